package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/inspect"
	"github.com/onnxlora/onnxlora/internal/testutil"
)

// TestInspectGolden checks the text and JSON reports of the project's test
// models against golden files (go test -update rewrites them).
func TestInspectGolden(t *testing.T) {
	cases := []struct {
		name  string
		model string
		args  []string
	}{
		{"tiny-gpt", "tiny-gpt.onnx", nil},
		{"tiny-gpt-select", "tiny-gpt.onnx", []string{"--target", "q_proj,v_proj", "--layers", "1", "--rank", "4", "--alpha", "8"}},
		{"tiny-gpt-extdata", "tiny-gpt-extdata/model.onnx", nil},
		{"tiny-gpt-fp16", "tiny-gpt-fp16.onnx", []string{"--target", "all-linear"}},
		{"tiny-bert", "tiny-bert.onnx", nil},
		{"mlp-gemm-transb", "mlp-gemm-transb.onnx", nil},
		{"shared-weight", "shared-weight.onnx", nil},
		{"bf16-matmul", "bf16-matmul.onnx", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := model(c.model)
			if _, err := os.Stat(path); err != nil {
				t.Skipf("skipping: %v", err)
			}
			text := mustRun(t, append([]string{"inspect", path}, c.args...)...)
			testutil.Golden(t, "inspect/"+c.name+".txt", []byte(text.stdout))
			js := mustRun(t, append([]string{"inspect", path, "--json"}, c.args...)...)
			checkJSON(t, js.stdout)
			testutil.Golden(t, "inspect/"+c.name+".json", []byte(js.stdout))
		})
	}
}

// TestInspectCorpusGolden does the same on real exports from the shared
// corpus, skipping each model that is absent.
func TestInspectCorpusGolden(t *testing.T) {
	cases := []struct {
		name  string
		model string
		args  []string
	}{
		{"llama-tiny-fp16-extdata", "llama-tiny-fp16-extdata/model.onnx", []string{"--target", "q_proj,v_proj", "--layers", "0"}},
		{"gpt2-beamsearch-subgraph", "gpt2-beamsearch-subgraph.onnx", nil},
		{"qwen-tiny-fp16-unnamed-nodes", "qwen-tiny-fp16-unnamed-nodes.onnx", nil},
		{"decoder-transposed-weights-opset24", "decoder-transposed-weights-opset24.onnx", []string{"--target", "all-linear"}},
		{"whisper-decoder-attention-fp32", "whisper-decoder-attention-fp32.onnx", nil},
		{"ort-lora-two-params", "ort-lora-two-params.onnx", nil},
		{"quantized-qdq-extdata", "quantized-qdq-extdata/conv_qdq_external_ini.onnx", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := corpusModel(t, c.model)
			text := mustRun(t, append([]string{"inspect", path}, c.args...)...)
			testutil.Golden(t, "corpus/"+c.name+".txt", []byte(text.stdout))
			js := mustRun(t, append([]string{"inspect", path, "--json"}, c.args...)...)
			checkJSON(t, js.stdout)
			testutil.Golden(t, "corpus/"+c.name+".json", []byte(js.stdout))
		})
	}
}

func TestInspectCorpusRefusesPathTraversal(t *testing.T) {
	path := corpusModel(t, "bad-external-data-path-traversal.onnx")
	r := run(t, "inspect", path)
	if r.code != 1 || !strings.Contains(r.stderr, "outside the model's folder") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("exit %d, stderr %q; want 1 and one line about the folder", r.code, r.stderr)
	}
}

// checkJSON parses a report and checks the fields scripts rely on.
func checkJSON(t *testing.T, s string) {
	t.Helper()
	var r inspect.Report
	if err := json.Unmarshal([]byte(s), &r); err != nil {
		t.Fatalf("not JSON: %v", err)
	}
	if r.SchemaVersion != inspect.SchemaVersion || r.Layers == nil || r.Adapters == nil || r.Skipped == nil {
		t.Errorf("report misses required fields: %+v", r)
	}
	var raw map[string]any
	_ = json.Unmarshal([]byte(s), &raw)
	for _, k := range []string{"schema_version", "model", "layers", "totals", "selection", "adapters", "skipped"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("JSON lacks key %q", k)
		}
	}
}

