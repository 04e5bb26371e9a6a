package rewrite

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// ErrResidualBase is wrapped by CheckPlainExport's error: the model's
// adapters are deltas on residual weights (PiSSA/OLoRA).
var ErrResidualBase = errors.New("the adapters were initialized from the base weights, which now hold residuals")

// CheckPlainExport refuses a model whose adapters were injected with a
// base-altering init (manifest "init": pissa, pissa_niter_N, olora): their
// A and B are a delta on the residual weights, so a plain PEFT adapter made
// from them would be wrong on the original model. ExportPEFTConverted is
// the way out.
func CheckPlainExport(m *graph.Model, only []string) error {
	man, err := ReadManifest(m)
	if err != nil || man == nil {
		return err
	}
	want := map[string]bool{}
	for _, o := range only {
		want[strings.TrimSpace(o)] = true
	}
	var mods []string
	init := ""
	for _, a := range man.Adapters {
		if a.Init != "" && (len(want) == 0 || want[a.Module]) {
			mods = append(mods, a.Module)
			init = a.Init
		}
	}
	if len(mods) == 0 {
		return nil
	}
	return fmt.Errorf("%w (init %s on %s): export them against the original weights with the model as injected at step 0 (export-adapter --initial)", ErrResidualBase, init, strings.Join(mods, ", "))
}

// ExportPEFTConverted writes the model's PiSSA/OLoRA-trained adapters as a
// plain LoRA on the ORIGINAL base weights, as PEFT's save_pretrained does
// with path_initial_model_for_weight_conversion. With the base W = W_res +
// s·A₀·B₀ at step 0 and W_res + s·A·B after training, the update on W is
// s·(A·B − A₀·B₀) = s·[A | A₀]·[B ; −B₀]: the factors are concatenated
// along the rank, r and lora_alpha double (alpha·√2 with rsLoRA, so the
// scaling stays), and init_lora_weights is true. `merge BASE --adapter DIR`
// on the original base then gives the trained model's weights.
//
// initial is the model as injected (step 0: an .onnx file with the same
// modules) or a PEFT adapter directory saved at step 0.
func ExportPEFTConverted(m *graph.Model, initial, dir string, opts ExportOptions) (*ExportReport, error) {
	if err := refuseSaved(m, "a converted (plain LoRA) export"); err != nil {
		return nil, err
	}
	picked, source, err := exportable(m, opts.Only)
	if err != nil {
		return nil, err
	}
	init0, err := readInitialAdapters(initial)
	if err != nil {
		return nil, err
	}
	rep := &ExportReport{Source: source}
	var chosen []*foundAdapter
	var mods []export.PEFTModule
	for _, f := range picked {
		mod, err := peftModule(m, f)
		if err != nil {
			return nil, fmt.Errorf("adapter %s: %w", f.Module, err)
		}
		m0, ok := init0[f.Module]
		if !ok {
			return nil, fmt.Errorf("adapter %s: the initial adapters (%s) have no module %s; they have: %s", f.Module, initial, f.Module, strings.Join(sortedKeys(init0), ", "))
		}
		conv, err := concatInit(mod, m0, f.RSLoRA)
		if err != nil {
			return nil, fmt.Errorf("adapter %s: %w", f.Module, err)
		}
		mods = append(mods, conv)
		// The config is built from copies carrying the doubled rank and
		// alpha, so rank_pattern and alpha_pattern come out doubled too.
		b := *f.branch
		b.Rank = conv.Rank
		c := *f
		c.branch, c.Alpha = &b, conv.Alpha
		chosen = append(chosen, &c)
		rep.Modules = append(rep.Modules, f.Module)
	}
	cfg, err := peftConfig(m, chosen, opts)
	if err != nil {
		return nil, err
	}
	if err := export.WritePEFTAdapter(dir, cfg, mods); err != nil {
		return nil, err
	}
	rep.Config = cfg
	return rep, nil
}

// concatInit builds the converted module: A' = [A ; A₀] ([2r, in]) and
// B' = [B | −B₀] ([out, 2r]), in PEFT's layout.
func concatInit(t, i export.PEFTModule, rslora bool) (export.PEFTModule, error) {
	if t.Rank != i.Rank || t.InFeatures != i.InFeatures || t.OutFeatures != i.OutFeatures {
		return t, fmt.Errorf("the trained adapter is [r=%d, in=%d, out=%d] but the initial one is [r=%d, in=%d, out=%d]", t.Rank, t.InFeatures, t.OutFeatures, i.Rank, i.InFeatures, i.OutFeatures)
	}
	if !closeScaling(t.Scaling, i.Scaling) {
		return t, fmt.Errorf("the trained adapter's scaling is %g but the initial one's is %g", t.Scaling, i.Scaling)
	}
	r, in, out := t.Rank, t.InFeatures, t.OutFeatures
	c := t
	c.Rank = 2 * r
	if rslora {
		c.Alpha = t.Alpha * math.Sqrt2
	} else {
		c.Alpha = 2 * t.Alpha
	}
	c.A = make([]float32, 0, 2*r*in)
	c.A = append(append(c.A, t.A...), i.A...)
	c.B = make([]float32, out*2*r)
	for j := 0; j < out; j++ {
		copy(c.B[j*2*r:j*2*r+r], t.B[j*r:(j+1)*r])
		for k := 0; k < r; k++ {
			c.B[j*2*r+r+k] = -i.B[j*r+k]
		}
	}
	return c, nil
}

// closeScaling compares scalings that may have been rounded to a tensor
// type on the way.
func closeScaling(a, b float64) bool {
	return math.Abs(a-b) <= 1e-3*math.Max(math.Abs(a), math.Abs(b))
}

// readInitialAdapters reads the step-0 adapters, by module: from an ONNX
// model (its branches) or a PEFT adapter directory.
func readInitialAdapters(path string) (map[string]export.PEFTModule, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("initial adapters: %w", err)
	}
	out := map[string]export.PEFTModule{}
	if st.IsDir() {
		if _, err := os.Stat(filepath.Join(path, export.PEFTConfigFile)); err != nil {
			return nil, fmt.Errorf("initial adapters: %s is a directory without %s", path, export.PEFTConfigFile)
		}
		_, mods, err := export.ReadPEFTAdapter(path)
		if err != nil {
			return nil, fmt.Errorf("initial adapters: %w", err)
		}
		for _, mod := range mods {
			out[mod.Name] = mod
		}
		return out, nil
	}
	m0, err := graph.Load(path)
	if err != nil {
		return nil, fmt.Errorf("initial adapters: %w", err)
	}
	defer m0.Close()
	found, _, _, err := findAdapters(m0, m0.Graph())
	if err != nil {
		return nil, fmt.Errorf("initial adapters %s: %w", path, err)
	}
	if len(found) == 0 {
		return nil, fmt.Errorf("initial adapters: %s has no LoRA adapters", path)
	}
	for _, f := range found {
		mod, err := peftModule(m0, f)
		if err != nil {
			return nil, fmt.Errorf("initial adapter %s: %w", f.Module, err)
		}
		out[f.Module] = mod
	}
	return out, nil
}
