package inspect

import (
	"math"
	"path/filepath"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/rewrite"
)

// TestConvDeltaNorm: a Conv adapter's ||scaling·B·A||_F is computed on the
// flattened kernel, equal (to the report's 6 digits) to the norm of the
// PEFT fixture's delta computed here from its A and B.
func TestConvDeltaNorm(t *testing.T) {
	dir := filepath.Join(testutil.RepoRoot(), "testdata", "variants-b")
	m, err := graph.Load(filepath.Join(dir, "conv.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	inj, err := rewrite.Inject(m, rewrite.InjectConfig{SelectOptions: rewrite.SelectOptions{Targets: []string{"body"}, Rank: 4, Alpha: 8}})
	if err != nil {
		t.Fatal(err)
	}
	f, err := export.OpenSafetensors(filepath.Join(dir, "conv", "adapter", export.PEFTWeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a, _ := f.ReadFloat64("base_model.model.body.lora_A.weight") // [4, 8·3·3]
	b, _ := f.ReadFloat64("base_model.model.body.lora_B.weight") // [6, 4]
	ad := inj.Manifest.Adapters[0]
	for name, v := range map[string][]float64{ad.LoraA: a, ad.LoraB: b} {
		tp, _ := m.Graph().Initializer(name)
		if err := graph.SetFloat64s(tp, v); err != nil {
			t.Fatal(err)
		}
	}
	want := 0.0
	for o := 0; o < 6; o++ {
		for c := 0; c < 72; c++ {
			s := 0.0
			for k := 0; k < 4; k++ {
				s += b[o*4+k] * a[k*72+c]
			}
			want += (2 * s) * (2 * s)
		}
	}
	want = math.Sqrt(want)
	rep, err := Build(m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Adapters) != 1 || rep.Adapters[0].Norm == nil {
		t.Fatalf("adapters %+v", rep.Adapters)
	}
	if got := *rep.Adapters[0].Norm; math.Abs(got-want) > 1e-5*want {
		t.Errorf("norm %v, want %v", got, want)
	}
}
