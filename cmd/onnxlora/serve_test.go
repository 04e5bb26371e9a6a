package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
	"github.com/onnxlora/onnxlora/rewrite"
)

// trainedLoRA writes the base model injected with constant factors whose
// A and B are random (as if trained) and returns its path.
func trainedLoRA(t *testing.T, dir string) string {
	return trainedLoRAWith(t, dir, "trained", "q_proj,v_proj", 4, 1)
}

// trainedLoRAWith is trainedLoRA with a name, targets, rank and seed.
func trainedLoRAWith(t *testing.T, dir, name, targets string, rank int, seed uint64) string {
	t.Helper()
	p := filepath.Join(dir, name+"-lora.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", p, "--target", targets, "--rank", fmt.Sprint(rank), "--alpha", "8")
	m, err := graph.Load(p)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	man, err := rewrite.ReadManifest(m)
	if err != nil || man == nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 2))
	g := m.Graph()
	for _, a := range man.Adapters {
		for _, name := range []string{a.LoraA, a.LoraB} {
			tp, _ := g.Initializer(name)
			vals := make([]float64, tp.Dims[0]*tp.Dims[1])
			for i := range vals {
				vals[i] = rng.Float64() - 0.5
			}
			if err := graph.SetFloat64s(tp, vals); err != nil {
				t.Fatal(err)
			}
		}
	}
	trained := filepath.Join(dir, name+".onnx")
	if err := m.Save(trained, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	return trained
}

// TestServeCommands runs the serving workflow through the CLI: an
// adapter-input model, adapters from export-adapter (an injected model with
// non-zero B) and from convert-adapter (a PEFT directory), merged into the
// adapter-input model and into the plain base, and verify --adapter in ONNX
// Runtime against those merges.
func TestServeCommands(t *testing.T) {
	dir := t.TempDir()
	base := model("tiny-gpt.onnx")
	serve := filepath.Join(dir, "serve.onnx")
	mustRun(t, "inject", base, "-o", serve, "--target", "q_proj,v_proj", "--adapter-inputs")
	trained := trainedLoRA(t, dir)

	a2 := filepath.Join(dir, "a2.onnx_adapter")
	r := mustRun(t, "export-adapter", trained, "-o", a2)
	if !strings.Contains(r.stdout, "Exported 4 adapter(s) as 8 parameters") {
		t.Errorf("export-adapter said %q", r.stdout)
	}
	peft := filepath.Join(dir, "peft")
	mustRun(t, "export-adapter", trained, "-o", peft)
	a1 := filepath.Join(dir, "a1.bin")
	mustRun(t, "export-adapter", trained, "-o", a1, "--format", "onnx-adapter")
	fromPEFT := filepath.Join(dir, "a1.onnx_adapter")
	mustRun(t, "convert-adapter", peft, "-o", fromPEFT)

	// The two routes give the same parameters (the PEFT route through
	// float32 safetensors, so equal within rounding of scaling·B).
	x, err := export.ReadOnnxAdapter(a1)
	if err != nil {
		t.Fatal(err)
	}
	y, err := export.ReadOnnxAdapter(fromPEFT)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range x.Params {
		q, ok := y.Param(p.Name)
		if !ok {
			t.Fatalf("convert-adapter has no %s", p.Name)
		}
		pv, _ := p.Float64s()
		qv, _ := q.Float64s()
		for i := range pv {
			if d := pv[i] - qv[i]; d > 1e-6 || d < -1e-6 {
				t.Fatalf("%s[%d]: %g vs %g", p.Name, i, pv[i], qv[i])
			}
		}
	}

	m2 := filepath.Join(dir, "m2.onnx")
	mustRun(t, "merge", serve, "--adapter", a2, "-o", m2)
	m1 := filepath.Join(dir, "m1.onnx")
	mustRun(t, "merge", base, "--adapter", fromPEFT, "-o", m1)
	merged := filepath.Join(dir, "merged.onnx")
	mustRun(t, "merge", trained, "-o", merged)

	orttest.Require(t)
	tol := []string{"--rtol", "1e-5", "--atol", "1e-6"}
	mustRun(t, append([]string{"verify", serve, "--adapter", a2, m2}, tol...)...)
	mustRun(t, append([]string{"verify", serve, "--adapter", a2, merged}, tol...)...)
	mustRun(t, append([]string{"verify", serve, "--adapter", fromPEFT, m1}, tol...)...)
	mustRun(t, "verify", base, serve, "--rtol", "0", "--atol", "0")
	// The adapter does change the outputs: against the base it fails.
	if r := run(t, append([]string{"verify", serve, "--adapter", a2, base}, tol...)...); r.code != 1 {
		t.Errorf("verify with an adapter against the base: exit %d", r.code)
	}
}

