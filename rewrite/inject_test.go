package rewrite

import (
	"crypto/sha256"
	"math"
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

func loadModel(t testing.TB, path string) *graph.Model {
	t.Helper()
	m, err := graph.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func allLinear(rank int, alpha float64) InjectConfig {
	return InjectConfig{SelectOptions: SelectOptions{Targets: []string{AllLinear}, Rank: rank, Alpha: alpha}}
}

// injectModels are the models every structural test runs on: testdata
// models always, corpus models when the corpus is present.
func injectModels(t *testing.T) map[string]string {
	models := map[string]string{
		"tiny-gpt":         testutil.TestModel("tiny-gpt.onnx"),
		"tiny-gpt-fp16":    testutil.TestModel("tiny-gpt-fp16.onnx"),
		"tiny-bert":        testutil.TestModel("tiny-bert.onnx"),
		"mlp-gemm-transb":  testutil.TestModel("mlp-gemm-transb.onnx"),
		"shared-weight":    testutil.TestModel("shared-weight.onnx"),
		"bf16-matmul":      testutil.TestModel("bf16-matmul.onnx"),
		"tiny-gpt-extdata": testutil.TestModel("tiny-gpt-extdata/model.onnx"),
	}
	if _, err := os.Stat(filepath.Join(testutil.RepoRoot(), "..", "shared", "corpus")); err == nil {
		for name, file := range map[string]string{
			"whisper-decoder":   "whisper-decoder-attention-fp32.onnx",
			"qwen-unnamed":      "qwen-tiny-fp16-unnamed-nodes.onnx",
			"decoder-transpose": "decoder-transposed-weights-opset24.onnx",
			"gpt2-conv1d-gemm":  "gpt2-conv1d-gemm-pytorch16.onnx",
			"bert-tied":         "bert-toy-tied-embeddings.onnx",
			"cnn-gemm-transb":   "cnn-mnist-gemm-transb.onnx",
			"beamsearch":        "gpt2-beamsearch-subgraph.onnx",
			"llama-extdata":     "llama-tiny-fp16-extdata/model.onnx",
			"keras-bert":        "bert-qa-keras2onnx.onnx",
		} {
			models[name] = testutil.Corpus(t, file)
		}
	} else {
		t.Logf("shared corpus absent: testing testdata models only")
	}
	return models
}

// TestInjectKeepsBaseGraph checks the promise of inject: every original
// initializer, node and metadata entry is still there unchanged, except
// that adapted nodes write a new output name, and the branch is shaped as
// the manifest says.
func TestInjectKeepsBaseGraph(t *testing.T) {
	for name, path := range injectModels(t) {
		t.Run(name, func(t *testing.T) {
			base := loadModel(t, path)
			before := proto.Clone(base.Proto).(*onnxpb.ModelProto)
			m := loadModel(t, path)
			inj, err := Inject(m, allLinear(4, 8))
			if err != nil {
				t.Fatal(err)
			}
			if len(inj.Manifest.Adapters) == 0 {
				t.Fatal("no adapter injected")
			}
			renamed := map[string]Adapter{}
			for _, a := range inj.Manifest.Adapters {
				renamed[a.BaseOutput] = a
			}
			checkOriginalsKept(t, before, m.Proto, renamed)
			checkBranches(t, m, inj.Manifest)

			out := filepath.Join(t.TempDir(), "out.onnx")
			if err := m.Save(out, graph.SaveOptions{}); err != nil {
				t.Fatal(err)
			}
			testutil.CheckONNXLike(t, path, out)
			back := loadModel(t, out)
			man, err := ReadManifest(back)
			if err != nil || man == nil || len(man.Adapters) != len(inj.Manifest.Adapters) {
				t.Fatalf("manifest after save: %v, %v", man, err)
			}
			if len(man.Trainable) != 2*len(man.Adapters) {
				t.Errorf("trainable lists %d names for %d adapters", len(man.Trainable), len(man.Adapters))
			}
		})
	}
}

// checkOriginalsKept compares the graphs of before and after scope by scope.
func checkOriginalsKept(t *testing.T, before, after *onnxpb.ModelProto, renamed map[string]Adapter) {
	t.Helper()
	for _, kv := range before.MetadataProps {
		found := false
		for _, have := range after.MetadataProps {
			if proto.Equal(kv, have) {
				found = true
			}
		}
		if !found {
			t.Errorf("metadata %q lost or changed", kv.GetKey())
		}
	}
	var walk func(b, a *onnxpb.GraphProto)
	walk = func(b, a *onnxpb.GraphProto) {
		inits := map[string]*onnxpb.TensorProto{}
		for _, ti := range a.Initializer {
			inits[ti.GetName()] = ti
		}
		for _, ti := range b.Initializer {
			if !proto.Equal(ti, inits[ti.GetName()]) {
				t.Errorf("initializer %q changed or lost", ti.GetName())
			}
		}
		for i, vi := range b.Output {
			if !proto.Equal(vi, a.Output[i]) {
				t.Errorf("graph output %q changed", vi.GetName())
			}
		}
		// The original nodes appear in their original order.
		j := 0
		for _, bn := range b.Node {
			for j < len(a.Node) && !sameNode(bn, a.Node[j], renamed) {
				j++
			}
			if j == len(a.Node) {
				t.Fatalf("node %q (%s) lost, changed or reordered", bn.GetName(), bn.GetOpType())
			}
			an := a.Node[j]
			for k, bs := range nodeGraphs(bn) {
				walk(bs, nodeGraphs(an)[k])
			}
			j++
		}
	}
	walk(before.Graph, after.Graph)
}

func nodeGraphs(n *onnxpb.NodeProto) []*onnxpb.GraphProto {
	var gs []*onnxpb.GraphProto
	for _, a := range n.Attribute {
		if a.G != nil {
			gs = append(gs, a.G)
		}
		gs = append(gs, a.Graphs...)
	}
	return gs
}

// sameNode reports whether after is before, allowing only the first
// output's rename by an adapter, and subgraphs (compared separately).
func sameNode(before, after *onnxpb.NodeProto, renamed map[string]Adapter) bool {
	b := proto.Clone(before).(*onnxpb.NodeProto)
	a := proto.Clone(after).(*onnxpb.NodeProto)
	if len(a.Output) > 0 {
		if ad, ok := renamed[a.Output[0]]; ok && len(b.Output) > 0 && b.Output[0] == ad.Output {
			a.Output[0] = ad.Output
		}
	}
	for _, n := range []*onnxpb.NodeProto{a, b} {
		for _, attr := range n.Attribute {
			attr.G, attr.Graphs = nil, nil
		}
	}
	return proto.Equal(a, b)
}

// checkBranches checks each adapter's initializers and nodes.
func checkBranches(t *testing.T, m *graph.Model, man *Manifest) {
	t.Helper()
	g := m.Graph()
	var scopes []*graph.Graph
	g.Walk(func(s *graph.Graph) { scopes = append(scopes, s) })
	find := func(name string) *onnxpb.TensorProto {
		for _, s := range scopes {
			if ti, _ := s.Initializer(name); ti != nil {
				return ti
			}
		}
		return nil
	}
	for _, a := range man.Adapters {
		tA, tB, tS := find(a.LoraA), find(a.LoraB), find(a.ScalingTensor)
		if tA == nil || tB == nil || tS == nil {
			t.Fatalf("%s: adapter initializers missing", a.Module)
		}
		if a.LoraA != a.Module+".lora_A.weight" || a.LoraB != a.Module+".lora_B.weight" {
			t.Errorf("%s: adapter names %q, %q", a.Module, a.LoraA, a.LoraB)
		}
		r := int64(a.Rank)
		if !slices.Equal(tA.Dims, []int64{a.InFeatures, r}) || !slices.Equal(tB.Dims, []int64{r, a.OutFeatures}) {
			t.Errorf("%s: A %v, B %v for in=%d out=%d r=%d", a.Module, tA.Dims, tB.Dims, a.InFeatures, a.OutFeatures, r)
		}
		if graph.DataType(tA.GetDataType()).String() != a.DType || tB.GetDataType() != tA.GetDataType() {
			t.Errorf("%s: A is %v, B is %v, manifest says %s", a.Module, graph.DataType(tA.GetDataType()), graph.DataType(tB.GetDataType()), a.DType)
		}
		bv, err := m.Float64s(tB)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range bv {
			if v != 0 {
				t.Fatalf("%s: lora_B is not zero", a.Module)
			}
		}
		av, _ := m.Float64s(tA)
		bound := 1/math.Sqrt(float64(a.InFeatures)) + 1e-3 // fp16 rounding slack
		nonzero := 0
		for _, v := range av {
			if math.Abs(v) > bound {
				t.Fatalf("%s: lora_A value %v outside kaiming bound %v", a.Module, v, bound)
			}
			if v != 0 {
				nonzero++
			}
		}
		if nonzero < len(av)/2 {
			t.Errorf("%s: lora_A is mostly zero", a.Module)
		}
		if math.Abs(a.Scaling-a.Alpha/float64(a.Rank)) > 1e-12 {
			t.Errorf("%s: scaling %v, want alpha/r", a.Module, a.Scaling)
		}
		if len(a.Nodes) < 4 || !strings.Contains(a.Nodes[0], "/lora/") {
			t.Errorf("%s: branch nodes %v", a.Module, a.Nodes)
		}
	}
}

func TestInjectSharedWeightAdaptsOneUser(t *testing.T) {
	m := loadModel(t, testutil.TestModel("shared-weight.onnx"))
	layers, _ := FindLayers(m)
	shared := 0
	for _, l := range layers {
		if l.Shared {
			shared++
		}
	}
	if shared < 2 {
		t.Fatalf("expected the two users of shared.weight to be marked shared, got %d shared layers", shared)
	}
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"branch_a"}, Rank: 2, Alpha: 4}})
	if err != nil {
		t.Fatal(err)
	}
	if len(inj.Manifest.Adapters) != 1 || inj.Manifest.Adapters[0].Module != "branch_a" {
		t.Fatalf("adapters: %+v", inj.Manifest.Adapters)
	}
	g := m.Graph()
	for _, n := range g.Proto.Node {
		if n.GetName() == "/branch_b/MatMul" {
			for _, c := range g.Consumers(n.Output[0]) {
				if strings.Contains(c.GetName(), "/lora/") {
					t.Errorf("branch_b output feeds %s", c.GetName())
				}
			}
		}
	}
}

