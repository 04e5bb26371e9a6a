package rewrite

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// PEFT assignment kinds.
const (
	KindLoRA          = "lora"
	KindEmbedding     = "embedding"
	KindModulesToSave = "modules_to_save"
)

// PEFTAssignment is one adapter module and the layer it goes to.
type PEFTAssignment struct {
	// Kind is KindLoRA, KindEmbedding or KindModulesToSave.
	Kind string `json:"kind"`
	// Module is the module path in the adapter's keys; Mapped is what the
	// module map made of it (equal to Module when unchanged).
	Module string `json:"module"`
	Mapped string `json:"mapped"`
	// Keys are the tensors in the file, with their shapes.
	Keys   []string `json:"keys"`
	Shapes [][]int  `json:"shapes"`
	// Layer is the ONNX layer's module path ("" when unmatched), Op its
	// node type (MatMul, Gemm, Gather), LayerShape its [in, out] (for a
	// Gather: [vocab, dim]) and Weight the constant it reads.
	Layer      string  `json:"layer,omitempty"`
	Op         string  `json:"op,omitempty"`
	LayerShape []int64 `json:"layer_shape,omitempty"`
	Weight     string  `json:"weight,omitempty"`
	// Rank, Alpha and Scaling are the LoRA module's (zero for
	// modules_to_save).
	Rank    int     `json:"rank,omitempty"`
	Alpha   float64 `json:"alpha,omitempty"`
	Scaling float64 `json:"scaling,omitempty"`
	// Problem says why the module cannot be applied to its layer (sizes).
	Problem string `json:"problem,omitempty"`

	layer *Layer
	order int // the layer's position among the model's targets
	mod   *export.PEFTModule
	saved []*export.PEFTSaved
}

// PEFTMatch is how an adapter's modules map onto a model's layers.
type PEFTMatch struct {
	// Preset is the module map preset used ("" for none) and PresetNote
	// what it is for.
	Preset     string `json:"preset,omitempty"`
	PresetNote string `json:"preset_note,omitempty"`
	// Producer is the model's producer_name.
	Producer string `json:"producer,omitempty"`
	// Assignments lists every module of the adapter, matched or not.
	Assignments []PEFTAssignment `json:"assignments"`
	// Config is the adapter's configuration.
	Config *export.PEFTConfig `json:"-"`

	adapter *export.PEFTAdapter // the modules the assignments point into
}

// Unmatched returns the assignments that found no layer.
func (pm *PEFTMatch) Unmatched() []PEFTAssignment {
	var out []PEFTAssignment
	for _, a := range pm.Assignments {
		if a.Layer == "" {
			out = append(out, a)
		}
	}
	return out
}

// UnmatchedError is returned when adapter modules match no layer.
type UnmatchedError struct {
	Dir   string
	Total int
	// Modules are the unmatched modules, each with the closest layer in
	// the same layer (same number segments), "" when there is none.
	Modules []UnmatchedModule
}

// UnmatchedModule is a module that matched no layer.
type UnmatchedModule struct {
	Module, Mapped, Closest string
}

// Error is one line: how many, the first, and its closest layer.
func (e *UnmatchedError) Error() string {
	u := e.Modules[0]
	s := fmt.Sprintf("peft adapter %s: %d of %d modules match no layer of the model, e.g. %s", e.Dir, len(e.Modules), e.Total, u.Module)
	if u.Mapped != u.Module {
		s += " (mapped to " + u.Mapped + ")"
	}
	if u.Closest != "" {
		s += "; closest layer: " + u.Closest
	}
	return s
}

// Details lists every unmatched module, one per line.
func (e *UnmatchedError) Details() string {
	var b strings.Builder
	for _, u := range e.Modules {
		fmt.Fprintf(&b, "  %s", u.Module)
		if u.Mapped != u.Module {
			fmt.Fprintf(&b, " -> %s", u.Mapped)
		}
		if u.Closest != "" {
			fmt.Fprintf(&b, " (closest layer: %s)", u.Closest)
		}
		b.WriteByte('\n')
	}
	return b.String()
}

// MatchPEFT reads an adapter directory and works out which layer each of
// its modules goes to, as ApplyPEFT would, without changing the model: a
// dry run. Errors are what ApplyPEFT refuses before matching (config,
// keys, selection, ambiguity); unmatched modules and size mismatches are
// reported in the result.
func MatchPEFT(m *graph.Model, dir string, opts MergeOptions) (*PEFTMatch, error) {
	return matchPEFT(m, dir, opts, false)
}