// TestInspectInjected inspects a model after inject: adapters with their
// rank, alpha and a zero norm (B starts at zero), the DOT drawing, and a
// selection on top of the existing adapters that agrees with inject's line.
func TestInspectInjected(t *testing.T) {
	dir := t.TempDir()
	lora := filepath.Join(dir, "lora.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", lora, "--target", "q_proj,v_proj", "--rank", "8", "--alpha", "16")

	r := mustRun(t, "inspect", lora)
	testutil.Golden(t, "inspect/tiny-gpt-lora.txt", []byte(strings.ReplaceAll(r.stdout, dir, "$TMP")))
	js := mustRun(t, "inspect", lora, "--json")
	var rep inspect.Report
	if err := json.Unmarshal([]byte(js.stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Adapters) != 4 || rep.Totals.Adapted != 4 {
		t.Fatalf("adapters %d, adapted layers %d; want 4 and 4", len(rep.Adapters), rep.Totals.Adapted)
	}
	for _, a := range rep.Adapters {
		if a.Rank != 8 || a.Alpha != 16 || a.Norm == nil || *a.Norm != 0 {
			t.Errorf("%s: rank %d alpha %v norm %v; want 8, 16, 0", a.Module, a.Rank, a.Alpha, a.Norm)
		}
	}
	testutil.Golden(t, "inspect/tiny-gpt-lora.json", []byte(strings.ReplaceAll(js.stdout, dir, "$TMP")))

	dot := mustRun(t, "inspect", lora, "--dot", "--layer", `layers\.0\.self_attn\.(q|k)_proj`, "--target", "k_proj")
	testutil.Golden(t, "inspect/tiny-gpt-lora.dot", []byte(strings.ReplaceAll(dot.stdout, dir, "$TMP")))
	if n := strings.Count(dot.stdout, "subgraph cluster_"); n != 2 {
		t.Errorf("DOT has %d clusters, want 2", n)
	}

	// The selection's PEFT line is what inject would print.
	sel := mustRun(t, "inspect", lora, "--target", "o_proj", "--json")
	var selRep inspect.Report
	if err := json.Unmarshal([]byte(sel.stdout), &selRep); err != nil {
		t.Fatal(err)
	}
	dry := mustRun(t, "inject", lora, "--target", "o_proj", "--dry-run", "--json")
	var res injectResult
	if err := json.Unmarshal([]byte(dry.stdout), &res); err != nil {
		t.Fatal(err)
	}
	if selRep.Selection.Summary != res.Summary {
		t.Errorf("inspect selection says %q, inject --dry-run says %q", selRep.Selection.Summary, res.Summary)
	}

	// -o writes the report to a file and nothing to stdout.
	file := filepath.Join(dir, "plan.dot")
	o := mustRun(t, "inspect", lora, "--dot", "-o", file)
	if o.stdout != "" {
		t.Errorf("stdout with -o: %q", o.stdout)
	}
	if data, err := os.ReadFile(file); err != nil || !strings.HasPrefix(string(data), "digraph onnxlora {") {
		t.Errorf("-o file: %v %q", err, data)
	}
}

func TestInspectNoMatchAndNoLayerToDraw(t *testing.T) {
	r := run(t, "inspect", model("tiny-gpt.onnx"), "--target", "query")
	if r.code != 1 || !strings.HasPrefix(r.stderr, "onnxlora: no module matched") {
		t.Errorf("exit %d, stderr %q", r.code, r.stderr)
	}
	r = run(t, "inspect", model("tiny-gpt.onnx"), "--dot", "--layer", "nothing-like-this")
	if r.code != 1 || !strings.Contains(r.stderr, "no layer to draw") {
		t.Errorf("exit %d, stderr %q", r.code, r.stderr)
	}
}
