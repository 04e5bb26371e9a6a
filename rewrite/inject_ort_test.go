package rewrite

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// golden holds, per testdata model, fixed inputs and the outputs torch
// computed for them when the generator made the model.
type golden struct {
	Inputs  map[string]goldenTensor `json:"inputs"`
	Outputs map[string]goldenTensor `json:"outputs"`
	Rtol    float64                 `json:"rtol"`
	Atol    float64                 `json:"atol"`
}

type goldenTensor struct {
	Shape []int64   `json:"shape"`
	DType string    `json:"dtype"`
	Data  []float64 `json:"data"`
}

func readGolden(t *testing.T, model string) golden {
	t.Helper()
	raw, err := os.ReadFile(testutil.TestModel("golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var all map[string]golden
	if err := json.Unmarshal(raw, &all); err != nil {
		t.Fatal(err)
	}
	g, ok := all[model]
	if !ok {
		t.Fatalf("golden.json has no entry for %s", model)
	}
	return g
}

var ortDTypes = map[string]ortrun.DType{
	"float32": ortrun.Float32, "float16": ortrun.Float16, "int64": ortrun.Int64, "bool": ortrun.Bool,
}

func (g golden) tensors(t *testing.T) []ortrun.Tensor {
	t.Helper()
	var ins []ortrun.Tensor
	for name, gt := range g.Inputs {
		dt, ok := ortDTypes[gt.DType]
		if !ok {
			t.Fatalf("golden input %s has dtype %s", name, gt.DType)
		}
		ten, err := ortrun.FromFloat64(name, dt, gt.Shape, gt.Data)
		if err != nil {
			t.Fatal(err)
		}
		ins = append(ins, ten)
	}
	return ins
}

func runModel(t *testing.T, path string, inputs []ortrun.Tensor) map[string][]float64 {
	t.Helper()
	s := orttest.Open(t, path)
	outs, err := s.Run(inputs)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	res := map[string][]float64{}
	for _, o := range outs {
		v, err := o.Float64s()
		if err != nil {
			t.Fatal(err)
		}
		res[o.Name] = v
	}
	return res
}

func assertClose(t *testing.T, what string, got, want map[string][]float64, rtol, atol float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d outputs, want %d", what, len(got), len(want))
	}
	for name, w := range want {
		maxAbs, _, ok := ortrun.Compare(got[name], w, rtol, atol)
		if !ok {
			t.Errorf("%s: output %s differs: max abs error %g (rtol %g, atol %g)", what, name, maxAbs, rtol, atol)
		}
	}
}

// tolerances for comparing two runs of equivalent graphs: ORT may fuse the
// two graphs' nodes differently, which reorders float arithmetic.
func tolerances(dt graph.DataType) (rtol, atol float64) {
	if dt == graph.Float16 || dt == graph.BFloat16 {
		return 2e-2, 2e-2
	}
	return 1e-4, 1e-5
}

var ortTestModels = []string{
	"tiny-gpt.onnx", "tiny-gpt-fp16.onnx", "tiny-bert.onnx", "mlp-gemm-transb.onnx",
	"shared-weight.onnx", "bf16-matmul.onnx", "tiny-gpt-extdata/model.onnx",
}

// TestInjectedRunsLikeBase: with B = 0 the injected model's outputs equal
// the base model's in ONNX Runtime, and the base model equals what torch
// computed when the model was generated.
func TestInjectedRunsLikeBase(t *testing.T) {
	orttest.Require(t)
	for _, name := range ortTestModels {
		t.Run(name, func(t *testing.T) {
			gold := readGolden(t, name)
			inputs := gold.tensors(t)
			path := testutil.TestModel(name)
			base := runModel(t, path, inputs)
			want := map[string][]float64{}
			for n, o := range gold.Outputs {
				want[n] = o.Data
			}
			assertClose(t, "base vs torch", base, want, math.Max(gold.Rtol, 1e-4), math.Max(gold.Atol, 1e-4))

			m := loadModel(t, path)
			inj, err := Inject(m, allLinear(8, 16))
			if err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(t.TempDir(), "lora.onnx")
			if err := m.Save(out, graph.SaveOptions{}); err != nil {
				t.Fatal(err)
			}
			rtol, atol := tolerances(inj.Layers[0].DType)
			assertClose(t, "injected vs base", runModel(t, out, inputs), base, rtol, atol)
		})
	}
}

// randomizeAdapters sets every adapter's A and B to random values, as if
// trained, and returns them as float64 in the manifest's order.
func randomizeAdapters(t *testing.T, m *graph.Model, man *Manifest, seed uint64) (as, bs [][]float64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	g := m.Graph()
	var scopes []*graph.Graph
	g.Walk(func(s *graph.Graph) { scopes = append(scopes, s) })
	set := func(name string, scale float64) []float64 {
		for _, s := range scopes {
			if ti, _ := s.Initializer(name); ti != nil {
				n, _ := graph.NumElements(ti.Dims)
				v := make([]float64, n)
				for i := range v {
					v[i] = rng.NormFloat64() * scale
				}
				if err := graph.SetFloat64s(ti, v); err != nil {
					t.Fatal(err)
				}
				// Read back what the tensor holds after rounding to its type.
				got, err := m.Float64s(ti)
				if err != nil {
					t.Fatal(err)
				}
				return got
			}
		}
		t.Fatalf("initializer %s not found", name)
		return nil
	}
	for _, a := range man.Adapters {
		as = append(as, set(a.LoraA, 0.2))
		bs = append(bs, set(a.LoraB, 0.2))
	}
	return as, bs
}

// TestTrainedAdapterSingleLayer checks y = base(x) + scaling·(x·A)·B against
// a direct float64 computation, for MatMul with a batched N-D input and for
// Gemm with transA, transB, alpha, beta and C, in fp32 and fp16.
func TestTrainedAdapterSingleLayer(t *testing.T) {
	orttest.Require(t)
	rng := rand.New(rand.NewPCG(3, 4))
	randVals := func(n int64) []float64 {
		v := make([]float64, n)
		for i := range v {
			v[i] = rng.NormFloat64()
		}
		return v
	}
	const in, out = 6, 5
	cases := []struct {
		name           string
		op             string
		dt             graph.DataType
		transA, transB bool
		alpha, beta    float64
		xShape         []int64
	}{
		{"matmul-fp32-3d", "MatMul", graph.Float, false, false, 1, 0, []int64{2, 3, in}},
		{"matmul-fp16", "MatMul", graph.Float16, false, false, 1, 0, []int64{4, in}},
		{"gemm-transB", "Gemm", graph.Float, false, true, 1, 1, []int64{4, in}},
		{"gemm-transA-alpha-beta", "Gemm", graph.Float, true, true, 0.5, 2, []int64{in, 4}},
		{"gemm-plain-alpha", "Gemm", graph.Float, false, false, 1.5, 0.25, []int64{3, in}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			wDims := []int64{in, out}
			if c.transB {
				wDims = []int64{out, in}
			}
			wVals := randVals(in * out)
			W, err := graph.NewFloatTensor("layer.weight", c.dt, wDims, wVals)
			if err != nil {
				t.Fatal(err)
			}
			wVals = graph.DecodeFloats(c.dt, W.RawData)
			node := &onnxpb.NodeProto{Name: proto.String("/layer/" + c.op), OpType: proto.String(c.op), Input: []string{"x", "layer.weight"}, Output: []string{"y"}}
			inits := []*onnxpb.TensorProto{W}
			var cVals []float64
			if c.op == "Gemm" {
				node.Attribute = []*onnxpb.AttributeProto{
					intAttr("transA", c.transA), intAttr("transB", c.transB),
					{Name: proto.String("alpha"), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(float32(c.alpha))},
					{Name: proto.String("beta"), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(float32(c.beta))},
				}
				cVals = randVals(out)
				C, _ := graph.NewFloatTensor("layer.bias", c.dt, []int64{out}, cVals)
				inits = append(inits, C)
				node.Input = append(node.Input, "layer.bias")
			}
			rows := int64(1)
			for _, d := range c.xShape[:len(c.xShape)-1] {
				rows *= d
			}
			if c.transA {
				rows = c.xShape[1]
			}
			mp := singleNodeModel(node, inits, c.dt, c.xShape, []int64{rows, out})
			m := graph.NewModel(mp, "")
			inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"layer"}, Rank: 3, Alpha: 6}, Dropout: 0.25})
			if err != nil {
				t.Fatal(err)
			}
			as, bs := randomizeAdapters(t, m, inj.Manifest, 11)
			A, B, s := as[0], bs[0], inj.Manifest.Adapters[0].Scaling
			path := filepath.Join(t.TempDir(), "m.onnx")
			if err := m.Save(path, graph.SaveOptions{}); err != nil {
				t.Fatal(err)
			}
			testutil.CheckONNX(t, path)

			n := int64(1)
			for _, d := range c.xShape {
				n *= d
			}
			xVals := randVals(n)
			x, err := ortrun.FromFloat64("x", ortrun.DType(c.dt), c.xShape, xVals)
			if err != nil {
				t.Fatal(err)
			}
			xVals, _ = x.Float64s()
			got := runModel(t, path, []ortrun.Tensor{x})["y"]

			// Reference: rows of op(x), times W (as the node sees it), plus
			// the adapter, in float64.
			xRow := func(r, k int64) float64 {
				if c.transA {
					return xVals[k*rows+r]
				}
				return xVals[r*in+k]
			}
			wAt := func(k, j int64) float64 {
				if c.transB {
					return wVals[j*in+k]
				}
				return wVals[k*out+j]
			}
			want := make([]float64, rows*out)
			for r := int64(0); r < rows; r++ {
				xa := make([]float64, 3)
				for q := 0; q < 3; q++ {
					for k := int64(0); k < in; k++ {
						xa[q] += xRow(r, k) * A[k*3+int64(q)]
					}
				}
				for j := int64(0); j < out; j++ {
					var base, lora float64
					for k := int64(0); k < in; k++ {
						base += xRow(r, k) * wAt(k, j)
					}
					for q := 0; q < 3; q++ {
						lora += xa[q] * B[int64(q)*out+j]
					}
					y := base
					if c.op == "Gemm" {
						y = c.alpha*base + c.beta*cVals[j]
					}
					want[r*out+j] = y + s*lora
				}
			}
			rtol, atol := 1e-5, 1e-5
			if c.dt == graph.Float16 {
				rtol, atol = 1e-2, 3e-2
			}
			if maxAbs, _, ok := ortrun.Compare(got, want, rtol, atol); !ok {
				t.Fatalf("adapter output differs from x·W + s·x·A·B: max abs error %g", maxAbs)
			}
		})
	}
}

