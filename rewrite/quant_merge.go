package rewrite

import (
	"fmt"
	"math"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// quantEdit is a quantized layer's planned merge: its new weight W + ΔW.
type quantEdit struct {
	l    *Layer
	w    []float64 // [in, out]
	mode string
	rep  *MergedLayer
}

// addQuantAdapter plans the merge of an adapter beside a quantized layer,
// as MergeOptions.Quantized says.
func (p *plan) addQuantAdapter(f *foundAdapter) error {
	return p.addFactors(f, p.addQuantUpdate)
}

// addQuantUpdate plans W' = deq(W) + scaling·Scale·A·B for a quantized
// layer (A [in, r], B [r, out]).
func (p *plan) addQuantUpdate(l *Layer, a, b []float64, r int, scaling float64, rep *MergedLayer) error {
	q := l.Quant
	switch p.opts.Quantized {
	case QuantRefuse:
		return fmt.Errorf("layer %s has a quantized weight (%s): merge --dequantize writes float weights, --requantize quantizes W + ΔW again with the layer's own scheme and reports the error that adds", l.Module, q)
	case QuantDequantize, QuantRequantize:
	default:
		return fmt.Errorf("unknown quantized merge mode %q", p.opts.Quantized)
	}
	if l.Shared {
		return fmt.Errorf("layer %s's quantized weight (%s) is shared with other nodes; merging it would change them too", l.Module, q)
	}
	if int64(len(a)) != l.In*int64(r) || int64(len(b)) != int64(r)*l.Out {
		return fmt.Errorf("factors of %d and %d values do not fit a [%d, %d] layer at rank %d", len(a), len(b), l.In, l.Out, r)
	}
	w, err := dequantized(p.m, l)
	if err != nil {
		return err
	}
	in, out := int(l.In), int(l.Out)
	coef := scaling * p.opts.Scale
	w0 := slices.Clone(w)
	for i := 0; i < in; i++ {
		for k := 0; k < r; k++ {
			c := coef * a[i*r+k]
			for j := 0; j < out; j++ {
				d := c * b[k*out+j]
				w[i*out+j] += d
			}
		}
	}
	var maxAbs float64
	for i, v := range w {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return fmt.Errorf("layer %s: W + ΔW is not finite", l.Module)
		}
		maxAbs = math.Max(maxAbs, math.Abs(v-w0[i]))
	}
	rep.Node, rep.Weight, rep.Quantized = l.Node.GetName(), q.Data, p.opts.Quantized
	rep.Shape, rep.DType, rep.Factor = []int64{l.In, l.Out}, l.DType.String(), coef
	rep.Elements = l.In * l.Out
	rep.MaxDelta = maxAbs
	p.quant = append(p.quant, &quantEdit{l: l, w: w, mode: p.opts.Quantized, rep: rep})
	return nil
}

// commitQuant writes the planned quantized merges: float weights in place
// of the quantized ones, or the same scheme's codes for W + ΔW.
func (p *plan) commitQuant() error {
	for _, e := range p.quant {
		var err error
		if e.mode == QuantRequantize {
			err = p.requantize(e)
		} else {
			err = p.dequantize(e)
		}
		if err != nil {
			return fmt.Errorf("layer %s: %w", e.l.Module, err)
		}
		p.report.Merged = append(p.report.Merged, *e.rep)
	}
	return nil
}

// dequantize replaces a quantized weight by the float W + ΔW: a MatMulNBits
// becomes a MatMul (and an Add for its bias), a DequantizeLinear's output
// a float initializer.
func (p *plan) dequantize(e *quantEdit) error {
	l, q, g := e.l, e.l.Quant, e.l.Graph
	n := l.Node
	if q.Kind == QuantNBits {
		t, err := graph.NewFloatTensor(g.UniqueName(l.Module+".weight"), l.DType, []int64{l.In, l.Out}, e.w)
		if err != nil {
			return err
		}
		g.AddInitializer(t)
		out := n.Output[0]
		n.OpType, n.Domain, n.Attribute = proto.String("MatMul"), nil, nil
		n.Input = []string{n.Input[0], t.GetName()}
		if q.Bias != "" {
			mid := g.UniqueName(out + "_before_bias")
			g.SetOutput(n, 0, mid)
			add := &onnxpb.NodeProto{Name: proto.String(g.UniqueName(n.GetName() + "_bias")), OpType: proto.String("Add"), Input: []string{mid, q.Bias}, Output: []string{out}}
			if err := g.InsertNodesAfter(n, add); err != nil {
				return err
			}
		}
		g.Reindex()
		dropQuantConstants(g, q)
		e.rep.Weight = t.GetName()
		return nil
	}
	// QDQ: the weight in the DequantizeLinear output's layout.
	vals := e.w
	dims := []int64{l.In, l.Out}
	if l.TransB {
		vals, dims = transposeF64(e.w, int(l.In), int(l.Out)), []int64{l.Out, l.In}
	}
	t, err := graph.NewFloatTensor(g.UniqueName(l.Module+".weight"), l.DType, dims, vals)
	if err != nil {
		return err
	}
	g.AddInitializer(t)
	g.SetInput(n, 1, t.GetName())
	g.Reindex()
	if len(g.Consumers(q.Dequant.Output[0])) == 0 && !g.IsGraphOutput(q.Dequant.Output[0]) {
		if err := g.RemoveNode(q.Dequant); err != nil {
			return err
		}
		g.Reindex()
		dropQuantConstants(g, q)
	}
	e.rep.Weight = t.GetName()
	return nil
}