// matchPEFT is MatchPEFT; lazy leaves the factors in the adapter file
// (export.ReadPEFTDirLazy), open until the match's adapter is closed.
func matchPEFT(m *graph.Model, dir string, opts MergeOptions, lazy bool) (pm *PEFTMatch, err error) {
	read := export.ReadPEFTDir
	if lazy {
		read = export.ReadPEFTDirLazy
	}
	ad, err := read(dir)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			ad.Close()
		}
	}()
	fail := func(err error) error { return fmt.Errorf("peft adapter %s: %w", dir, err) }
	if err := checkPEFTSelection(ad); err != nil {
		return nil, fail(err)
	}
	pm = &PEFTMatch{Config: ad.Config, Producer: m.Proto.GetProducerName(), adapter: ad}
	rules := append([]MapRule(nil), opts.Map...)
	switch opts.Preset {
	case "", "auto":
		if pr := PresetFor(pm.Producer); pr != nil {
			pm.Preset, pm.PresetNote = pr.Name, pr.Note
			rules = append(rules, pr.Rules...)
		}
	case "none":
	default:
		pr, err := PresetNamed(opts.Preset)
		if err != nil {
			return nil, err
		}
		pm.Preset, pm.PresetNote = pr.Name, pr.Note
		rules = append(rules, pr.Rules...)
	}
	for i := range ad.Modules {
		mod := &ad.Modules[i]
		kind := KindLoRA
		if mod.Embedding {
			kind = KindEmbedding
		}
		pm.Assignments = append(pm.Assignments, PEFTAssignment{
			Kind: kind, Module: mod.Name, Mapped: applyMapRules(rules, mod.Name),
			Keys: []string{mod.KeyA, mod.KeyB}, Shapes: [][]int{{mod.Rank, mod.InFeatures}, {mod.OutFeatures, mod.Rank}},
			Rank: mod.Rank, Alpha: mod.Alpha, Scaling: mod.Scaling, mod: mod,
		})
		if mod.Embedding {
			pm.Assignments[len(pm.Assignments)-1].Shapes = [][]int{{mod.Rank, mod.InFeatures}, {mod.OutFeatures, mod.Rank}}
		}
	}
	bySaved := map[string]int{}
	for i := range ad.Saved {
		sv := &ad.Saved[i]
		j, ok := bySaved[sv.Module]
		if !ok {
			j = len(pm.Assignments)
			bySaved[sv.Module] = j
			pm.Assignments = append(pm.Assignments, PEFTAssignment{Kind: KindModulesToSave, Module: sv.Module, Mapped: applyMapRules(rules, sv.Module)})
		}
		a := &pm.Assignments[j]
		a.Keys = append(a.Keys, sv.Key)
		a.Shapes = append(a.Shapes, sv.Shape)
		a.saved = append(a.saved, sv)
	}
	pm.Assignments, err = onlyAssignments(pm.Assignments, opts.Only)
	if err != nil {
		return nil, fail(err)
	}
	layers, _ := FindLayers(m)
	targets := append(append([]*Layer(nil), layers...), findEmbeddings(m)...)
	if err := assignLayers(pm.Assignments, targets); err != nil {
		return nil, fail(err)
	}
	for i := range pm.Assignments {
		a := &pm.Assignments[i]
		if a.layer != nil {
			a.Problem = assignmentProblem(a, ad.Config)
		}
	}
	return pm, nil
}

// assignmentProblem checks that a module's tensors fit its layer.
func assignmentProblem(a *PEFTAssignment, cfg *export.PEFTConfig) string {
	l := a.layer
	if a.Kind != KindModulesToSave {
		mod := a.mod
		if why := convAssignmentProblem(mod, l); why != "" {
			return why
		}
		if int64(mod.InFeatures) == l.In && int64(mod.OutFeatures) == l.Out {
			return ""
		}
		what := fmt.Sprintf("make a delta for %d inputs and %d outputs, but layer %s has %d inputs and %d outputs", mod.InFeatures, mod.OutFeatures, l.Module, l.In, l.Out)
		if a.Kind == KindEmbedding {
			what = fmt.Sprintf("make a delta for a [%d, %d] embedding table, but layer %s's table is [%d, %d]", mod.InFeatures, mod.OutFeatures, l.Module, l.In, l.Out)
		}
		hint := ""
		if int64(mod.InFeatures) == l.Out && int64(mod.OutFeatures) == l.In {
			hint = " (in and out swapped: is this adapter for another export of the model?)"
		}
		return fmt.Sprintf("%s %v and %s %v %s%s", suffixOf(mod.KeyA), mod.ShapeA(), suffixOf(mod.KeyB), mod.ShapeB(), what, hint)
	}
	for _, sv := range a.saved {
		switch sv.Param {
		case "weight":
			if _, err := savedWeightLayout(sv, l, cfg); err != nil {
				return err.Error()
			}
		case "bias":
			if l.Op == opGather || len(sv.Shape) != 1 || int64(sv.Shape[0]) != l.Out {
				return fmt.Sprintf("modules_to_save bias %s %v does not fit layer %s with %d outputs", sv.Key, sv.Shape, l.Module, l.Out)
			}
		default:
			return fmt.Sprintf("modules_to_save tensor %s: only weight and bias of a Linear or Embedding module can be applied (the module's layer is %s %s)", sv.Key, l.Op, l.Module)
		}
	}
	return ""
}

// suffixOf names a key by its LoRA part ("lora_A.weight") for messages.
func suffixOf(key string) string {
	for _, s := range []string{"lora_embedding_A", "lora_embedding_B", "lora_A", "lora_B"} {
		if i := strings.LastIndex(key, "."+s); i >= 0 {
			return key[i+1:]
		}
	}
	return key
}

