package rewrite

import (
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// branch is one LoRA branch found in a graph, in the shape Inject writes:
//
//	Output = Add(base(x), Mul(MatMul(MatMul(pre(x), A), B), S))
//
// where base is the adapted MatMul or Gemm, pre is nothing, a Dropout, a
// Transpose (for Gemm transA=1) or a Transpose then a Dropout, and A, B and
// S are constants. Recognition is purely structural, so merge and export
// still work on a model whose metadata (the manifest) was stripped.
type branch struct {
	Graph *graph.Graph
	Base  *onnxpb.NodeProto // the adapted MatMul or Gemm
	Layer *Layer            // Base as a layer (weight, orientation, alpha)
	// Branch nodes, from the input side; Dropout and Transpose may be nil.
	Transpose, Dropout, MatMulA, MatMulB, Mul, Add *onnxpb.NodeProto
	// A ([in, r]), B ([r, out]) and S (a scalar) are the constants' names.
	A, B, S    string
	TA, TB, TS *onnxpb.TensorProto
	Rank       int
	// Ratio is the Dropout's ratio input (opset >= 12), "" when absent.
	Ratio string
	// Output is the Add's output, the layer's original output name;
	// BaseOutput is what the base node writes now.
	Output, BaseOutput string
}

// nodes returns the branch's nodes, Add first: the order they are removed in.
func (b *branch) nodes() []*onnxpb.NodeProto {
	ns := []*onnxpb.NodeProto{b.Add, b.Mul, b.MatMulB, b.MatMulA}
	if b.Dropout != nil {
		ns = append(ns, b.Dropout)
	}
	if b.Transpose != nil {
		ns = append(ns, b.Transpose)
	}
	return ns
}

// findBranches returns every LoRA branch in the model's graphs (subgraphs
// included), in graph order.
func findBranches(top *graph.Graph) []*branch {
	var found []*branch
	top.Walk(func(g *graph.Graph) {
		for _, n := range g.Proto.Node {
			if n.GetOpType() != "Add" || !graph.IsStandardOp(n) {
				continue
			}
			if b, _ := recognizeAt(g, n); b != nil {
				found = append(found, b)
			}
		}
	})
	return found
}

// recognizeAt checks whether add is the Add node of a LoRA branch and
// returns the branch, or the reason it is not one (for error messages when
// a manifest says it should be).
func recognizeAt(g *graph.Graph, add *onnxpb.NodeProto) (*branch, string) {
	if add.GetOpType() != "Add" || !graph.IsStandardOp(add) || len(add.Input) != 2 || len(add.Output) != 1 {
		return nil, "not a two-input Add"
	}
	reason := "neither Add input is a Mul of the adapter path"
	for i := 0; i < 2; i++ {
		b, why := recognizeOrder(g, add, add.Input[i], add.Input[1-i])
		if b != nil {
			return b, ""
		}
		if why != "" {
			reason = why
		}
	}
	return nil, reason
}

// recognizeOrder tries add = baseOut + deltaOut.
func recognizeOrder(g *graph.Graph, add *onnxpb.NodeProto, deltaOut, baseOut string) (*branch, string) {
	mul := g.Producer(deltaOut)
	if mul == nil || mul.GetOpType() != "Mul" || !graph.IsStandardOp(mul) || len(mul.Input) != 2 {
		return nil, ""
	}
	base := g.Producer(baseOut)
	if base == nil || !graph.IsStandardOp(base) || (base.GetOpType() != "MatMul" && base.GetOpType() != "Gemm") || len(base.Output) == 0 || base.Output[0] != baseOut {
		return nil, ""
	}
	b := &branch{Graph: g, Base: base, Add: add, Mul: mul, Output: add.Output[0], BaseOutput: baseOut}
	// Mul(MatMul_B output, S) in either order.
	for j := 0; j < 2; j++ {
		if p := g.Producer(mul.Input[j]); p != nil && p.GetOpType() == "MatMul" && graph.IsStandardOp(p) {
			if t := scalarConstant(g, mul.Input[1-j]); t != nil {
				b.MatMulB, b.S, b.TS = p, mul.Input[1-j], t
				break
			}
		}
	}
	if b.MatMulB == nil {
		return nil, "the Mul does not multiply a MatMul by a constant scalar"
	}
	mb := b.MatMulB
	if len(mb.Input) != 2 {
		return nil, "MatMul_B does not have two inputs"
	}
	b.MatMulA = g.Producer(mb.Input[0])
	if b.MatMulA == nil || b.MatMulA.GetOpType() != "MatMul" || !graph.IsStandardOp(b.MatMulA) || len(b.MatMulA.Input) != 2 {
		return nil, "MatMul_B's input is not a MatMul (the A side)"
	}
	b.B, b.TB = mb.Input[1], constant2D(g, mb.Input[1])
	b.A, b.TA = b.MatMulA.Input[1], constant2D(g, b.MatMulA.Input[1])
	if b.TA == nil || b.TB == nil {
		return nil, "lora_A or lora_B is not a constant 2-D float tensor"
	}
	// The input side: x, Dropout(x), Transpose(x) or Dropout(Transpose(x)).
	x := base.Input[0]
	in := b.MatMulA.Input[0]
	if in != x {
		p := g.Producer(in)
		if p != nil && p.GetOpType() == "Dropout" && graph.IsStandardOp(p) && len(p.Input) >= 1 {
			b.Dropout = p
			if len(p.Input) >= 2 {
				b.Ratio = p.Input[1]
			}
			in = p.Input[0]
		}
	}
	if in != x {
		p := g.Producer(in)
		if p != nil && p.GetOpType() == "Transpose" && graph.IsStandardOp(p) && len(p.Input) == 1 && isSwap(p) {
			b.Transpose = p
			in = p.Input[0]
		}
	}
	if in != x {
		return nil, "the adapter path does not read the base layer's input"
	}
	transA := base.GetOpType() == "Gemm" && graph.AttrInt(base, "transA", 0) != 0
	if transA != (b.Transpose != nil) {
		return nil, "the adapter path's Transpose does not match the Gemm's transA"
	}
	l, why := layerOf(g, base)
	if l == nil {
		return nil, "the base node is not an adaptable layer: " + why
	}
	b.Layer = l
	if l.Weight.Name == b.A || l.Weight.Name == b.B {
		return nil, "the base weight is one of the adapter's factors"
	}
	da, db := b.TA.Dims, b.TB.Dims
	if da[0] != l.In || db[1] != l.Out || da[1] != db[0] || da[1] <= 0 {
		return nil, fmt.Sprintf("lora_A %v and lora_B %v do not fit a [%d, %d] layer", da, db, l.In, l.Out)
	}
	b.Rank = int(da[1])
	// Every intermediate value must feed only the next branch node, or
	// removing the branch would break another reader.
	private := []struct {
		value string
		next  *onnxpb.NodeProto
	}{{baseOut, add}, {deltaOut, add}, {mb.Output[0], mul}, {b.MatMulA.Output[0], mb}}
	if b.Dropout != nil {
		private = append(private, struct {
			value string
			next  *onnxpb.NodeProto
		}{b.Dropout.Output[0], b.MatMulA})
		for _, extra := range b.Dropout.Output[1:] {
			if extra != "" && (len(g.Consumers(extra)) > 0 || g.IsGraphOutput(extra)) {
				return nil, "the Dropout's mask output is used"
			}
		}
	}
	if b.Transpose != nil {
		next := b.MatMulA
		if b.Dropout != nil {
			next = b.Dropout
		}
		private = append(private, struct {
			value string
			next  *onnxpb.NodeProto
		}{b.Transpose.Output[0], next})
	}
	for _, p := range private {
		cs := g.Consumers(p.value)
		if g.IsGraphOutput(p.value) || len(cs) != 1 || cs[0] != p.next {
			return nil, fmt.Sprintf("value %q has readers outside the adapter branch", p.value)
		}
	}
	for _, n := range []*onnxpb.NodeProto{add, mul, mb, b.MatMulA} {
		if len(n.Output) != 1 {
			return nil, fmt.Sprintf("node %s has %d outputs", nodeDisplayName(n), len(n.Output))
		}
	}
	return b, ""
}

// isSwap reports whether a Transpose swaps the two axes of a matrix.
func isSwap(n *onnxpb.NodeProto) bool {
	perm := graph.AttrInts(n, "perm")
	return len(perm) == 2 && perm[0] == 1 && perm[1] == 0
}

// scalarConstant returns the constant float tensor behind name when it
// holds exactly one element.
func scalarConstant(g *graph.Graph, name string) *onnxpb.TensorProto {
	t, _, _ := g.ConstantTensor(name)
	if t == nil || !graph.DataType(t.GetDataType()).IsFloat() {
		return nil
	}
	if n, err := graph.NumElements(t.Dims); err != nil || n != 1 {
		return nil
	}
	return t
}

// constant2D returns the constant float matrix behind name, or nil.
func constant2D(g *graph.Graph, name string) *onnxpb.TensorProto {
	t, _, _ := g.ConstantTensor(name)
	if t == nil || !graph.DataType(t.GetDataType()).IsFloat() || len(t.Dims) != 2 {
		return nil
	}
	return t
}

// foundAdapter is a branch together with what it means: the manifest entry
// when there is one, or what recognition could infer.
type foundAdapter struct {
	*branch
	Module  string
	Alpha   float64
	Scaling float64 // exact scaling: the manifest's when the tensor agrees
	RSLoRA  bool
	Dropout float64
	// Manifest is the entry's index in the manifest, -1 when recognized.
	Manifest int
}

// adapterSource says where the adapters of a model were found.
const (
	sourceManifest   = "manifest"
	sourceRecognized = "recognized"
)

// findAdapters locates the model's adapters: the manifest's entries, each
// checked against the graph, or, when the manifest is absent, every branch
// that recognition finds. top must index m's main graph.
func findAdapters(m *graph.Model, top *graph.Graph) ([]*foundAdapter, *Manifest, string, error) {
	man, err := ReadManifest(m)
	if err != nil {
		return nil, nil, "", err
	}
	if man == nil {
		found, err := recognizedAdapters(m, top)
		return found, nil, sourceRecognized, err
	}
	var out []*foundAdapter
	seen := map[string]bool{}
	for i, a := range man.Adapters {
		if seen[a.Module] {
			return nil, nil, "", fmt.Errorf("manifest lists module %s twice", a.Module)
		}
		seen[a.Module] = true
		b, err := locateManifestBranch(top, a)
		if err != nil {
			return nil, nil, "", fmt.Errorf("adapter %s: %w", a.Module, err)
		}
		f := &foundAdapter{branch: b, Module: a.Module, Alpha: a.Alpha, RSLoRA: a.RSLoRA, Dropout: a.Dropout, Manifest: i}
		s, err := scalarValue(m, b.TS)
		if err != nil {
			return nil, nil, "", fmt.Errorf("adapter %s: %w", a.Module, err)
		}
		// The scaling tensor holds the manifest's value rounded to the
		// layer's type; use the exact value then (as PEFT does, whose
		// scaling is a Python float), and the tensor's when someone edited it.
		if a.Rank != b.Rank {
			return nil, nil, "", fmt.Errorf("adapter %s: the manifest says rank %d but lora_A %s is %v", a.Module, a.Rank, b.A, b.TA.Dims)
		}
		f.Scaling = s
		if roundsTo(a.Scaling, graph.DataType(b.TS.GetDataType()), s) {
			f.Scaling = a.Scaling
		} else {
			f.Alpha = alphaFor(s, b.Rank, a.RSLoRA)
		}
		out = append(out, f)
	}
	return out, man, sourceManifest, nil
}

// locateManifestBranch finds the branch of a manifest entry: the Add among
// its nodes, in the graph it names, recognized and checked against the
// names the manifest records.
func locateManifestBranch(top *graph.Graph, a Adapter) (*branch, error) {
	var g *graph.Graph
	top.Walk(func(s *graph.Graph) {
		if g == nil && graphName(s) == a.Graph {
			g = s
		}
	})
	if g == nil {
		return nil, fmt.Errorf("graph %q not found", a.Graph)
	}
	add := g.Producer(a.Output)
	if add == nil || !slices.Contains(a.Nodes, add.GetName()) {
		return nil, fmt.Errorf("its Add node (writing %q) is gone; the branch was edited after inject", a.Output)
	}
	b, why := recognizeAt(g, add)
	if b == nil {
		return nil, fmt.Errorf("the branch at %s is no longer a LoRA branch: %s", nodeDisplayName(add), why)
	}
	var diffs []string
	check := func(what, got, want string) {
		if got != want {
			diffs = append(diffs, fmt.Sprintf("%s is %q, the manifest says %q", what, got, want))
		}
	}
	check("node", b.Base.GetName(), a.Node)
	check("lora_A", b.A, a.LoraA)
	check("lora_B", b.B, a.LoraB)
	check("scaling tensor", b.S, a.ScalingTensor)
	check("base output", b.BaseOutput, a.BaseOutput)
	if len(diffs) > 0 {
		return nil, fmt.Errorf("the graph does not match the manifest: %s", strings.Join(diffs, "; "))
	}
	return b, nil
}

// recognizedAdapters turns every recognized branch into an adapter, naming
// modules like FindLayers does (or after the lora_A tensor, which Inject
// names <module>.lora_A.weight).
func recognizedAdapters(m *graph.Model, top *graph.Graph) ([]*foundAdapter, error) {
	layers, _ := FindLayers(m)
	moduleOf := map[*onnxpb.NodeProto]string{}
	for _, l := range layers {
		moduleOf[l.Node] = l.Module
	}
	var out []*foundAdapter
	seen := map[string]bool{}
	for _, b := range findBranches(top) {
		mod := strings.TrimSuffix(b.A, ".lora_A.weight")
		if mod == b.A || mod == "" {
			mod = moduleOf[b.Base]
		}
		if mod == "" {
			mod = ModulePath(b.Base.GetName(), b.Layer.Weight.Name)
		}
		for base, k := mod, 1; seen[mod]; k++ {
			mod = fmt.Sprintf("%s_%d", base, k)
		}
		seen[mod] = true
		s, err := scalarValue(m, b.TS)
		if err != nil {
			return nil, fmt.Errorf("branch at %s: %w", nodeDisplayName(b.Add), err)
		}
		f := &foundAdapter{branch: b, Module: mod, Scaling: s, Alpha: alphaFor(s, b.Rank, false), Manifest: -1}
		if b.Dropout != nil {
			f.Dropout = dropoutRatio(m, b)
		}
		out = append(out, f)
	}
	return out, nil
}

// alphaFor inverts scaling = alpha/r (or alpha/sqrt(r) with rsLoRA).
func alphaFor(scaling float64, rank int, rslora bool) float64 {
	if rslora {
		return scaling * math.Sqrt(float64(rank))
	}
	return scaling * float64(rank)
}

// roundsTo reports whether exact, rounded to dt, is stored.
func roundsTo(exact float64, dt graph.DataType, stored float64) bool {
	raw, err := graph.EncodeFloats(dt, []float64{exact})
	if err != nil {
		return false
	}
	return graph.DecodeFloats(dt, raw)[0] == stored
}

func scalarValue(m *graph.Model, t *onnxpb.TensorProto) (float64, error) {
	v, err := m.Float64s(t)
	if err != nil {
		return 0, err
	}
	if len(v) != 1 {
		return 0, fmt.Errorf("scaling tensor %q holds %d values", t.GetName(), len(v))
	}
	return v[0], nil
}

// dropoutRatio reads a branch's dropout probability (input or attribute).
func dropoutRatio(m *graph.Model, b *branch) float64 {
	if b.Ratio != "" {
		if t := scalarConstant(b.Graph, b.Ratio); t != nil {
			if v, err := scalarValue(m, t); err == nil {
				return v
			}
		}
		return 0
	}
	return float64(graph.AttrFloat(b.Dropout, "ratio", 0.5))
}