func TestInjectExternalDataLeavesInputAlone(t *testing.T) {
	src := testutil.TestModel("tiny-gpt-extdata/model.onnx")
	dataFile := filepath.Join(filepath.Dir(src), "model.onnx.data")
	sum := func(p string) [32]byte {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return sha256.Sum256(b)
	}
	modelSum, dataSum := sum(src), sum(dataFile)
	m := loadModel(t, src)
	if _, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj", "v_proj"}, Rank: 4, Alpha: 8}}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	out := filepath.Join(dir, "model.onnx")
	if err := m.Save(out, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	if sum(src) != modelSum || sum(dataFile) != dataSum {
		t.Fatal("the input model or its data file changed")
	}
	if _, err := os.Stat(filepath.Join(dir, "model.onnx.data")); err != nil {
		t.Fatalf("external data in should give external data out: %v", err)
	}
	testutil.CheckONNX(t, out)
	if err := m.Save(src, graph.SaveOptions{}); err == nil {
		t.Fatal("saving over the input model must be refused")
	}
}

func TestInjectNoMatchListsModules(t *testing.T) {
	m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
	_, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"query"}, Rank: 4, Alpha: 8}})
	if err == nil || !strings.Contains(err.Error(), "model.layers.0.self_attn.q_proj") {
		t.Fatalf("want an error listing module paths, got %v", err)
	}
	if _, ok := m.Metadata(ManifestKey); ok {
		t.Fatal("a failed inject wrote a manifest")
	}
}

