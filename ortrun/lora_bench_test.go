package ortrun_test

import (
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// servingModels are a stack of square MatMul layers in three forms: with
// LoRA weights as graph inputs (rank-0 defaults), and merged with each of
// two adapters; plus the adapters.
type servingModels struct {
	d, layers, rank int
	loraPath        string
	basePath        string
	mergedPaths     [2]string
	adapters        [2]*export.OnnxAdapter
}

func f32Raw(v []float64) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		u := math.Float32bits(float32(x))
		b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
	}
	return b
}

func tensorProto(name string, dims []int64, v []float64) *onnxpb.TensorProto {
	return &onnxpb.TensorProto{Name: proto.String(name), DataType: proto.Int32(int32(graph.Float)), Dims: dims, RawData: f32Raw(v)}
}

func saveGraph(tb testing.TB, path string, g *onnxpb.GraphProto) {
	tb.Helper()
	g.Name = proto.String("serving")
	m := &onnxpb.ModelProto{IrVersion: proto.Int64(8), ProducerName: proto.String("ortrun lora bench"),
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(17)}}, Graph: g}
	b, err := proto.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		tb.Fatal(err)
	}
}

// newServingModels writes the models to a temporary folder. Weights are
// rounded to float32 before merging so the merged models hold exactly
// float32(W + A·B) of the values the adapter-input model sees.
func newServingModels(tb testing.TB, d, layers, rank int) *servingModels {
	tb.Helper()
	dir := tb.TempDir()
	rng := rand.New(rand.NewPCG(7, uint64(d)))
	rnd := func(n int, scale float64) []float64 {
		v := make([]float64, n)
		for i := range v {
			v[i] = float64(float32(rng.NormFloat64() * scale))
		}
		return v
	}
	sm := &servingModels{d: d, layers: layers, rank: rank,
		loraPath: filepath.Join(dir, "lora.onnx"), basePath: filepath.Join(dir, "base.onnx")}
	ws := make([][]float64, layers)
	for l := range ws {
		ws[l] = rnd(d*d, 1/math.Sqrt(float64(d)))
	}
	for k := range sm.adapters {
		a := &export.OnnxAdapter{}
		for l := 0; l < layers; l++ {
			mod := "layers." + string(rune('0'+l)) + ".proj"
			pa, err := export.NewOnnxAdapterParam(mod+".lora_A.weight", graph.Float, []int64{int64(d), int64(rank)}, rnd(d*rank, 0.5/math.Sqrt(float64(d))))
			if err != nil {
				tb.Fatal(err)
			}
			pb, err := export.NewOnnxAdapterParam(mod+".lora_B.weight", graph.Float, []int64{int64(rank), int64(d)}, rnd(rank*d, 0.5/math.Sqrt(float64(rank))))
			if err != nil {
				tb.Fatal(err)
			}
			a.Params = append(a.Params, pa, pb)
		}
		sm.adapters[k] = a
	}
	input := valueInfo("x", ortrun.Float32, "batch", d)
	output := valueInfo("y", ortrun.Float32, "batch", d)
	build := func(path string, lora bool, merged *export.OnnxAdapter) {
		g := &onnxpb.GraphProto{Input: []*onnxpb.ValueInfoProto{input}, Output: []*onnxpb.ValueInfoProto{output}}
		cur := "x"
		for l := 0; l < layers; l++ {
			mod := "layers." + string(rune('0'+l)) + ".proj"
			out := mod + ".out"
			if l == layers-1 {
				out = "y"
			}
			w := ws[l]
			if merged != nil {
				w = append([]float64{}, w...)
				pa, _ := merged.Param(mod + ".lora_A.weight")
				pb, _ := merged.Param(mod + ".lora_B.weight")
				av, _ := pa.Float64s()
				bv, _ := pb.Float64s()
				for i := 0; i < d; i++ {
					for k := 0; k < rank; k++ {
						aik := av[i*rank+k]
						for j := 0; j < d; j++ {
							w[i*d+j] += aik * bv[k*d+j]
						}
					}
				}
			}
			g.Initializer = append(g.Initializer, tensorProto(mod+".weight", []int64{int64(d), int64(d)}, w))
			if !lora {
				g.Node = append(g.Node, node("MatMul", []string{cur, mod + ".weight"}, []string{out}))
				cur = out
				continue
			}
			an, bn, dim := mod+".lora_A.weight", mod+".lora_B.weight", "lora_rank_"+string(rune('0'+l))
			g.Initializer = append(g.Initializer, tensorProto(an, []int64{int64(d), 0}, nil), tensorProto(bn, []int64{0, int64(d)}, nil))
			g.Input = append(g.Input, valueInfo(an, ortrun.Float32, d, dim), valueInfo(bn, ortrun.Float32, dim, d))
			g.Node = append(g.Node,
				node("MatMul", []string{cur, mod + ".weight"}, []string{mod + ".base"}),
				node("MatMul", []string{cur, an}, []string{mod + ".a"}),
				node("MatMul", []string{mod + ".a", bn}, []string{mod + ".b"}),
				node("Add", []string{mod + ".base", mod + ".b"}, []string{out}))
			cur = out
		}
		saveGraph(tb, path, g)
	}
	build(sm.loraPath, true, nil)
	build(sm.basePath, false, nil)
	for k := range sm.mergedPaths {
		sm.mergedPaths[k] = filepath.Join(dir, "merged"+string(rune('1'+k))+".onnx")
		build(sm.mergedPaths[k], false, sm.adapters[k])
	}
	return sm
}

