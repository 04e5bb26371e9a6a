package main

// End-to-end tests of the model lifecycle through the CLI, run in-process:
// inject -> verify against the base, train (random adapters) -> merge ->
// verify against the unmerged model, and a deliberately wrong merge that
// verify must catch. Every model the CLI writes goes through onnx.checker.

import (
	"encoding/json"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
	"github.com/onnxlora/onnxlora/rewrite"
)

// e2eRun runs onnxlora with args against buffers.
func e2eRun(t *testing.T, args ...string) result {
	t.Helper()
	ios, _, out, errOut := TestIO()
	code := Main(NewFactory(ios), args)
	return result{code: code, stdout: out.String(), stderr: errOut.String()}
}

// e2eMustRun runs the CLI and fails the test unless it exits 0.
func e2eMustRun(t *testing.T, args ...string) result {
	t.Helper()
	r := e2eRun(t, args...)
	if r.code != 0 {
		t.Fatalf("onnxlora %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// e2eModel is a model of the lifecycle tests and the layers to adapt.
type e2eModel struct {
	name    string // subtest name
	file    string // in testdata/models, or in the shared corpus
	corpus  bool
	targets string
}

// path returns the model's path, skipping the test when it is a corpus
// model and the corpus is absent.
func (m e2eModel) path(t *testing.T) string {
	t.Helper()
	if m.corpus {
		return corpusModel(t, m.file)
	}
	return model(m.file)
}

// e2eModels are the testdata models of the lifecycle tests, then the real
// exports.
var e2eModels = []e2eModel{
	{"tiny-gpt", "tiny-gpt.onnx", false, "all-linear"},
	{"tiny-gpt-fp16", "tiny-gpt-fp16.onnx", false, "all-linear"},
	{"tiny-bert", "tiny-bert.onnx", false, "all-linear"},
	{"mlp-gemm-transb", "mlp-gemm-transb.onnx", false, "fc1,fc2,fc3"},
	{"tiny-gpt-extdata", "tiny-gpt-extdata/model.onnx", false, "q_proj,v_proj,down_proj"},
	{"bf16-matmul", "bf16-matmul.onnx", false, "fc1,fc2"},
	{"corpus-llama-fp16-extdata", "llama-tiny-fp16-extdata/model.onnx", true, "q_proj,v_proj,o_proj"},
	{"corpus-decoder-transposed", "decoder-transposed-weights-opset24.onnx", true, "q_proj,v_proj,down_proj"},
	{"corpus-bert-tied", "bert-toy-tied-embeddings.onnx", true, "query,value"},
	{"corpus-whisper-decoder", "whisper-decoder-attention-fp32.onnx", true, "all-linear"},
	{"corpus-whisper-encoder-fp16", "whisper-encoder-attention-fp16.onnx", true, "all-linear"},
	{"corpus-qwen-unnamed-fp16", "qwen-tiny-fp16-unnamed-nodes.onnx", true, "l0.q.w,l1.v.w,l0.dn.w"},
	{"corpus-gpt2-conv1d-gemm", "gpt2-conv1d-gemm-pytorch16.onnx", true, "c_attn,c_proj"},
	{"corpus-gpt2-tiny-fp32", "gpt2-tiny-fp32/model.onnx", true, "all-linear"},
	{"corpus-gpt2-tiny-fp16", "gpt2-tiny-fp16/model.onnx", true, "c_fc,c_proj"},
	{"corpus-megatron-numeric-names", "gpt2-megatron-pytorch19.onnx", true, "all-linear"},
	{"corpus-cnn-gemm-transb", "cnn-mnist-gemm-transb.onnx", true, "fc1,fc2"},
	{"corpus-linear-gemm-matmul", "linear-gemm-and-matmul-pytorch201.onnx", true, "all-linear"},
	{"corpus-keras-bert", "bert-qa-keras2onnx.onnx", true, "query,value"},
}

// e2eInject runs `onnxlora inject` and checks the written model.
func e2eInject(t *testing.T, src, dst, targets string) {
	t.Helper()
	e2eMustRun(t, "inject", src, "-o", dst, "--target", targets, "--rank", "4", "--alpha", "8", "--seed", "1")
	testutil.CheckONNXLike(t, src, dst)
}

// TestE2EInjectVerifiesAgainstBase: untrained adapters (B = 0) leave every
// output as it was.
func TestE2EInjectVerifiesAgainstBase(t *testing.T) {
	orttest.Require(t)
	for _, m := range e2eModels {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			base := m.path(t)
			lora := filepath.Join(t.TempDir(), "lora.onnx")
			e2eInject(t, base, lora, m.targets)
			r := e2eMustRun(t, "verify", base, lora, "--samples", "2")
			if !strings.Contains(r.stdout, "PASS: all") || strings.Contains(r.stdout, "FAIL") {
				t.Errorf("verify output:\n%s", r.stdout)
			}
		})
	}
}

// randomizeAdapters writes a copy of the injected model src whose adapter
// factors (those which picks from each adapter) hold 0.1·N(0,1) values
// from rng, as if trained, saved with opts, and returns its manifest.
func randomizeAdapters(t *testing.T, src, dst string, rng *rand.Rand, which func(rewrite.Adapter) []string, opts graph.SaveOptions) *rewrite.Manifest {
	t.Helper()
	m, err := graph.Load(src)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	man, err := rewrite.ReadManifest(m)
	if err != nil || man == nil {
		t.Fatalf("%s: no manifest (%v)", src, err)
	}
	g := m.Graph()
	for _, a := range man.Adapters {
		for _, name := range which(a) {
			w, _ := g.Initializer(name)
			if w == nil {
				t.Fatalf("%s: manifest names %s, which is not an initializer", src, name)
			}
			n, err := graph.NumElements(w.Dims)
			if err != nil {
				t.Fatal(err)
			}
			vals := make([]float64, n)
			for i := range vals {
				vals[i] = 0.1 * rng.NormFloat64()
			}
			if err := graph.SetFloat64s(w, vals); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := m.Save(dst, opts); err != nil {
		t.Fatal(err)
	}
	return man
}

// bothFactors picks an adapter's lora_A and lora_B for randomizeAdapters.
func bothFactors(a rewrite.Adapter) []string { return []string{a.LoraA, a.LoraB} }

// e2eRandomizeAdapters randomizes both factors of every adapter.
func e2eRandomizeAdapters(t *testing.T, src, dst string, seed uint64) *rewrite.Manifest {
	return randomizeAdapters(t, src, dst, rand.New(rand.NewPCG(seed, 7)), bothFactors, graph.SaveOptions{})
}

// TestE2EMergeMatchesUnmerged: merging trained adapters changes nothing
// but the graph, while the adapters themselves do change the outputs.
func TestE2EMergeMatchesUnmerged(t *testing.T) {
	orttest.Require(t)
	for _, m := range e2eModels {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			base := m.path(t)
			dir := t.TempDir()
			lora, trained, merged := filepath.Join(dir, "lora.onnx"), filepath.Join(dir, "trained.onnx"), filepath.Join(dir, "merged.onnx")
			e2eInject(t, base, lora, m.targets)
			e2eRandomizeAdapters(t, lora, trained, 1)
			e2eMustRun(t, "merge", trained, "-o", merged)
			testutil.CheckONNXLike(t, base, merged)

			r := e2eMustRun(t, "verify", trained, merged, "--samples", "2", "--seed", "5")
			if !strings.Contains(r.stdout, "PASS: all") {
				t.Errorf("merged vs unmerged:\n%s", r.stdout)
			}
			// The adapters are not a no-op: the merged model differs from
			// the base, so the check above is not vacuous.
			r = e2eRun(t, "verify", base, merged, "--quiet")
			if r.code != 1 || !strings.Contains(r.stdout, "FAIL") {
				t.Errorf("merged vs base: exit %d, want 1 (trained adapters change outputs)\n%s%s", r.code, r.stdout, r.stderr)
			}
		})
	}
}

// e2eWrongMerge writes a copy of a correctly merged model in which every
// square adapter was merged transposed: W + s·(A·B)ᵀ where the layer needs
// W + s·A·B (the mistake a merge makes when it ignores the weight's layout).
// It returns how many weights it spoiled.
func e2eWrongMerge(t *testing.T, trained, merged, dst string) int {
	t.Helper()
	tm, err := graph.Load(trained)
	if err != nil {
		t.Fatal(err)
	}
	defer tm.Close()
	man, err := rewrite.ReadManifest(tm)
	if err != nil || man == nil {
		t.Fatalf("%s: no manifest (%v)", trained, err)
	}
	mm, err := graph.Load(merged)
	if err != nil {
		t.Fatal(err)
	}
	defer mm.Close()
	tg, mg := tm.Graph(), mm.Graph()
	read := func(m *graph.Model, g *graph.Graph, name string) []float64 {
		w, _ := g.Initializer(name)
		if w == nil {
			t.Fatalf("no initializer %s", name)
		}
		v, err := m.Float64s(w)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	spoiled := 0
	for _, a := range man.Adapters {
		if a.InFeatures != a.OutFeatures {
			continue
		}
		n, r := int(a.InFeatures), a.Rank
		A, B := read(tm, tg, a.LoraA), read(tm, tg, a.LoraB)
		p := make([]float64, n*n) // P = A·B, [in, out]
		for i := 0; i < n; i++ {
			for j := 0; j < n; j++ {
				for k := 0; k < r; k++ {
					p[i*n+j] += A[i*r+k] * B[k*n+j]
				}
			}
		}
		// The merged weight holds W + s·P ([in, out], MatMul) or
		// W + s·Pᵀ ([out, in], Gemm transB=1): add s·(Pᵀ - P) or
		// s·(P - Pᵀ) to get the transposed delta instead.
		transposed, scale := false, a.Scaling
		for _, nd := range mm.Proto.Graph.Node {
			if nd.GetName() == a.Node && nd.GetOpType() == "Gemm" {
				transposed = graph.AttrInt(nd, "transB", 0) == 1
				scale /= float64(graph.AttrFloat(nd, "alpha", 1))
			}
		}
		w, _ := mg.Initializer(a.Weight)
		if w == nil {
			t.Fatalf("%s: merged weight %s not found", merged, a.Weight)
		}
		vals := read(mm, mg, a.Weight)
		for i := 0; i < n; i++ {
			for j := 0; j < n; j++ {
				d := p[j*n+i] - p[i*n+j]
				if transposed {
					d = -d
				}
				vals[i*n+j] += scale * d
			}
		}
		if err := graph.SetFloat64s(w, vals); err != nil {
			t.Fatal(err)
		}
		spoiled++
	}
	if err := mm.Save(dst, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	return spoiled
}

// TestE2EWrongMergeFails: verify catches a merge that transposes the delta,
// exiting 1 with a one-line error naming the output.
func TestE2EWrongMergeFails(t *testing.T) {
	orttest.Require(t)
	for _, m := range []e2eModel{
		{"tiny-gpt", "tiny-gpt.onnx", false, "q_proj,v_proj"},
		{"mlp-gemm-transb", "mlp-gemm-transb.onnx", false, "fc2"},
	} {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			base := m.path(t)
			dir := t.TempDir()
			lora, trained := filepath.Join(dir, "lora.onnx"), filepath.Join(dir, "trained.onnx")
			merged, wrong := filepath.Join(dir, "merged.onnx"), filepath.Join(dir, "wrong.onnx")
			e2eInject(t, base, lora, m.targets)
			e2eRandomizeAdapters(t, lora, trained, 2)
			e2eMustRun(t, "merge", trained, "-o", merged)
			testutil.CheckONNXLike(t, base, merged)
			if n := e2eWrongMerge(t, trained, merged, wrong); n == 0 {
				t.Fatal("no square adapter to merge wrongly")
			}
			testutil.CheckONNXLike(t, base, wrong)

			e2eMustRun(t, "verify", trained, merged)
			r := e2eRun(t, "verify", trained, wrong)
			if r.code != 1 {
				t.Fatalf("wrong merge: exit %d, want 1\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
			}
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			last := lines[len(lines)-1]
			out := "logits"
			if m.name == "mlp-gemm-transb" {
				out = "output"
			}
			if !strings.HasPrefix(last, "onnxlora: "+wrong+" does not match "+trained) || !strings.Contains(last, out+" (max abs") {
				t.Errorf("error line = %q, want it to name %s", last, out)
			}
			if !strings.Contains(r.stdout, "FAIL") {
				t.Errorf("table does not show FAIL:\n%s", r.stdout)
			}
		})
	}
}

// TestE2EVerifyJSONAfterInject checks the machine-readable report of an
// injected model against its base.
func TestE2EVerifyJSONAfterInject(t *testing.T) {
	orttest.Require(t)
	lora := filepath.Join(t.TempDir(), "lora.onnx")
	e2eInject(t, model("tiny-bert.onnx"), lora, "query,value")
	r := e2eMustRun(t, "verify", model("tiny-bert.onnx"), lora, "--json", "--samples", "2", "--dim", "sequence=5")
	var rep struct {
		Pass    bool             `json:"pass"`
		Samples int              `json:"samples"`
		Dims    map[string]int64 `json:"dims"`
		Outputs []struct {
			Name  string  `json:"name"`
			Pass  bool    `json:"pass"`
			Shape []int64 `json:"shape"`
		} `json:"outputs"`
		Latency map[string]float64 `json:"latency_ms"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("--json output is not JSON: %v\n%s", err, r.stdout)
	}
	if !rep.Pass || rep.Samples != 2 || rep.Dims["sequence"] != 5 || len(rep.Outputs) != 2 || rep.Outputs[0].Shape[1] != 5 || rep.Latency["a"] <= 0 {
		t.Errorf("report: %+v", rep)
	}
}