func intAttr(name string, on bool) *onnxpb.AttributeProto {
	v := int64(0)
	if on {
		v = 1
	}
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

func singleNodeModel(node *onnxpb.NodeProto, inits []*onnxpb.TensorProto, dt graph.DataType, xShape, yShape []int64) *onnxpb.ModelProto {
	vi := func(name string, shape []int64) *onnxpb.ValueInfoProto {
		var dims []*onnxpb.TensorShapeProto_Dimension
		for _, d := range shape {
			dims = append(dims, &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d}})
		}
		return &onnxpb.ValueInfoProto{Name: proto.String(name), Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{
			TensorType: &onnxpb.TypeProto_Tensor{ElemType: proto.Int32(int32(dt)), Shape: &onnxpb.TensorShapeProto{Dim: dims}}}}}
	}
	if node.GetOpType() == "MatMul" {
		yShape = append(append([]int64(nil), xShape[:len(xShape)-1]...), yShape[1])
	}
	return &onnxpb.ModelProto{
		IrVersion:   proto.Int64(8),
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(17)}},
		Graph: &onnxpb.GraphProto{
			Name: proto.String("single"), Node: []*onnxpb.NodeProto{node}, Initializer: inits,
			Input: []*onnxpb.ValueInfoProto{vi("x", xShape)}, Output: []*onnxpb.ValueInfoProto{vi("y", yShape)},
		},
	}
}

