package rewrite

import (
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// branch is one LoRA branch found in a graph, in the shape Inject writes
// (loraBranch):
//
//	Output = Add(base(x), Mul(MatMul(MatMul(pre(x), A), B), S))
//
// where base is the adapted MatMul or Gemm, pre is nothing, a Dropout, a
// Transpose (for Gemm transA=1) or a Transpose then a Dropout, and A, B and
// S are constants. Recognition is purely structural, so merge and export
// still work on a model whose metadata (the manifest) was stripped.
type branch struct {
	*branchMatch
	// Add is the root; Dropout is nil when the branch has none.
	Add, Dropout *onnxpb.NodeProto
	// A ([in, r]), B ([r, out]) and S (a scalar) are the constants' names.
	A, B, S    string
	TA, TB, TS *onnxpb.TensorProto
	Rank       int
	// Ratio is the Dropout's ratio input (opset >= 12), "" when absent.
	Ratio string
}

// nodes returns the branch's nodes, Add first: the order they are removed in.
func (b *branch) nodes() []*onnxpb.NodeProto {
	ns := slices.Clone(b.Nodes)
	slices.Reverse(ns)
	return ns
}

// findBranches returns every LoRA branch in the model's graphs (subgraphs
// included), in graph order.
func findBranches(top *graph.Graph) []*branch {
	var found []*branch
	top.Walk(func(g *graph.Graph) {
		for _, n := range g.Proto.Node {
			if !graph.IsStandardOp(n) || !slices.ContainsFunc(branchKinds, func(k *branchKind) bool { return k.root().Op == n.GetOpType() }) {
				continue
			}
			if b, _ := recognizeAt(g, n); b != nil {
				found = append(found, b)
			}
		}
	})
	// A branch inside another (the LoRA sum inside a DoRA branch) is
	// part of that one, not an adapter of its own.
	inner := map[*onnxpb.NodeProto]bool{}
	for _, b := range found {
		for _, n := range b.Nodes[:len(b.Nodes)-1] {
			inner[n] = true
		}
	}
	outer := found[:0]
	for _, b := range found {
		if !inner[b.Nodes[len(b.Nodes)-1]] {
			outer = append(outer, b)
		}
	}
	return outer
}

// recognizeAt checks whether add is the Add node of a LoRA branch and
// returns the branch, or the reason it is not one (for error messages when
// a manifest says it should be).
func recognizeAt(g *graph.Graph, add *onnxpb.NodeProto) (*branch, string) {
	return recognizeAtDepth(g, add, 0)
}

// recognizeAtDepth is recognizeAt for a branch that depth others are
// stacked on.
func recognizeAtDepth(g *graph.Graph, add *onnxpb.NodeProto, depth int) (*branch, string) {
	var whys []string
	for _, k := range branchKinds {
		bm, why := k.matchStacked(g, add, depth)
		if bm == nil {
			whys = append(whys, why)
			continue
		}
		b := &branch{
			branchMatch: bm, Add: bm.node("Add"), Dropout: bm.node("Dropout"),
			A: bm.Params["A"], B: bm.Params["B"], S: bm.Params["S"], Ratio: bm.Params["ratio"],
			TA: bm.Tensors["A"], TB: bm.Tensors["B"], TS: bm.Tensors["S"], Rank: int(bm.Dims["r"]),
		}
		if k == adapterInputBranch {
			if why := b.adapterDefaults(); why != "" {
				whys = append(whys, why)
				continue
			}
		}
		return b, ""
	}
	// The plain LoRA kind's reason comes first and is what a damaged
	// branch usually shows; the others would only repeat it in their terms.
	return nil, whys[0] + " (nor does it fit any other branch kind)"
}

// branchKinds are the kinds recognition knows, tried in order.
var branchKinds = []*branchKind{loraBranch, adapterInputBranch, convBranch, castBranchF16, castBranchBF16, doraBranch, doraBranchTransB, doraBiasBranch, doraBiasBranchTransB, nbitsBranch}

func init() { branchKinds = append(branchKinds, doraConvKinds...) }

// isInputs reports whether the branch's A and B are graph inputs
// (adapterInputBranch): fed per run, the scaling inside B.
func (b *branch) isInputs() bool { return b.Kind == adapterInputBranch }

// adapterDefaults checks an adapter-input branch's factors against the
// layer, declared types and initializer defaults alike, and takes the
// defaults (rank 0 unless someone trained them) as TA and TB. It returns
// why they do not fit, or "".
func (b *branch) adapterDefaults() string {
	l := b.Layer
	r := int64(-1)
	for _, f := range []struct {
		name   string
		fixed  int // the axis that is the layer's in or out
		size   int64
		t      **onnxpb.TensorProto
		rankAx int
	}{{b.A, 0, l.In, &b.TA, 1}, {b.B, 1, l.Out, &b.TB, 0}} {
		if tt := inputType(b.Graph, f.name); tt != nil {
			if dt := graph.DataType(tt.GetElemType()); dt != l.DType {
				return fmt.Sprintf("input %q is %v, the layer computes in %v", f.name, dt, l.DType)
			}
			if sh := tt.GetShape(); sh != nil {
				d := sh.GetDim()
				if len(d) != 2 || (d[f.fixed].GetDimParam() == "" && d[f.fixed].Value != nil && d[f.fixed].GetDimValue() != f.size) {
					return fmt.Sprintf("input %q is declared with a shape that does not fit a [%d, %d] layer", f.name, l.In, l.Out)
				}
			}
		}
		t, _ := b.Graph.Initializer(f.name)
		if t == nil {
			continue
		}
		if len(t.Dims) != 2 || t.Dims[f.fixed] != f.size || !graph.DataType(t.GetDataType()).IsFloat() || (r >= 0 && t.Dims[f.rankAx] != r) {
			return fmt.Sprintf("the default of input %q is %v, which does not fit a [%d, %d] layer", f.name, t.Dims, l.In, l.Out)
		}
		r = t.Dims[f.rankAx]
		*f.t = t
	}
	if (b.TA == nil) != (b.TB == nil) {
		return fmt.Sprintf("only one of inputs %q and %q has a default", b.A, b.B)
	}
	b.Rank = max(int(r), 0)
	return ""
}

// inputType returns the declared tensor type of graph input name, looking
// in enclosing graphs too, or nil.
func inputType(g *graph.Graph, name string) *onnxpb.TypeProto_Tensor {
	for s := g; s != nil; s = s.Parent {
		if s.IsGraphInput(name) {
			for _, vi := range s.Proto.Input {
				if vi.GetName() == name {
					return vi.GetType().GetTensorType()
				}
			}
		}
	}
	return nil
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
		// A module may have several adapters (inject --stack), each its own branch.
		if key := a.Module + "\x00" + a.Output; seen[key] {
			return nil, nil, "", fmt.Errorf("manifest lists module %s twice", a.Module)
		} else {
			seen[key] = true
		}
		b, err := locateManifestBranch(top, a)
		if err != nil {
			return nil, nil, "", fmt.Errorf("adapter %s: %w", a.Module, err)
		}
		f := &foundAdapter{branch: b, Module: a.Module, Alpha: a.Alpha, RSLoRA: a.RSLoRA, Dropout: a.Dropout, Manifest: i}
		if b.isInputs() != (a.Mode == ModeAdapterInputs) {
			return nil, nil, "", fmt.Errorf("adapter %s: the manifest says mode %q but the branch at %s is of kind %s", a.Module, a.Mode, nodeDisplayName(b.Add), b.Kind.Name)
		}
		if b.isInputs() {
			// The rank is the defaults' (0 unless trained), the scaling in B.
			f.Scaling, f.Alpha, f.RSLoRA = 1, float64(b.Rank), false
			out = append(out, f)
			continue
		}
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
		s := 1.0 // adapter inputs: the scaling is in B
		if !b.isInputs() {
			var err error
			if s, err = scalarValue(m, b.TS); err != nil {
				return nil, fmt.Errorf("branch at %s: %w", nodeDisplayName(b.Add), err)
			}
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
