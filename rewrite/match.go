package rewrite

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
)

// AllLinear is the Targets value that selects every candidate except the
// output heads, like PEFT's target_modules="all-linear" (compared without
// case, as PEFT does). Every candidate is a linear layer here, so the only
// thing left to skip is the head PEFT skips via get_output_embeddings.
const AllLinear = "all-linear"

// maxListedModules bounds how many module paths an error lists, so that a
// 100-layer model does not print thousands of lines.
const maxListedModules = 20

// regexNote is appended to regex errors: users copy patterns from PEFT
// configs, which are Python regexes, and Go's RE2 lacks a few features.
const regexNote = "Go RE2 syntax: no backreferences or lookarounds"

// PatternEntry is one entry of a PEFT rank_pattern or alpha_pattern: a regex
// Key and the value used for the modules it matches. Patterns are kept as an
// ordered slice because PEFT takes the first matching key in dict order, and
// a Go map has no order.
type PatternEntry struct {
	// Key is a regex matched against the whole module path the way PEFT's
	// get_pattern_key does: re.match(rf"(.*\.)?({key})$", path), i.e. the key
	// must match a dot-separated suffix of the path ("q_proj" matches
	// "model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj" matches
	// only layer 0). Go's RE2 syntax: no backreferences or lookarounds.
	Key string
	// Value is the rank (a positive whole number) or the alpha.
	Value float64
}

// ParsePatterns parses CLI "regex=value" strings into ordered pattern
// entries, keeping the input order (PEFT iterates rank_pattern in dict
// order). The split is at the last "=" since values never contain one. A key
// given twice keeps its first position and takes the last value, which is
// what building a Python dict from the same pairs does. Each string holds one
// pattern: commas are not separators, because regexes use them ("{1,3}").
func ParsePatterns(list []string) ([]PatternEntry, error) {
	var out []PatternEntry
	pos := map[string]int{}
	for _, s := range list {
		i := strings.LastIndexByte(s, '=')
		if i < 0 {
			return nil, fmt.Errorf("pattern %q: want regex=value", s)
		}
		key, val := strings.TrimSpace(s[:i]), strings.TrimSpace(s[i+1:])
		if key == "" {
			return nil, fmt.Errorf("pattern %q: empty regex before '='", s)
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
			return nil, fmt.Errorf("pattern %q: value %q is not a finite number", s, val)
		}
		if _, err := compilePatternKey(key); err != nil {
			return nil, fmt.Errorf("pattern %q: %w", s, err)
		}
		if j, ok := pos[key]; ok {
			out[j].Value = v
			continue
		}
		pos[key] = len(out)
		out = append(out, PatternEntry{Key: key, Value: v})
	}
	return out, nil
}

// compilePatternKey builds PEFT's get_pattern_key regex for key. The key is
// wrapped in a group, as PEFT does, so that "q|v" means "(q|v)" and not
// "...q" or "v" at the top level.
func compilePatternKey(key string) (*regexp.Regexp, error) {
	re, err := regexp.Compile(`^(?:.*\.)?(?:` + key + `)$`)
	if err != nil {
		return nil, fmt.Errorf("invalid regex %q: %v (%s)", key, err, regexNote)
	}
	return re, nil
}

// SelectOptions says which candidate modules get a LoRA adapter and with
// which rank and alpha, with the semantics of PEFT's LoraConfig fields named
// on each option.
type SelectOptions struct {
	// Targets are module names (PEFT target_modules as a list): a module is
	// targeted when its path equals an entry or ends with "." + entry, so
	// "q_proj" and "self_attn.q_proj" both match "model.layers.0.self_attn.q_proj"
	// but "proj" does not. AllLinear ("all-linear") selects every candidate
	// that is not an output head. Blank entries are ignored.
	Targets []string
	// TargetRegex must match the whole module path (PEFT target_modules as a
	// string: re.fullmatch). It adds to Targets when both are set. Go's RE2
	// syntax: no backreferences or lookarounds.
	TargetRegex string
	// Exclude takes modules out with the same rule as Targets (PEFT
	// exclude_modules as a list); exclusion wins over any target.
	Exclude []string
	// ExcludeRegex takes out modules whose whole path it matches (PEFT
	// exclude_modules as a string).
	ExcludeRegex string
	// Layers keeps only modules in these layers (PEFT layers_to_transform).
	// The layer index is the first number segment after a layer container:
	// PEFT's re.match(r".*?\.[^.]*\.(\d+)\.", path), so "model.layers.3.mlp.up_proj"
	// is in layer 3 and "model.layers.3.experts.1.w1" too. A module with no
	// layer index is not selected. As in PEFT, the filter applies to modules
	// targeted by a name suffix; a Targets entry equal to the whole path names
	// that module directly and is kept, and Layers cannot be combined with
	// TargetRegex or AllLinear (PEFT refuses layers_to_transform with a string
	// target_modules). Unlike PEFT the layer container may start the path
	// ("layers.0.fc1"): PEFT always sees a root module name first, while ONNX
	// exports of a submodule often start at the container.
	Layers []int
	// LayersPattern names the layer containers to read the index after (PEFT
	// layers_pattern, e.g. "layers", "h", "layer", "blocks"); each is a regex.
	// Empty means any container, as in PEFT. It needs Layers.
	LayersPattern []string
	// RankPattern overrides Rank for the modules matched by the first entry
	// whose Key matches (PEFT rank_pattern). Values must be positive whole
	// numbers.
	RankPattern []PatternEntry
	// AlphaPattern overrides Alpha the same way (PEFT alpha_pattern).
	AlphaPattern []PatternEntry
	// Rank is the LoRA rank r; it must be positive.
	Rank int
	// Alpha is lora_alpha; the adapter output is scaled by Alpha/Rank. It
	// must be finite and non-zero: a zero alpha makes the adapter inert.
	Alpha float64
}

