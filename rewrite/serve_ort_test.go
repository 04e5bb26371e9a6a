package rewrite

import (
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// TestServeAdapterInputsORT is the serving acceptance test: one ONNX
// Runtime session of an adapter-input model (inject --adapter-inputs)
// serves no adapter, adapter 1, adapter 2, adapter 3, adapter 1 again and
// none again. No adapter equals the base model in every bit; each adapter
// equals the base merged with it (relative error <= 1e-5). Adapter 1 comes
// from a PEFT directory (as convert-adapter makes it), adapter 2 from a
// model injected with constant factors and non-zero B (export-adapter),
// adapter 3 from an adapter-input model whose defaults were trained.
func TestServeAdapterInputsORT(t *testing.T) {
	orttest.Require(t)
	dir := t.TempDir()
	basePath := testutil.TestModel("tiny-gpt.onnx")

	serve := loadModel(t, basePath)
	cfg := adapterInputsConfig()
	if _, err := Inject(serve, cfg); err != nil {
		t.Fatal(err)
	}
	servePath := mgSaveModel(t, serve, filepath.Join(dir, "serve.onnx"))

	// Adapter 1: a PEFT directory (rsLoRA, a rank pattern), converted.
	peftModel := loadModel(t, basePath)
	pcfg := InjectConfig{RSLoRA: true, SelectOptions: SelectOptions{Targets: []string{"q_proj", "v_proj", "down_proj"}, Rank: 4, Alpha: 6,
		RankPattern: []PatternEntry{{Key: "down_proj", Value: 2}}}}
	mgInjectRandom(t, peftModel, pcfg, 1)
	peftDir := filepath.Join(dir, "peft")
	if _, err := ExportPEFT(peftModel, peftDir, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	_, mods, err := export.ReadPEFTAdapter(peftDir)
	if err != nil {
		t.Fatal(err)
	}
	ad1, err := export.OnnxAdapterFromPEFT(mods, graph.Float)
	if err != nil {
		t.Fatal(err)
	}

	// Adapter 2: constant factors with non-zero B, exported.
	classic := loadModel(t, basePath)
	mgInjectRandom(t, classic, allLinear(3, 5), 2)
	ad2, _, err := ExportOnnxAdapter(classic, ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// Adapter 3: an adapter-input model whose defaults were trained.
	trained := loadModel(t, servePath)
	setAdapterDefaults(t, trained, 5, 3)
	ad3, rep3, err := ExportOnnxAdapter(trained, ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep3.Modules) != len(ad3.Params)/2 || len(ad3.Params) == 0 {
		t.Fatalf("exported %d modules in %d params", len(rep3.Modules), len(ad3.Params))
	}

	// The references: the base merged with each adapter; adapter 1 into
	// the plain base, adapter 2 into the adapter-input model, adapter 3
	// by merging the trained model's own defaults.
	ref := func(name string, m *graph.Model, merge func(*graph.Model) error) string {
		if err := merge(m); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return mgSaveModel(t, m, filepath.Join(dir, name+".onnx"))
	}
	ref1 := ref("merged1", loadModel(t, basePath), func(m *graph.Model) error { _, err := ApplyOnnxAdapter(m, ad1, MergeOptions{}); return err })
	ref2 := ref("merged2", loadModel(t, servePath), func(m *graph.Model) error { _, err := ApplyOnnxAdapter(m, ad2, MergeOptions{}); return err })
	ref3 := ref("merged3", trained, func(m *graph.Model) error { _, err := Merge(m, MergeOptions{}); return err })

	// Adapter 1 merged into the adapter-input model gives the same
	// weights as into the base: same factors, same arithmetic.
	alt := loadModel(t, servePath)
	if _, err := ApplyOnnxAdapter(alt, ad1, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	mgSameTensors(t, loadModel(t, ref1), alt)

	rng := rand.New(rand.NewPCG(3, 4))
	ids := make([]int64, 2*8)
	for i := range ids {
		ids[i] = rng.Int64N(64)
	}
	x, err := ortrun.NewTensor("input_ids", []int64{2, 8}, ids)
	if err != nil {
		t.Fatal(err)
	}
	runOnce := func(path string) ortrun.Tensor {
		s := orttest.Open(t, path)
		out, err := s.Run([]ortrun.Tensor{x})
		if err != nil {
			t.Fatal(err)
		}
		return out[0]
	}
	want := map[string]ortrun.Tensor{"none": runOnce(basePath), "1": runOnce(ref1), "2": runOnce(ref2), "3": runOnce(ref3)}
	// The exported adapter also computes what the model it came from does
	// (constant factors and a scaling node, unmerged).
	if rel := relError(mustFloats(t, want["2"]), mustFloats(t, runOnce(mgSaveModel(t, classic, filepath.Join(dir, "classic.onnx"))))); rel > 1e-5 {
		t.Errorf("adapter 2 merged differs from the model it was exported from by %.3g", rel)
	}

	adapters := map[string]*ortrun.Adapter{}
	for name, a := range map[string]*export.OnnxAdapter{"1": ad1, "2": ad2, "3": ad3} {
		p := filepath.Join(dir, "adapter"+name+export.OnnxAdapterExt)
		if err := export.WriteOnnxAdapter(p, a); err != nil {
			t.Fatal(err)
		}
		ad, err := ortrun.LoadAdapter(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ad.Close() })
		adapters[name] = ad
	}
	s := orttest.Open(t, servePath)
	for _, name := range []string{"none", "1", "2", "3", "1", "none"} {
		var ro ortrun.RunOptions
		if name != "none" {
			ro.Adapters = []*ortrun.Adapter{adapters[name]}
		}
		out, err := s.RunWith([]ortrun.Tensor{x}, nil, ro)
		if err != nil {
			t.Fatalf("adapter %s: %v", name, err)
		}
		got, _ := out[0].Float64s()
		exp, _ := want[name].Float64s()
		if name == "none" {
			if !slices.Equal(out[0].Data, want[name].Data) {
				t.Errorf("no adapter: the output is not the base model's, bit for bit")
			}
			continue
		}
		rel, changed := relError(got, exp), relError(exp, mustFloats(t, want["none"]))
		t.Logf("adapter %s: max |served - merged| / max |merged| = %.2g (the adapter moves the output by %.2g)", name, rel, changed)
		if rel > 1e-5 || math.IsNaN(rel) {
			t.Errorf("adapter %s: served output differs from the merged model's by %.3g", name, rel)
		}
		if changed < 1e-3 {
			t.Errorf("adapter %s changes the output by only %.3g: the test proves nothing", name, changed)
		}
	}
}

// setAdapterDefaults replaces every adapter input's default with random
// rank-r factors, as training an adapter-input model would.
func setAdapterDefaults(t *testing.T, m *graph.Model, seed uint64, r int64) {
	t.Helper()
	man, err := ReadManifest(m)
	if err != nil || man == nil {
		t.Fatalf("manifest: %v", err)
	}
	rng := rand.New(rand.NewPCG(seed, 9))
	g := m.Graph()
	for _, a := range man.Adapters {
		for _, f := range []struct {
			name string
			dims []int64
		}{{a.LoraA, []int64{a.InFeatures, r}}, {a.LoraB, []int64{r, a.OutFeatures}}} {
			tp, _ := g.Initializer(f.name)
			if tp == nil {
				t.Fatalf("no default for %s", f.name)
			}
			vals := make([]float64, f.dims[0]*f.dims[1])
			for i := range vals {
				vals[i] = (2*rng.Float64() - 1) / math.Sqrt(float64(f.dims[0]))
			}
			nt, err := graph.NewFloatTensor(f.name, graph.DataType(tp.GetDataType()), f.dims, vals)
			if err != nil {
				t.Fatal(err)
			}
			*tp = onnxpb.TensorProto{}
			tp.Name, tp.DataType, tp.Dims, tp.RawData, tp.FloatData = nt.Name, nt.DataType, nt.Dims, nt.RawData, nt.FloatData
		}
	}
}

// relError is max|a - b| / max|b|.
func relError(a, b []float64) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	var d, n float64
	for i := range a {
		d = math.Max(d, math.Abs(a[i]-b[i]))
		n = math.Max(n, math.Abs(b[i]))
	}
	return d / n
}

func mustFloats(t *testing.T, x ortrun.Tensor) []float64 {
	t.Helper()
	v, err := x.Float64s()
	if err != nil {
		t.Fatal(err)
	}
	return v
}
