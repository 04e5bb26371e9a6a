package rewrite

import (
	"fmt"
	"regexp"
	"slices"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// opGather is the Op of an embedding lookup taken for a layer.
const opGather = "Gather"

// gatherSegmentRE matches the op segment torch.onnx gives an embedding's
// node ("/model/embed_tokens/Gather", "Gather_10").
var gatherSegmentRE = regexp.MustCompile(`^Gather(_[A-Za-z0-9_]*)?$`)

// maxReplaceRank bounds the identity factor a modules_to_save replacement
// is expressed with (min(in, out) squared float64 values).
const maxReplaceRank = 4096

// weightInput is the node input that reads the layer's weight.
func (l *Layer) weightInput() int {
	if l.Op == opGather {
		return 0
	}
	return 1
}

// findEmbeddings lists the Gather nodes that look rows up in a constant
// 2-D float table along axis 0: nn.Embedding in an export. Each is a Layer
// with Op "Gather", In the vocabulary size and Out the embedding width.
func findEmbeddings(m *graph.Model) []*Layer {
	var out []*Layer
	m.Graph().Walk(func(g *graph.Graph) {
		for _, n := range g.Proto.Node {
			if n.GetOpType() != opGather || !graph.IsStandardOp(n) || len(n.Input) < 2 || graph.AttrInt(n, "axis", 0) != 0 {
				continue
			}
			w := g.ResolveWeight(n.Input[0])
			if w == nil || g.ResolveWeight(n.Input[1]) != nil {
				continue
			}
			dims := w.Dims()
			dt := w.DataType()
			if w.CastTo != graph.Undefined {
				dt = w.CastTo
			}
			if len(dims) != 2 || !dt.IsFloat() || !w.DataType().IsFloat() {
				continue
			}
			out = append(out, &Layer{
				Module: embeddingPath(n.GetName(), w.Name), Node: n, Graph: g, Op: opGather,
				Weight: w, In: dims[0], Out: dims[1], DType: dt, Alpha: 1, Shared: g.IsShared(w, n),
			})
		}
	})
	return out
}

// embeddingPath is ModulePath for a Gather: the scoped node name without
// its op segment, else the weight's parameter name without ".weight".
func embeddingPath(node, weight string) string {
	segs := splitScoped(node)
	if len(segs) >= 2 && gatherSegmentRE.MatchString(segs[len(segs)-1]) {
		return joinSegments(segs[:len(segs)-1])
	}
	if p, ok := pathFromWeightName(weight); ok {
		return p
	}
	if node != "" {
		return node
	}
	return weight
}

// savedWeightLayout checks a modules_to_save weight against its layer and
// says whether it is stored [out, in] (torch Linear) rather than [in, out]
// (GPT-2's Conv1D, with fan_in_fan_out, and embedding tables [vocab, dim]).
func savedWeightLayout(sv *export.PEFTSaved, l *Layer, cfg *export.PEFTConfig) (outIn bool, err error) {
	if len(sv.Shape) == 2 {
		r, c := int64(sv.Shape[0]), int64(sv.Shape[1])
		switch {
		case l.Op == opGather && r == l.In && c == l.Out:
			return false, nil
		case l.Op != opGather && cfg.FanInFanOut && r == l.In && c == l.Out:
			return false, nil
		case l.Op != opGather && r == l.Out && c == l.In:
			return true, nil
		}
	}
	want := fmt.Sprintf("[%d, %d] ([out, in] as torch's Linear stores it)", l.Out, l.In)
	if l.Op == opGather {
		want = fmt.Sprintf("[%d, %d] (the embedding table)", l.In, l.Out)
	}
	return false, fmt.Errorf("modules_to_save weight %s %v does not fit layer %s: want %s", sv.Key, sv.Shape, l.Module, want)
}

// addSaved plans the replacement of a layer's weight (and bias) by a
// modules_to_save copy. A replacement is the update W += I·(W' - W): the
// difference is exact in float64 for float16/bfloat16/float32 values, so
// the one rounding to the weight's type gives W' as PEFT stores it.
func (p *plan) addSaved(as *PEFTAssignment, cfg *export.PEFTConfig) error {
	l := as.layer
	for _, sv := range as.saved {
		if sv.Param != "weight" {
			continue
		}
		outIn, err := savedWeightLayout(sv, l, cfg)
		if err != nil {
			return err
		}
		in, out := int(l.In), int(l.Out)
		r := min(in, out)
		if r > maxReplaceRank {
			return fmt.Errorf("modules_to_save weight %s is %dx%d; replacing weights with both sides over %d is not supported", sv.Key, in, out, maxReplaceRank)
		}
		old, err := p.m.Float64s(l.Weight.Tensor)
		if err != nil {
			return err
		}
		storedT := l.Weight.Transposed // the chain's orientation; Gemm's transB is in l.In/l.Out
		// diff[i][j], in the node's x·W orientation, in the units the node
		// computes with: alpha·W for a Gemm.
		diff := make([]float64, in*out)
		for i := 0; i < in; i++ {
			for j := 0; j < out; j++ {
				var nv float64
				if outIn {
					nv = float64(sv.Values[j*in+i])
				} else {
					nv = float64(sv.Values[i*out+j])
				}
				var ov float64
				// The stored tensor is [in, out] unless the chain or transB
				// swaps it.
				if storedT != l.TransB {
					ov = old[j*in+i]
				} else {
					ov = old[i*out+j]
				}
				diff[i*out+j] = nv - l.Alpha*ov
			}
		}
		var a, b []float64
		if in <= out {
			a, b = identity(in), diff
		} else {
			a, b = diff, identity(out)
		}
		rep := &MergedLayer{Module: l.Module, PEFTModule: sv.Key, Scaling: 1}
		if err := p.addUpdate(l, a, b, r, 1, rep); err != nil {
			return err
		}
	}
	for _, sv := range as.saved {
		if sv.Param == "bias" {
			if err := p.addSavedBias(sv, l); err != nil {
				return err
			}
		}
	}
	return nil
}

func identity(n int) []float64 {
	id := make([]float64, n*n)
	for i := 0; i < n; i++ {
		id[i*n+i] = 1
	}
	return id
}

// addSavedBias plans the replacement of a layer's bias: Gemm's C, or the
// constant added to a MatMul's output.
func (p *plan) addSavedBias(sv *export.PEFTSaved, l *Layer) error {
	bias, beta, reader := layerBias(l)
	if bias == nil {
		return fmt.Errorf("modules_to_save bias %s: layer %s has no constant bias to replace", sv.Key, l.Module)
	}
	if n, err := graph.NumElements(bias.Tensor.Dims); err != nil || int64(len(sv.Values)) != l.Out || n != l.Out {
		return fmt.Errorf("modules_to_save bias %s %v does not fit bias %s %v", sv.Key, sv.Shape, bias.Name, bias.Tensor.Dims)
	}
	if beta == 0 {
		return fmt.Errorf("layer %s: the Gemm's beta is 0, so its bias cannot be set", l.Module)
	}
	next := reader
	if len(bias.Chain) > 0 {
		next = bias.Chain[0]
	}
	if p.hasOtherReaders(bias.Scope, bias.Name, next) {
		return fmt.Errorf("modules_to_save bias %s: bias %s is shared with other nodes", sv.Key, bias.Name)
	}
	old, err := p.m.Float64s(bias.Tensor)
	if err != nil {
		return err
	}
	diff := make([]float64, len(old))
	for j := range old {
		diff[j] = float64(sv.Values[j]) - beta*old[j]
	}
	for _, q := range p.updates {
		if q.dst == bias.Tensor {
			return fmt.Errorf("bias %q would be replaced twice", bias.Name)
		}
	}
	rep := &MergedLayer{Module: l.Module, PEFTModule: sv.Key, Node: reader.GetName(), Weight: bias.Name, Scaling: 1,
		Shape: append([]int64(nil), bias.Tensor.Dims...), DType: graph.DataType(bias.Tensor.GetDataType()).String(),
		Factor: p.opts.Scale / beta, Elements: l.Out}
	p.updates = append(p.updates, &update{rep: rep, src: bias.Tensor, dst: bias.Tensor, rows: 1, cols: len(old), r: 1, u: []float64{1}, v: diff, coef: p.opts.Scale / beta})
	return nil
}

// layerBias finds the bias of a MatMul or Gemm layer: Gemm's third input
// (scaled by beta), or the other operand of the only Add that reads a
// MatMul's output. It returns the constant, beta and the node reading it.
func layerBias(l *Layer) (*graph.Weight, float64, *onnxpb.NodeProto) {
	g := l.Graph
	if l.Op == "Gemm" {
		if len(l.Node.Input) < 3 || l.Node.Input[2] == "" {
			return nil, 0, nil
		}
		w := g.ResolveWeight(l.Node.Input[2])
		return w, float64(graph.AttrFloat(l.Node, "beta", 1)), l.Node
	}
	if l.Op != "MatMul" || len(l.Node.Output) == 0 {
		return nil, 0, nil
	}
	cons := g.Consumers(l.Node.Output[0])
	if len(cons) != 1 || cons[0].GetOpType() != "Add" || len(cons[0].Input) != 2 {
		return nil, 0, nil
	}
	add := cons[0]
	k := slices.Index(add.Input, l.Node.Output[0])
	other := 1 - k
	w := g.ResolveWeight(add.Input[other])
	if w == nil {
		return nil, 0, nil
	}
	return w, 1, add
}
