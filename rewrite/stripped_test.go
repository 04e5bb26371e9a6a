package rewrite

import (
	"strings"
	"testing"
)

func TestStrippedMetadataAdaptersRecognized(t *testing.T) {
	m := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	inj := mgInjectRandom(t, m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}}}, 5)
	m.Proto.MetadataProps = nil
	rec, err := RecognizedAdapters(m)
	if err != nil {
		t.Fatal(err)
	}
	if len(rec) != len(inj.Manifest.Adapters) {
		t.Fatalf("recognized %d adapters, injected %d", len(rec), len(inj.Manifest.Adapters))
	}
	for i, a := range rec {
		w := inj.Manifest.Adapters[i]
		if a.Module != w.Module || a.LoraA != w.LoraA || a.LoraB != w.LoraB || a.Rank != w.Rank || a.Scaling != w.Scaling || a.InFeatures != w.InFeatures || a.OutFeatures != w.OutFeatures || a.Node != w.Node {
			t.Errorf("recognized %+v\ninjected %+v", a, w)
		}
	}
	for _, targets := range [][]string{{"q_proj"}, {"v_proj"}} {
		_, err = Inject(m, mgInjectDefaults(InjectConfig{SelectOptions: SelectOptions{Targets: targets}}))
		if err == nil || !strings.Contains(err.Error(), "LoRA branch(es) (the first on model.layers.0.self_attn.q_proj) but no manifest") {
			t.Errorf("inject %v on a stripped adapted model: %v", targets, err)
		}
	}
	// With the manifest there, nothing is "recognized".
	m2 := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	mgInjectRandom(t, m2, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}}}, 5)
	if rec, err := RecognizedAdapters(m2); err != nil || rec != nil {
		t.Errorf("with a manifest: %v %v", rec, err)
	}
}
