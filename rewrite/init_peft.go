package rewrite

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// A PEFT adapter saved with init_lora_weights "pissa" or "olora" (and not
// converted) is a delta on the residual weights: PEFT's from_pretrained
// runs the init on the base again, turning W into W − s·B₀·A₀, then loads
// the trained A and B. Both inits are deterministic (an SVD fixes the
// vectors up to sign, and B₀·A₀ does not depend on it), so ApplyPEFT can
// do the same: it computes A₀ and B₀ from each matched layer's weight and
// applies the plain adapter s·(B·A − B₀·A₀), the conversion PEFT's
// path_initial_model_for_weight_conversion writes. pissa_niter_N starts
// from a random sketch and cannot be rebuilt; it is refused.

// residualInitMethod returns the init method of an adapter directory's
// config when it is pissa/olora ("" otherwise), reading the raw JSON so a
// config Validate refuses can still be recognized.
func residualInitMethod(dir string) (Init, map[string]json.RawMessage, error) {
	// Only a small regular file is read here; anything else (missing, a
	// FIFO, huge) is left to ApplyPEFT's own checks and messages.
	path := filepath.Join(dir, export.PEFTConfigFile)
	if st, err := os.Stat(path); err != nil || !st.Mode().IsRegular() || st.Size() > 1<<20 {
		return "", nil, nil
	}
	if st, err := os.Stat(filepath.Join(dir, export.PEFTWeightsFile)); err != nil || !st.Mode().IsRegular() {
		return "", nil, nil
	}
	raw, err := graph.ReadFile(path, 1<<20)
	if err != nil {
		return "", nil, nil
	}
	var cfg map[string]json.RawMessage
	if json.Unmarshal(raw, &cfg) != nil {
		return "", nil, nil
	}
	var s string
	if json.Unmarshal(cfg["init_lora_weights"], &s) != nil {
		return "", nil, nil
	}
	init := Init(strings.ToLower(s))
	if !init.ChangesBase() {
		return "", nil, nil
	}
	return init, cfg, nil
}

// planResidualInit plans ApplyPEFT of a pissa/olora adapter directory:
// the converted adapter is written to a temporary directory and planned
// from there. It returns a nil plan (and no error) for other adapters.
func planResidualInit(m *graph.Model, dir string, opts MergeOptions) (*plan, error) {
	init, rawCfg, err := residualInitMethod(dir)
	if err != nil || init == "" {
		return nil, err
	}
	method, niter, _ := init.svdInit()
	if method == "pissa" && niter >= 0 {
		return nil, fmt.Errorf("peft adapter %s: init_lora_weights=%q starts from a random sketch, so the residual weights it was trained against cannot be rebuilt; save it with PEFT's path_initial_model_for_weight_conversion", dir, string(init))
	}
	tmp, err := os.MkdirTemp("", "onnxlora-residual-init-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	// The trained adapter, read as a plain LoRA.
	plain := filepath.Join(tmp, "trained")
	rawCfg["init_lora_weights"] = json.RawMessage("true")
	if err := writeAdapterCopy(dir, plain, rawCfg); err != nil {
		return nil, err
	}
	pm, err := MatchPEFT(m, plain, opts)
	if err != nil {
		return nil, fixTempPath(err, plain, dir)
	}
	cfg := *pm.Config
	if cfg.FanInFanOut && method == "olora" {
		return nil, fmt.Errorf("peft adapter %s: olora with fan_in_fan_out factors the weight as torch stores it, [in, out]; that is not modelled", dir)
	}
	var mods []export.PEFTModule
	for i := range pm.Assignments {
		a := &pm.Assignments[i]
		switch {
		case a.Kind != KindLoRA:
			return nil, fmt.Errorf("peft adapter %s: module %s is %s; with init_lora_weights=%s only LoRA modules are handled", dir, a.Module, a.Kind, string(init))
		case a.layer == nil:
			if !opts.AllowPartial {
				return nil, fmt.Errorf("peft adapter %s: module %s matches no layer of the model; its residual cannot be rebuilt", dir, a.Module)
			}
			continue
		case a.Problem != "":
			return nil, fmt.Errorf("peft adapter %s: module %s -> layer %s: %s", dir, a.Module, a.Layer, a.Problem)
		}
		mod, l := a.mod, a.layer
		f0, err := svdFactors(m, l, mod.Rank, mod.Scaling, method, niter, 0)
		if err != nil {
			return nil, fmt.Errorf("peft adapter %s: module %s -> layer %s: rebuilding the %s init: %w", dir, a.Module, l.Module, string(init), err)
		}
		r, in, out := mod.Rank, mod.InFeatures, mod.OutFeatures
		m0 := *mod
		m0.A, m0.B = make([]float32, r*in), make([]float32, out*r)
		for k := 0; k < r; k++ {
			for j := 0; j < in; j++ {
				m0.A[k*in+j] = float32(f0.a[j*r+k])
			}
			for j := 0; j < out; j++ {
				m0.B[j*r+k] = float32(f0.b[k*out+j])
			}
		}
		conv, err := concatInit(*mod, m0, cfg.UseRSLoRA)
		if err != nil {
			return nil, err
		}
		mods = append(mods, conv)
	}
	if len(mods) == 0 {
		return nil, fmt.Errorf("peft adapter %s: none of its modules matches a layer of the model", dir)
	}
	// r and alpha double with the concatenated factors; the scaling stays.
	cfg.InitLoraWeights = "true"
	cfg.R *= 2
	grow := 2.0
	if cfg.UseRSLoRA {
		grow = math.Sqrt2
	}
	cfg.LoraAlpha *= grow
	cfg.RankPattern = append([]export.Pattern[int](nil), cfg.RankPattern...)
	for i := range cfg.RankPattern {
		cfg.RankPattern[i].Value *= 2
	}
	cfg.AlphaPattern = append([]export.Pattern[float64](nil), cfg.AlphaPattern...)
	for i := range cfg.AlphaPattern {
		cfg.AlphaPattern[i].Value *= grow
	}
	converted := filepath.Join(tmp, "converted")
	if err := export.WritePEFTAdapter(converted, &cfg, mods); err != nil {
		return nil, fixTempPath(err, converted, dir)
	}
	p, err := planPEFT(m, converted, opts, false) // the folder goes when this returns
	if err != nil {
		return nil, fixTempPath(err, converted, dir)
	}
	return p, nil
}

// writeAdapterCopy writes dst as src with another config: the edited
// adapter_config.json and a copy of the weights.
func writeAdapterCopy(src, dst string, cfg map[string]json.RawMessage) error {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	data, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dst, export.PEFTConfigFile), data, 0o600); err != nil {
		return err
	}
	in, err := graph.Open(filepath.Join(src, export.PEFTWeightsFile))
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(filepath.Join(dst, export.PEFTWeightsFile))
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// fixTempPath names the user's directory in errors about a temporary copy.
func fixTempPath(err error, tmp, dir string) error {
	msg := err.Error()
	if !strings.Contains(msg, tmp) {
		return err
	}
	return &renamedError{msg: strings.ReplaceAll(msg, tmp, dir), err: err}
}

// renamedError is an error with another message, still unwrapping to it
// (errors.Is(err, export.ErrUnsupported) keeps working).
type renamedError struct {
	msg string
	err error
}

func (e *renamedError) Error() string { return e.msg }
func (e *renamedError) Unwrap() error { return e.err }
