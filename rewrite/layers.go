package rewrite

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Layer is a MatMul or Gemm node that multiplies an activation by a constant
// 2-D weight: a place where a LoRA adapter can go.
type Layer struct {
	// Module is the PEFT-style module path, unique within the model.
	Module string
	// Node is the MatMul or Gemm node, and Graph the graph that holds it.
	Node  *onnxpb.NodeProto
	Graph *graph.Graph
	// Op is "MatMul" or "Gemm".
	Op string
	// Weight is the constant the node multiplies by, with the chain of
	// Identity/Transpose/Cast nodes it passes through.
	Weight *graph.Weight
	// In and Out are the layer's features: the weight is [In, Out] as the
	// node uses it (after transposes and transB).
	In, Out int64
	// DType is the type the multiplication runs in: the weight's type after
	// any Cast in its chain.
	DType graph.DataType
	// TransA and TransB are Gemm's attributes; Alpha is Gemm's alpha.
	TransA, TransB bool
	Alpha          float64
	// Shared is true when the weight also feeds other nodes.
	Shared bool
	// OutputHead is true when the layer's output is a graph output.
	OutputHead bool
	// Kernel is a Conv layer's spatial kernel shape (the weight's dims
	// after [out, in]); nil for MatMul and Gemm. A Conv layer's In and Out
	// are its input and output channels.
	Kernel []int64
	// Quant describes a quantized weight (MatMulNBits, DequantizeLinear),
	// nil for a float one; Weight is then the quantized data.
	Quant *Quant
}

// KernelSize is the number of kernel positions of a Conv layer (the
// product of Kernel), 1 for other layers.
func (l *Layer) KernelSize() int64 {
	k := int64(1)
	for _, d := range l.Kernel {
		k *= d
	}
	return k
}

// WeightName returns the name of the constant behind the layer's weight.
func (l *Layer) WeightName() string { return l.Weight.Name }

// StoredTransposed reports whether the stored weight is [Out, In]: the chain
// or Gemm's transB swaps it (never both in a way that cancels out, which
// this also accounts for).
func (l *Layer) StoredTransposed() bool { return l.Weight.Transposed != l.TransB }

// Skipped is a MatMul or Gemm node that cannot take an adapter, and why.
type Skipped struct {
	Node   string `json:"node"`
	Op     string `json:"op"`
	Module string `json:"module,omitempty"`
	Reason string `json:"reason"`
}

// FindLayers lists every adaptable MatMul, Gemm and Conv in the model, in graph
// order with subgraphs after the node that holds them, and the MatMul-like
// nodes it passed over with the reason. Nodes that belong to LoRA branches
// of the manifest are neither.
func FindLayers(m *graph.Model) ([]*Layer, []Skipped) {
	g := m.Graph()
	branch := branchNodeNames(m)
	var layers []*Layer
	var skipped []Skipped
	g.Walk(func(s *graph.Graph) {
		for _, n := range s.Proto.Node {
			if branch[n.GetName()] && n.GetName() != "" {
				continue
			}
			l, reason := layerOf(s, n)
			if l != nil && l.Shared && l.Weight != nil && len(branch) > 0 {
				// A DoRA branch reads the weight too; it is not another layer.
				l.Shared = sharedBeyond(l, branch)
			}
			if l != nil {
				layers = append(layers, l)
			} else if reason != "" {
				skipped = append(skipped, Skipped{Node: nodeDisplayName(n), Op: n.GetOpType(), Reason: reason})
			}
		}
	})
	uniqueModules(layers)
	return layers, skipped
}

// matmulLike are ONNX Runtime contrib ops (com.microsoft) that multiply by
// weights but cannot take an adapter, so inspect can say why they were
// skipped. The standard ops of the same names (Attention from opset 23)
// carry no weights.
var matmulLike = map[string]string{
	"MatMulInteger":      "quantized weight (MatMulInteger)",
	"QLinearMatMul":      "quantized weight (QLinearMatMul)",
	"MatMulNBits":        "quantized weight (MatMulNBits)",
	"QGemm":              "quantized weight (QGemm)",
	"FusedMatMul":        "fused op (FusedMatMul): unfuse it to adapt",
	"Attention":          "fused attention op: its packed QKV weight is left alone",
	"MultiHeadAttention": "fused attention op",
}