// dropQuantConstants removes the quantized weight's data, scales and zero
// points once nothing reads them.
func dropQuantConstants(g *graph.Graph, q *Quant) {
	for _, c := range []string{q.Data, q.Scales, q.ZeroPoints} {
		if c != "" {
			dropConstant(g, c)
		}
	}
}

// requantize writes W + ΔW back in the layer's own scheme (bits, block
// size, zero points or not, scale axis) and records the error that adds:
// the largest |deq(quant(W')) − W'| and its Frobenius norm relative to W'.
func (p *plan) requantize(e *quantEdit) error {
	l, q, g := e.l, e.l.Quant, e.l.Graph
	constant := func(name string) *onnxpb.TensorProto {
		t, _, _ := g.ConstantTensor(name)
		return t
	}
	td, ts := constant(q.Data), constant(q.Scales)
	var tz *onnxpb.TensorProto
	if q.ZeroPoints != "" {
		tz = constant(q.ZeroPoints)
	}
	for _, name := range []string{q.Data, q.Scales, q.ZeroPoints} {
		if name != "" && len(g.Consumers(name)) > 1 {
			return fmt.Errorf("constant %q is read by other nodes too; use --dequantize", name)
		}
	}
	in, out := int(l.In), int(l.Out)
	var codes []byte
	var scales []float64
	var zps []byte
	deq := make([]float64, len(e.w))
	if q.Kind == QuantNBits {
		codes, scales, zps = quantizeNBits(e.w, in, out, int(q.Bits), int(q.BlockSize), tz != nil, deq)
	} else {
		signed := graph.DataType(td.GetDataType()) == graph.Int8
		// int8 with zero points all 0 (or none) stays symmetric; uint8
		// without zero points keeps 0 as its zero point.
		symmetric := signed && (tz == nil || allZero(p.m, tz))
		codes, scales, zps = quantizeQDQ(e.w, in, out, l.TransB, int(q.Axis), signed, symmetric, tz == nil, deq)
	}
	// New constants under fresh names, read where the old ones were: the
	// old ones may live in an external data file a streaming save copies.
	reader, first := l.Node, 1
	if q.Kind == QuantQDQ {
		reader, first = q.Dequant, 0
	}
	for i, rt := range []struct {
		old  *onnxpb.TensorProto
		data []byte
		f    []float64
	}{{td, codes, nil}, {ts, nil, scales}, {tz, zps, nil}} {
		if rt.old == nil {
			continue
		}
		t := &onnxpb.TensorProto{Name: proto.String(g.UniqueName(rt.old.GetName())), DataType: rt.old.DataType, Dims: slices.Clone(rt.old.Dims)}
		var err error
		if rt.f != nil {
			err = graph.SetFloat64s(t, rt.f)
		} else {
			err = graph.SetRawData(t, rt.data)
		}
		if err != nil {
			return err
		}
		g.AddInitializer(t)
		g.SetInput(reader, first+i, t.GetName())
	}
	g.Reindex()
	for _, c := range []string{q.Data, q.Scales, q.ZeroPoints} {
		if c != "" {
			dropConstant(g, c)
		}
	}
	var maxErr, num, den float64
	for i, v := range e.w {
		d := deq[i] - v
		maxErr = math.Max(maxErr, math.Abs(d))
		num += d * d
		den += v * v
	}
	e.rep.RequantMaxError = maxErr
	if den > 0 {
		e.rep.RequantRelError = math.Sqrt(num / den)
	}
	return nil
}