// TestServeErrors: corrupt files, wrong names, shapes and types are one
// line and exit 1, and nothing is written.
func TestServeErrors(t *testing.T) {
	dir := t.TempDir()
	base := model("tiny-gpt.onnx")
	serve := filepath.Join(dir, "serve.onnx")
	mustRun(t, "inject", base, "-o", serve, "--target", "q_proj,v_proj", "--adapter-inputs")
	good := filepath.Join(dir, "good.onnx_adapter")
	mustRun(t, "export-adapter", trainedLoRA(t, dir), "-o", good)
	data, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	ga, err := export.ReadOnnxAdapter(good)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	variant := func(name string, edit func(*export.OnnxAdapter)) string {
		a := &export.OnnxAdapter{FormatVersion: 1}
		for _, p := range ga.Params {
			p.Dims = append([]int64(nil), p.Dims...)
			a.Params = append(a.Params, p)
		}
		edit(a)
		p := filepath.Join(dir, name)
		if err := export.WriteOnnxAdapter(p, a); err != nil {
			t.Fatal(err)
		}
		return p
	}
	corrupt := append([]byte(nil), data...)
	copy(corrupt[4:8], "XXXX")
	cases := map[string]struct {
		adapter string
		want    string
	}{
		"truncated": {write("trunc.onnx_adapter", data[:len(data)/2]), "truncated"},
		"corrupt":   {write("corrupt.onnx_adapter", corrupt), "TORT"},
		"name": {variant("name.onnx_adapter", func(a *export.OnnxAdapter) {
			a.Params[0].Name = "model.layers.9.self_attn.q_proj.lora_A.weight"
		}), "not"},
		"shape": {variant("shape.onnx_adapter", func(a *export.OnnxAdapter) {
			p := &a.Params[0] // [32, 4] -> [16, 8]
			p.Dims = []int64{16, 8}
		}), "shape"},
		"dtype": {variant("dtype.onnx_adapter", func(a *export.OnnxAdapter) {
			for i, p := range a.Params {
				v, _ := p.Float64s()
				a.Params[i], _ = export.NewOnnxAdapterParam(p.Name, graph.Float16, p.Dims, v)
			}
		}), "FLOAT16"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			out := filepath.Join(dir, name+"-merged.onnx")
			r := run(t, "merge", serve, "--adapter", c.adapter, "-o", out)
			checkOneLineError(t, r, c.want)
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("merge wrote %s", out)
			}
			if ortrun.Init() == nil { // verify needs ONNX Runtime
				r = run(t, "verify", serve, "--adapter", c.adapter, base)
				checkOneLineError(t, r, "")
				t.Logf("verify: %s", strings.TrimSpace(r.stderr))
			}
		})
	}
	// Nothing to export from rank-0 defaults.
	out := filepath.Join(dir, "empty.onnx_adapter")
	checkOneLineError(t, run(t, "export-adapter", serve, "-o", out), "rank-0")
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("export-adapter wrote %s", out)
	}
	if r := run(t, "export-adapter", serve, "-o", out, "--format", "zip"); r.code != 2 {
		t.Errorf("bad --format: exit %d", r.code)
	}
}

// checkOneLineError wants exit 1 and one line on stderr containing want.
func checkOneLineError(t *testing.T, r result, want string) {
	t.Helper()
	msg := strings.TrimSpace(r.stderr)
	if r.code != 1 || strings.Count(msg, "\n") != 0 || !strings.Contains(msg, want) {
		t.Errorf("exit %d, stderr %q; want exit 1 and one line with %q", r.code, r.stderr, want)
	}
}