// Candidate is a layer LoRA could be attached to.
type Candidate struct {
	// Module is the layer's module path, as ModulePath derives it.
	Module string
	// OutputHead marks a layer whose output is a graph output (an lm_head or
	// classifier): AllLinear skips it, as PEFT skips the output embeddings.
	// Naming it in Targets still selects it.
	OutputHead bool
	// NotLinear marks a Conv layer: AllLinear leaves it out, as PEFT's
	// all-linear does; naming it selects it.
	NotLinear bool
}

// Selection is a candidate chosen for an adapter, with its resolved rank and
// alpha. Several selections may share a Module when one layer is called more
// than once; they then share one adapter.
type Selection struct {
	// Index is the position of the candidate in the slice given to Select.
	Index int
	// Module is the candidate's module path.
	Module string
	// Rank is the LoRA rank for this module (Rank, or a RankPattern value).
	Rank int
	// Alpha is lora_alpha for this module (Alpha, or an AlphaPattern value).
	Alpha float64
}

// compiledPattern is a PatternEntry with its regex built.
type compiledPattern struct {
	re    *regexp.Regexp
	value float64
}

// Selector is a validated, compiled SelectOptions. Build it once with
// NewSelector and use it for every candidate.
type Selector struct {
	opts        SelectOptions
	targets     []string
	exclude     []string
	allLinear   bool
	targetRE    *regexp.Regexp
	excludeRE   *regexp.Regexp
	layers      map[int]bool
	layerREs    []*regexp.Regexp
	rankPats    []compiledPattern
	alphaPats   []compiledPattern
	description string
}

