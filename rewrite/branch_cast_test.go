package rewrite

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

func TestFloat32AdaptersOnFloat16Layers(t *testing.T) {
	if err := castBranchF16.check(); err != nil {
		t.Fatal(err)
	}
	path := mgTestModels + "/tiny-gpt-fp16.onnx"
	base := loadModel(t, path)
	m := loadModel(t, path)
	inj := mgInjectRandom(t, m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj", "v_proj"}}, AdapterDType: graph.Float}, 11)
	g := m.Graph()
	for _, a := range inj.Manifest.Adapters {
		if a.DType != graph.Float.String() {
			t.Errorf("%s: manifest dtype %s", a.Module, a.DType)
		}
		for _, name := range []string{a.LoraA, a.LoraB, a.ScalingTensor} {
			if tp, _ := g.Initializer(name); tp == nil || graph.DataType(tp.GetDataType()) != graph.Float {
				t.Errorf("%s: %s is not float32", a.Module, name)
			}
		}
		if !strings.HasSuffix(a.Nodes[0], "/lora/Cast_x") || !strings.HasSuffix(a.Nodes[len(a.Nodes)-2], "/lora/Cast_out") {
			t.Errorf("%s: nodes %v", a.Module, a.Nodes)
		}
	}
	// Exported for PEFT in float32, as PEFT keeps them.
	dir := filepath.Join(t.TempDir(), "adapter")
	if _, err := ExportPEFT(m, dir, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	_, mods, err := export.ReadPEFTAdapter(dir)
	if err != nil || mods[0].DType != export.DTypeF32 {
		t.Fatalf("exported: %v %v", err, mods)
	}
	// Without the manifest the branches are still recognized.
	stripped := mgCloneModel(m)
	stripped.Proto.MetadataProps = nil
	if rec, err := RecognizedAdapters(stripped); err != nil || len(rec) != len(inj.Manifest.Adapters) {
		t.Fatalf("recognized %d of %d: %v", len(rec), len(inj.Manifest.Adapters), err)
	}
	merged := mgCloneModel(m)
	if _, err := Merge(merged, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	if len(merged.Graph().Proto.Node) != len(base.Graph().Proto.Node) {
		t.Fatalf("merged model has %d nodes, the base %d", len(merged.Graph().Proto.Node), len(base.Graph().Proto.Node))
	}
	fromStripped := mgCloneModel(stripped)
	if _, err := Merge(fromStripped, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	mgSameTensors(t, fromStripped, merged)

	orttest.Require(t)
	tmp := t.TempDir()
	feeds := func(*ortrun.Session) []ortrun.Tensor { return mgGoldenFeeds(t, "tiny-gpt-fp16.onnx") }
	live := mgRunModel(t, mgSaveModel(t, m, filepath.Join(tmp, "live.onnx")), feeds)
	folded := mgRunModel(t, mgSaveModel(t, merged, filepath.Join(tmp, "merged.onnx")), feeds)
	worst := mgCompareRuns(t, live, folded, 2e-2)
	effect := mgCompareRunsQuiet(live, mgRunModel(t, path, feeds))
	t.Logf("float32 adapters on float16 layers: live vs merged within %.3g of scale; the adapters move the outputs by %.3g", worst, effect)
	if effect < 5e-2 {
		t.Errorf("the adapters barely change the outputs (%g)", effect)
	}
}
