package rewrite

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/testutil"
)

const (
	mgTestModels = "../testdata/models"
	mgCorpusDir  = "../../shared/corpus" // resolved through testutil.Corpus
)

// ---- helpers shared by the merge, PEFT and export tests ----

// mgCloneModel copies a model in memory; external data stays where it is.
func mgCloneModel(m *graph.Model) *graph.Model {
	return graph.NewModel(proto.Clone(m.Proto).(*onnxpb.ModelProto), m.Dir())
}

// mgRandomizeAdapters gives every adapter in the manifest random A and B, so
// merging has something to fold. Values are sized so the delta is about as
// large as a kaiming-initialized weight.
func mgRandomizeAdapters(t testing.TB, m *graph.Model, seed uint64) {
	t.Helper()
	man, err := ReadManifest(m)
	if err != nil || man == nil {
		t.Fatalf("no manifest: %v", err)
	}
	rng := rand.New(rand.NewPCG(seed, 7))
	g := m.Graph()
	for _, a := range man.Adapters {
		for _, name := range []string{a.LoraA, a.LoraB} {
			var tp *onnxpb.TensorProto
			g.Walk(func(s *graph.Graph) {
				if x, sc := s.Initializer(name); x != nil && sc == s {
					tp = x
				}
			})
			if tp == nil {
				t.Fatalf("adapter %s: initializer %s not found", a.Module, name)
			}
			fan := float64(tp.Dims[0])
			n, _ := graph.NumElements(tp.Dims) // Conv LoRA factors are kernels
			vals := make([]float64, n)
			for i := range vals {
				vals[i] = (2*rng.Float64() - 1) / math.Sqrt(fan) / math.Sqrt(math.Max(a.Scaling, 1))
			}
			if err := graph.SetFloat64s(tp, vals); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// mgInjectRandom injects adapters and randomizes them.
func mgInjectRandom(t testing.TB, m *graph.Model, cfg InjectConfig, seed uint64) *Injection {
	t.Helper()
	inj, err := Inject(m, mgInjectDefaults(cfg))
	if err != nil {
		t.Fatal(err)
	}
	mgRandomizeAdapters(t, m, seed)
	return inj
}

// mgInjectDefaults fills in what mgInjectRandom injects by default: every
// layer at r=4, alpha=8.
func mgInjectDefaults(cfg InjectConfig) InjectConfig {
	if cfg.Rank == 0 {
		cfg.Rank, cfg.Alpha = 4, 8
	}
	if len(cfg.Targets) == 0 && cfg.TargetRegex == "" {
		cfg.TargetRegex = ".*"
	}
	return cfg
}

func mgSaveModel(t testing.TB, m *graph.Model, path string) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := m.Save(path, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	return path
}

// mgRefMerged computes what a merged weight must hold, independently of the
// kernel: W + coef·A·B ([in, out]) or W + coef·(A·B)ᵀ ([out, in]), summed
// over k in order in float64 and rounded once.
func mgRefMerged(w, a, b []float64, in, out, r int, coef float64, storedT bool) []float64 {
	res := make([]float64, len(w))
	for i := 0; i < in; i++ {
		for j := 0; j < out; j++ {
			s := 0.0
			for k := 0; k < r; k++ {
				s += float64(a[i*r+k] * b[k*out+j])
			}
			idx := i*out + j
			if storedT {
				idx = j*in + i
			}
			res[idx] = w[idx] + float64(coef*s)
		}
	}
	return res
}

// mgTensorByName finds an initializer anywhere in the model.
func mgTensorByName(m *graph.Model, name string) *onnxpb.TensorProto {
	var found *onnxpb.TensorProto
	m.Graph().Walk(func(s *graph.Graph) {
		if t, sc := s.Initializer(name); t != nil && sc == s {
			found = t
		}
	})
	return found
}

func mgRawOf(t testing.TB, m *graph.Model, tp *onnxpb.TensorProto) []byte {
	t.Helper()
	raw, err := m.RawData(tp)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func mgFloatsOf(t testing.TB, m *graph.Model, tp *onnxpb.TensorProto) []float64 {
	t.Helper()
	v, err := m.Float64s(tp)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// mgBaseCase is a model to inject, merge and compare with its base.
type mgBaseCase struct {
	name   string
	path   string                                // model file
	build  func(t testing.TB, dir string) string // or a builder writing one into dir
	inject InjectConfig                          // defaults: every layer, r=4, alpha=8
	golden string                                // golden.json model whose inputs to use
	spec   mgFeedSpec                            // else inputs made from this
	tol    float64
	noORT  bool
}

func (c mgBaseCase) modelPath(t testing.TB) string {
	if c.build != nil {
		return c.build(t, t.TempDir())
	}
	if strings.HasPrefix(c.path, mgCorpusDir) {
		return testutil.Corpus(t, strings.TrimPrefix(c.path, mgCorpusDir+"/"))
	}
	return c.path
}

func mgTestdataCases() []mgBaseCase {
	return []mgBaseCase{
		{name: "tiny-gpt", path: mgTestModels + "/tiny-gpt.onnx", tol: 1e-5},
		{name: "tiny-gpt-dropout-rslora", path: mgTestModels + "/tiny-gpt.onnx", tol: 1e-5,
			inject: InjectConfig{SelectOptions: SelectOptions{TargetRegex: ".*", Rank: 8, Alpha: 16, RankPattern: []PatternEntry{{Key: "q_proj", Value: 2}}, AlphaPattern: []PatternEntry{{Key: "down_proj", Value: 3}}}, Dropout: 0.1, RSLoRA: true}},
		{name: "tiny-gpt-fp16", path: mgTestModels + "/tiny-gpt-fp16.onnx", tol: 2e-2},
		{name: "tiny-gpt-extdata", path: mgTestModels + "/tiny-gpt-extdata/model.onnx", tol: 1e-5},
		{name: "tiny-bert", path: mgTestModels + "/tiny-bert.onnx", tol: 1e-5},
		{name: "mlp-gemm-transb", path: mgTestModels + "/mlp-gemm-transb.onnx", tol: 1e-5},
		{name: "mlp-gemm-alpha", build: mgBuildGemmAlpha, golden: "mlp-gemm-transb.onnx", tol: 1e-5},
		{name: "gemm-transA", build: mgBuildGemmTransA, tol: 1e-5},
		{name: "bf16-matmul", path: mgTestModels + "/bf16-matmul.onnx", tol: 2e-2},
		{name: "shared-weight", path: mgTestModels + "/shared-weight.onnx", tol: 1e-5,
			inject: InjectConfig{SelectOptions: SelectOptions{Targets: []string{"branch_a", "lm_head"}, Rank: 4, Alpha: 8}}},
		{name: "shared-transpose", build: mgBuildSharedTranspose, tol: 1e-5,
			inject: InjectConfig{SelectOptions: SelectOptions{Targets: []string{"left"}, Rank: 2, Alpha: 4}}},
	}
}

// mgNodeByName finds a node anywhere in the model.
func mgNodeByName(m *graph.Model, name string) *onnxpb.NodeProto {
	var found *onnxpb.NodeProto
	m.Graph().Walk(func(s *graph.Graph) {
		for _, n := range s.Proto.Node {
			if n.GetName() == name {
				found = n
			}
		}
	})
	return found
}

func mgConstantByName(m *graph.Model, name string) *onnxpb.TensorProto {
	t, _, _ := m.Graph().ConstantTensor(name)
	return t
}

func mgMustEncode(t testing.TB, dt graph.DataType, v []float64) []byte {
	t.Helper()
	raw, err := graph.EncodeFloats(dt, v)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// mgSameTensors checks that two models have the same graph and the same
// bytes in every tensor, wherever they are stored.
func mgSameTensors(t testing.TB, a, b *graph.Model) {
	t.Helper()
	var ta, tb []*onnxpb.TensorProto
	a.Tensors(func(x *onnxpb.TensorProto) { ta = append(ta, x) })
	b.Tensors(func(x *onnxpb.TensorProto) { tb = append(tb, x) })
	if len(ta) != len(tb) {
		t.Fatalf("%d tensors vs %d", len(ta), len(tb))
	}
	for i := range ta {
		if ta[i].GetName() != tb[i].GetName() || !slices.Equal(ta[i].Dims, tb[i].Dims) || ta[i].GetDataType() != tb[i].GetDataType() {
			t.Fatalf("tensor %d: %s %v vs %s %v", i, ta[i].GetName(), ta[i].Dims, tb[i].GetName(), tb[i].Dims)
		}
		if graph.DataType(ta[i].GetDataType()).BitSize() == 0 {
			continue
		}
		if !slices.Equal(mgRawOf(t, a, ta[i]), mgRawOf(t, b, tb[i])) {
			t.Errorf("tensor %s: different bytes", ta[i].GetName())
		}
	}
	ga, gb := proto.Clone(a.Proto.Graph).(*onnxpb.GraphProto), proto.Clone(b.Proto.Graph).(*onnxpb.GraphProto)
	strip := func(g *onnxpb.GraphProto) {
		graph.NewGraph(g).Walk(func(s *graph.Graph) { s.Proto.Initializer = nil })
	}
	strip(ga)
	strip(gb)
	for i := range ga.Node {
		for _, at := range ga.Node[i].Attribute {
			at.T = nil
		}
		for _, at := range gb.Node[i].Attribute {
			at.T = nil
		}
	}
	if !proto.Equal(ga, gb) {
		t.Error("the graphs differ")
	}
}

func equalJSON(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

// ---- small models built for cases the test models lack ----

func mgValueInfo(name string, dt graph.DataType, dims ...int64) *onnxpb.ValueInfoProto {
	shape := &onnxpb.TensorShapeProto{}
	for _, d := range dims {
		shape.Dim = append(shape.Dim, &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d}})
	}
	return &onnxpb.ValueInfoProto{Name: proto.String(name), Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{
		TensorType: &onnxpb.TypeProto_Tensor{ElemType: proto.Int32(int32(dt)), Shape: shape}}}}
}

func mgTestNode(op, name string, inputs, outputs []string, attrs ...*onnxpb.AttributeProto) *onnxpb.NodeProto {
	return &onnxpb.NodeProto{OpType: proto.String(op), Name: proto.String(name), Input: inputs, Output: outputs, Attribute: attrs}
}

func mgIntAttr(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

func mgFloatAttr(name string, v float32) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(v)}
}

func mgRandomTensor(t testing.TB, rng *rand.Rand, name string, dims ...int64) *onnxpb.TensorProto {
	t.Helper()
	n, _ := graph.NumElements(dims)
	v := make([]float64, n)
	for i := range v {
		v[i] = rng.NormFloat64() / math.Sqrt(float64(dims[0]))
	}
	tp, err := graph.NewFloatTensor(name, graph.Float, dims, v)
	if err != nil {
		t.Fatal(err)
	}
	return tp
}

func mgWriteTestModel(t testing.TB, path string, g *onnxpb.GraphProto) string {
	t.Helper()
	mp := &onnxpb.ModelProto{
		IrVersion:   proto.Int64(8),
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(17)}},
		Graph:       g,
	}
	return mgSaveModel(t, graph.NewModel(mp, filepath.Dir(path)), path)
}

// mgBuildGemmAlpha is mlp-gemm-transb with alpha 0.5 on fc2 and alpha 1.25,
// beta 0.75 on fc3: the merged delta must be divided by alpha.
func mgBuildGemmAlpha(t testing.TB, dir string) string {
	m := loadModel(t, mgTestModels+"/mlp-gemm-transb.onnx")
	for _, n := range m.Proto.Graph.Node {
		switch n.GetName() {
		case "/fc2/Gemm":
			mgSetAttr(n, mgFloatAttr("alpha", 0.5))
		case "/fc3/Gemm":
			mgSetAttr(n, mgFloatAttr("alpha", 1.25))
			mgSetAttr(n, mgFloatAttr("beta", 0.75))
		}
	}
	return mgSaveModel(t, m, filepath.Join(dir, "model.onnx"))
}

// mgSetAttr sets a node attribute, replacing one of the same name.
func mgSetAttr(n *onnxpb.NodeProto, a *onnxpb.AttributeProto) {
	for i, have := range n.Attribute {
		if have.GetName() == a.GetName() {
			n.Attribute[i] = a
			return
		}
	}
	n.Attribute = append(n.Attribute, a)
}

// mgBuildGemmTransA has a Gemm with transA=1 and alpha 0.7 (the branch gets a
// Transpose) followed by a Gemm with transB=1 and alpha 1.3.
func mgBuildGemmTransA(t testing.TB, dir string) string {
	rng := rand.New(rand.NewPCG(5, 6))
	g := &onnxpb.GraphProto{
		Name:   proto.String("gemm-transA"),
		Input:  []*onnxpb.ValueInfoProto{mgValueInfo("x", graph.Float, 4, 3)},
		Output: []*onnxpb.ValueInfoProto{mgValueInfo("z", graph.Float, 3, 2)},
		Initializer: []*onnxpb.TensorProto{
			mgRandomTensor(t, rng, "proj.weight", 4, 5), mgRandomTensor(t, rng, "proj.bias", 5),
			mgRandomTensor(t, rng, "out.weight", 2, 5),
		},
		Node: []*onnxpb.NodeProto{
			mgTestNode("Gemm", "/proj/Gemm", []string{"x", "proj.weight", "proj.bias"}, []string{"y"},
				mgIntAttr("transA", 1), mgFloatAttr("alpha", 0.7), mgFloatAttr("beta", 0.5)),
			mgTestNode("Gemm", "/out/Gemm", []string{"y", "out.weight"}, []string{"z"}, mgIntAttr("transB", 1), mgFloatAttr("alpha", 1.3)),
		},
	}
	return mgWriteTestModel(t, filepath.Join(dir, "model.onnx"), g)
}

// mgBuildSharedTranspose feeds one Transpose of a weight to two MatMuls, so
// a merged layer needs its own copy of the weight past the Transpose.
func mgBuildSharedTranspose(t testing.TB, dir string) string {
	rng := rand.New(rand.NewPCG(7, 8))
	g := &onnxpb.GraphProto{
		Name:        proto.String("shared-transpose"),
		Input:       []*onnxpb.ValueInfoProto{mgValueInfo("x", graph.Float, 2, 8)},
		Output:      []*onnxpb.ValueInfoProto{mgValueInfo("y", graph.Float, 2, 6)},
		Initializer: []*onnxpb.TensorProto{mgRandomTensor(t, rng, "shared.weight", 6, 8)},
		Node: []*onnxpb.NodeProto{
			mgTestNode("Transpose", "/shared/Transpose", []string{"shared.weight"}, []string{"wt"}, &onnxpb.AttributeProto{
				Name: proto.String("perm"), Type: onnxpb.AttributeProto_INTS.Enum(), Ints: []int64{1, 0}}),
			mgTestNode("MatMul", "/left/MatMul", []string{"x", "wt"}, []string{"l"}),
			mgTestNode("Relu", "/relu/Relu", []string{"x"}, []string{"rx"}),
			mgTestNode("MatMul", "/right/MatMul", []string{"rx", "wt"}, []string{"r"}),
			mgTestNode("Add", "/sum/Add", []string{"l", "r"}, []string{"y"}),
		},
	}
	return mgWriteTestModel(t, filepath.Join(dir, "model.onnx"), g)
}
