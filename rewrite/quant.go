package rewrite

import (
	"fmt"
	"math"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Quantized bases (QLoRA): a layer whose weight is quantized, a
// com.microsoft MatMulNBits or a DequantizeLinear feeding a MatMul/Gemm,
// takes a float LoRA branch beside the quantized product, in the scales'
// type. The base stays quantized, so with B = 0 the model computes exactly
// what it did. Merging cannot add a float ΔW to integer codes: merge
// refuses unless asked to write float weights (Dequantize) or to quantize
// W + ΔW again with the layer's own scheme (Requantize), reporting the
// error that adds.

// Quant describes a layer's quantized weight.
type Quant struct {
	// Kind is QuantNBits or QuantQDQ.
	Kind string
	// Bits and BlockSize are MatMulNBits'; Axis the DequantizeLinear's
	// (-1 for a per-tensor scale).
	Bits, BlockSize, Axis int64
	// Data, Scales and ZeroPoints name the quantized constants ("" for no
	// zero points); Bias is MatMulNBits' bias input, "" for none.
	Data, Scales, ZeroPoints, Bias string
	// Dequant is the DequantizeLinear node of a QDQ weight.
	Dequant *onnxpb.NodeProto
}

// Quantized-weight kinds.
const (
	QuantNBits = "MatMulNBits"
	QuantQDQ   = "QDQ"
)

// Merge modes for quantized layers (MergeOptions.Quantized).
const (
	QuantRefuse     = ""
	QuantDequantize = "dequantize"
	QuantRequantize = "requantize"
)

func (q *Quant) String() string {
	if q.Kind == QuantNBits {
		return fmt.Sprintf("MatMulNBits %d-bit, block %d", q.Bits, q.BlockSize)
	}
	return "DequantizeLinear"
}

// nbitsBranch is loraBranch beside a MatMulNBits.
var nbitsBranch = func() *branchKind {
	k := *loraBranch
	k.Name, k.BaseOps = "lora (MatMulNBits)", []string{QuantNBits}
	return &k
}()

// isBaseNode reports whether p's domain is one a layer node may have: the
// standard one, or com.microsoft for MatMulNBits.
func isBaseNode(p *onnxpb.NodeProto) bool {
	return graph.IsStandardOp(p) || (p.GetDomain() == "com.microsoft" && p.GetOpType() == QuantNBits)
}

// nbitsLayerOf returns a MatMulNBits node as a layer, or why not.
func nbitsLayerOf(g *graph.Graph, n *onnxpb.NodeProto) (*Layer, string) {
	if len(n.Input) < 3 {
		return nil, "MatMulNBits without scales"
	}
	k, nn := graph.AttrInt(n, "K", 0), graph.AttrInt(n, "N", 0)
	bits, block := graph.AttrInt(n, "bits", 4), graph.AttrInt(n, "block_size", 0)
	if k <= 0 || nn <= 0 || block < 16 || block&(block-1) != 0 || (bits != 2 && bits != 4 && bits != 8) {
		return nil, fmt.Sprintf("MatMulNBits with K=%d N=%d bits=%d block_size=%d", k, nn, bits, block)
	}
	if len(n.Input) > 4 && n.Input[4] != "" {
		return nil, "MatMulNBits with g_idx (act-order) is not supported"
	}
	data, _, _ := g.ConstantTensor(n.Input[1])
	scales, _, _ := g.ConstantTensor(n.Input[2])
	if data == nil || scales == nil || graph.DataType(data.GetDataType()) != graph.Uint8 {
		return nil, "MatMulNBits whose weight or scales are not constants"
	}
	kb := (k + block - 1) / block
	if len(data.Dims) != 3 || data.Dims[0] != nn || data.Dims[1] != kb || data.Dims[2] != block*bits/8 {
		return nil, fmt.Sprintf("MatMulNBits weight %q is %v, not [%d, %d, %d]", data.GetName(), data.Dims, nn, kb, block*bits/8)
	}
	dt := graph.DataType(scales.GetDataType())
	if n2, _ := graph.NumElements(scales.Dims); !dt.IsFloat() || n2 != nn*kb {
		return nil, fmt.Sprintf("MatMulNBits scales %q are %v %v", scales.GetName(), dt, scales.Dims)
	}
	q := &Quant{Kind: QuantNBits, Bits: bits, BlockSize: block, Axis: -1, Data: n.Input[1], Scales: n.Input[2]}
	if len(n.Input) > 3 && n.Input[3] != "" {
		zp, _, _ := g.ConstantTensor(n.Input[3])
		if zp == nil || graph.DataType(zp.GetDataType()) != graph.Uint8 {
			return nil, "MatMulNBits zero points that are not packed uint8 constants"
		}
		if c, _ := graph.NumElements(zp.Dims); c != nn*((kb*bits+7)/8) {
			return nil, fmt.Sprintf("MatMulNBits zero points %q are %v", zp.GetName(), zp.Dims)
		}
		q.ZeroPoints = n.Input[3]
	}
	if len(n.Input) > 5 && n.Input[5] != "" {
		q.Bias = n.Input[5]
	}
	w := g.ResolveWeight(n.Input[1])
	if w == nil {
		return nil, "MatMulNBits weight is not a constant"
	}
	l := &Layer{Node: n, Graph: g, Op: QuantNBits, Alpha: 1, Weight: w, In: k, Out: nn, DType: dt, Quant: q}
	l.place(g, w)
	return l, ""
}

// qdqLayer fills in l, a MatMul or Gemm whose weight input is the output
// of dq, a DequantizeLinear of constants; or says why it cannot be.
func qdqLayer(g *graph.Graph, l *Layer, dq *onnxpb.NodeProto) (*Layer, string) {
	if !graph.IsStandardOp(dq) || len(dq.Input) < 2 {
		return nil, "quantized weight (DequantizeLinear)"
	}
	data, _, _ := g.ConstantTensor(dq.Input[0])
	scales, _, _ := g.ConstantTensor(dq.Input[1])
	if data == nil || scales == nil {
		return nil, "quantized weight (DequantizeLinear of non-constants)"
	}
	ddt := graph.DataType(data.GetDataType())
	if (ddt != graph.Int8 && ddt != graph.Uint8) || len(data.Dims) != 2 {
		return nil, fmt.Sprintf("quantized weight %q is %v %v (only 2-D int8/uint8)", data.GetName(), ddt, data.Dims)
	}
	if graph.AttrInt(dq, "block_size", 0) != 0 {
		return nil, "blocked DequantizeLinear is not supported"
	}
	q := &Quant{Kind: QuantQDQ, Bits: 8, Axis: -1, Data: dq.Input[0], Scales: dq.Input[1], Dequant: dq}
	if n, _ := graph.NumElements(scales.Dims); n != 1 {
		axis := graph.AttrInt(dq, "axis", 1)
		if axis < 0 {
			axis += 2
		}
		if len(scales.Dims) != 1 || (axis != 0 && axis != 1) || scales.Dims[0] != data.Dims[axis] {
			return nil, fmt.Sprintf("DequantizeLinear scales %q %v do not fit weight %v", scales.GetName(), scales.Dims, data.Dims)
		}
		q.Axis = axis
	}
	if len(dq.Input) > 2 && dq.Input[2] != "" {
		zp, _, _ := g.ConstantTensor(dq.Input[2])
		if zp == nil {
			return nil, "DequantizeLinear zero point is not a constant"
		}
		nz, _ := graph.NumElements(zp.Dims)
		ns, _ := graph.NumElements(scales.Dims)
		if zp.GetDataType() != data.GetDataType() || nz != ns {
			return nil, fmt.Sprintf("DequantizeLinear zero point %q (%v %v) does not fit its scales %v", zp.GetName(), graph.DataType(zp.GetDataType()), zp.Dims, scales.Dims)
		}
		q.ZeroPoints = dq.Input[2]
	}
	l.DType = graph.DataType(scales.GetDataType())
	if !l.DType.IsFloat() {
		return nil, "DequantizeLinear scales are not floats"
	}
	l.Weight = &graph.Weight{Name: dq.Input[0], Tensor: data, Scope: g}
	l.Quant = q
	l.In, l.Out = data.Dims[0], data.Dims[1]
	if l.TransB {
		l.In, l.Out = l.Out, l.In
	}
	l.Shared = len(g.Consumers(dq.Output[0])) > 1 || len(g.Consumers(dq.Input[0])) > 1
	for _, out := range l.Node.Output {
		if g.IsGraphOutput(out) {
			l.OutputHead = true
		}
	}
	l.Module = ModulePath(l.Node.GetName(), dq.Output[0])
	return l, ""
}

// quantProblem refuses what a quantized layer cannot take at inject.
func quantProblem(l *Layer, cfg InjectConfig) string {
	switch {
	case cfg.DoRA:
		return "DoRA on a quantized weight is not supported"
	case cfg.Init != InitKaiming && cfg.Init != InitGaussian:
		return fmt.Sprintf("--init %s writes a residual into the weight, which is quantized here (%s)", cfg.Init, l.Quant)
	}
	return ""
}

// dequantized returns the layer's weight dequantized, [in, out] in x·W
// orientation, in float64.
func dequantized(m *graph.Model, l *Layer) ([]float64, error) {
	q, g := l.Quant, l.Graph
	tensor := func(name string) (*onnxpb.TensorProto, error) {
		t, _, _ := g.ConstantTensor(name)
		if t == nil {
			return nil, fmt.Errorf("constant %q is gone", name)
		}
		return t, nil
	}
	td, err := tensor(q.Data)
	if err != nil {
		return nil, err
	}
	ts, err := tensor(q.Scales)
	if err != nil {
		return nil, err
	}
	raw, err := m.RawData(td)
	if err != nil {
		return nil, err
	}
	scales, err := m.Float64s(ts)
	if err != nil {
		return nil, err
	}
	var zraw []byte
	if q.ZeroPoints != "" {
		tz, err := tensor(q.ZeroPoints)
		if err != nil {
			return nil, err
		}
		if zraw, err = m.RawData(tz); err != nil {
			return nil, err
		}
	}
	in, out := int(l.In), int(l.Out)
	w := make([]float64, in*out)
	if q.Kind == QuantNBits {
		k, n, bits, block := in, out, int(q.Bits), int(q.BlockSize)
		kb := (k + block - 1) / block
		blob := block * bits / 8
		zbytes := (kb*bits + 7) / 8
		for r := 0; r < n; r++ {
			for c := 0; c < k; c++ {
				b := c / block
				code := unpackCode(raw[(r*kb+b)*blob:], c%block, bits)
				zp := 1 << (bits - 1)
				if zraw != nil {
					zp = unpackCode(zraw[r*zbytes:], b, bits)
				}
				w[c*n+r] = float64(code-zp) * scales[r*kb+b]
			}
		}
		return w, nil
	}
	signed := graph.DataType(td.GetDataType()) == graph.Int8
	rows, cols := int(td.Dims[0]), int(td.Dims[1])
	val := func(b []byte, i int) int {
		if signed {
			return int(int8(b[i]))
		}
		return int(b[i])
	}
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			s, z := scales[0], 0
			switch q.Axis {
			case 0:
				s = scales[i]
			case 1:
				s = scales[j]
			}
			if zraw != nil {
				zi := 0
				switch q.Axis {
				case 0:
					zi = i
				case 1:
					zi = j
				}
				z = val(zraw, zi)
			}
			v := float64(val(raw, i*cols+j)-z) * s
			if l.TransB { // stored [out, in]
				w[j*out+i] = v
			} else {
				w[i*out+j] = v
			}
		}
	}
	return w, nil
}