func TestInjectTwice(t *testing.T) {
	m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
	cfg := InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}, Rank: 4, Alpha: 8}}
	if _, err := Inject(m, cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := Inject(m, cfg); err == nil || !strings.Contains(err.Error(), "already has an adapter") {
		t.Fatalf("re-injecting the same module: %v", err)
	}
	cfg.Targets = []string{"v_proj"}
	inj, err := Inject(m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(inj.Manifest.Adapters) != 4 {
		t.Fatalf("want 4 adapters after two injects, got %d", len(inj.Manifest.Adapters))
	}
	// The branch MatMuls of the first inject are not layers.
	layers, _ := FindLayers(m)
	for _, l := range layers {
		if strings.Contains(l.Node.GetName(), "/lora/") {
			t.Errorf("branch node %s taken for a layer", l.Node.GetName())
		}
	}
}

func TestInjectSeedAndInit(t *testing.T) {
	aValues := func(cfg InjectConfig) []float64 {
		m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
		inj, err := Inject(m, cfg)
		if err != nil {
			t.Fatal(err)
		}
		ti, _ := m.Graph().Initializer(inj.Manifest.Adapters[0].LoraA)
		v, err := m.Float64s(ti)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	cfg := InjectConfig{SelectOptions: SelectOptions{Targets: []string{"model.layers.0.self_attn.q_proj"}, Rank: 8, Alpha: 16}, Seed: 7}
	a1, a2 := aValues(cfg), aValues(cfg)
	for i := range a1 {
		if a1[i] != a2[i] {
			t.Fatal("same seed gave different lora_A")
		}
	}
	// Adding a target leaves the first adapter's draw unchanged.
	wide := cfg
	wide.Targets = []string{"model.layers.0.self_attn.q_proj", "k_proj"}
	if a3 := aValues(wide); a3[0] != a1[0] || a3[len(a3)-1] != a1[len(a1)-1] {
		t.Fatal("adding a target changed another adapter's init")
	}
	cfg.Seed = 8
	if a4 := aValues(cfg); a4[0] == a1[0] {
		t.Fatal("another seed gave the same lora_A")
	}
	// Gaussian: std 1/r, as PEFT's init_lora_weights="gaussian".
	cfg.Init = InitGaussian
	g := aValues(cfg)
	var sum, sq float64
	for _, v := range g {
		sum += v
		sq += v * v
	}
	n := float64(len(g))
	std := math.Sqrt(sq/n - (sum/n)*(sum/n))
	if math.Abs(std-1.0/8) > 0.03 {
		t.Errorf("gaussian std %v, want about %v", std, 1.0/8)
	}
	cfg.Init = "xavier"
	m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
	if _, err := Inject(m, cfg); err == nil {
		t.Error("unknown init accepted")
	}
}

func TestInjectDropoutAndRSLoRA(t *testing.T) {
	m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}, Rank: 4, Alpha: 8}, Dropout: 0.1, RSLoRA: true})
	if err != nil {
		t.Fatal(err)
	}
	a := inj.Manifest.Adapters[0]
	if math.Abs(a.Scaling-8/2.0) > 1e-12 {
		t.Errorf("rslora scaling %v, want alpha/sqrt(r) = 4", a.Scaling)
	}
	g := m.Graph()
	var dropout *onnxpb.NodeProto
	for _, n := range g.Proto.Node {
		if n.GetOpType() == "Dropout" && strings.HasPrefix(n.GetName(), "/model/layers.0/self_attn/q_proj/lora/") {
			dropout = n
		}
	}
	if dropout == nil {
		t.Fatal("no Dropout on the branch")
	}
	ratio, _, _ := g.ConstantTensor(dropout.Input[1])
	if ratio == nil {
		t.Fatal("dropout ratio is not a constant input (opset >= 12)")
	}
	if v, _ := m.Float64s(ratio); math.Abs(v[0]-0.1) > 1e-7 {
		t.Errorf("dropout ratio %v", v)
	}
	if _, err := Inject(loadModel(t, testutil.TestModel("tiny-gpt.onnx")), InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}, Rank: 4, Alpha: 8}, Dropout: 1}); err == nil {
		t.Error("dropout 1 accepted")
	}
}

