package rewrite

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// ApplyPEFT merges a HuggingFace PEFT LoRA adapter directory
// (adapter_config.json + adapter_model.safetensors) into the model's
// weights, without injecting a branch first.
//
// The adapter must be one PEFT would load: every LoRA module in the file
// must be selected by the config's target_modules, exclude_modules,
// layers_to_transform and layers_pattern (evaluated on the module paths of
// the keys, as PEFT evaluates them on the torch model), else it is refused
// with the reason. Each module path (the key after "base_model.model.",
// without the LoRA suffix) is renamed by opts.Map and the preset
// (opts.Preset), then goes to the layer whose path is the same, or is a
// dotted suffix of it, or has it as a dotted suffix, provided the leading
// segments only one side has contain no number: "model.layers.0.q_proj"
// matches a layer "layers.0.q_proj" or "base.model.layers.0.q_proj", but
// "model.decoder.layers.1.fc1" never matches "fc1". The longest match
// wins; a tie, or a layer claimed by two modules, is an error. Modules
// matching no layer are an *UnmatchedError unless opts.AllowPartial.
//
// Linear LoRA: PEFT's delta W[out, in] += scaling·B·A is W[in, out] +=
// scaling·Aᵀ·Bᵀ in ONNX's x·W orientation, added as the stored weight is
// oriented. fan_in_fan_out (GPT-2's Conv1D) only says how torch stores the
// base weight, so the delta is placed by the ONNX layer's orientation either
// way. Embedding LoRA (lora_embedding_A [r, vocab], lora_embedding_B [dim,
// r]) goes to a Gather on a constant table [vocab, dim], which gets
// scaling·Aᵀ·Bᵀ; a table shared with a tied lm_head is copied first, so
// the head keeps the base weights, as in PEFT's unmerged forward.
// modules_to_save tensors replace the matched layer's weight (and bias, the
// Add after a MatMul or Gemm's C). r, lora_alpha, use_rslora, rank_pattern
// and alpha_pattern are honoured; DoRA, LoRA biases, convolution adapters
// and base-altering initializations are refused (errors wrapping
// export.ErrUnsupported). The arithmetic, rounding, weight sharing and
// options are Merge's; opts.Only names PEFT modules like Targets do (a path
// or a dotted suffix of it).
func ApplyPEFT(m *graph.Model, adapterDir string, opts MergeOptions) (*MergeReport, error) {
	p, err := planPEFT(m, adapterDir, opts)
	if err != nil {
		return nil, err
	}
	return p.applyInMemory()
}

// ApplyPEFTFile applies a PEFT adapter directory to the model at src (as
// ApplyPEFT does) and saves the result to dst, streaming weights like
// MergeFile.
func ApplyPEFTFile(src, adapterDir, dst string, opts MergeOptions, save graph.SaveOptions) (*MergeReport, error) {
	m, err := graph.LoadLazy(src)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	p, err := planPEFT(m, adapterDir, opts)
	if err != nil {
		return nil, err
	}
	return p.save(dst, save)
}

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
	ad, err := export.ReadPEFTDir(dir)
	if err != nil {
		return nil, err
	}
	fail := func(err error) error { return fmt.Errorf("peft adapter %s: %w", dir, err) }
	if err := checkPEFTSelection(ad); err != nil {
		return nil, fail(err)
	}
	pm := &PEFTMatch{Config: ad.Config, Producer: m.Proto.GetProducerName()}
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

// planPEFT matches the adapter's modules to layers and plans their merge.
func planPEFT(m *graph.Model, dir string, opts MergeOptions) (*plan, error) {
	// pissa/olora adapters: rebuild the residual init (init_peft.go).
	if p, err := planResidualInit(m, dir, opts); p != nil || err != nil {
		return p, err
	}
	pm, err := MatchPEFT(m, dir, opts)
	if err != nil {
		return nil, err
	}
	top := m.Graph()
	p, err := newPlan(m, top, opts, "peft")
	if err != nil {
		return nil, err
	}
	if un := pm.Unmatched(); len(un) > 0 {
		if !opts.AllowPartial {
			return nil, unmatchedError(dir, pm, m)
		}
		for _, a := range un {
			p.report.Unmatched = append(p.report.Unmatched, a.Module)
		}
	}
	var todo []*PEFTAssignment
	for i := range pm.Assignments {
		if a := &pm.Assignments[i]; a.layer != nil {
			todo = append(todo, a)
		}
	}
	if len(todo) == 0 {
		return nil, fmt.Errorf("peft adapter %s: none of its %d modules matches a layer of the model", dir, len(pm.Assignments))
	}
	for _, a := range todo {
		if a.Problem != "" {
			return nil, fmt.Errorf("peft module %s: %s", a.Module, a.Problem)
		}
	}
	sort.SliceStable(todo, func(i, j int) bool { return todo[i].order < todo[j].order })
	for _, a := range todo {
		var err error
		if a.Kind == KindModulesToSave {
			err = p.addSaved(a, pm.Config)
		} else {
			err = p.addPEFTLoRA(a)
		}
		if err != nil {
			return nil, fmt.Errorf("peft module %s -> layer %s: %w", a.Module, a.Layer, err)
		}
	}
	return p, nil
}