// unpackCode reads the i-th code of width bits, packed low-first.
func unpackCode(b []byte, i, bits int) int {
	per := 8 / bits
	return int(b[i/per]>>((i%per)*bits)) & (1<<bits - 1)
}

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

// quantizeNBits quantizes w [in=K, out=N] in MatMulNBits' layout: blocks of
// block along K per output row, min/max with zero points, else symmetric
// around 2^(bits-1). deq receives the dequantized values, [K, N].
func quantizeNBits(w []float64, k, n, bits, block int, withZP bool, deq []float64) (codes []byte, scales []float64, zps []byte) {
	kb := (k + block - 1) / block
	blob := block * bits / 8
	zbytes := (kb*bits + 7) / 8
	codes = make([]byte, n*kb*blob)
	scales = make([]float64, n*kb)
	if withZP {
		zps = make([]byte, n*zbytes)
	}
	qmax := float64(int(1)<<bits - 1)
	half := 1 << (bits - 1)
	for r := 0; r < n; r++ {
		for b := 0; b < kb; b++ {
			lo, hi, amax := 0.0, 0.0, 0.0
			for c := b * block; c < min(k, (b+1)*block); c++ {
				v := w[c*n+r]
				lo, hi, amax = math.Min(lo, v), math.Max(hi, v), math.Max(amax, math.Abs(v))
			}
			var s float64
			zp := half
			if withZP {
				s = float64(float32((hi - lo) / qmax))
				if s > 0 {
					zp = int(math.Max(0, math.Min(qmax, math.Round(-lo/s))))
				} else {
					zp = 0
				}
				putCode(zps[r*zbytes:], b, bits, zp)
			} else {
				s = float64(float32(amax / float64(half-1)))
			}
			scales[r*kb+b] = s
			for c := b * block; c < (b+1)*block; c++ {
				code := zp
				if c < k && s > 0 {
					code = int(math.Max(0, math.Min(qmax, math.Round(w[c*n+r]/s)+float64(zp))))
				}
				putCode(codes[(r*kb+b)*blob:], c-b*block, bits, code)
				if c < k {
					deq[c*n+r] = float64(code-zp) * s
				}
			}
		}
	}
	return codes, scales, zps
}