// NewSelector validates opts and compiles its regexes. Errors name the
// offending option: no target at all, Rank <= 0, a zero or non-finite Alpha,
// an invalid regex, a rank pattern that is not a positive whole number, or
// Layers combined with TargetRegex/AllLinear.
func NewSelector(opts SelectOptions) (*Selector, error) {
	s := &Selector{opts: opts}
	if opts.Rank <= 0 {
		return nil, fmt.Errorf("rank must be a positive integer, got %d", opts.Rank)
	}
	if opts.Alpha == 0 || math.IsNaN(opts.Alpha) || math.IsInf(opts.Alpha, 0) {
		return nil, fmt.Errorf("alpha must be a finite non-zero number (PEFT's default lora_alpha is 8), got %v", opts.Alpha)
	}
	for _, t := range opts.Targets {
		t = strings.TrimSpace(t)
		switch {
		case t == "":
		case strings.EqualFold(t, AllLinear):
			s.allLinear = true
		default:
			s.targets = append(s.targets, t)
		}
	}
	for _, t := range opts.Exclude {
		if t = strings.TrimSpace(t); t != "" {
			s.exclude = append(s.exclude, t)
		}
	}
	var err error
	if opts.TargetRegex != "" {
		if s.targetRE, err = compileFull(opts.TargetRegex); err != nil {
			return nil, fmt.Errorf("target regex: %w", err)
		}
	}
	if opts.ExcludeRegex != "" {
		if s.excludeRE, err = compileFull(opts.ExcludeRegex); err != nil {
			return nil, fmt.Errorf("exclude regex: %w", err)
		}
	}
	if !s.allLinear && len(s.targets) == 0 && s.targetRE == nil {
		return nil, errors.New(`no target modules given: name modules (e.g. q_proj,v_proj), use "all-linear", or give a target regex`)
	}
	if len(opts.Layers) > 0 {
		if s.targetRE != nil || s.allLinear {
			return nil, errors.New(`layers cannot be combined with a target regex or "all-linear" (as in PEFT, layers_to_transform needs a list of module names); put the layer in the regex instead, e.g. .*\.layers\.(0|1)\..*`)
		}
		s.layers = map[int]bool{}
		for _, l := range opts.Layers {
			if l < 0 {
				return nil, fmt.Errorf("layer index %d is negative", l)
			}
			s.layers[l] = true
		}
		pats := opts.LayersPattern
		if len(pats) == 0 {
			pats = []string{`[^.]*`}
		}
		for _, p := range pats {
			re, err := regexp.Compile(`^(?:.*?\.)?(?:` + p + `)\.(\d+)\.`)
			if err != nil {
				return nil, fmt.Errorf("layers pattern %q: %v (%s)", p, err, regexNote)
			}
			s.layerREs = append(s.layerREs, re)
		}
	} else if len(opts.LayersPattern) > 0 {
		return nil, errors.New("a layers pattern needs layer indices to select (as in PEFT, layers_pattern needs layers_to_transform)")
	}
	if s.rankPats, err = compilePatterns(opts.RankPattern); err != nil {
		return nil, fmt.Errorf("rank pattern: %w", err)
	}
	for _, p := range opts.RankPattern {
		if p.Value <= 0 || p.Value != math.Trunc(p.Value) || p.Value > math.MaxInt32 {
			return nil, fmt.Errorf("rank pattern %q: rank %v is not a positive whole number", p.Key, p.Value)
		}
	}
	if s.alphaPats, err = compilePatterns(opts.AlphaPattern); err != nil {
		return nil, fmt.Errorf("alpha pattern: %w", err)
	}
	for _, p := range opts.AlphaPattern {
		if math.IsNaN(p.Value) || math.IsInf(p.Value, 0) {
			return nil, fmt.Errorf("alpha pattern %q: alpha %v is not finite", p.Key, p.Value)
		}
	}
	s.description = s.describe()
	return s, nil
}

// compileFull compiles a regex that must match a whole module path, like
// Python's re.fullmatch.
func compileFull(expr string) (*regexp.Regexp, error) {
	re, err := regexp.Compile(`^(?:` + expr + `)$`)
	if err != nil {
		return nil, fmt.Errorf("invalid regex %q: %v (%s)", expr, err, regexNote)
	}
	return re, nil
}

// compilePatterns compiles pattern keys, keeping their order.
func compilePatterns(list []PatternEntry) ([]compiledPattern, error) {
	out := make([]compiledPattern, 0, len(list))
	for _, p := range list {
		re, err := compilePatternKey(p.Key)
		if err != nil {
			return nil, err
		}
		out = append(out, compiledPattern{re: re, value: p.Value})
	}
	return out, nil
}

// nameMatches is PEFT's list rule: key == t or key.endswith("." + t).
func nameMatches(module string, names []string) (exact, suffix bool) {
	for _, t := range names {
		if module == t {
			exact = true
		} else if strings.HasSuffix(module, "."+t) {
			suffix = true
		}
	}
	return exact, suffix
}

// layerIndex returns the layer a module path is in: the number after the
// first segment matched by one of the layer patterns, tried in order.
func (s *Selector) layerIndex(module string) (int, bool) {
	for _, re := range s.layerREs {
		if m := re.FindStringSubmatch(module); m != nil {
			n, err := strconv.Atoi(m[1])
			if err != nil {
				return 0, false
			}
			return n, true
		}
	}
	return 0, false
}

// verdict is why a candidate was or was not selected; Select uses it to
// explain an empty selection.
type verdict int

const (
	vSelected verdict = iota
	vNoTarget
	vExcluded
	vOtherLayer
	vOutputHead
)

// judge applies PEFT's check_target_module_exists order: exclusion first,
// then the regex or name targets, then the layer filter for name-suffix
// matches.
func (s *Selector) judge(c Candidate) verdict {
	targeted := s.targetRE != nil && s.targetRE.MatchString(c.Module)
	exact, suffix := nameMatches(c.Module, s.targets)
	targeted = targeted || exact
	headSkipped := false
	if s.allLinear {
		if c.OutputHead {
			headSkipped = true
		} else if !c.NotLinear {
			targeted = true
		}
	}
	layerMiss := false
	if !targeted && suffix {
		if s.layers == nil {
			targeted = true
		} else if l, ok := s.layerIndex(c.Module); ok && s.layers[l] {
			targeted = true
		} else {
			layerMiss = true
		}
	}
	if !targeted {
		switch {
		case layerMiss:
			return vOtherLayer
		case headSkipped:
			return vOutputHead
		}
		return vNoTarget
	}
	if s.excludeRE != nil && s.excludeRE.MatchString(c.Module) {
		return vExcluded
	}
	if exact, suffix := nameMatches(c.Module, s.exclude); exact || suffix {
		return vExcluded
	}
	return vSelected
}

