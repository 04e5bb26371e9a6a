package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestResizeCommand: inject with --init pissa, look at the spectra, resize
// the model and an exported PEFT directory, and refuse bad flags.
func TestResizeCommand(t *testing.T) {
	dir := t.TempDir()
	injected := filepath.Join(dir, "pissa.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", injected, "--target", "q_proj,v_proj", "--rank", "4", "--alpha", "8", "--init", "pissa")

	var sp struct {
		Adapters []struct {
			Module   string    `json:"module"`
			Singular []float64 `json:"singular_values"`
		} `json:"adapters"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "inspect", injected, "--spectra", "--json").stdout), &sp); err != nil {
		t.Fatal(err)
	}
	if len(sp.Adapters) != 4 || len(sp.Adapters[0].Singular) != 4 || sp.Adapters[0].Singular[0] <= 0 {
		t.Fatalf("spectra: %+v", sp.Adapters)
	}
	text := mustRun(t, "inspect", injected, "--spectra").stdout
	if !strings.Contains(text, "model.layers.0.self_attn.q_proj") || !strings.Contains(text, "R@99%") {
		t.Errorf("spectra text:\n%s", text)
	}
	svg := filepath.Join(dir, "spectra.svg")
	mustRun(t, "inspect", injected, "--plot", svg)
	if raw, err := os.ReadFile(svg); err != nil || !strings.Contains(string(raw), "<svg") {
		t.Fatalf("plot: %v", err)
	}

	resized := filepath.Join(dir, "r2.onnx")
	var rep struct {
		Layers []struct {
			NewRank int     `json:"new_rank"`
			Error   float64 `json:"frobenius_error"`
		} `json:"layers"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "resize", injected, "--rank", "2", "-o", resized, "--json").stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Layers) != 4 || rep.Layers[0].NewRank != 2 || rep.Layers[0].Error <= 0 {
		t.Fatalf("resize report %+v", rep.Layers)
	}
	// The error is the discarded singular values, from the spectra above.
	s := sp.Adapters[0].Singular
	if want := s[2]*s[2] + s[3]*s[3]; abs(rep.Layers[0].Error*rep.Layers[0].Error-want) > 1e-6*want {
		t.Errorf("error² %g, discarded σ² %g", rep.Layers[0].Error*rep.Layers[0].Error, want)
	}
	if out := mustRun(t, "inspect", resized, "--json").stdout; !strings.Contains(out, `"rank": 2`) {
		t.Errorf("inspect of the resized model does not show rank 2")
	}

	// A PEFT directory in, a PEFT directory out.
	plain := filepath.Join(dir, "lora.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", plain, "--target", "q_proj", "--rank", "4", "--alpha", "8")
	peft := filepath.Join(dir, "adapter")
	mustRun(t, "export-adapter", plain, "-o", peft)
	peft2 := filepath.Join(dir, "adapter-r2")
	mustRun(t, "resize", peft, "--rank", "2", "-o", peft2)
	cfg, err := os.ReadFile(filepath.Join(peft2, "adapter_config.json"))
	if err != nil || !strings.Contains(string(cfg), `"r": 2`) {
		t.Fatalf("resized adapter config: %s %v", cfg, err)
	}

	for _, args := range [][]string{
		{"resize", injected, "-o", filepath.Join(dir, "x.onnx")},
		{"resize", injected, "-o", filepath.Join(dir, "x.onnx"), "--rank", "2", "--energy", "0.9"},
		{"resize", injected, "-o", filepath.Join(dir, "x.onnx"), "--energy", "1.5"},
		{"resize", injected, "--rank", "2"},
		{"resize", injected, "--rank", "2", "-o", injected},
		{"inject", model("tiny-gpt.onnx"), "-o", filepath.Join(dir, "x.onnx"), "--target", "q_proj", "--init", "svd"},
		{"inspect", injected, "--spectra", "--dot"},
	} {
		if r := run(t, args...); r.code != 2 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Errorf("onnxlora %s: exit %d, stderr %q; want a one-line usage error", strings.Join(args, " "), r.code, r.stderr)
		}
	}
	if r := run(t, "inspect", plain, "--plot", filepath.Join(dir, "zero.svg")); r.code != 1 || !strings.Contains(r.stderr, "B = 0") {
		t.Errorf("plot of untrained adapters: exit %d, %q", r.code, r.stderr)
	}
	if r := run(t, "inject", model("tiny-gpt.onnx"), "-o", filepath.Join(dir, "x.onnx"), "--target", "q_proj", "--init", "olora", "--rank", "64", "--allow-large-rank"); r.code != 1 || !strings.Contains(r.stderr, "exceeds min(in, out)") {
		t.Errorf("olora rank 64: exit %d, %q", r.code, r.stderr)
	}
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

// TestExportPiSSAConverted: export-adapter refuses PiSSA adapters without
// --initial, and with it writes a plain LoRA (r and alpha doubled) that
// merge --adapter applies to the original base.
func TestExportPiSSAConverted(t *testing.T) {
	dir := t.TempDir()
	step0 := filepath.Join(dir, "step0.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", step0, "--target", "q_proj", "--rank", "4", "--alpha", "8", "--init", "olora")
	if r := run(t, "export-adapter", step0, "-o", filepath.Join(dir, "plain")); r.code != 1 || !strings.Contains(r.stderr, "--initial") {
		t.Errorf("plain export of an OLoRA model: exit %d, %q", r.code, r.stderr)
	}
	out := filepath.Join(dir, "lora")
	r := mustRun(t, "export-adapter", step0, "-o", out, "--initial", step0)
	if !strings.Contains(r.stdout, "r=8, lora_alpha=16") {
		t.Errorf("stdout: %s", r.stdout)
	}
	// At step 0 the converted update is A·B − A₀·B₀ = 0: the original base
	// comes back unchanged by merge.
	merged := filepath.Join(dir, "merged.onnx")
	var rep struct {
		Merged []struct {
			MaxDelta float64 `json:"max_abs_delta"`
		} `json:"merged"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "merge", model("tiny-gpt.onnx"), "--adapter", out, "-o", merged, "--json").stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 2 {
		t.Fatalf("merged %d layers, want 2", len(rep.Merged))
	}
	for _, l := range rep.Merged {
		if l.MaxDelta > 1e-5 {
			t.Errorf("step-0 conversion changes a weight by %g", l.MaxDelta)
		}
	}
}

// TestExportOnnxAdapterRefusesPiSSA: an .onnx_adapter of PiSSA factors
// would be served on the original base, where they are wrong.
func TestExportOnnxAdapterRefusesPiSSA(t *testing.T) {
	dir := t.TempDir()
	m := filepath.Join(dir, "pissa.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", m, "--target", "q_proj", "--rank", "2", "--alpha", "2", "--init", "pissa_niter_2")
	out := filepath.Join(dir, "a.onnx_adapter")
	if r := run(t, "export-adapter", m, "-o", out); r.code != 1 || !strings.Contains(r.stderr, "residuals") {
		t.Errorf("exit %d, %q", r.code, r.stderr)
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("the refused export wrote a file")
	}
}