// onlyAssignments keeps the modules selected by only, each entry a module
// path or a dotted suffix of one (PEFT's target rule); an entry that
// selects nothing is an error.
func onlyAssignments(as []PEFTAssignment, only []string) ([]PEFTAssignment, error) {
	if len(only) == 0 {
		return as, nil
	}
	var names []string
	for _, o := range only {
		if o = strings.TrimSpace(o); o == "" {
			return nil, errors.New("an empty module name was given to select")
		}
		names = append(names, o)
	}
	var kept []PEFTAssignment
	used := map[string]bool{}
	for _, a := range as {
		for _, o := range names {
			if a.Module == o || strings.HasSuffix(a.Module, "."+o) {
				used[o] = true
				kept = append(kept, a)
				break
			}
		}
	}
	var missing []string
	for _, o := range names {
		if !used[o] {
			missing = append(missing, o)
		}
	}
	if len(missing) > 0 {
		var all []string
		for _, a := range as {
			all = append(all, a.Module)
		}
		return nil, fmt.Errorf("no module %s in the adapter; it has: %s", strings.Join(missing, ", "), strings.Join(all, ", "))
	}
	return kept, nil
}

// pathScore is how well an adapter module path (after the map) matches a
// layer path: high for the same path, the number of shared segments when
// one is a dotted suffix of the other and the leading segments only one has
// contain no number (so no layer index is dropped), else 0.
func pathScore(name, layer string) int {
	if name == layer {
		return 1 << 20
	}
	short, long := name, layer
	if len(short) > len(long) {
		short, long = long, short
	}
	if !strings.HasSuffix(long, "."+short) {
		return 0
	}
	for _, seg := range strings.Split(long[:len(long)-len(short)-1], ".") {
		if isDigits(seg) {
			return 0
		}
	}
	return strings.Count(short, ".") + 1
}

// assignLayers gives each assignment its best layer of the right kind
// (Gather for embedding LoRA, MatMul/Gemm for LoRA, either for
// modules_to_save). Ties and layers claimed twice are errors.
func assignLayers(as []PEFTAssignment, targets []*Layer) error {
	claimed := map[*Layer][]string{}
	var problems []string
	for i := range as {
		a := &as[i]
		best, bestL := 0, []*Layer(nil)
		for _, l := range targets {
			gather := l.Op == opGather
			if (a.Kind == KindEmbedding && !gather) || (a.Kind == KindLoRA && gather) {
				continue
			}
			s := pathScore(a.Mapped, l.Module)
			switch {
			case s > best:
				best, bestL = s, []*Layer{l}
			case s == best && s > 0:
				bestL = append(bestL, l)
			}
		}
		switch len(bestL) {
		case 0:
		case 1:
			l := bestL[0]
			a.order = slices.Index(targets, l)
			a.layer, a.Layer, a.Op, a.LayerShape = l, l.Module, l.Op, []int64{l.In, l.Out}
			if l.Weight != nil {
				a.Weight = l.Weight.Name
			}
			claimed[l] = append(claimed[l], a.Module)
		default:
			var names []string
			for _, l := range bestL {
				names = append(names, l.Module)
			}
			problems = append(problems, fmt.Sprintf("module %s matches %d layers equally: %s", a.Module, len(names), strings.Join(names, ", ")))
		}
	}
	for l, names := range claimed {
		if len(names) > 1 {
			sort.Strings(names)
			problems = append(problems, fmt.Sprintf("layer %s is matched by %d modules: %s", l.Module, len(names), strings.Join(names, ", ")))
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return fmt.Errorf("ambiguous module mapping (give a module map): %s", strings.Join(problems, "; "))
	}
	return nil
}

// numberSegments returns a path's all-digit segments, joined.
func numberSegments(path string) string {
	var out []string
	for _, s := range strings.Split(path, ".") {
		if isDigits(s) {
			out = append(out, s)
		}
	}
	return strings.Join(out, ".")
}

// unmatchedError builds the error for modules that found no layer, each
// with the layer of the same layer index sharing the most trailing
// segments.
func unmatchedError(dir string, pm *PEFTMatch, m *graph.Model) error {
	layers, _ := FindLayers(m)
	targets := append(layers, findEmbeddings(m)...)
	e := &UnmatchedError{Dir: dir, Total: len(pm.Assignments)}
	for _, a := range pm.Unmatched() {
		u := UnmatchedModule{Module: a.Module, Mapped: a.Mapped}
		idx := numberSegments(a.Mapped)
		score := 0
		for _, l := range targets {
			if numberSegments(l.Module) != idx {
				continue
			}
			if s := commonSuffix(a.Mapped, l.Module); s > score {
				u.Closest, score = l.Module, s
			}
		}
		e.Modules = append(e.Modules, u)
	}
	return e
}

// commonSuffix counts the trailing dotted segments a and b have in common.
func commonSuffix(a, b string) int {
	sa, sb := strings.Split(a, "."), strings.Split(b, ".")
	n := 0
	for n < len(sa) && n < len(sb) && sa[len(sa)-1-n] == sb[len(sb)-1-n] {
		n++
	}
	return n
}