func (sm *servingModels) input(tb testing.TB, batch int) ortrun.Tensor {
	tb.Helper()
	x := make([]float64, batch*sm.d)
	for i := range x {
		x[i] = math.Sin(float64(i) * 0.37)
	}
	xt, err := ortrun.FromFloat64("x", ortrun.Float32, []int64{int64(batch), int64(sm.d)}, x)
	if err != nil {
		tb.Fatal(err)
	}
	return xt
}

func (sm *servingModels) loadAdapters(tb testing.TB) [2]*ortrun.Adapter {
	tb.Helper()
	var out [2]*ortrun.Adapter
	for k, a := range sm.adapters {
		ad, err := ortrun.NewAdapter(a, "adapter"+string(rune('1'+k)))
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { ad.Close() })
		out[k] = ad
	}
	return out
}

// TestAdapterMatchesMergedModel: no adapter, adapter 1, adapter 2,
// adapter 1, none on one session, each against the base model or the model
// merged with that adapter, all in ONNX Runtime.
func TestAdapterMatchesMergedModel(t *testing.T) {
	orttest.Require(t)
	sm := newServingModels(t, 64, 3, 4)
	s := orttest.Open(t, sm.loraPath)
	ads := sm.loadAdapters(t)
	xt := sm.input(t, 4)
	refs := map[string][]float64{}
	for name, p := range map[string]string{"base": sm.basePath, "1": sm.mergedPaths[0], "2": sm.mergedPaths[1]} {
		out, err := orttest.Open(t, p).Run([]ortrun.Tensor{xt})
		if err != nil {
			t.Fatal(err)
		}
		refs[name] = outFloats(t, out)
	}
	for _, step := range []string{"base", "1", "2", "1", "base"} {
		var opts ortrun.RunOptions
		if step != "base" {
			opts.Adapters = []*ortrun.Adapter{ads[step[0]-'1']}
		}
		out, err := s.RunWith([]ortrun.Tensor{xt}, nil, opts)
		if err != nil {
			t.Fatal(err)
		}
		y := outFloats(t, out)
		rel := normRel(y, refs[step])
		if step == "base" && rel != 0 {
			t.Errorf("no adapter: rel %g vs the base model, want exactly equal", rel)
		}
		if rel > 1e-5 {
			t.Errorf("adapter %s: rel %g vs the merged model", step, rel)
		}
		if step != "base" && normRel(refs["base"], refs[step]) < 0.05 {
			t.Fatalf("adapter %s barely changes the model", step)
		}
		t.Logf("%s: rel %.2g vs the %s model", step, rel, map[bool]string{true: "base", false: "merged"}[step == "base"])
	}
}

// Serving benchmarks, one token (batch 1) through 8 layers of 512×512 with
// rank-16 adapters: go test ./ortrun -run '^$' -bench Serve
const benchD, benchLayers, benchRank = 512, 8, 16

func BenchmarkServeSwitchAdapterEachRun(b *testing.B) {
	orttest.Require(b)
	sm := newServingModels(b, benchD, benchLayers, benchRank)
	s := orttest.Open(b, sm.loraPath)
	ads := sm.loadAdapters(b)
	xt := sm.input(b, 1)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := s.RunWith([]ortrun.Tensor{xt}, nil, ortrun.RunOptions{Adapters: ads[i%2 : i%2+1]}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkServeSameAdapter(b *testing.B) {
	orttest.Require(b)
	sm := newServingModels(b, benchD, benchLayers, benchRank)
	s := orttest.Open(b, sm.loraPath)
	ads := sm.loadAdapters(b)
	xt := sm.input(b, 1)
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.RunWith([]ortrun.Tensor{xt}, nil, ortrun.RunOptions{Adapters: ads[:1]}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkServeMergedRun(b *testing.B) {
	orttest.Require(b)
	sm := newServingModels(b, benchD, benchLayers, benchRank)
	s := orttest.Open(b, sm.mergedPaths[0])
	xt := sm.input(b, 1)
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.Run([]ortrun.Tensor{xt}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkServeMergedOpenAndRun is switching by loading the other
// adapter's merged model: open, one run, close.
func BenchmarkServeMergedOpenAndRun(b *testing.B) {
	orttest.Require(b)
	sm := newServingModels(b, benchD, benchLayers, benchRank)
	xt := sm.input(b, 1)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		s, err := ortrun.Open(sm.mergedPaths[i%2], nil)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.Run([]ortrun.Tensor{xt}); err != nil {
			b.Fatal(err)
		}
		s.Close()
	}
}
