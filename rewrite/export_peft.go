package rewrite

import (
	"errors"
	"fmt"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// ExportOptions tunes ExportPEFT.
type ExportOptions struct {
	// BaseModel is written as base_model_name_or_path (null when empty),
	// e.g. the HuggingFace id of the model the ONNX file was exported from.
	BaseModel string
	// TaskType is written as task_type, e.g. "CAUSAL_LM" (null when empty).
	TaskType string
	// Only exports the adapters of these modules; empty means all.
	Only []string
	// Prefix goes before each module path in the keys; nil means
	// export.PEFTKeyPrefix ("base_model.model."), what PeftModel loads.
	Prefix *string
}

// ExportReport describes a written PEFT adapter directory.
type ExportReport struct {
	// Source is where the adapters were found: "manifest" or "recognized".
	Source string `json:"source"`
	// Config is the adapter_config.json written.
	Config *export.PEFTConfig `json:"-"`
	// Modules are the exported module paths, in graph order.
	Modules []string `json:"modules"`
	// FanInFanOut is the fan_in_fan_out written: true when every exported
	// layer is a GPT-2 style Conv1D (see ExportPEFT).
	FanInFanOut bool `json:"fan_in_fan_out"`
	// Untrained is true when every lora_B is zero: the adapters are as
	// inject made them and change nothing.
	Untrained bool `json:"untrained,omitempty"`
	// Saved are the modules_to_save layers written in full.
	Saved []string `json:"modules_to_save,omitempty"`
}

// ExportPEFT writes the model's (trained) LoRA adapters as a PEFT adapter
// directory that peft.PeftModel.from_pretrained can load onto the original
// torch model, and that ApplyPEFT can merge into the base ONNX model with
// exactly the result Merge gives on the injected one.
//
// lora_A is written [r, in] (the transpose of the ONNX branch's A [in, r])
// and lora_B [out, r] (the transpose of B [r, out]), in the branch's float
// type, under keys base_model.model.<module>.lora_{A,B}.weight. The config
// has the most common rank and alpha as r and lora_alpha, rank_pattern and
// alpha_pattern entries for the modules that differ, use_rslora,
// lora_dropout, fan_in_fan_out (true when every exported layer is a GPT-2
// Conv1D, as PEFT sets it; see isConv1D), peft_type LORA and target_modules:
// short names ("q_proj") when every layer so named is exported, full module
// paths otherwise. Layers inject made modules_to_save are written whole
// (see peftSaved) and listed in modules_to_save. Adapters mixing rsLoRA and plain scaling cannot be
// described by one config and are refused.
func ExportPEFT(m *graph.Model, dir string, opts ExportOptions) (*ExportReport, error) {
	chosen, source, err := exportable(m, opts.Only)
	if err != nil {
		return nil, err
	}
	rep := &ExportReport{Source: source}
	mods := make([]export.PEFTModule, 0, len(chosen))
	for _, f := range chosen {
		mod, err := peftModule(m, f)
		if err != nil {
			return nil, fmt.Errorf("adapter %s: %w", f.Module, err)
		}
		mods = append(mods, mod)
		rep.Modules = append(rep.Modules, f.Module)
	}
	cfg, err := peftConfig(m, chosen, opts)
	if err != nil {
		return nil, err
	}
	if cfg.UseDoRA, err = allDoRA(chosen); err != nil {
		return nil, err
	}
	conv := true
	for _, f := range chosen {
		conv = conv && isConv1D(f.Layer)
	}
	cfg.FanInFanOut = conv
	rep.FanInFanOut = conv
	rep.Untrained = true
	for _, mod := range mods {
		for _, v := range mod.B {
			if v != 0 {
				rep.Untrained = false
				break
			}
		}
	}
	prefix := export.PEFTKeyPrefix
	if opts.Prefix != nil {
		prefix = *opts.Prefix
	}
	var saved []export.PEFTSaved
	if man, err := ReadManifest(m); err != nil {
		return nil, err
	} else if man != nil && len(man.Saved) > 0 {
		if saved, err = peftSaved(m, man); err != nil {
			return nil, err
		}
		for _, s := range man.Saved {
			cfg.ModulesToSave = append(cfg.ModulesToSave, s.Module)
			rep.Saved = append(rep.Saved, s.Module)
		}
	}
	if err := export.WritePEFTAdapterSaved(dir, cfg, mods, saved, prefix); err != nil {
		return nil, err
	}
	rep.Config = cfg
	return rep, nil
}

// factors reads the adapter's lora_A and lora_B values.
func (f *foundAdapter) factors(m *graph.Model) (a, b []float64, err error) {
	if a, err = m.Float64s(f.TA); err != nil {
		return nil, nil, err
	}
	if b, err = m.Float64s(f.TB); err != nil {
		return nil, nil, err
	}
	return a, b, nil
}

// exportable finds the model's adapters and returns those only selects
// (all by default), in graph order; none at all is an error.
func exportable(m *graph.Model, only []string) ([]*foundAdapter, string, error) {
	found, _, source, err := findAdapters(m, m.Graph())
	if err != nil {
		return nil, "", err
	}
	if len(found) == 0 {
		return nil, "", errors.New("the model has no LoRA adapters to export (no manifest and no branch of the shape inject writes)")
	}
	sel, err := selectModules(found, only)
	if err != nil {
		return nil, "", err
	}
	var chosen []*foundAdapter
	seen := map[string]bool{}
	for _, f := range found {
		if !sel[f.Module] {
			continue
		}
		if seen[f.Module] {
			return nil, "", fmt.Errorf("module %s has stacked adapters (inject --stack); an adapter file holds one per module: merge them, or export before stacking", f.Module)
		}
		seen[f.Module] = true
		chosen = append(chosen, f)
	}
	return chosen, source, nil
}

// isConv1D reports whether a layer is an export of transformers' Conv1D
// (GPT-2's c_attn, c_proj, c_fc), for which PEFT sets fan_in_fan_out: its
// parameter is stored [in, out] and the node multiplies by it directly
// (a MatMul, or a Gemm without transB, as torch.onnx exports addmm), under
// its own parameter name. nn.Linear stores [out, in], so its export goes
// through a Transpose, transB=1, or a folded copy the exporter renames
// ("onnx::MatMul_12", "weight_transposed"); exporters that store Linear
// weights [in, out] themselves name them after the op (onnxruntime-genai's
// "q_proj.MatMul.weight"), which this rule leaves out.
func isConv1D(l *Layer) bool {
	if l == nil || l.Weight == nil || l.StoredTransposed() || len(l.Weight.Chain) > 0 {
		return false
	}
	name := l.Weight.Name
	if renamedWeight(name) {
		return false
	}
	i := strings.LastIndexByte(name, '.')
	if i < 0 || (name[i+1:] != "weight" && name[i+1:] != "weight_resize") {
		return false
	}
	j := strings.LastIndexByte(name[:i], '.')
	return !opSegmentRE.MatchString(name[j+1 : i])
}

// peftModule converts one branch's factors to PEFT's layout.
func peftModule(m *graph.Model, f *foundAdapter) (export.PEFTModule, error) {
	dt, ok := peftDType[graph.DataType(f.TA.GetDataType())]
	if !ok || f.TB.GetDataType() != f.TA.GetDataType() {
		return export.PEFTModule{}, fmt.Errorf("lora_A is %v and lora_B %v; both must be one float type", graph.DataType(f.TA.GetDataType()), graph.DataType(f.TB.GetDataType()))
	}
	if f.Layer.Op == opConv {
		return peftConvModule(m, f, dt)
	}
	a, b, err := f.factors(m)
	if err != nil {
		return export.PEFTModule{}, err
	}
	in, out, r := int(f.TA.Dims[0]), int(f.TB.Dims[1]), f.Rank
	mod := export.PEFTModule{
		Name: f.Module, DType: dt, Rank: r, InFeatures: in, OutFeatures: out,
		Alpha: f.Alpha, Scaling: f.Scaling,
		A: make([]float32, r*in), B: make([]float32, out*r),
	}
	for i := 0; i < in; i++ {
		for k := 0; k < r; k++ {
			mod.A[k*in+i] = float32(a[i*r+k])
		}
	}
	for k := 0; k < r; k++ {
		for j := 0; j < out; j++ {
			mod.B[j*r+k] = float32(b[k*out+j])
		}
	}
	return mod, attachMagnitude(m, f, &mod)
}

// peftConfig builds the adapter_config.json describing the adapters found
// in m (target_modules and the patterns are judged against all its layers).
func peftConfig(m *graph.Model, found []*foundAdapter, opts ExportOptions) (*export.PEFTConfig, error) {
	layers, _ := FindLayers(m)
	allLayers := make([]string, 0, len(layers))
	for _, l := range layers {
		allLayers = append(allLayers, l.Module)
	}
	rslora := found[0].RSLoRA
	for _, f := range found {
		if f.RSLoRA != rslora {
			return nil, fmt.Errorf("adapters %s (use_rslora=%v) and %s (use_rslora=%v) scale differently; one PEFT config cannot hold both: export them separately with Only", found[0].Module, rslora, f.Module, f.RSLoRA)
		}
	}
	rank := mostCommon(found, func(f *foundAdapter) int { return f.Rank })
	alpha := mostCommon(found, func(f *foundAdapter) float64 { return f.Alpha })
	dropout := mostCommon(found, func(f *foundAdapter) float64 { return f.Dropout })

	exported := map[string]bool{}
	for _, f := range found {
		exported[f.Module] = true
	}
	cfg := export.NewPEFTConfig(rank, alpha, targetNames(found, allLayers, exported)...)
	cfg.UseRSLoRA = rslora
	cfg.LoraDropout = dropout
	cfg.TaskType = opts.TaskType
	cfg.BaseModelNameOrPath = opts.BaseModel
	for _, f := range found {
		if f.Rank != rank {
			cfg.RankPattern = append(cfg.RankPattern, export.Pattern[int]{Key: patternKey(f.Module, allLayers), Value: f.Rank})
		}
		if f.Alpha != alpha {
			cfg.AlphaPattern = append(cfg.AlphaPattern, export.Pattern[float64]{Key: patternKey(f.Module, allLayers), Value: f.Alpha})
		}
	}
	return cfg, nil
}

// mostCommon returns the value most adapters have (the first one seen on a
// tie), so rank_pattern and alpha_pattern stay short.
func mostCommon[V comparable](found []*foundAdapter, key func(*foundAdapter) V) V {
	count := map[V]int{}
	best := key(found[0])
	for _, f := range found {
		v := key(f)
		count[v]++
		if count[v] > count[best] {
			best = v
		}
	}
	return best
}

// targetNames returns target_modules: a module's last segment when every
// layer with that last segment is exported (PEFT's usual ["q_proj",
// "v_proj"]), else the module's full path, which PEFT matches exactly.
func targetNames(found []*foundAdapter, allLayers []string, exported map[string]bool) []string {
	short := map[string]bool{}
	for _, l := range allLayers {
		leaf := l[strings.LastIndexByte(l, '.')+1:]
		if _, seen := short[leaf]; !seen {
			short[leaf] = true
		}
		if !exported[l] {
			short[leaf] = false
		}
	}
	var names []string
	seen := map[string]bool{}
	for _, f := range found {
		name := f.Module
		if leaf := name[strings.LastIndexByte(name, '.')+1:]; short[leaf] {
			name = leaf
		}
		if !seen[name] {
			seen[name] = true
			names = append(names, name)
		}
	}
	return names
}

// patternKey names one module in rank_pattern/alpha_pattern: the shortest
// dotted suffix of its path that no other layer's path ends with and that
// does not start with a layer number ("layers.3.self_attn.q_proj"), so the
// key matches in PEFT versions that require a dot before it as well as in
// those that match from the start; the full path when nothing shorter is
// unique.
func patternKey(module string, allLayers []string) string {
	segs := strings.Split(module, ".")
	for k := 1; k < len(segs); k++ {
		first := segs[len(segs)-k]
		if isDigits(first) {
			continue
		}
		cand := strings.Join(segs[len(segs)-k:], ".")
		unique := true
		for _, l := range allLayers {
			if l != module && (l == cand || strings.HasSuffix(l, "."+cand)) {
				unique = false
				break
			}
		}
		if unique {
			return cand
		}
	}
	return module
}
