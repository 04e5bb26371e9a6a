package rewrite

import (
	"fmt"

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
