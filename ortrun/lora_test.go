package ortrun_test

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// adaptersDir holds the adapter-input model and the adapter files that
// testdata/adapters/generate.py writes with Python's flatbuffers package.
var adaptersDir = filepath.Join(testutil.RepoRoot(), "testdata", "adapters")

// loraModule is one adapted MatMul of lora-inputs.onnx.
type loraModule struct {
	name    string
	in, out int
	w       []float64 // [in, out]
}

var loraModules = []struct {
	name    string
	in, out int
}{{"layers.0.proj", 8, 6}, {"layers.1.proj", 6, 5}}

// readWeights reads the base weights from the model file.
func readWeights(t *testing.T, path string) []loraModule {
	t.Helper()
	m, err := graph.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var mods []loraModule
	for _, lm := range loraModules {
		init, _ := m.Graph().Initializer(lm.name + ".weight")
		if init == nil {
			t.Fatalf("%s has no weight %s.weight", path, lm.name)
		}
		w, err := m.Float64s(init)
		if err != nil {
			t.Fatal(err)
		}
		if len(w) != lm.in*lm.out {
			t.Fatalf("%s.weight has %d values", lm.name, len(w))
		}
		mods = append(mods, loraModule{lm.name, lm.in, lm.out, w})
	}
	return mods
}

// refForward computes x·(W + A·B) layer by layer in float64, with the
// adapter's A [in, r] and B [r, out] (nil adapter: the base).
func refForward(t *testing.T, mods []loraModule, ad *export.OnnxAdapter, x []float64, batch int) []float64 {
	t.Helper()
	cur := x
	for _, m := range mods {
		w := append([]float64{}, m.w...)
		if ad != nil {
			pa, okA := ad.Param(m.name + ".lora_A.weight")
			pb, okB := ad.Param(m.name + ".lora_B.weight")
			if !okA || !okB {
				t.Fatalf("adapter lacks %s", m.name)
			}
			a, _ := pa.Float64s()
			b, _ := pb.Float64s()
			r := int(pa.Dims[1])
			for i := 0; i < m.in; i++ {
				for j := 0; j < m.out; j++ {
					for k := 0; k < r; k++ {
						w[i*m.out+j] += a[i*r+k] * b[k*m.out+j]
					}
				}
			}
		}
		next := make([]float64, batch*m.out)
		for n := 0; n < batch; n++ {
			for j := 0; j < m.out; j++ {
				for i := 0; i < m.in; i++ {
					next[n*m.out+j] += cur[n*m.in+i] * w[i*m.out+j]
				}
			}
		}
		cur = next
	}
	return cur
}

// normRel returns max|got-want| / max|want|.
func normRel(got, want []float64) float64 {
	var d, w float64
	for i := range want {
		d = math.Max(d, math.Abs(got[i]-want[i]))
		w = math.Max(w, math.Abs(want[i]))
	}
	return d / w
}

func testInput(t *testing.T, batch, width int) (ortrun.Tensor, []float64) {
	t.Helper()
	x := make([]float64, batch*width)
	for i := range x {
		x[i] = float64(float32(math.Sin(float64(3*i+1)) * 1.5))
	}
	xt, err := ortrun.FromFloat64("x", ortrun.Float32, []int64{int64(batch), int64(width)}, x)
	if err != nil {
		t.Fatal(err)
	}
	return xt, x
}