// TestTrainedAdapterWholeModel: a whole model with random adapters computes
// what the base model computes with each adapted weight replaced by
// W + scaling·A·B (in the weight's stored orientation), by linearity.
func TestTrainedAdapterWholeModel(t *testing.T) {
	orttest.Require(t)
	models := []string{"tiny-gpt.onnx", "mlp-gemm-transb.onnx", "bf16-matmul.onnx", "tiny-bert.onnx"}
	for _, name := range models {
		t.Run(name, func(t *testing.T) {
			gold := readGolden(t, name)
			inputs := gold.tensors(t)
			path := testutil.TestModel(name)
			m := loadModel(t, path)
			inj, err := Inject(m, allLinear(4, 8))
			if err != nil {
				t.Fatal(err)
			}
			as, bs := randomizeAdapters(t, m, inj.Manifest, 5)
			lora := filepath.Join(t.TempDir(), "lora.onnx")
			if err := m.Save(lora, graph.SaveOptions{}); err != nil {
				t.Fatal(err)
			}

			ref := loadModel(t, path)
			rg := ref.Graph()
			for i, a := range inj.Manifest.Adapters {
				l := inj.Layers[i]
				w, _ := rg.Initializer(a.Weight)
				wv, err := ref.Float64s(w)
				if err != nil {
					t.Fatal(err)
				}
				in, out, r := a.InFeatures, a.OutFeatures, int64(a.Rank)
				for k := int64(0); k < in; k++ {
					for j := int64(0); j < out; j++ {
						var d float64
						for q := int64(0); q < r; q++ {
							d += as[i][k*r+q] * bs[i][q*out+j]
						}
						// Gemm's alpha scales the weight's product too.
						d *= a.Scaling / l.Alpha
						if l.StoredTransposed() {
							wv[j*in+k] += d
						} else {
							wv[k*out+j] += d
						}
					}
				}
				// Keep the reference in float64 precision where the graph allows.
				if err := graph.SetFloat64s(w, wv); err != nil {
					t.Fatal(err)
				}
			}
			refPath := filepath.Join(t.TempDir(), "ref.onnx")
			if err := ref.Save(refPath, graph.SaveOptions{}); err != nil {
				t.Fatal(err)
			}
			rtol, atol := 1e-4, 1e-4
			if inj.Layers[0].DType != graph.Float || inj.Layers[0].Weight.DataType() != graph.Float {
				rtol, atol = 3e-2, 3e-2
			}
			assertClose(t, "adapters vs W+sAB", runModel(t, lora, inputs), runModel(t, refPath, inputs), rtol, atol)
		})
	}
}