func TestInjectGemmAndSubgraph(t *testing.T) {
	m := loadModel(t, testutil.TestModel("mlp-gemm-transb.onnx"))
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc1"}, Rank: 4, Alpha: 4}})
	if err != nil {
		t.Fatal(err)
	}
	a := inj.Manifest.Adapters[0]
	// fc1.weight is stored [out=32, in=16] with transB=1: the adapter is [in, r] x [r, out].
	if a.Op != "Gemm" || a.InFeatures != 16 || a.OutFeatures != 32 {
		t.Fatalf("Gemm transB adapter: %+v", a)
	}
	if !inj.Layers[0].StoredTransposed() {
		t.Error("fc1.weight with transB=1 should be stored transposed")
	}

	bs := loadModel(t, testutil.Corpus(t, "gpt2-beamsearch-subgraph.onnx"))
	inj, err = Inject(bs, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"c_fc"}, Rank: 2, Alpha: 4}})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range inj.Manifest.Adapters {
		if a.Graph == "" {
			t.Errorf("%s: adapter should live in the BeamSearch decoder subgraph", a.Module)
		}
	}
}

func TestPrintTrainable(t *testing.T) {
	m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
	var base int64
	for _, ti := range m.Proto.Graph.Initializer {
		if graph.DataType(ti.GetDataType()).IsFloat() {
			n, _ := graph.NumElements(ti.Dims)
			base += n
		}
	}
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj", "v_proj"}, Rank: 8, Alpha: 16}})
	if err != nil {
		t.Fatal(err)
	}
	// 2 layers x (q, v) x r(32+32), all 32x32 in tiny-gpt.
	want := int64(2 * 2 * 8 * (32 + 32))
	if inj.Trainable != want {
		t.Errorf("trainable %d, want %d", inj.Trainable, want)
	}
	// All params = base + trainable, as PEFT counts them.
	if inj.All != base+want {
		t.Errorf("all params %d, want %d", inj.All, base+want)
	}
	if !strings.HasPrefix(inj.String(), "trainable params: 2,048 || all params: ") {
		t.Errorf("summary %q", inj.String())
	}
}