// addPEFTLoRA plans one LoRA (or embedding LoRA) module's delta.
func (p *plan) addPEFTLoRA(as *PEFTAssignment) error {
	l, mod := as.layer, as.mod
	if l.Op == opConv {
		return p.addPEFTConv(as)
	}
	// PEFT's A [r, in] and B [out, r] (for embeddings [r, vocab] and
	// [dim, r]) are the transposes of the x·W factors A [in, r], B [r, out].
	r := mod.Rank
	a := make([]float64, mod.InFeatures*r)
	for k := 0; k < r; k++ {
		for i := 0; i < mod.InFeatures; i++ {
			a[i*r+k] = float64(mod.A[k*mod.InFeatures+i])
		}
	}
	b := make([]float64, r*mod.OutFeatures)
	for j := 0; j < mod.OutFeatures; j++ {
		for k := 0; k < r; k++ {
			b[k*mod.OutFeatures+j] = float64(mod.B[j*r+k])
		}
	}
	rep := &MergedLayer{Module: l.Module, PEFTModule: mod.Name, Rank: r, Alpha: mod.Alpha, Scaling: mod.Scaling}
	if l.Quant != nil {
		return p.addQuantUpdate(l, a, b, r, mod.Scaling, rep)
	}
	if mod.Magnitude != nil {
		return p.addPEFTDoRA(l, mod, a, b, rep)
	}
	return p.addUpdate(l, a, b, r, mod.Scaling, rep)
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

// checkPEFTSelection refuses an adapter whose keys PEFT would not load:
// a LoRA module not selected by the config, or a selection PEFT refuses.
func checkPEFTSelection(ad *export.PEFTAdapter) error {
	cfg := ad.Config
	so, checkable, err := peftSelectOptions(cfg)
	if err != nil {
		return err
	}
	if !checkable || len(ad.Modules) == 0 {
		return nil
	}
	sel, err := NewSelector(so)
	if err != nil {
		return fmt.Errorf("%s: %w", export.PEFTConfigFile, err)
	}
	var bad []string
	for _, mod := range ad.Modules {
		if !sel.Matches(Candidate{Module: mod.Name}) {
			bad = append(bad, mod.Name)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	what := describePEFTSelection(cfg)
	if len(bad) == len(ad.Modules) {
		return fmt.Errorf("none of its %d modules is selected by %s in %s, so PEFT would refuse the config (target modules not found), e.g. %s", len(bad), what, export.PEFTConfigFile, bad[0])
	}
	return fmt.Errorf("%d of its %d modules are not selected by %s in %s, so PEFT would not load their keys, e.g. %s", len(bad), len(ad.Modules), what, export.PEFTConfigFile, bad[0])
}

// peftSelectOptions turns the config's selection fields into a Selector's
// options. checkable is false when the selection cannot be evaluated on
// module paths alone: no target_modules (PEFT then uses a per-architecture
// default) or "all-linear" (depends on layer types).
func peftSelectOptions(cfg *export.PEFTConfig) (so SelectOptions, checkable bool, err error) {
	so = SelectOptions{Rank: 1, Alpha: 1, Layers: cfg.LayersToTransform}
	tm := cfg.TargetModules
	switch {
	case tm.IsRegex && strings.EqualFold(tm.Regex, AllLinear):
		return so, false, nil
	case tm.IsRegex:
		so.TargetRegex = tm.Regex
	case len(tm.Names) == 0:
		return so, false, nil
	default:
		so.Targets = tm.Names
	}
	if raw, ok := cfg.Extra["exclude_modules"]; ok {
		var s string
		var list []string
		switch {
		case string(raw) == "null":
		case json.Unmarshal(raw, &s) == nil:
			so.ExcludeRegex = s
		case json.Unmarshal(raw, &list) == nil:
			so.Exclude = list
		default:
			return so, false, fmt.Errorf("%s: exclude_modules must be a string or a list of strings", export.PEFTConfigFile)
		}
	}
	if raw, ok := cfg.Extra["layers_pattern"]; ok && len(so.Layers) > 0 {
		var s string
		var list []string
		switch {
		case string(raw) == "null":
		case json.Unmarshal(raw, &s) == nil:
			if s != "" {
				so.LayersPattern = []string{s}
			}
		case json.Unmarshal(raw, &list) == nil:
			so.LayersPattern = list
		default:
			return so, false, fmt.Errorf("%s: layers_pattern must be a string or a list of strings", export.PEFTConfigFile)
		}
	}
	if tm.IsRegex && len(so.Layers) > 0 {
		return so, false, fmt.Errorf("%s: layers_to_transform cannot be used with a string target_modules (PEFT refuses this config)", export.PEFTConfigFile)
	}
	return so, true, nil
}

// describePEFTSelection says what the config selects, for messages.
func describePEFTSelection(cfg *export.PEFTConfig) string {
	var s string
	if cfg.TargetModules.IsRegex {
		s = fmt.Sprintf("target_modules %q", cfg.TargetModules.Regex)
	} else {
		s = fmt.Sprintf("target_modules %q", cfg.TargetModules.Names)
	}
	if len(cfg.LayersToTransform) > 0 {
		s += fmt.Sprintf(" with layers_to_transform %v", cfg.LayersToTransform)
	}
	if raw, ok := cfg.Extra["exclude_modules"]; ok && string(raw) != "null" {
		s += " and exclude_modules " + string(raw)
	}
	return s
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
