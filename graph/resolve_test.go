package graph

import (
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

func castAttr(to DataType) *onnxpb.AttributeProto { return intAttr("to", int64(to)) }

// weightsModel has weights reached in every supported way and a few that
// must not resolve.
func weightsModel() *onnxpb.GraphProto {
	w := func(name string, dims ...int64) *onnxpb.TensorProto {
		n := int64(1)
		for _, d := range dims {
			n *= d
		}
		return rawTensor(name, Float, dims, make([]byte, 4*n))
	}
	body := &onnxpb.GraphProto{
		Name:  proto.String("body"),
		Input: []*onnxpb.ValueInfoProto{valueInfo("i"), valueInfo("cond")},
		Node: []*onnxpb.NodeProto{
			// Reads the outer Transpose of Wsub.
			node("sub_mm", "MatMul", []string{"i", "Wsub_t"}, []string{"sub_out"}),
		},
		Output: []*onnxpb.ValueInfoProto{valueInfo("cond"), valueInfo("sub_out")},
	}
	return &onnxpb.GraphProto{
		Name:  proto.String("weights"),
		Input: []*onnxpb.ValueInfoProto{valueInfo("x"), valueInfo("Wover")},
		Initializer: []*onnxpb.TensorProto{
			w("Wplain", 4, 8), w("Wchain", 8, 4), w("Wover", 4, 8), w("W3d", 2, 4, 8), w("Wperm", 2, 4, 8),
			w("Wtwice", 4, 8), w("Wsub", 8, 4), w("Wtied", 8, 4),
		},
		Node: []*onnxpb.NodeProto{
			node("mm_plain", "MatMul", []string{"x", "Wplain"}, []string{"y1"}),
			// Wchain -> Identity -> Cast(fp16) -> Transpose -> MatMul
			node("id", "Identity", []string{"Wchain"}, []string{"Wchain_id"}),
			node("cast", "Cast", []string{"Wchain_id"}, []string{"Wchain_16"}, castAttr(Float16)),
			node("tr", "Transpose", []string{"Wchain_16"}, []string{"Wchain_t"}, intsAttr("perm", 1, 0)),
			node("mm_chain", "MatMul", []string{"x", "Wchain_t"}, []string{"y2"}),
			node("mm_over", "MatMul", []string{"x", "Wover"}, []string{"y3"}),
			node("tr3", "Transpose", []string{"W3d"}, []string{"W3d_t"}), // reverses 3 axes
			node("mm_3d", "MatMul", []string{"x", "W3d_t"}, []string{"y4"}),
			node("trp", "Transpose", []string{"Wperm"}, []string{"Wperm_t"}, intsAttr("perm", 0, 2, 1)),
			node("mm_perm", "MatMul", []string{"x", "Wperm_t"}, []string{"y5"}),
			node("t1", "Transpose", []string{"Wtwice"}, []string{"Wtwice_1"}),
			node("t2", "Transpose", []string{"Wtwice_1"}, []string{"Wtwice_2"}, intsAttr("perm", 1, 0)),
			node("mm_twice", "MatMul", []string{"x", "Wtwice_2"}, []string{"y6"}),
			node("relu", "Relu", []string{"Wplain"}, []string{"Wrelu"}),
			node("mm_relu", "MatMul", []string{"x", "Wrelu"}, []string{"y7"}),
			node("k", "Constant", nil, []string{"K"}, &onnxpb.AttributeProto{Name: proto.String("value"), Type: onnxpb.AttributeProto_TENSOR.Enum(), T: w("", 4, 8)}),
			node("mm_const", "MatMul", []string{"x", "K"}, []string{"y8"}),
			node("trs", "Transpose", []string{"Wsub"}, []string{"Wsub_t"}),
			node("loop", "Loop", []string{"", "c", "x"}, []string{"y9"}, graphAttr("body", body)),
			// Wtied feeds a Gather directly and a MatMul through a Transpose.
			node("gather", "Gather", []string{"Wtied", "ids"}, []string{"emb"}),
			node("trt", "Transpose", []string{"Wtied"}, []string{"Wtied_t"}),
			node("mm_tied", "MatMul", []string{"x", "Wtied_t"}, []string{"y10"}),
			node("mm_act", "MatMul", []string{"x", "y1"}, []string{"y11"}),
		},
	}
}

func findNode(t *testing.T, g *Graph, name string) (*onnxpb.NodeProto, *Graph) {
	t.Helper()
	var found *onnxpb.NodeProto
	var scope *Graph
	g.Walk(func(s *Graph) {
		for _, n := range s.Proto.Node {
			if n.GetName() == name {
				found, scope = n, s
			}
		}
	})
	if found == nil {
		t.Fatalf("no node %q", name)
	}
	return found, scope
}

func chainOps(w *Weight) string {
	var ops []string
	for _, n := range w.Chain {
		ops = append(ops, n.GetName())
	}
	return strings.Join(ops, ",")
}

func TestResolveWeight(t *testing.T) {
	g := NewGraph(weightsModel())
	tests := []struct {
		consumer, weight, chain string
		transposed              bool
		castTo                  DataType
		dims                    []int64
		shared                  bool
	}{
		{"mm_plain", "Wplain", "", false, Undefined, []int64{4, 8}, true}, // Wplain also feeds relu
		{"mm_chain", "Wchain", "id,cast,tr", true, Float16, []int64{4, 8}, false},
		{"mm_twice", "Wtwice", "t1,t2", false, Undefined, []int64{4, 8}, false},
		{"mm_const", "K", "", false, Undefined, []int64{4, 8}, false},
		{"sub_mm", "Wsub", "trs", true, Undefined, []int64{4, 8}, false},
		{"mm_tied", "Wtied", "trt", true, Undefined, []int64{4, 8}, true},
		{"gather", "Wtied", "", false, Undefined, []int64{8, 4}, true},
	}
	for _, tc := range tests {
		n, scope := findNode(t, g, tc.consumer)
		in := n.Input[1]
		if tc.consumer == "gather" {
			in = n.Input[0]
		}
		w := scope.ResolveWeight(in)
		if w == nil {
			t.Errorf("%s: no weight", tc.consumer)
			continue
		}
		if w.Name != tc.weight || chainOps(w) != tc.chain || w.Transposed != tc.transposed || w.CastTo != tc.castTo || !slices.Equal(w.Dims(), tc.dims) {
			t.Errorf("%s: got %s chain [%s] transposed %v cast %v dims %v", tc.consumer, w.Name, chainOps(w), w.Transposed, w.CastTo, w.Dims())
		}
		if w.Scope != g {
			t.Errorf("%s: scope %q", tc.consumer, w.Scope.Proto.GetName())
		}
		if w.DataType() != Float {
			t.Errorf("%s: DataType %v", tc.consumer, w.DataType())
		}
		if tc.weight == "K" && (w.Constant == nil || w.Constant.GetName() != "k") {
			t.Errorf("K: Constant = %v", w.Constant)
		} else if tc.weight != "K" && w.Constant != nil {
			t.Errorf("%s: Constant = %v for an initializer", tc.consumer, w.Constant)
		}
		if got := scope.IsShared(w, n); got != tc.shared {
			t.Errorf("%s: IsShared = %v, want %v", tc.consumer, got, tc.shared)
		}
	}
	for _, consumer := range []string{"mm_over", "mm_3d", "mm_perm", "mm_relu", "mm_act"} {
		n, scope := findNode(t, g, consumer)
		if w := scope.ResolveWeight(n.Input[1]); w != nil {
			t.Errorf("%s: resolved %s, want nil", consumer, w.Name)
		}
	}
	if w := g.ResolveWeight("x"); w != nil {
		t.Error("a graph input resolved to a weight")
	}
}

func TestIsSharedThroughSubgraphs(t *testing.T) {
	// W is read by two MatMuls inside a Loop body: shared, although the
	// main graph sees only the Loop as its consumer. V is read by one.
	body := &onnxpb.GraphProto{
		Name:  proto.String("body"),
		Input: []*onnxpb.ValueInfoProto{valueInfo("i"), valueInfo("cond")},
		Node: []*onnxpb.NodeProto{
			node("a", "MatMul", []string{"i", "W"}, []string{"ao"}),
			node("b", "MatMul", []string{"ao", "W"}, []string{"bo"}),
			node("c", "MatMul", []string{"bo", "V"}, []string{"co"}),
		},
		Output: []*onnxpb.ValueInfoProto{valueInfo("cond"), valueInfo("co")},
	}
	gp := &onnxpb.GraphProto{
		Name:        proto.String("main"),
		Input:       []*onnxpb.ValueInfoProto{valueInfo("x")},
		Initializer: []*onnxpb.TensorProto{rawTensor("W", Float, []int64{1, 1}, le32f(1)), rawTensor("V", Float, []int64{1, 1}, le32f(1))},
		Node:        []*onnxpb.NodeProto{node("loop", "Loop", []string{"", "", "x"}, []string{"y"}, graphAttr("body", body))},
		Output:      []*onnxpb.ValueInfoProto{valueInfo("y")},
	}
	g := NewGraph(gp)
	sub := g.Subgraphs[0]
	for _, tc := range []struct {
		node   string
		shared bool
	}{{"a", true}, {"b", true}, {"c", false}} {
		n, _ := findNode(t, g, tc.node)
		w := sub.ResolveWeight(n.Input[1])
		if w == nil || w.Scope != g {
			t.Fatalf("%s: weight %+v", tc.node, w)
		}
		if got := sub.IsShared(w, n); got != tc.shared {
			t.Errorf("%s: IsShared = %v, want %v", tc.node, got, tc.shared)
		}
	}
	// A graph output that is the weight itself counts as a reader.
	gp.Output = append(gp.Output, valueInfo("V"))
	g = NewGraph(gp)
	n, _ := findNode(t, g, "c")
	if w := g.Subgraphs[0].ResolveWeight("V"); !g.Subgraphs[0].IsShared(w, n) {
		t.Error("a weight that is also a graph output is not shared")
	}
}

func TestResolveWeightCorpusTransposed(t *testing.T) {
	m := mustLoad(t, corpusPath(t, "decoder-transposed-weights-opset24.onnx"))
	g := m.Graph()
	count := 0
	for _, n := range g.Proto.Node {
		if n.GetOpType() != "MatMul" {
			continue
		}
		w := g.ResolveWeight(n.Input[1])
		if w == nil {
			continue
		}
		count++
		if len(w.Chain) != 1 || w.Chain[0].GetOpType() != "Transpose" || !w.Transposed {
			t.Errorf("%s: weight %s chain [%s] transposed %v", n.GetName(), w.Name, chainOps(w), w.Transposed)
		}
		td := w.Tensor.Dims
		if d := w.Dims(); len(td) != 2 || d[0] != td[1] || d[1] != td[0] {
			t.Errorf("%s: Dims %v of a stored %v", n.GetName(), d, td)
		}
		if !strings.HasSuffix(w.Name, ".weight") {
			t.Errorf("%s: weight %s", n.GetName(), w.Name)
		}
		if g.IsShared(w, n) {
			t.Errorf("%s: %s reported shared", n.GetName(), w.Name)
		}
		if w := g.ResolveWeight(n.Input[0]); w != nil {
			t.Errorf("%s: activation input resolved to %s", n.GetName(), w.Name)
		}
		if n.GetName() == "model/layers.0/self_attn/q_proj/MatMul_node_29" && (w.Name != "model.layers.0.self_attn.q_proj.weight" || !slices.Equal(w.Tensor.Dims, []int64{64, 64})) {
			t.Errorf("q_proj of layer 0: %s %v", w.Name, w.Tensor.Dims)
		}
	}
	if count != 15 {
		t.Errorf("%d MatMul weights through a Transpose, the corpus README says 15", count)
	}
}

func TestResolveWeightCorpusTied(t *testing.T) {
	m := mustLoad(t, corpusPath(t, "bert-toy-tied-embeddings.onnx"))
	g := m.Graph()
	const tied = "bert.embeddings.word_embeddings.weight"
	var viaTranspose, direct int
	for _, n := range g.Proto.Node {
		switch n.GetOpType() {
		case "MatMul":
			w := g.ResolveWeight(n.Input[1])
			if w == nil {
				continue
			}
			if len(w.Chain) == 0 {
				direct++
				if g.IsShared(w, n) {
					t.Errorf("%s: %s reported shared", n.GetName(), w.Name)
				}
				continue
			}
			viaTranspose++
			if w.Name != tied || !w.Transposed || w.Chain[0].GetOpType() != "Transpose" {
				t.Errorf("%s: %s chain [%s]", n.GetName(), w.Name, chainOps(w))
			}
			if !g.IsShared(w, n) {
				t.Errorf("%s: the tied embedding is not reported shared", n.GetName())
			}
		case "Gather":
			if n.Input[0] != tied {
				continue
			}
			w := g.ResolveWeight(tied)
			if w == nil || !g.IsShared(w, n) {
				t.Errorf("%s: the tied embedding is not shared from the Gather's side", n.GetName())
			}
		}
	}
	if viaTranspose != 1 || direct != 31 {
		t.Errorf("%d MatMul weights direct and %d via Transpose; the corpus README says 31 and 1", direct, viaTranspose)
	}
}

func TestResolveWeightCorpusBeamSearch(t *testing.T) {
	m := mustLoad(t, corpusPath(t, "gpt2-beamsearch-subgraph.onnx"))
	g := m.Graph()
	var beam *onnxpb.NodeProto
	for _, n := range g.Proto.Node {
		if n.GetOpType() == "BeamSearch" {
			beam = n
		}
	}
	if beam == nil || len(g.Subgraphs) == 0 {
		t.Fatal("no BeamSearch node with a subgraph")
	}
	resolved, outer := 0, 0
	for _, sg := range g.Subgraphs {
		if sg.Owner != beam {
			continue
		}
		sg.Walk(func(s *Graph) {
			for _, n := range s.Proto.Node {
				if n.GetOpType() != "MatMul" {
					continue
				}
				w := s.ResolveWeight(n.Input[1])
				if w == nil {
					continue
				}
				resolved++
				if s.IsShared(w, n) {
					t.Errorf("%s: %s reported shared", n.GetName(), w.Name)
				}
				if w.Scope == g {
					// Captured from the main graph: the BeamSearch node is
					// its consumer there.
					outer++
					if !slices.Contains(g.Consumers(w.Name), beam) {
						t.Errorf("%s: main graph does not list BeamSearch as a consumer of %s", n.GetName(), w.Name)
					}
				} else if x, _ := s.Initializer(w.Name); x != w.Tensor {
					t.Errorf("%s: %s not found in its subgraph", n.GetName(), w.Name)
				}
			}
		})
	}
	if resolved < 10 {
		t.Errorf("only %d weighted MatMuls found inside the BeamSearch subgraph", resolved)
	}
	t.Logf("%d MatMul weights in the decoder subgraph, %d captured from the main graph", resolved, outer)
	// None of the main graph's own nodes is a MatMul with a weight.
	for _, n := range g.Proto.Node {
		if n.GetOpType() == "MatMul" && len(n.Input) > 1 && g.ResolveWeight(n.Input[1]) != nil {
			t.Errorf("main graph MatMul %s has a weight", n.GetName())
		}
	}
}
