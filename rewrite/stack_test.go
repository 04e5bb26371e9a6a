package rewrite

import (
	"math"
	"path/filepath"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// TestStackedAdapters puts a second adapter on layers that have one
// (inject --stack) and checks the merge: each weight is W + s1·A1·B1 +
// s2·A2·B2 computed here in float64 and rounded once, with or without the
// manifest, and the merged model runs like the live one in ONNX Runtime.
func TestStackedAdapters(t *testing.T) {
	path := mgTestModels + "/tiny-gpt.onnx"
	base := loadModel(t, path)
	m := loadModel(t, path)
	targets := SelectOptions{Targets: []string{"q_proj", "down_proj"}}
	first := InjectConfig{SelectOptions: targets}
	first.Rank, first.Alpha = 4, 8
	if _, err := Inject(m, first); err != nil {
		t.Fatal(err)
	}
	if _, err := Inject(mgCloneModel(m), first); err == nil {
		t.Fatal("a second adapter without Stack was accepted")
	}
	second := first
	second.Rank, second.Alpha, second.Stack, second.Seed = 2, 3, true, 9
	inj, err := Inject(m, second)
	if err != nil {
		t.Fatal(err)
	}
	if len(inj.Manifest.Adapters) != 8 {
		t.Fatalf("%d adapters, want 8", len(inj.Manifest.Adapters))
	}
	mgRandomizeAdapters(t, m, 17)

	// The reference: every adapter's product added to the base weight.
	want := map[string][]float64{}
	for _, a := range inj.Manifest.Adapters {
		w := a.Weight
		if want[w] == nil {
			want[w] = mgFloatsOf(t, base, mgTensorByName(base, w))
		}
		av := mgFloatsOf(t, m, mgTensorByName(m, a.LoraA))
		bv := mgFloatsOf(t, m, mgTensorByName(m, a.LoraB))
		in, out := int(a.InFeatures), int(a.OutFeatures)
		for i := 0; i < in; i++ {
			for j := 0; j < out; j++ {
				s := 0.0
				for k := 0; k < a.Rank; k++ {
					s += av[i*a.Rank+k] * bv[k*out+j]
				}
				want[w][i*out+j] += a.Scaling * s
			}
		}
	}
	check := func(name string, merged *graph.Model) {
		t.Helper()
		if len(merged.Graph().Proto.Node) != len(base.Graph().Proto.Node) {
			t.Errorf("%s: %d nodes after the merge, the base has %d", name, len(merged.Graph().Proto.Node), len(base.Graph().Proto.Node))
		}
		for w, ref := range want {
			got := mgFloatsOf(t, merged, mgTensorByName(merged, w))
			for i := range ref {
				if r := float64(float32(ref[i])); math.Abs(got[i]-r) > 1e-7*math.Max(1, math.Abs(r)) {
					t.Fatalf("%s: %s[%d] = %v, want %v", name, w, i, got[i], r)
				}
			}
		}
	}
	merged := mgCloneModel(m)
	rep, err := Merge(merged, MergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 8 {
		t.Errorf("report lists %d merged adapters, want 8", len(rep.Merged))
	}
	check("manifest", merged)
	stripped := mgCloneModel(m)
	stripped.Proto.MetadataProps = nil
	if _, err := Merge(stripped, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	check("recognized", stripped)
	if _, err := ExportPEFT(m, filepath.Join(t.TempDir(), "peft"), ExportOptions{}); err == nil {
		t.Error("a PEFT export of stacked adapters was accepted")
	}

	orttest.Require(t)
	tmp := t.TempDir()
	feeds := func(*ortrun.Session) []ortrun.Tensor { return mgGoldenFeeds(t, "tiny-gpt.onnx") }
	live := mgRunModel(t, mgSaveModel(t, m, filepath.Join(tmp, "live.onnx")), feeds)
	folded := mgRunModel(t, mgSaveModel(t, merged, filepath.Join(tmp, "merged.onnx")), feeds)
	worst := mgCompareRuns(t, live, folded, 1e-4)
	effect := mgCompareRunsQuiet(live, mgRunModel(t, path, feeds))
	t.Logf("stacked adapters: live vs merged within %.3g of scale; the adapters move the outputs by %.3g", worst, effect)
	if effect < 1e-2 {
		t.Errorf("the adapters barely change the outputs (%g)", effect)
	}
}
