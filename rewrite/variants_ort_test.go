package rewrite

import (
	"math"
	"path/filepath"
	"testing"

	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// vtRel is max |got − want| / max |want| over every output.
func vtRel(t *testing.T, got, want map[string][]float64) float64 {
	t.Helper()
	var num, den float64
	for name, w := range want {
		g, ok := got[name]
		if !ok || len(g) != len(w) {
			t.Fatalf("output %s: %d values, want %d", name, len(g), len(w))
		}
		for i := range w {
			num = math.Max(num, math.Abs(g[i]-w[i]))
			den = math.Max(den, math.Abs(w[i]))
		}
	}
	return num / den
}

// TestPiSSAInORT: in ONNX Runtime, a model injected with pissa,
// pissa_niter_N or olora computes the base model at step 0 (rel <= 1e-5);
// after training (random A and B), the adapter converted back to plain
// LoRA and applied to the ORIGINAL base computes the trained model (rel <=
// 1e-5).
func TestPiSSAInORT(t *testing.T) {
	orttest.Require(t)
	gold := readGolden(t, "tiny-gpt.onnx")
	inputs := gold.tensors(t)
	basePath := testutil.TestModel("tiny-gpt.onnx")
	base := runModel(t, basePath, inputs)
	for _, init := range []Init{InitPiSSA, InitPiSSANiter(2), InitOLoRA} {
		t.Run(string(init), func(t *testing.T) {
			dir := t.TempDir()
			m := loadModel(t, basePath)
			if _, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{AllLinear}, Rank: 4, Alpha: 8}, Init: init, Seed: 5}); err != nil {
				t.Fatal(err)
			}
			step0 := mgSaveModel(t, m, filepath.Join(dir, "step0.onnx"))
			if rel := vtRel(t, runModel(t, step0, inputs), base); rel > 1e-5 {
				t.Errorf("step 0 differs from the base: rel %g", rel)
			} else {
				t.Logf("step 0 vs base: rel %.2g", rel)
			}
			mgRandomizeAdapters(t, m, 11)
			trained := mgSaveModel(t, m, filepath.Join(dir, "trained.onnx"))
			want := runModel(t, trained, inputs)
			if vtRel(t, want, base) < 1e-3 {
				t.Fatal("training did not change the outputs; the test would prove nothing")
			}
			peftDir := filepath.Join(dir, "lora")
			if _, err := ExportPEFTConverted(m, step0, peftDir, ExportOptions{}); err != nil {
				t.Fatal(err)
			}
			orig := loadModel(t, basePath)
			if _, err := ApplyPEFT(orig, peftDir, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			applied := mgSaveModel(t, orig, filepath.Join(dir, "applied.onnx"))
			if rel := vtRel(t, runModel(t, applied, inputs), want); rel > 1e-5 {
				t.Errorf("converted LoRA on the original base differs from the trained PiSSA model: rel %g", rel)
			} else {
				t.Logf("converted on original base vs trained: rel %.2g", rel)
			}
		})
	}
}

// TestResizeInORT: resizing trained adapters to their full rank leaves the
// model's outputs unchanged in ONNX Runtime, and a lower rank changes them.
func TestResizeInORT(t *testing.T) {
	orttest.Require(t)
	gold := readGolden(t, "tiny-gpt.onnx")
	inputs := gold.tensors(t)
	dir := t.TempDir()
	m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
	mgInjectRandom(t, m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{AllLinear}, Rank: 6, Alpha: 12}}, 4)
	trained := mgSaveModel(t, m, filepath.Join(dir, "trained.onnx"))
	want := runModel(t, trained, inputs)
	full := mgCloneModel(m)
	if _, err := Resize(full, ResizeOptions{Rank: 6}); err != nil {
		t.Fatal(err)
	}
	fullPath := mgSaveModel(t, full, filepath.Join(dir, "full.onnx"))
	if rel := vtRel(t, runModel(t, fullPath, inputs), want); rel > 1e-5 {
		t.Errorf("full-rank resize changed the outputs: rel %g", rel)
	}
	low := mgCloneModel(m)
	if _, err := Resize(low, ResizeOptions{Rank: 2}); err != nil {
		t.Fatal(err)
	}
	lowPath := mgSaveModel(t, low, filepath.Join(dir, "low.onnx"))
	testutil.CheckONNX(t, lowPath)
	if rel := vtRel(t, runModel(t, lowPath, inputs), want); rel < 1e-6 {
		t.Errorf("rank-2 resize of random rank-6 adapters left the outputs unchanged (rel %g)", rel)
	}
	// The resized model merges like any other.
	if _, err := Merge(low, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
}
