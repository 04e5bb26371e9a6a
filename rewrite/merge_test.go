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
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
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
			vals := make([]float64, tp.Dims[0]*tp.Dims[1])
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
	if cfg.Rank == 0 {
		cfg.Rank, cfg.Alpha = 4, 8
	}
	if len(cfg.Targets) == 0 && cfg.TargetRegex == "" {
		cfg.TargetRegex = ".*"
	}
	inj, err := Inject(m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	mgRandomizeAdapters(t, m, seed)
	return inj
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

// mgFeedSpec says how to build a model's inputs: values for symbolic dims and
// for some inputs by name.
type mgFeedSpec struct {
	dims   map[string]int64
	values map[string]func(shape []int64) []float64
}

var mgGolden map[string]struct {
	Inputs map[string]struct {
		Data  []float64 `json:"data"`
		DType string    `json:"dtype"`
		Shape []int64   `json:"shape"`
	} `json:"inputs"`
}

// mgGoldenFeeds returns the fixed inputs of a testdata model.
func mgGoldenFeeds(t testing.TB, model string) []ortrun.Tensor {
	t.Helper()
	if mgGolden == nil {
		data, err := os.ReadFile(filepath.Join(mgTestModels, "golden.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(data, &mgGolden); err != nil {
			t.Fatal(err)
		}
	}
	g, ok := mgGolden[model]
	if !ok {
		t.Fatalf("golden.json has no %s", model)
	}
	var feeds []ortrun.Tensor
	for _, name := range sortedKeys(g.Inputs) {
		in := g.Inputs[name]
		dt := map[string]ortrun.DType{"int64": ortrun.Int64, "float32": ortrun.Float32, "float16": ortrun.Float16}[in.DType]
		tt, err := ortrun.FromFloat64(name, dt, in.Shape, in.Data)
		if err != nil {
			t.Fatal(err)
		}
		feeds = append(feeds, tt)
	}
	return feeds
}

// mgMakeFeeds builds deterministic inputs for a session from a spec: integer
// inputs are small ids (masks are ones), float inputs are N(0, 0.5²).
func mgMakeFeeds(t testing.TB, s *ortrun.Session, spec mgFeedSpec) []ortrun.Tensor {
	t.Helper()
	rng := rand.New(rand.NewPCG(42, 43))
	var feeds []ortrun.Tensor
	for _, in := range s.Inputs() {
		shape := make([]int64, len(in.Shape))
		for i, d := range in.Shape {
			if d >= 0 {
				shape[i] = d
				continue
			}
			v, ok := spec.dims[in.DimNames[i]]
			if !ok {
				t.Fatalf("input %s: no value for dim %q", in.Name, in.DimNames[i])
			}
			shape[i] = v
		}
		n, _ := ortrun.NumElements(shape)
		var vals []float64
		if f := spec.values[in.Name]; f != nil {
			vals = f(shape)
		} else {
			vals = make([]float64, n)
			for i := range vals {
				switch {
				case in.DType.IsFloat():
					vals[i] = 0.5 * rng.NormFloat64()
				case strings.Contains(in.Name, "mask"):
					vals[i] = 1
				default:
					vals[i] = float64(rng.IntN(8))
				}
			}
		}
		tt, err := ortrun.FromFloat64(in.Name, in.DType, shape, vals)
		if err != nil {
			t.Fatal(err)
		}
		feeds = append(feeds, tt)
	}
	return feeds
}

func mgRunModel(t testing.TB, path string, feeds func(*ortrun.Session) []ortrun.Tensor) []ortrun.Tensor {
	t.Helper()
	s := orttest.Open(t, path)
	out, err := s.Run(feeds(s))
	if err != nil {
		t.Fatalf("running %s: %v", path, err)
	}
	return out
}

// mgCompareRuns checks got against want output by output with
// |got-want| <= tol·max|want| (+ tol relative), and returns the largest
// difference relative to the output's scale.
func mgCompareRuns(t testing.TB, got, want []ortrun.Tensor, tol float64) float64 {
	t.Helper()
	worst := 0.0
	if len(got) != len(want) {
		t.Fatalf("%d outputs, want %d", len(got), len(want))
	}
	for i := range got {
		if !want[i].DType.IsFloat() {
			if !slices.Equal(got[i].Data, want[i].Data) || !slices.Equal(got[i].Shape, want[i].Shape) {
				t.Errorf("output %s differs", want[i].Name)
			}
			continue
		}
		g, err := got[i].Float64s()
		if err != nil {
			t.Fatal(err)
		}
		w, err := want[i].Float64s()
		if err != nil {
			t.Fatal(err)
		}
		scale := 0.0
		for _, v := range w {
			scale = math.Max(scale, math.Abs(v))
		}
		if scale == 0 {
			scale = 1
		}
		maxAbs, _, ok := ortrun.Compare(g, w, tol, tol*scale)
		worst = math.Max(worst, maxAbs/scale)
		if !ok || !slices.Equal(got[i].Shape, want[i].Shape) {
			t.Errorf("output %s: max |diff| %.3g (%.3g of its scale %.3g), tolerance %.3g", want[i].Name, maxAbs, maxAbs/scale, scale, tol)
		}
	}
	return worst
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

// ---- kernel ----

func TestFloat16BitsMatchesGraph(t *testing.T) {
	check := func(f float64) {
		if got, want := float16Bits(f), graph.Float16Bits(f); got != want {
			t.Fatalf("float16Bits(%v = %#x) = %#04x, graph.Float16Bits gives %#04x", f, math.Float64bits(f), got, want)
		}
		if got, want := bfloat16Bits(f), graph.BFloat16Bits(f); got != want {
			t.Fatalf("bfloat16Bits(%v = %#x) = %#04x, graph.BFloat16Bits gives %#04x", f, math.Float64bits(f), got, want)
		}
	}
	for _, f := range []float64{0, math.Copysign(0, -1), 1, -1, 65504, 65519.99, 65520, 65536, 1e300, -1e300,
		math.Inf(1), math.Inf(-1), math.NaN(), 0x1p-14, 0x1p-24, 0x1p-25, 0x1.8p-25, 0x1p-26, 5e-324, 0x1p-126, 0x1p-133, 0x1p-134, 0x1.8p-134,
		math.MaxFloat32, 3.4e38, 3.40282357e38, 3.4028236e38} {
		check(f)
		check(-f)
	}
	// Every half and bfloat16 value, the ties halfway between neighbours,
	// and the doubles just beside those ties.
	for h := 0; h < 1<<16; h++ {
		for _, dec := range []func(uint16) float64{graph.Float16Value, graph.BFloat16Value} {
			v := dec(uint16(h))
			if math.IsNaN(v) || math.IsInf(v, 0) {
				continue
			}
			next := dec(uint16(h + 1))
			check(v)
			if !math.IsNaN(next) && !math.IsInf(next, 0) && h&0x7fff != 0x7fff {
				mid := (v + next) / 2
				check(mid)
				check(math.Nextafter(mid, math.Inf(1)))
				check(math.Nextafter(mid, math.Inf(-1)))
			}
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 2_000_000; i++ {
		f := math.Ldexp(rng.Float64()+0.5, rng.IntN(320)-170)
		if rng.IntN(2) == 0 {
			f = -f
		}
		check(f)
		check(math.Float64frombits(rng.Uint64()))
	}
}

func TestMergeRowsMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, dt := range []graph.DataType{graph.Float, graph.Float16, graph.BFloat16, graph.Double} {
		for _, r := range []int{1, 3, 4, 7, 16} {
			rows, cols := 5, 9
			w := make([]float64, rows*cols)
			a := make([]float64, rows*r)
			b := make([]float64, r*cols)
			for _, s := range [][]float64{w, a, b} {
				for i := range s {
					s[i] = rng.NormFloat64()
				}
			}
			src, _ := graph.NewFloatTensor("w", dt, []int64{int64(rows), int64(cols)}, w)
			w = graph.DecodeFloats(dt, src.RawData)
			u := &update{src: src, dst: src, rows: rows, cols: cols, r: r, u: a, v: b, coef: 0.37}
			out := make([]byte, len(src.RawData))
			mergeRows(out, src.RawData, u, 0, rows, make([]float64, 2*cols))
			want, _ := graph.EncodeFloats(dt, mgRefMerged(w, a, b, rows, cols, r, 0.37, false))
			if !slices.Equal(out, want) {
				t.Errorf("%v r=%d: kernel differs from the reference", dt, r)
			}
		}
	}
}

// ---- Merge restores the base graph ----

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

// feeds returns the case's ORT inputs.
func (c mgBaseCase) feeds(t testing.TB) func(*ortrun.Session) []ortrun.Tensor {
	name := c.golden
	if name == "" && strings.HasPrefix(c.path, mgTestModels+"/") {
		name = strings.TrimPrefix(c.path, mgTestModels+"/")
	}
	if name != "" {
		return func(*ortrun.Session) []ortrun.Tensor { return mgGoldenFeeds(t, name) }
	}
	return func(s *ortrun.Session) []ortrun.Tensor { return mgMakeFeeds(t, s, c.spec) }
}

func TestMergeRestoresBaseGraph(t *testing.T) {
	for _, c := range mgTestdataCases() {
		t.Run(c.name, func(t *testing.T) {
			path := c.modelPath(t)
			base := loadModel(t, path)
			m := loadModel(t, path)
			inj := mgInjectRandom(t, m, c.inject, 11)
			injected := mgCloneModel(m)
			rep, err := Merge(m, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Source != "manifest" || len(rep.Merged) != len(inj.Manifest.Adapters) {
				t.Fatalf("report: source %s, %d merged, want %d", rep.Source, len(rep.Merged), len(inj.Manifest.Adapters))
			}
			mgCheckMergedWeights(t, injected, m, rep)
			mgCheckSameAsBase(t, base, m, rep)
		})
	}
}

// mgCheckMergedWeights recomputes every merged weight from the injected
// model with the reference and compares bits.
func mgCheckMergedWeights(t testing.TB, injected, merged *graph.Model, rep *MergeReport) {
	t.Helper()
	man, _ := ReadManifest(injected)
	byModule := map[string]Adapter{}
	for _, a := range man.Adapters {
		byModule[a.Module] = a
	}
	for _, ml := range rep.Merged {
		a := byModule[ml.Module]
		orig := ml.Weight
		if ml.Original != "" {
			orig = ml.Original
		}
		wt := mgTensorByName(injected, orig)
		if wt == nil {
			wt = mgConstantByName(injected, orig)
		}
		w := mgFloatsOf(t, injected, wt)
		av := mgFloatsOf(t, injected, mgTensorByName(injected, a.LoraA))
		bv := mgFloatsOf(t, injected, mgTensorByName(injected, a.LoraB))
		in, out := int(a.InFeatures), int(a.OutFeatures)
		// A private copy in the node's orientation holds the transpose of a
		// weight that reached the node through a Transpose.
		if node := mgNodeByName(merged, ml.Node); ml.Original != "" && node.Input[1] == ml.Weight {
			rw := injected.Graph().ResolveWeight(mgNodeByName(injected, ml.Node).Input[1])
			if rw.Transposed {
				w = transposeF64(w, int(wt.Dims[0]), int(wt.Dims[1]))
			}
		}
		want := mgRefMerged(w, av, bv, in, out, a.Rank, ml.Factor, ml.Transposed)
		dt := graph.DataType(mgTensorByName(merged, ml.Weight).GetDataType())
		wantRaw := mgMustEncode(t, dt, want)
		got := mgRawOf(t, merged, mgTensorByName(merged, ml.Weight))
		if !slices.Equal(got, wantRaw) {
			t.Errorf("%s: merged weight %s differs from the reference", ml.Module, ml.Weight)
		}
		if ml.MaxDelta <= 0 || ml.Changed == 0 {
			t.Errorf("%s: report says max delta %g, %d changed", ml.Module, ml.MaxDelta, ml.Changed)
		}
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

// mgCheckSameAsBase compares the merged model with the base one: the same
// protobuf except the data of the merged weights (and private copies of
// shared weights, which must be new initializers).
func mgCheckSameAsBase(t testing.TB, base, merged *graph.Model, rep *MergeReport) {
	t.Helper()
	changed := map[string]bool{}
	copies := map[string]bool{}
	for _, ml := range rep.Merged {
		if ml.Original != "" {
			copies[ml.Weight] = true
		} else {
			changed[ml.Weight] = true
		}
	}
	got := proto.Clone(merged.Proto).(*onnxpb.ModelProto)
	want := base.Proto
	baseInits := map[string]*onnxpb.TensorProto{}
	graph.NewGraph(want.Graph).Walk(func(s *graph.Graph) {
		for _, tp := range s.Proto.Initializer {
			baseInits[tp.GetName()] = tp
		}
		for _, n := range s.Proto.Node {
			if n.GetOpType() == "Constant" && len(n.Attribute) > 0 && n.Attribute[0].T != nil {
				baseInits[n.Output[0]] = n.Attribute[0].T
			}
		}
	})
	gg := graph.NewGraph(got.Graph)
	var rewired []string
	gg.Walk(func(s *graph.Graph) {
		inits := s.Proto.Initializer[:0]
		for _, tp := range s.Proto.Initializer {
			if copies[tp.GetName()] {
				continue // checked separately
			}
			if changed[tp.GetName()] {
				b := baseInits[tp.GetName()]
				if !slices.Equal(tp.Dims, b.Dims) || tp.GetDataType() != b.GetDataType() {
					t.Errorf("merged weight %s changed shape or type", tp.GetName())
				}
				if slices.Equal(mgRawOf(t, merged, tp), mgRawOf(t, base, b)) {
					t.Errorf("merged weight %s did not change", tp.GetName())
				}
				tp = proto.Clone(b).(*onnxpb.TensorProto)
			}
			inits = append(inits, tp)
		}
		s.Proto.Initializer = inits
		for _, n := range s.Proto.Node {
			if n.GetOpType() == "Constant" && len(n.Attribute) > 0 && n.Attribute[0].T != nil && changed[n.Output[0]] {
				n.Attribute[0].T = proto.Clone(baseInits[n.Output[0]]).(*onnxpb.TensorProto)
			}
			for i, in := range n.Input {
				if copies[in] {
					rewired = append(rewired, n.GetName())
					n.Input[i] = mgNodeByName(base, n.GetName()).Input[i]
				}
			}
		}
	})
	if len(rewired) != len(copies) {
		t.Errorf("%d private weight copies, but %d nodes read them", len(copies), len(rewired))
	}
	if !proto.Equal(got, want) {
		// Narrow it down for the message.
		if len(got.Graph.Node) != len(want.Graph.Node) {
			t.Fatalf("merged graph has %d nodes, base has %d", len(got.Graph.Node), len(want.Graph.Node))
		}
		for i := range got.Graph.Node {
			if !proto.Equal(got.Graph.Node[i], want.Graph.Node[i]) {
				t.Fatalf("node %d differs:\n got %v\nwant %v", i, got.Graph.Node[i], want.Graph.Node[i])
			}
		}
		for i := range got.Graph.Initializer {
			if i >= len(want.Graph.Initializer) || !proto.Equal(got.Graph.Initializer[i], want.Graph.Initializer[i]) {
				t.Fatalf("initializer %d (%s) differs", i, got.Graph.Initializer[i].GetName())
			}
		}
		t.Fatalf("merged model differs from the base model (metadata: %v vs %v)", got.MetadataProps, want.MetadataProps)
	}
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

// ---- merged == unmerged in ONNX Runtime ----

func arange(from float64) func(shape []int64) []float64 {
	return func(shape []int64) []float64 {
		n, _ := ortrun.NumElements(shape)
		last := shape[len(shape)-1]
		v := make([]float64, n)
		for i := range v {
			v[i] = from + float64(int64(i)%last)
		}
		return v
	}
}

func fill(x float64) func(shape []int64) []float64 {
	return func(shape []int64) []float64 {
		n, _ := ortrun.NumElements(shape)
		v := make([]float64, n)
		for i := range v {
			v[i] = x
		}
		return v
	}
}

type valueFns = map[string]func([]int64) []float64

func withInject(c mgBaseCase, cfg InjectConfig) mgBaseCase {
	c.inject = cfg
	return c
}

func mgCorpusCases() []mgBaseCase {
	llm := map[string]int64{"batch_size": 1, "batch": 1, "seq_len": 3, "sequence_length": 3, "total_seq_len": 5, "total_sequence_length": 5, "past_seq_len": 2, "past_sequence_length": 2}
	c := func(name, file string, tol float64, spec mgFeedSpec) mgBaseCase {
		return mgBaseCase{name: name, path: mgCorpusDir + "/" + file, tol: tol, spec: spec}
	}
	return []mgBaseCase{
		// The genai builder's mask reformat takes a prefill (no past) or one new token.
		c("llama-tiny-fp16-extdata", "llama-tiny-fp16-extdata/model.onnx", 2e-2, mgFeedSpec{
			dims: map[string]int64{"batch_size": 1, "sequence_length": 4, "total_sequence_length": 4, "past_sequence_length": 0}, values: valueFns{"position_ids": arange(0)}}),
		c("gpt2-tiny-fp32", "gpt2-tiny-fp32/model.onnx", 1e-4, mgFeedSpec{dims: llm, values: valueFns{"position_ids": arange(2)}}),
		c("gpt2-tiny-fp16", "gpt2-tiny-fp16/model.onnx", 2e-2, mgFeedSpec{dims: llm, values: valueFns{"position_ids": arange(2)}}),
		c("gpt2-conv1d-gemm-pytorch16", "gpt2-conv1d-gemm-pytorch16.onnx", 1e-4, mgFeedSpec{dims: map[string]int64{"batch_size": 1, "seq_len": 2}}),
		c("gpt2-megatron-pytorch19", "gpt2-megatron-pytorch19.onnx", 1e-4, mgFeedSpec{dims: llm, values: valueFns{"position_ids": arange(2), "attention_mask": fill(1)}}),
		c("bert-toy-tied-embeddings", "bert-toy-tied-embeddings.onnx", 1e-4, mgFeedSpec{dims: map[string]int64{"batch": 1, "max_seq_len_in_batch": 4}, values: valueFns{"token_type_ids": fill(0)}}),
		c("bert-qa-keras2onnx", "bert-qa-keras2onnx.onnx", 1e-4, mgFeedSpec{dims: map[string]int64{"batch_size": 1}, values: valueFns{"token_type_ids": fill(0)}}),
		// Opset 9: the branch's Dropout takes its ratio as an attribute.
		withInject(c("cnn-mnist-gemm-transb", "cnn-mnist-gemm-transb.onnx", 1e-4, mgFeedSpec{}), InjectConfig{Dropout: 0.1}),
		c("linear-gemm-and-matmul-pytorch201", "linear-gemm-and-matmul-pytorch201.onnx", 1e-4, mgFeedSpec{}),
		c("decoder-transposed-weights-opset24", "decoder-transposed-weights-opset24.onnx", 1e-4, mgFeedSpec{
			dims: map[string]int64{"batch": 1, "sequence_len": 2}, values: valueFns{"position_ids": arange(0), "write_indices": fill(0), "nonpad_kv_seqlen": fill(2)}}),
		c("qwen-tiny-fp16-unnamed-nodes", "qwen-tiny-fp16-unnamed-nodes.onnx", 2e-2, mgFeedSpec{dims: llm}),
		c("whisper-decoder-attention-fp32", "whisper-decoder-attention-fp32.onnx", 1e-4, mgFeedSpec{}),
		c("whisper-encoder-attention-fp16", "whisper-encoder-attention-fp16.onnx", 2e-2, mgFeedSpec{}),
		c("gpt2-beamsearch-subgraph", "gpt2-beamsearch-subgraph.onnx", 1e-4, mgFeedSpec{
			dims: map[string]int64{"batch_size": 1, "sequence_length": 4},
			values: valueFns{"max_length": fill(8), "min_length": fill(1), "num_beams": fill(2), "num_return_sequences": fill(1),
				"length_penalty": fill(1), "repetition_penalty": fill(1)}}),
	}
}

func TestMergeMatchesUnmergedORT(t *testing.T) {
	orttest.Require(t)
	cases := append(mgTestdataCases(), mgCorpusCases()...)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			basePath := c.modelPath(t)
			m := loadModel(t, basePath)
			inj := mgInjectRandom(t, m, c.inject, 21)
			injPath := mgSaveModel(t, m, filepath.Join(dir, "injected", "model.onnx"))
			feeds := c.feeds(t)
			want := mgRunModel(t, injPath, feeds)
			before := mgRunModel(t, basePath, feeds)

			mm := loadModel(t, injPath)
			rep, err := Merge(mm, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Merged) != len(inj.Manifest.Adapters) {
				t.Fatalf("merged %d adapters, injected %d", len(rep.Merged), len(inj.Manifest.Adapters))
			}
			if _, ok := mm.Metadata(ManifestKey); ok {
				t.Error("the manifest is still in the merged model")
			}
			mergedPath := mgSaveModel(t, mm, filepath.Join(dir, "merged", "model.onnx"))
			got := mgRunModel(t, mergedPath, feeds)
			worst := mgCompareRuns(t, got, want, c.tol)
			effect := mgCompareRunsQuiet(got, before)
			t.Logf("%d adapters merged; merged vs unmerged: %.3g of scale; the adapters move outputs by %.3g", len(rep.Merged), worst, effect)
			if effect <= 10*worst && effect < 1e-3 && !strings.Contains(c.name, "beamsearch") {
				t.Errorf("the adapters barely change the outputs (%.3g): the test would not catch a wrong merge", effect)
			}

			// Streaming gives the same bytes, through the external data path
			// even for models that had none.
			streamPath := filepath.Join(dir, "stream", "model.onnx")
			os.MkdirAll(filepath.Dir(streamPath), 0o755)
			if _, err := MergeFile(injPath, streamPath, MergeOptions{}, graph.SaveOptions{External: graph.ExternalAlways}); err != nil {
				t.Fatal(err)
			}
			mgSameTensors(t, loadModel(t, mergedPath), loadModel(t, streamPath))
			if len(got) > 0 {
				mgCompareRuns(t, mgRunModel(t, streamPath, feeds), got, 0)
			}
		})
	}
}

// mgCompareRunsQuiet returns the largest difference of float outputs
// relative to their scale.
func mgCompareRunsQuiet(got, want []ortrun.Tensor) float64 {
	worst := 0.0
	for i := range got {
		if !want[i].DType.IsFloat() {
			if !slices.Equal(got[i].Data, want[i].Data) {
				worst = math.Inf(1)
			}
			continue
		}
		g, _ := got[i].Float64s()
		w, _ := want[i].Float64s()
		scale := 0.0
		for _, v := range w {
			scale = math.Max(scale, math.Abs(v))
		}
		if scale == 0 {
			scale = 1
		}
		maxAbs, _, _ := ortrun.Compare(g, w, 0, 0)
		worst = math.Max(worst, maxAbs/scale)
	}
	return worst
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

// ---- options, recognition, sharing, errors ----

func TestMergeWithoutManifest(t *testing.T) {
	for _, c := range mgTestdataCases() {
		t.Run(c.name, func(t *testing.T) {
			m := loadModel(t, c.modelPath(t))
			mgInjectRandom(t, m, c.inject, 31)
			stripped := mgCloneModel(m)
			stripped.DeleteMetadata(ManifestKey)
			rep, err := Merge(m, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			rep2, err := Merge(stripped, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if rep2.Source != "recognized" || len(rep2.Merged) != len(rep.Merged) {
				t.Fatalf("recognized %d adapters (%s), the manifest has %d", len(rep2.Merged), rep2.Source, len(rep.Merged))
			}
			for i := range rep.Merged {
				a, b := rep.Merged[i], rep2.Merged[i]
				// Without a manifest the exact scaling is the tensor's, which
				// may be rounded; everything else must agree.
				a.Scaling, b.Scaling, a.Factor, b.Factor, a.Alpha, b.Alpha, a.MaxDelta, b.MaxDelta, a.Changed, b.Changed = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
				if !equalJSON(a, b) {
					t.Errorf("adapter %d: manifest %+v, recognized %+v", i, a, b)
				}
			}
			if strings.Contains(c.name, "rslora") || strings.Contains(c.name, "fp16") || strings.Contains(c.name, "bf16") {
				return // the scaling tensor rounds alpha/sqrt(r), or the A/B type rounds it
			}
			if !proto.Equal(m.Proto, stripped.Proto) {
				t.Error("merging by recognition gives another model than merging by the manifest")
			}
		})
	}
}

func equalJSON(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

func TestMergeOnlyKeepsTheRestLive(t *testing.T) {
	orttest.Require(t)
	dir := t.TempDir()
	m := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	inj := mgInjectRandom(t, m, InjectConfig{}, 41)
	injPath := mgSaveModel(t, m, filepath.Join(dir, "injected.onnx"))
	feeds := func(*ortrun.Session) []ortrun.Tensor { return mgGoldenFeeds(t, "tiny-gpt.onnx") }
	want := mgRunModel(t, injPath, feeds)

	only := []string{"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"}
	part := loadModel(t, injPath)
	rep, err := Merge(part, MergeOptions{Only: only})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 3 || len(rep.Kept) != len(inj.Manifest.Adapters)-3 {
		t.Fatalf("merged %d, kept %d", len(rep.Merged), len(rep.Kept))
	}
	man, _ := ReadManifest(part)
	if man == nil || len(man.Adapters) != len(rep.Kept) || len(man.Trainable) != 2*len(rep.Kept) {
		t.Fatalf("manifest after a partial merge: %+v", man)
	}
	for _, a := range man.Adapters {
		if slices.Contains(only, a.Module) {
			t.Errorf("merged module %s is still in the manifest", a.Module)
		}
	}
	partPath := mgSaveModel(t, part, filepath.Join(dir, "part.onnx"))
	mgCompareRuns(t, mgRunModel(t, partPath, feeds), want, 1e-5)

	// Merging the rest gives what merging everything at once gives.
	rest := loadModel(t, partPath)
	if _, err := Merge(rest, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	all := loadModel(t, injPath)
	if _, err := Merge(all, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	mgSameTensors(t, rest, all)

	if _, err := Merge(loadModel(t, injPath), MergeOptions{Only: []string{"q_proj"}}); err == nil || !strings.Contains(err.Error(), "no adapter for module(s) q_proj") {
		t.Errorf("unknown module: %v", err)
	}
}

func TestMergeScale(t *testing.T) {
	m := loadModel(t, mgTestModels+"/mlp-gemm-transb.onnx")
	mgInjectRandom(t, m, InjectConfig{}, 51)
	injected := mgCloneModel(m)
	rep, err := Merge(m, MergeOptions{Scale: 0.25})
	if err != nil {
		t.Fatal(err)
	}
	for _, ml := range rep.Merged {
		if ml.Factor != ml.Scaling*0.25 {
			t.Errorf("%s: factor %v, want %v", ml.Module, ml.Factor, ml.Scaling*0.25)
		}
	}
	mgCheckMergedWeights(t, injected, m, rep)

	if _, err := Merge(mgCloneModel(injected), MergeOptions{Scale: math.NaN()}); err == nil {
		t.Error("a NaN scale was accepted")
	}
}

func TestMergeSafe(t *testing.T) {
	dir := t.TempDir()
	m := loadModel(t, mgTestModels+"/tiny-gpt-fp16.onnx")
	mgInjectRandom(t, m, InjectConfig{}, 61)
	// Large factors overflow float16 in one layer.
	man, _ := ReadManifest(m)
	a := man.Adapters[3]
	for _, name := range []string{a.LoraA, a.LoraB} {
		tp := mgTensorByName(m, name)
		big := make([]float64, tp.Dims[0]*tp.Dims[1])
		for i := range big {
			big[i] = 30000
		}
		if err := graph.SetFloat64s(tp, big); err != nil {
			t.Fatal(err)
		}
	}
	injPath := mgSaveModel(t, m, filepath.Join(dir, "in", "model.onnx"))
	before := proto.Clone(m.Proto)

	_, err := Merge(m, MergeOptions{Safe: true})
	if err == nil || !strings.Contains(err.Error(), "safe merge") || !strings.Contains(err.Error(), a.Module) {
		t.Fatalf("safe merge of an overflowing adapter: %v", err)
	}
	if !proto.Equal(before, m.Proto) {
		t.Error("a refused safe merge changed the model")
	}
	out := filepath.Join(dir, "out", "model.onnx")
	os.MkdirAll(filepath.Dir(out), 0o755)
	if _, err := MergeFile(injPath, out, MergeOptions{Safe: true}, graph.SaveOptions{External: graph.ExternalAlways}); err == nil {
		t.Fatal("MergeFile with Safe wrote an overflowing merge")
	}
	if ents, _ := os.ReadDir(filepath.Dir(out)); len(ents) != 0 {
		t.Errorf("a refused MergeFile left files: %v", ents)
	}
	rep, err := Merge(m, MergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ml := range rep.Merged {
		if (ml.Module == a.Module) != (ml.NonFinite > 0) {
			t.Errorf("%s: %d non-finite values reported", ml.Module, ml.NonFinite)
		}
	}
}

func TestMergeSharedWeights(t *testing.T) {
	base := loadModel(t, mgTestModels+"/shared-weight.onnx")
	for _, tc := range []struct {
		targets []string
		copies  map[string]string // module -> original weight of its copy
	}{
		{[]string{"branch_a"}, map[string]string{"branch_a": "shared.weight"}},
		// The first adapter gets a copy; the second then reads the weight
		// alone and is merged in place.
		{[]string{"branch_a", "branch_b"}, map[string]string{"branch_a": "shared.weight"}},
		// The tied lm_head reads the embedding through a Transpose that only
		// it uses: the embedding is copied and the Transpose reads the copy.
		{[]string{"lm_head"}, map[string]string{"lm_head": "embed_tokens.weight"}},
	} {
		t.Run(strings.Join(tc.targets, "+"), func(t *testing.T) {
			m := mgCloneModel(base)
			mgInjectRandom(t, m, InjectConfig{SelectOptions: SelectOptions{Targets: tc.targets, Rank: 4, Alpha: 8}}, 71)
			injected := mgCloneModel(m)
			rep, err := Merge(m, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for _, ml := range rep.Merged {
				if ml.Original != tc.copies[ml.Module] {
					t.Errorf("%s: merged into %s (copy of %q), want a copy of %q", ml.Module, ml.Weight, ml.Original, tc.copies[ml.Module])
				}
				if ml.Original != "" && ml.Weight != ml.Module+".weight" {
					t.Errorf("%s: the copy is called %s", ml.Module, ml.Weight)
				}
			}
			mgCheckMergedWeights(t, injected, m, rep)
			mgCheckSameAsBase(t, base, m, rep)
			// Layers that were not adapted still read the original values.
			for _, name := range []string{"shared.weight", "embed_tokens.weight"} {
				adaptedInPlace := false
				for _, ml := range rep.Merged {
					adaptedInPlace = adaptedInPlace || (ml.Weight == name)
				}
				if !adaptedInPlace && !slices.Equal(mgRawOf(t, m, mgTensorByName(m, name)), mgRawOf(t, base, mgTensorByName(base, name))) {
					t.Errorf("%s changed", name)
				}
			}
		})
	}
}

func TestMergeErrors(t *testing.T) {
	if _, err := Merge(loadModel(t, mgTestModels+"/tiny-gpt.onnx"), MergeOptions{}); err == nil || !strings.Contains(err.Error(), "no LoRA adapters") {
		t.Errorf("base model: %v", err)
	}
	m := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	mgInjectRandom(t, m, InjectConfig{}, 81)
	man, _ := ReadManifest(m)
	a := man.Adapters[2]

	// A branch edited after inject: its Mul now reads something else.
	edited := mgCloneModel(m)
	g := edited.Graph()
	mul := g.Producer(g.Producer(a.Output).Input[1])
	mul.Input[1] = mul.Input[0]
	before := proto.Clone(edited.Proto)
	if _, err := Merge(edited, MergeOptions{}); err == nil || !strings.Contains(err.Error(), a.Module) || !strings.Contains(err.Error(), "no longer a LoRA branch") {
		t.Errorf("edited branch: %v", err)
	}
	if !proto.Equal(before, edited.Proto) {
		t.Error("a failed merge changed the model")
	}

	// A branch value read elsewhere cannot be removed.
	leaky := mgCloneModel(m)
	leaky.Proto.Graph.Output = append(leaky.Proto.Graph.Output, &onnxpb.ValueInfoProto{Name: proto.String(a.BaseOutput)})
	if _, err := Merge(leaky, MergeOptions{}); err == nil || !strings.Contains(err.Error(), "readers outside the adapter branch") {
		t.Errorf("branch value as graph output: %v", err)
	}

	// A Gemm with alpha 0 cannot take a delta.
	gm := loadModel(t, mgTestModels+"/mlp-gemm-transb.onnx")
	mgInjectRandom(t, gm, InjectConfig{}, 82)
	for _, n := range gm.Proto.Graph.Node {
		if n.GetName() == "/fc1/Gemm" {
			mgSetAttr(n, mgFloatAttr("alpha", 0))
		}
	}
	if _, err := Merge(gm, MergeOptions{}); err == nil || !strings.Contains(err.Error(), "alpha is 0") {
		t.Errorf("Gemm alpha 0: %v", err)
	}

	// MergeFile never overwrites its input.
	dir := t.TempDir()
	p := mgSaveModel(t, m, filepath.Join(dir, "model.onnx"))
	if _, err := MergeFile(p, p, MergeOptions{}, graph.SaveOptions{External: graph.ExternalAlways}); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("MergeFile onto its input: %v", err)
	}
}

// TestSIMDKernelsMatchGo checks that the vector kernels (where the build
// and CPU have them) give bitwise the pure Go results and the same
// statistics, on shapes with ragged tails and on values the vector code
// must hand back: zeros, subnormals, overflow, infinities, NaN.
func TestSIMDKernelsMatchGo(t *testing.T) {
	if !useSIMD {
		t.Skip("no vector kernels in this build or on this CPU")
	}
	rng := rand.New(rand.NewPCG(9, 10))
	special := []float64{0, math.Copysign(0, -1), 1e-6, -3e-8, 6e-5, 65504, -65519, 65520, 3.3e38, math.Inf(1), math.Inf(-1), math.NaN(), 1e-40, 1.5e-45}
	value := func() float64 {
		switch rng.IntN(10) {
		case 0:
			return special[rng.IntN(len(special))]
		case 1:
			return rng.NormFloat64() * 3e4
		default:
			return rng.NormFloat64() * 0.05
		}
	}
	for iter := 0; iter < 400; iter++ {
		dt := []graph.DataType{graph.Float16, graph.BFloat16, graph.Float}[iter%3]
		rows, cols, r := 1+rng.IntN(4), 1+rng.IntN(1200), 1+rng.IntN(20)
		if iter%5 == 0 {
			cols = 32 * (1 + rng.IntN(40))
		}
		w := make([]float64, rows*cols)
		for i := range w {
			w[i] = value()
		}
		src, err := graph.NewFloatTensor("w", dt, []int64{int64(rows), int64(cols)}, w)
		if err != nil {
			t.Fatal(err)
		}
		u := &update{src: src, dst: src, rows: rows, cols: cols, r: r, coef: rng.NormFloat64(),
			u: make([]float64, rows*r), v: make([]float64, r*cols)}
		scale := math.Pow(10, float64(rng.IntN(7)-4))
		for i := range u.u {
			u.u[i] = rng.NormFloat64() * scale
		}
		for i := range u.v {
			u.v[i] = rng.NormFloat64()
			if rng.IntN(50) == 0 {
				u.v[i] = special[rng.IntN(len(special))]
			}
		}
		got := make([]byte, len(src.RawData))
		want := make([]byte, len(src.RawData))
		stGot := mergeRows(got, src.RawData, u, 0, rows, make([]float64, 2*cols))
		useSIMD = false
		stWant := mergeRows(want, src.RawData, u, 0, rows, make([]float64, 2*cols))
		useSIMD = true
		if !slices.Equal(got, want) {
			for i := 0; i < len(got); i += dt.BitSize() / 8 {
				if got[i] != want[i] || got[i+1] != want[i+1] {
					t.Fatalf("%v [%d, %d] r=%d: element %d differs (SIMD %x, Go %x)", dt, rows, cols, r, i/(dt.BitSize()/8), got[i:i+dt.BitSize()/8], want[i:i+dt.BitSize()/8])
				}
			}
			t.Fatalf("%v [%d, %d] r=%d: results differ", dt, rows, cols, r)
		}
		if stGot != stWant {
			t.Fatalf("%v [%d, %d] r=%d: stats %+v, Go %+v", dt, rows, cols, r, stGot, stWant)
		}
	}
}

// TestKernelRoundsTiesToEven builds deltas of exactly half a unit in the
// last place of each weight (and a hair more or less), where rounding to
// nearest even is decided, and checks both kernels against
// graph.EncodeFloats.
func TestKernelRoundsTiesToEven(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for _, dt := range []graph.DataType{graph.Float16, graph.BFloat16, graph.Float} {
		cols := 4096
		w := make([]float64, cols)
		for i := range w {
			w[i] = rng.NormFloat64() * math.Pow(2, float64(rng.IntN(20)-10))
		}
		src, _ := graph.NewFloatTensor("w", dt, []int64{1, int64(cols)}, w)
		w = graph.DecodeFloats(dt, src.RawData)
		d := make([]float64, cols)
		for q, x := range w {
			bits := src.RawData[q*dt.BitSize()/8:]
			var next float64
			switch dt {
			case graph.Float:
				next = float64(math.Nextafter32(float32(x), float32(math.Inf(1))))
			default:
				raw := []byte{bits[0], bits[1]}
				v := uint16(raw[0]) | uint16(raw[1])<<8
				if x >= 0 {
					v++
				} else {
					v--
				}
				raw[0], raw[1] = byte(v), byte(v>>8)
				next = graph.DecodeFloats(dt, raw)[0]
			}
			half := (next - x) / 2
			switch q % 4 {
			case 0:
				d[q] = half
			case 1:
				d[q] = -half
			case 2:
				d[q] = half * (1 + 0x1p-20)
			case 3:
				d[q] = half * (1 - 0x1p-20)
			}
		}
		u := &update{src: src, dst: src, rows: 1, cols: cols, r: 1, coef: 1, u: []float64{1}, v: d}
		sum := make([]float64, cols)
		for q := range sum {
			sum[q] = w[q] + d[q]
		}
		want := mgMustEncode(t, dt, sum)
		for _, simd := range []bool{false, true} {
			if simd && !useSIMD {
				continue
			}
			saved := useSIMD
			useSIMD = simd
			got := make([]byte, len(want))
			mergeRows(got, src.RawData, u, 0, 1, make([]float64, 2*cols))
			useSIMD = saved
			if !slices.Equal(got, want) {
				t.Errorf("%v (simd %v): ties are not rounded to even", dt, simd)
			}
		}
	}
}
