package main

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/rewrite"
)

// trainedModel injects adapters into a test model and gives them random
// values, as training would, returning the saved path.
func trainedModel(t *testing.T, name string, targets string) string {
	t.Helper()
	dir := t.TempDir()
	lora := filepath.Join(dir, "lora.onnx")
	mustRun(t, "inject", model(name), "-o", lora, "--target", targets, "--rank", "4", "--alpha", "8", "-q")
	trained := filepath.Join(dir, "trained.onnx")
	randomizeAdapters(t, lora, trained, rand.New(rand.NewPCG(1, 2)), bothFactors, graph.SaveOptions{})
	return trained
}

// weights returns every initializer's raw bytes by name.
func weights(t *testing.T, path string) map[string][]byte {
	t.Helper()
	m, err := graph.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	out := map[string][]byte{}
	for _, ti := range m.Proto.Graph.Initializer {
		raw, err := m.RawData(ti)
		if err != nil {
			t.Fatal(err)
		}
		out[ti.GetName()] = append([]byte(nil), raw...)
	}
	return out
}

func TestMergeCommand(t *testing.T) {
	trained := trainedModel(t, "tiny-gpt-extdata/model.onnx", "q_proj,v_proj")
	out := filepath.Join(t.TempDir(), "merged.onnx")
	r := mustRun(t, "merge", trained, "-o", out)
	if !strings.Contains(r.stdout, "Merged 4 adapter(s) (from manifest)") || !strings.Contains(r.stdout, "model.layers.1.self_attn.v_proj") {
		t.Errorf("merge output:\n%s", r.stdout)
	}
	if !strings.Contains(r.stderr, "wrote "+out) {
		t.Errorf("merge notes: %q", r.stderr)
	}
	if _, err := os.Stat(out + ".data"); err != nil {
		t.Errorf("external data in should give external data out: %v", err)
	}
	// The merged model has the base model's initializers and no others,
	// with the adapted weights changed and the rest identical.
	base, merged := weights(t, model("tiny-gpt-extdata/model.onnx")), weights(t, out)
	if len(base) != len(merged) {
		t.Fatalf("merged model has %d initializers, base %d", len(merged), len(base))
	}
	changed := 0
	for name, b := range base {
		mv, ok := merged[name]
		if !ok {
			t.Fatalf("initializer %s missing after merge", name)
		}
		if !bytes.Equal(b, mv) {
			changed++
		}
	}
	if changed != 4 {
		t.Errorf("%d weights changed, want the 4 adapted ones", changed)
	}
	testutil.CheckONNXLike(t, model("tiny-gpt-extdata/model.onnx"), out)

	// --json gives the report.
	jsonOut := filepath.Join(t.TempDir(), "m.onnx")
	r = mustRun(t, "merge", trained, "-o", jsonOut, "--json", "--only", "model.layers.0.self_attn.q_proj")
	var rep rewrite.MergeReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("merge --json: %v\n%s", err, r.stdout)
	}
	if len(rep.Merged) != 1 || len(rep.Kept) != 3 {
		t.Errorf("--only merged %d, kept %d; want 1 and 3", len(rep.Merged), len(rep.Kept))
	}
}

// Export then merge --adapter onto the base equals merging the model.
func TestExportAdapterThenMergeAdapter(t *testing.T) {
	trained := trainedModel(t, "tiny-gpt.onnx", "q_proj,v_proj,down_proj")
	dir := t.TempDir()
	merged := filepath.Join(dir, "merged.onnx")
	mustRun(t, "merge", trained, "-o", merged, "-q")
	adapter := filepath.Join(dir, "adapter")
	r := mustRun(t, "export-adapter", trained, "-o", adapter, "--task-type", "CAUSAL_LM")
	if !strings.Contains(r.stdout, "Exported 6 adapter(s)") {
		t.Errorf("export-adapter output: %s", r.stdout)
	}
	for _, f := range []string{"adapter_config.json", "adapter_model.safetensors"} {
		if _, err := os.Stat(filepath.Join(adapter, f)); err != nil {
			t.Fatal(err)
		}
	}
	viaPEFT := filepath.Join(dir, "peft.onnx")
	mustRun(t, "merge", model("tiny-gpt.onnx"), "--adapter", adapter, "-o", viaPEFT, "-q")
	a, b := weights(t, merged), weights(t, viaPEFT)
	for name, w := range a {
		if !bytes.Equal(w, b[name]) {
			t.Errorf("weight %s differs between merge and export + merge --adapter", name)
		}
	}
	testutil.CheckONNXLike(t, model("tiny-gpt.onnx"), viaPEFT)
}

func TestMergeUsageAndErrors(t *testing.T) {
	trained := trainedModel(t, "mlp-gemm-transb.onnx", "fc1")
	tmp := t.TempDir()
	cases := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"merge", trained}, 2, "missing -o/--output"},
		{[]string{"merge", trained, "-o", trained}, 2, "is the input"},
		{[]string{"merge", trained, "-o", filepath.Join(tmp, "x.onnx"), "--scale", "0"}, 2, "--scale"},
		{[]string{"merge", trained, "-o", filepath.Join(tmp, "x.onnx"), "--allow-partial"}, 2, "goes with --adapter"},
		{[]string{"merge", trained, "-o", filepath.Join(tmp, "x.onnx"), "--only", "nope"}, 1, "nope"},
		{[]string{"merge", model("mlp-gemm-transb.onnx"), "--adapter", tmp, "-o", filepath.Join(tmp, "y.onnx")}, 1, "adapter_config.json"},
		{[]string{"export-adapter", trained}, 2, "missing -o/--output"},
		{[]string{"export-adapter", model("mlp-gemm-transb.onnx"), "-o", filepath.Join(tmp, "none")}, 1, "adapter"},
	}
	for _, c := range cases {
		r := run(t, c.args...)
		if r.code != c.code || !strings.Contains(r.stderr, c.msg) {
			t.Errorf("onnxlora %s: exit %d, stderr %q; want exit %d mentioning %q", strings.Join(c.args, " "), r.code, r.stderr, c.code, c.msg)
		}
		if strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Errorf("onnxlora %s: error is not one line: %q", strings.Join(c.args, " "), r.stderr)
		}
	}
	for _, f := range []string{"x.onnx", "y.onnx"} {
		if _, err := os.Stat(filepath.Join(tmp, f)); err == nil {
			t.Errorf("a failed merge left %s behind", f)
		}
	}
}
