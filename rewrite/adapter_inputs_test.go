package rewrite

import (
	"slices"
	"testing"

	"github.com/onnxlora/onnxlora/internal/testutil"
)

// TestStartAdapterInputs: the starting defaults are what Inject gives
// constant factors for the same seed (A), and zero (B), so the model is
// still the base; merging them changes no weight bit.
func TestStartAdapterInputs(t *testing.T) {
	path := testutil.TestModel("tiny-gpt.onnx")
	m := loadModel(t, path)
	cfg := adapterInputsConfig()
	cfg.Seed = 7
	if _, err := Inject(m, cfg); err != nil {
		t.Fatal(err)
	}
	names, err := StartAdapterInputs(m, 4, cfg)
	if err != nil {
		t.Fatal(err)
	}
	classic := loadModel(t, path)
	ccfg := allLinear(4, 8)
	ccfg.Seed = 7
	inj, err := Inject(classic, ccfg)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(names, inj.Manifest.Trainable) {
		t.Fatalf("trainable %v, classic inject %v", names, inj.Manifest.Trainable)
	}
	g, cg := m.Graph(), classic.Graph()
	for i, name := range names {
		tp, _ := g.Initializer(name)
		ct, _ := cg.Initializer(name)
		if !slices.Equal(tp.Dims, ct.Dims) || !slices.Equal(mgFloatsOf(t, m, tp), mgFloatsOf(t, classic, ct)) {
			t.Errorf("%s (factor %d): %v differs from classic inject's %v", name, i%2, tp.Dims, ct.Dims)
		}
	}
	found, _, _, err := findAdapters(m, g)
	if err != nil || len(found) != len(names)/2 || found[0].Rank != 4 {
		t.Fatalf("after start: %d adapters, %v", len(found), err)
	}
	base := loadModel(t, path)
	if _, err := Merge(m, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	mgSameTensors(t, base, m)
	if _, err := StartAdapterInputs(loadModel(t, path), 4, cfg); err == nil {
		t.Error("a model without adapter inputs was accepted")
	}
}