// Matches reports whether c is selected.
func (s *Selector) Matches(c Candidate) bool { return s.judge(c) == vSelected }

// RankAlpha returns the rank and alpha for a module path: the value of the
// first RankPattern/AlphaPattern entry that matches (PEFT get_pattern_key),
// else Rank/Alpha.
func (s *Selector) RankAlpha(module string) (int, float64) {
	rank, alpha := s.opts.Rank, s.opts.Alpha
	for _, p := range s.rankPats {
		if p.re.MatchString(module) {
			rank = int(p.value)
			break
		}
	}
	for _, p := range s.alphaPats {
		if p.re.MatchString(module) {
			alpha = p.value
			break
		}
	}
	return rank, alpha
}

// Select returns the selected candidates in candidate order, with their rank
// and alpha. It fails when there is no candidate or nothing is selected; the
// error then lists the module paths the model has (the first 20 and a count)
// and how many candidates were left out by exclusion, layers or the output
// head rule.
func (s *Selector) Select(cands []Candidate) ([]Selection, error) {
	if len(cands) == 0 {
		return nil, errors.New("the model has no layer to adapt (no MatMul or Gemm with a constant weight)")
	}
	var out []Selection
	counts := map[verdict]int{}
	for i, c := range cands {
		v := s.judge(c)
		counts[v]++
		if v != vSelected {
			continue
		}
		r, a := s.RankAlpha(c.Module)
		out = append(out, Selection{Index: i, Module: c.Module, Rank: r, Alpha: a})
	}
	if len(out) > 0 {
		return out, nil
	}
	var why []string
	if n := counts[vExcluded]; n > 0 {
		why = append(why, fmt.Sprintf("%d matched but were excluded", n))
	}
	if n := counts[vOtherLayer]; n > 0 {
		why = append(why, fmt.Sprintf("%d matched in layers other than %v", n, s.opts.Layers))
	}
	if n := counts[vOutputHead]; n > 0 {
		why = append(why, fmt.Sprintf("%d output head(s) are skipped by %s", n, AllLinear))
	}
	msg := "no module matched " + s.description
	if len(why) > 0 {
		msg += " (" + strings.Join(why, "; ") + ")"
	}
	return nil, fmt.Errorf("%s; %s", msg, listModules(cands))
}

// Unmatched returns the Targets entries (other than AllLinear) that match no
// candidate's module path by PEFT's name rule, ignoring exclusion and layers,
// in the order given. A CLI can warn about them: a misspelled target is
// otherwise silently ignored when another target matches.
func (s *Selector) Unmatched(cands []Candidate) []string {
	var out []string
	for _, t := range s.targets {
		found := false
		for _, c := range cands {
			if exact, suffix := nameMatches(c.Module, []string{t}); exact || suffix {
				found = true
				break
			}
		}
		if !found {
			out = append(out, t)
		}
	}
	return out
}

// describe says in words what the selector targets, for error messages.
func (s *Selector) describe() string {
	var parts []string
	names := s.targets
	if s.allLinear {
		names = append([]string{AllLinear}, names...)
	}
	if len(names) > 0 {
		parts = append(parts, fmt.Sprintf("target modules %q", names))
	}
	if s.targetRE != nil {
		parts = append(parts, fmt.Sprintf("target regex %q", s.opts.TargetRegex))
	}
	d := strings.Join(parts, " or ")
	if s.layers != nil {
		d += fmt.Sprintf(" in layers %v", s.opts.Layers)
	}
	return d
}

// listModules names the distinct module paths of cands, in order, cut to
// maxListedModules.
func listModules(cands []Candidate) string {
	seen := map[string]bool{}
	var mods []string
	for _, c := range cands {
		if !seen[c.Module] {
			seen[c.Module] = true
			mods = append(mods, c.Module)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "the model has %d module(s): ", len(mods))
	shown := mods
	if len(shown) > maxListedModules {
		shown = shown[:maxListedModules]
	}
	b.WriteString(strings.Join(shown, ", "))
	if n := len(mods) - len(shown); n > 0 {
		fmt.Fprintf(&b, ", ... and %d more", n)
	}
	return b.String()
}

// Select is NewSelector(opts) followed by Selector.Select(cands).
func Select(cands []Candidate, opts SelectOptions) ([]Selection, error) {
	s, err := NewSelector(opts)
	if err != nil {
		return nil, err
	}
	return s.Select(cands)
}