func putCode(b []byte, i, bits, code int) {
	per := 8 / bits
	b[i/per] |= byte(code << ((i % per) * bits))
}

// quantizeQDQ quantizes w [in, out] into a DequantizeLinear weight stored
// [in, out] (or [out, in] when transB), per tensor (axis -1) or per axis
// of the stored layout, int8 symmetric or min/max with a zero point.
func quantizeQDQ(w []float64, in, out int, transB bool, axis int, signed, symmetric, noZP bool, deq []float64) (codes []byte, scales []float64, zps []byte) {
	rows, cols := in, out
	if transB {
		rows, cols = out, in
	}
	at := func(i, j int) int { // stored (i, j) -> index in w
		if transB {
			return j*out + i
		}
		return i*out + j
	}
	groups, groupOf := 1, func(i, j int) int { return 0 }
	switch axis {
	case 0:
		groups, groupOf = rows, func(i, j int) int { return i }
	case 1:
		groups, groupOf = cols, func(i, j int) int { return j }
	}
	lo, hi, amax := make([]float64, groups), make([]float64, groups), make([]float64, groups)
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			gi, v := groupOf(i, j), w[at(i, j)]
			lo[gi], hi[gi], amax[gi] = math.Min(lo[gi], v), math.Max(hi[gi], v), math.Max(amax[gi], math.Abs(v))
		}
	}
	qmin, qmax := 0.0, 255.0
	if signed {
		qmin, qmax = -128, 127
	}
	scales = make([]float64, groups)
	zp := make([]int, groups)
	zps = make([]byte, groups)
	for gi := range scales {
		switch {
		case symmetric:
			scales[gi] = float64(float32(amax[gi] / 127))
		case noZP:
			scales[gi] = float64(float32(hi[gi] / qmax))
		default:
			scales[gi] = float64(float32((hi[gi] - lo[gi]) / (qmax - qmin)))
			if scales[gi] > 0 {
				zp[gi] = int(math.Max(qmin, math.Min(qmax, math.Round(qmin-lo[gi]/scales[gi]))))
			}
		}
		zps[gi] = byte(int8(zp[gi]))
		if !signed {
			zps[gi] = byte(zp[gi])
		}
	}
	codes = make([]byte, rows*cols)
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			gi, idx := groupOf(i, j), at(i, j)
			c := zp[gi]
			if scales[gi] > 0 {
				c = int(math.Max(qmin, math.Min(qmax, math.Round(w[idx]/scales[gi])+float64(zp[gi]))))
			}
			if signed {
				codes[i*cols+j] = byte(int8(c))
			} else {
				codes[i*cols+j] = byte(c)
			}
			deq[idx] = float64(c-zp[gi]) * scales[gi]
		}
	}
	return codes, scales, zps
}

func allZero(m *graph.Model, t *onnxpb.TensorProto) bool {
	raw, err := m.RawData(t)
	if err != nil {
		return false
	}
	for _, b := range raw {
		if b != 0 {
			return false
		}
	}
	return true
}