// layerOf returns the layer n is, or why it is not one ("" for nodes that
// are not matrix products at all).
func layerOf(g *graph.Graph, n *onnxpb.NodeProto) (*Layer, string) {
	op := n.GetOpType()
	if op == QuantNBits && n.GetDomain() == "com.microsoft" {
		return nbitsLayerOf(g, n)
	}
	if reason, ok := matmulLike[op]; ok && (n.GetDomain() == "com.microsoft" || op == "MatMulInteger" || op == "QLinearMatMul") {
		return nil, reason
	}
	if op == opConv && graph.IsStandardOp(n) && len(n.Input) >= 2 {
		return convLayerOf(g, n)
	}
	if (op != "MatMul" && op != "Gemm") || !graph.IsStandardOp(n) || len(n.Input) < 2 {
		return nil, ""
	}
	l := &Layer{Node: n, Graph: g, Op: op, Alpha: 1}
	if op == "Gemm" {
		l.TransA = graph.AttrInt(n, "transA", 0) != 0
		l.TransB = graph.AttrInt(n, "transB", 0) != 0
		l.Alpha = float64(graph.AttrFloat(n, "alpha", 1))
	}
	w := g.ResolveWeight(n.Input[1])
	if w == nil {
		if p := g.Producer(n.Input[1]); p != nil && p.GetOpType() == "DequantizeLinear" {
			return qdqLayer(g, l, p)
		}
		if g.IsOverridableInitializer(n.Input[1]) || g.IsGraphInput(n.Input[1]) {
			return nil, "dynamic weight: " + strconv.Quote(n.Input[1]) + " is a graph input"
		}
		if g.ResolveWeight(n.Input[0]) != nil {
			return nil, "the constant is the left operand"
		}
		return nil, "activation x activation"
	}
	if isAdapterWeight(w.Name) {
		return nil, "part of a LoRA adapter"
	}
	l.Weight = w
	dims := w.Dims()
	if len(dims) != 2 {
		return nil, fmt.Sprintf("weight %q is %d-D, not 2-D", w.Name, len(dims))
	}
	l.DType = w.DataType()
	if w.CastTo != graph.Undefined {
		l.DType = w.CastTo
	}
	if !l.DType.IsFloat() || !w.DataType().IsFloat() {
		return nil, fmt.Sprintf("weight %q is %v, not floating point (quantized?)", w.Name, w.DataType())
	}
	l.In, l.Out = dims[0], dims[1]
	if l.TransB {
		l.In, l.Out = l.Out, l.In
	}
	l.place(g, w)
	return l, ""
}

// place fills in what every layer kind records about its node n in g and
// its weight w: whether w is shared, whether n's output is a graph output
// (an output head), and the module path.
func (l *Layer) place(g *graph.Graph, w *graph.Weight) {
	n := l.Node
	l.Shared = g.IsShared(w, n)
	for _, out := range n.Output {
		if g.IsGraphOutput(out) {
			l.OutputHead = true
		}
	}
	l.Module = ModulePath(n.GetName(), w.Name)
}

// isAdapterWeight reports whether a constant is named like a LoRA factor,
// so an adapter branch is never itself taken for a layer.
func isAdapterWeight(name string) bool {
	return strings.HasSuffix(name, ".lora_A.weight") || strings.HasSuffix(name, ".lora_B.weight")
}

// uniqueModules gives layers that derive the same module path (unnamed nodes
// sharing a weight, say) distinct paths, "_1", "_2"... after the first, so
// adapter names never collide.
func uniqueModules(layers []*Layer) {
	seen := map[string]int{}
	for _, l := range layers {
		seen[l.Module]++
	}
	count := map[string]int{}
	for _, l := range layers {
		if seen[l.Module] < 2 {
			continue
		}
		base := l.Module
		k := count[base]
		count[base]++
		if k > 0 {
			for {
				cand := base + "_" + strconv.Itoa(k)
				if seen[cand] == 0 {
					l.Module = cand
					seen[cand] = 1
					break
				}
				k++
			}
		}
	}
}

func nodeDisplayName(n *onnxpb.NodeProto) string {
	if n.GetName() != "" {
		return n.GetName()
	}
	if len(n.Output) > 0 {
		return n.GetOpType() + " -> " + n.Output[0]
	}
	return n.GetOpType()
}

// Candidates turns layers into the matcher's candidates.
func Candidates(layers []*Layer) []Candidate {
	c := make([]Candidate, len(layers))
	for i, l := range layers {
		c[i] = Candidate{Module: l.Module, OutputHead: l.OutputHead, NotLinear: l.Op == opConv}
	}
	return c
}