// Before IR version 4 every initializer is also listed as a graph input;
// those are still constant weights, and new initializers must be listed too.
func TestInjectLegacyIRInitializersAsInputs(t *testing.T) {
	W, _ := graph.NewFloatTensor("fc.weight", graph.Float, []int64{4, 3}, make([]float64, 12))
	node := &onnxpb.NodeProto{Name: proto.String("/fc/MatMul"), OpType: proto.String("MatMul"), Input: []string{"x", "fc.weight"}, Output: []string{"y"}}
	mp := singleNodeModel(node, []*onnxpb.TensorProto{W}, graph.Float, []int64{2, 4}, []int64{2, 3})
	mp.IrVersion = proto.Int64(3)
	mp.OpsetImport[0].Version = proto.Int64(8)
	mp.Graph.Input = append(mp.Graph.Input, &onnxpb.ValueInfoProto{Name: proto.String("fc.weight"), Type: mp.Graph.Input[0].Type})
	m := graph.NewModel(mp, "")
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: 2, Alpha: 2}})
	if err != nil {
		t.Fatal(err)
	}
	declared := map[string]bool{}
	for _, vi := range mp.Graph.Input {
		declared[vi.GetName()] = true
	}
	a := inj.Manifest.Adapters[0]
	for _, name := range []string{a.LoraA, a.LoraB, a.ScalingTensor} {
		if !declared[name] {
			t.Errorf("IR 3 model: initializer %s not declared as a graph input", name)
		}
	}
	// From IR 4 on, an initializer that is also an input can be fed at run
	// time, so it is not a constant weight.
	mp.IrVersion = proto.Int64(4)
	if layers, skipped := FindLayers(graph.NewModel(mp, "")); len(layers) != 0 || len(skipped) == 0 {
		t.Errorf("IR 4 overridable weight: %d layers, skipped %v", len(layers), skipped)
	}
}

// Where the layer's shapes are declared, the branch's values get value_info
// too (Netron shows them on the edges; onnx.checker's shape inference in
// TestInjectKeepsBaseGraph checks they are consistent).
func TestInjectDescribesBranchShapes(t *testing.T) {
	m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}, Rank: 4, Alpha: 8}})
	if err != nil {
		t.Fatal(err)
	}
	g := m.Graph()
	described := 0
	for _, a := range inj.Manifest.Adapters {
		base := tensorType(g, a.BaseOutput)
		if base == nil {
			t.Fatalf("%s: no value_info for the base output", a.Module)
		}
		if x := tensorType(g, g.Producer(a.BaseOutput).Input[0]); x == nil || x.Shape == nil {
			continue // the exporter did not declare the layer's input shape
		}
		described++
		xa := tensorType(g, g.Consumers(a.LoraA)[0].Output[0])
		if xa == nil || xa.Shape.Dim[len(xa.Shape.Dim)-1].GetDimValue() != int64(a.Rank) {
			t.Fatalf("%s: x·A value_info %v, want last dim %d", a.Module, xa, a.Rank)
		}
		if len(xa.Shape.Dim) != len(base.Shape.Dim) {
			t.Errorf("%s: x·A has rank %d, the output %d", a.Module, len(xa.Shape.Dim), len(base.Shape.Dim))
		}
	}
	if described == 0 {
		t.Fatal("no adapted layer had a declared input shape; the test checks nothing")
	}
}