func outFloats(t *testing.T, out []ortrun.Tensor) []float64 {
	t.Helper()
	if len(out) != 1 {
		t.Fatalf("%d outputs", len(out))
	}
	v, err := out[0].Float64s()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func readAdapter(t *testing.T, name string) *export.OnnxAdapter {
	t.Helper()
	a, err := export.ReadOnnxAdapter(filepath.Join(adaptersDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func loadAdapter(t *testing.T, path string) *ortrun.Adapter {
	t.Helper()
	a, err := ortrun.LoadAdapter(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// TestAdapterSwitching serves no adapter, adapter 1, adapter 2, adapter 1
// and none again from one session, checking each run against base.onnx
// (exactly) or a float64 x·(W + A·B).
func TestAdapterSwitching(t *testing.T) {
	model := filepath.Join(adaptersDir, "lora-inputs.onnx")
	s := orttest.Open(t, model)
	base := orttest.Open(t, filepath.Join(adaptersDir, "base.onnx"))
	mods := readWeights(t, model)
	const batch = 3
	xt, x := testInput(t, batch, 8)

	// Adapter 1 as Python wrote it; adapter 2 as Go writes it.
	ad1, ad2 := readAdapter(t, "adapter1.onnx_adapter"), readAdapter(t, "adapter2.onnx_adapter")
	a1 := loadAdapter(t, filepath.Join(adaptersDir, "adapter1.onnx_adapter"))
	goPath := filepath.Join(t.TempDir(), "adapter2.onnx_adapter")
	if err := export.WriteOnnxAdapter(goPath, ad2); err != nil {
		t.Fatal(err)
	}
	a2 := loadAdapter(t, goPath)
	if got := a2.Params(); len(got) != 4 || got[0].Name != "layers.0.proj.lora_A.weight" || got[0].Shape[1] != 2 {
		t.Fatalf("adapter 2 params %+v", got)
	}

	baseOut, err := base.Run([]ortrun.Tensor{xt})
	if err != nil {
		t.Fatal(err)
	}
	baseY := outFloats(t, baseOut)
	if rel := normRel(baseY, refForward(t, mods, nil, x, batch)); rel > 1e-5 {
		t.Fatalf("base model vs float64 reference: rel %g", rel)
	}

	steps := []struct {
		label string
		ad    *ortrun.Adapter
		ref   *export.OnnxAdapter
	}{{"none", nil, nil}, {"adapter 1", a1, ad1}, {"adapter 2", a2, ad2}, {"adapter 1 again", a1, ad1}, {"none again", nil, nil}}
	for _, st := range steps {
		var opts ortrun.RunOptions
		if st.ad != nil {
			opts.Adapters = []*ortrun.Adapter{st.ad}
		}
		out, err := s.RunWith([]ortrun.Tensor{xt}, nil, opts)
		if err != nil {
			t.Fatalf("%s: %v", st.label, err)
		}
		y := outFloats(t, out)
		if st.ad == nil {
			for i := range y {
				if y[i] != baseY[i] {
					t.Fatalf("%s: y[%d] = %v, base model gives %v", st.label, i, y[i], baseY[i])
				}
			}
			t.Logf("%s: equal to base.onnx in every element", st.label)
			continue
		}
		want := refForward(t, mods, st.ref, x, batch)
		rel := normRel(y, want)
		if rel > 1e-5 {
			t.Errorf("%s: rel %g vs float64 x·(W+A·B)", st.label, rel)
		}
		// The adapter must really change the output, or the check is void.
		if moved := normRel(baseY, want); moved < 0.05 {
			t.Fatalf("%s: the adapter moves the output by only %g", st.label, moved)
		}
		t.Logf("%s: rel %.2g vs float64 reference (adapter moves the output by %.2g)", st.label, rel, normRel(baseY, want))
	}

	// From bytes: the same result as from the file.
	buf, err := ad2.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	a2b, err := ortrun.NewAdapterFromBytes(buf, "adapter2 bytes")
	if err != nil {
		t.Fatal(err)
	}
	defer a2b.Close()
	for i := range buf {
		buf[i] = 0 // ORT copied it
	}
	y1 := outFloats(t, mustRun(t, s, xt, a2))
	y2 := outFloats(t, mustRun(t, s, xt, a2b))
	for i := range y1 {
		if y1[i] != y2[i] {
			t.Fatalf("adapter from bytes differs at %d: %v vs %v", i, y2[i], y1[i])
		}
	}
}

func mustRun(t *testing.T, s *ortrun.Session, x ortrun.Tensor, ads ...*ortrun.Adapter) []ortrun.Tensor {
	t.Helper()
	out, err := s.RunWith([]ortrun.Tensor{x}, nil, ortrun.RunOptions{Adapters: ads})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestAdapterConcurrentRuns: runs with different adapters at the same time
// on one session each get their own adapter.
func TestAdapterConcurrentRuns(t *testing.T) {
	model := filepath.Join(adaptersDir, "lora-inputs.onnx")
	s := orttest.Open(t, model)
	mods := readWeights(t, model)
	xt, x := testInput(t, 2, 8)
	names := []string{"adapter1.onnx_adapter", "adapter2.onnx_adapter"}
	var ads []*ortrun.Adapter
	var wants [][]float64
	for _, n := range names {
		ads = append(ads, loadAdapter(t, filepath.Join(adaptersDir, n)))
		wants = append(wants, refForward(t, mods, readAdapter(t, n), x, 2))
	}
	var wg sync.WaitGroup
	errs := make(chan string, 40)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for it := 0; it < 10; it++ {
				k := (g + it) % 2
				out, err := s.RunWith([]ortrun.Tensor{xt}, nil, ortrun.RunOptions{Adapters: ads[k : k+1]})
				if err != nil {
					errs <- err.Error()
					return
				}
				y, _ := out[0].Float64s()
				if rel := normRel(y, wants[k]); rel > 1e-5 {
					errs <- names[k] + ": wrong result under concurrency"
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

func TestAdapterErrors(t *testing.T) {
	model := filepath.Join(adaptersDir, "lora-inputs.onnx")
	s := orttest.Open(t, model)
	xt, _ := testInput(t, 1, 8)
	ad1 := readAdapter(t, "adapter1.onnx_adapter")

	variant := func(mod func(a *export.OnnxAdapter)) *ortrun.Adapter {
		a := &export.OnnxAdapter{Params: append([]export.OnnxAdapterParam{}, ad1.Params...)}
		mod(a)
		ad, err := ortrun.NewAdapter(a, "variant")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ad.Close() })
		return ad
	}
	f16 := variant(func(a *export.OnnxAdapter) {
		v, _ := a.Params[0].Float64s()
		p, err := export.NewOnnxAdapterParam(a.Params[0].Name, graph.Float16, a.Params[0].Dims, v)
		if err != nil {
			t.Fatal(err)
		}
		a.Params[0] = p
	})
	badShape := variant(func(a *export.OnnxAdapter) {
		p := a.Params[0]
		p.Dims = []int64{4, 8}
		a.Params[0] = p
	})
	unknown := variant(func(a *export.OnnxAdapter) { a.Params[1].Name = "layers.9.proj.lora_B.weight" })
	onlyB := variant(func(a *export.OnnxAdapter) { a.Params = a.Params[1:2] })
	rankMismatch := variant(func(a *export.OnnxAdapter) {
		p := a.Params[1] // B [4, 6] -> [3, 6]: fits the symbolic dim alone, not with A [8, 4]
		p.Dims, p.Data = []int64{3, 6}, p.Data[:3*6*4]
		a.Params[1] = p
	})
	a1 := loadAdapter(t, filepath.Join(adaptersDir, "adapter1.onnx_adapter"))
	a1b := loadAdapter(t, filepath.Join(adaptersDir, "adapter1.onnx_adapter"))
	closed := loadAdapter(t, filepath.Join(adaptersDir, "adapter2.onnx_adapter"))
	closed.Close()
	closed.Close()
	aInput, err := ortrun.FromFloat64("layers.0.proj.lora_A.weight", ortrun.Float32, []int64{8, 1}, make([]float64, 8))
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name   string
		inputs []ortrun.Tensor
		ads    []*ortrun.Adapter
		want   string
	}{
		{"dtype", nil, []*ortrun.Adapter{f16}, `"layers.0.proj.lora_A.weight" is float16, model input is float32`},
		{"shape", nil, []*ortrun.Adapter{badShape}, `has shape [4 8], model input wants [8 lora_rank_0]`},
		{"unknown name", nil, []*ortrun.Adapter{unknown}, `"layers.9.proj.lora_B.weight" is not an input`},
		{"overlap with input", []ortrun.Tensor{aInput}, []*ortrun.Adapter{a1}, "is also given by the inputs"},
		{"two adapters overlap", nil, []*ortrun.Adapter{a1, a1b}, "is also given by adapter"},
		{"same adapter twice", nil, []*ortrun.Adapter{a1, a1}, "given twice"},
		{"closed", nil, []*ortrun.Adapter{closed}, "is closed"},
		{"nil", nil, []*ortrun.Adapter{nil}, "adapter 0 is nil"},
		// Rank disagreement between A and B only ORT can see, at run time.
		{"rank mismatch", nil, []*ortrun.Adapter{rankMismatch}, "ort: running"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := s.RunWith(append([]ortrun.Tensor{xt}, c.inputs...), nil, ortrun.RunOptions{Adapters: c.ads})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error containing %q", err, c.want)
			}
			if strings.ContainsAny(err.Error(), "\n\r") {
				t.Errorf("multi-line error: %q", err)
			}
			t.Logf("%v", err)
		})
	}
	// Half an adapter is allowed: the other half keeps its rank-0 default,
	// which ORT rejects as a MatMul shape mismatch.
	if _, err := s.RunWith([]ortrun.Tensor{xt}, nil, ortrun.RunOptions{Adapters: []*ortrun.Adapter{onlyB}}); err == nil {
		t.Error("B without A ran")
	}

	// Corrupt input never reaches ORT.
	buf, err := os.ReadFile(filepath.Join(adaptersDir, "adapter1.onnx_adapter"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ortrun.NewAdapterFromBytes(buf[:100], "cut"); err == nil || !strings.Contains(err.Error(), "onnx adapter cut:") {
		t.Errorf("truncated bytes: %v", err)
	}
	trunc := filepath.Join(t.TempDir(), "trunc.onnx_adapter")
	if err := os.WriteFile(trunc, buf[:len(buf)-40], 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ortrun.LoadAdapter(trunc); err == nil || !strings.Contains(err.Error(), trunc) {
		t.Errorf("truncated file: %v", err)
	}
}

// TestORTLoraTestModel runs ONNX Runtime's own LoRA test model (its
// weights are graph inputs with [4, 0] and [0, 4] defaults) with an adapter
// written by the export package.
func TestORTLoraTestModel(t *testing.T) {
	path := testutil.Corpus(t, "ort-lora-two-params.onnx")
	s := orttest.Open(t, path)
	m, err := graph.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	init, _ := m.Graph().Initializer("weight_x")
	w, err := m.Float64s(init)
	m.Close()
	if err != nil || len(w) != 16 {
		t.Fatalf("weight_x: %v (%d values)", err, len(w))
	}
	x := make([]float64, 16)
	for i := range x {
		x[i] = float64(i%5) - 1.5
	}
	xt, err := ortrun.FromFloat64("input_x", ortrun.Float32, []int64{4, 4}, x)
	if err != nil {
		t.Fatal(err)
	}
	const r = 2
	av, bv := make([]float64, 4*r), make([]float64, r*4)
	for i := range av {
		av[i] = 0.25 * float64(i+1)
		bv[i] = 0.5 - 0.125*float64(i)
	}
	pa, err := export.NewOnnxAdapterParam("lora_param_a", graph.Float, []int64{4, r}, av)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := export.NewOnnxAdapterParam("lora_param_b", graph.Float, []int64{r, 4}, bv)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "two.onnx_adapter")
	if err := export.WriteOnnxAdapter(p, &export.OnnxAdapter{Params: []export.OnnxAdapterParam{pa, pb}}); err != nil {
		t.Fatal(err)
	}
	ad := loadAdapter(t, p)
	ref := func(withAdapter bool) []float64 {
		out := make([]float64, 16)
		for i := 0; i < 4; i++ {
			for j := 0; j < 4; j++ {
				for k := 0; k < 4; k++ {
					wk := w[k*4+j]
					if withAdapter {
						for q := 0; q < r; q++ {
							wk += av[k*r+q] * bv[q*4+j]
						}
					}
					out[i*4+j] += x[i*4+k] * wk
				}
			}
		}
		return out
	}
	for _, with := range []bool{false, true, false} {
		var ads []*ortrun.Adapter
		if with {
			ads = []*ortrun.Adapter{ad}
		}
		out, err := s.RunWith([]ortrun.Tensor{xt}, nil, ortrun.RunOptions{Adapters: ads})
		if err != nil {
			t.Fatal(err)
		}
		got := outFloats(t, out)
		// Small integers and quarters: float32 computes these exactly.
		want := ref(with)
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("adapter %v: y[%d] = %v, want %v", with, i, got[i], want[i])
			}
		}
	}
}

// TestORTAcceptsWrittenAdapters: ONNX Runtime's own reader (memory-mapped
// and from bytes) accepts what export writes for every kind of parameter:
// float16, bfloat16, double, int64, uint8 and an empty tensor.
func TestORTAcceptsWrittenAdapters(t *testing.T) {
	orttest.Require(t)
	a := readAdapter(t, "mixed.onnx_adapter")
	p := filepath.Join(t.TempDir(), "mixed.onnx_adapter")
	if err := export.WriteOnnxAdapter(p, a); err != nil {
		t.Fatal(err)
	}
	ad := loadAdapter(t, p)
	if got := ad.Params(); len(got) != len(a.Params) || got[3].Name != "one" || len(got[3].Shape) != 1 || got[4].Shape[1] != 0 {
		t.Errorf("params %+v", got)
	}
	b, err := ortrun.NewAdapter(a, "mixed")
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
}
