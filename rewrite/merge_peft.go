package rewrite

import (
	"fmt"
	"sort"

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
	p, err := planPEFT(m, adapterDir, opts, true)
	if err != nil {
		return nil, err
	}
	defer p.done()
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
	p, err := planPEFT(m, adapterDir, opts, true)
	if err != nil {
		return nil, err
	}
	defer p.done()
	return p.save(dst, save)
}

// planPEFT matches the adapter's modules to layers and plans their merge.
// With lazy, the plan's jobs read each module's factors from the adapter
// file when they merge it; call the plan's done after.
func planPEFT(m *graph.Model, dir string, opts MergeOptions, lazy bool) (_ *plan, err error) {
	// pissa/olora adapters: rebuild the residual init (init_peft.go).
	if p, err := planResidualInit(m, dir, opts); p != nil || err != nil {
		return p, err
	}
	pm, err := matchPEFT(m, dir, opts, lazy)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			pm.adapter.Close()
		}
	}()
	top := m.Graph()
	p, err := newPlan(m, top, opts, "peft")
	if err != nil {
		return nil, err
	}
	p.peft = pm.adapter
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
	r := mod.Rank
	rep := &MergedLayer{Module: l.Module, PEFTModule: mod.Name, Rank: r, Alpha: mod.Alpha, Scaling: mod.Scaling}
	if l.Op != opConv && l.Quant == nil && mod.Magnitude == nil && !p.planned(l.Weight.Tensor) {
		// The job that merges the module reads and converts its factors,
		// so memory holds one module's at a time.
		return p.addLazyUpdate(l, int64(r*mod.InFeatures), int64(mod.OutFeatures*r), r, mod.Scaling, rep, func() ([]float64, []float64, error) {
			a32, b32, err := mod.Factors()
			if err != nil {
				return nil, nil, err
			}
			a, b := peftFactors(mod, a32, b32)
			return a, b, nil
		})
	}
	if err := mod.Load(); err != nil {
		return err
	}
	if l.Op == opConv {
		return p.addPEFTConv(as)
	}
	a, b := peftFactors(mod, mod.A, mod.B)
	if l.Quant != nil {
		return p.addQuantUpdate(l, a, b, r, mod.Scaling, rep)
	}
	if mod.Magnitude != nil {
		return p.addPEFTDoRA(l, mod, a, b, rep)
	}
	return p.addUpdate(l, a, b, r, mod.Scaling, rep)
}

// peftFactors returns a module's factors pa and pb as A [in, r] and B [r, out]:
// PEFT's A [r, in] and B [out, r] (for embeddings [r, vocab] and [dim, r])
// are their transposes.
func peftFactors(mod *export.PEFTModule, pa, pb []float32) (a, b []float64) {
	r := mod.Rank
	a = make([]float64, mod.InFeatures*r)
	for k := 0; k < r; k++ {
		for i := 0; i < mod.InFeatures; i++ {
			a[i*r+k] = float64(pa[k*mod.InFeatures+i])
		}
	}
	b = make([]float64, r*mod.OutFeatures)
	for j := 0; j < mod.OutFeatures; j++ {
		for k := 0; k < r; k++ {
			b[k*mod.OutFeatures+j] = float64(pb[j*r+k])
		}
	}
	return a, b
}
