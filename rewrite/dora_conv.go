package rewrite

import (
	"fmt"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// DoRA on Conv layers, as PEFT's DoraConv2dLayer (and its Conv1d/Conv3d
// variants): the magnitude is [1, out, 1…], the norm is over the kernel's
// in and spatial axes, and with V = W + scaling·ΔW (ΔW = B·A on the
// flattened kernel)
//
//	y = (m/‖V‖) ⊙ (conv(x, W) + scaling·Conv_B(Conv_A(x)))  (+ the bias)
//
// ΔW is built as PEFT's get_delta_weight builds it for kxk kernels, a 1x1
// convolution of Aᵀ by B, transposed back; ‖V‖² is a convolution of V² by
// a kernel of ones. A Conv with a bias recomputes conv(x, W) without it
// (twice, so that the branch stays a tree): y = (m/‖V‖)⊙(conv(x, W) +
// scaling·lora(x)) + (base(x) − conv(x, W)).

// doraConvKindOf builds the description for a Conv with dims spatial axes.
func doraConvKindOf(bias bool, dims int) *branchKind {
	perm := []int64{1, 0}
	for i := 0; i < dims; i++ {
		perm = append(perm, int64(2+i))
	}
	p := func() []*onnxpb.AttributeProto { return []*onnxpb.AttributeProto{intsAttr("perm", perm...)} }
	nodes := []branchNode{
		{Name: "Transpose_A", Op: "Transpose", In: []operand{paramIn("A")}, Attrs: p()},
		{Name: "Conv_delta", Op: opConv, In: []operand{nodeOut("Transpose_A"), paramIn("B")}},
		{Name: "Transpose_delta", Op: "Transpose", In: []operand{nodeOut("Conv_delta")}, Attrs: p()},
		{Name: "Mul_delta_scaling", Op: "Mul", In: []operand{nodeOut("Transpose_delta"), paramIn("S")}, Commutes: true},
		{Name: "Add_V", Op: "Add", In: []operand{paramIn("W"), nodeOut("Mul_delta_scaling")}, Commutes: true},
		{Name: "Pow_V", Op: "Pow", In: []operand{nodeOut("Add_V"), paramIn("two")}},
		{Name: "Conv_norm2", Op: opConv, In: []operand{nodeOut("Pow_V"), paramIn("ones")}},
		{Name: "Transpose_norm2", Op: "Transpose", In: []operand{nodeOut("Conv_norm2")}, Attrs: p()},
		{Name: "Sqrt_norm", Op: "Sqrt", In: []operand{nodeOut("Transpose_norm2")}, Doc: doraDetach},
		{Name: "Div_magnitude", Op: "Div", In: []operand{paramIn("M"), nodeOut("Sqrt_norm")}},
		{Name: "Conv_A", Op: opConv, In: []operand{theLayerInput, paramIn("A")}, BaseAttrs: convBaseAttrs},
		{Name: "Conv_B", Op: opConv, In: []operand{nodeOut("Conv_A"), paramIn("B")}, Shape: shapeLayerOut},
		{Name: "Mul_scaling", Op: "Mul", In: []operand{nodeOut("Conv_B"), paramIn("S")}, Commutes: true, Shape: shapeLayerOut},
	}
	base := theLayerOutput
	if bias {
		nodes = append(nodes, branchNode{Name: "Conv_W", Op: opConv, In: []operand{theLayerInput, paramIn("W")}, BaseAttrs: convBaseAttrs, Shape: shapeLayerOut})
		base = nodeOut("Conv_W")
	}
	nodes = append(nodes,
		branchNode{Name: "Add_lora", Op: "Add", In: []operand{base, nodeOut("Mul_scaling")}, Commutes: true, Shape: shapeLayerOut},
		branchNode{Name: "Mul_dora", Op: "Mul", In: []operand{nodeOut("Add_lora"), nodeOut("Div_magnitude")}, Commutes: true},
	)
	if bias {
		nodes[len(nodes)-1].Shape = shapeLayerOut
		nodes = append(nodes,
			branchNode{Name: "Conv_W_bias", Op: opConv, In: []operand{theLayerInput, paramIn("W")}, BaseAttrs: convBaseAttrs, Shape: shapeLayerOut},
			branchNode{Name: "Sub_bias", Op: "Sub", In: []operand{theLayerOutput, nodeOut("Conv_W_bias")}, Shape: shapeLayerOut},
			branchNode{Name: "Add_bias", Op: "Add", In: []operand{nodeOut("Mul_dora"), nodeOut("Sub_bias")}, Commutes: true},
		)
	}
	name := fmt.Sprintf("dora conv%dd", dims)
	if bias {
		name += " with bias"
	}
	return &branchKind{
		Name: name, BaseOps: []string{opConv}, Nodes: nodes,
		Params: []branchParam{
			{Name: "A", Label: "lora_A", Class: paramKernel, Dims: []string{"r", "in"}},
			{Name: "B", Label: "lora_B", Class: paramKernel, Dims: []string{"out", "r"}},
			{Name: "S", Label: "scaling", Class: paramScalar},
			{Name: "M", Label: "lora_magnitude_vector", Class: paramKernel, Dims: []string{"one", "out"}},
			{Name: "ones", Label: "DoRA ones", Class: paramKernel, Dims: []string{"one", "in"}},
			{Name: "two", Label: "DoRA exponent", Class: paramScalar},
			{Name: "W", Label: "the layer's weight", LayerValue: true},
		},
	}
}

// doraConvKinds are the Conv DoRA descriptions: 1, 2 and 3 spatial axes,
// with and without a bias.
var doraConvKinds = func() []*branchKind {
	var ks []*branchKind
	for dims := 1; dims <= 3; dims++ {
		ks = append(ks, doraConvKindOf(false, dims), doraConvKindOf(true, dims))
	}
	return ks
}()

// doraConvKind returns the description for a Conv layer.
func doraConvKind(l *Layer) *branchKind {
	i := 2 * (len(l.Kernel) - 1)
	if hasBias(l) {
		i++
	}
	if i < 0 || i >= len(doraConvKinds) {
		return nil
	}
	return doraConvKinds[i]
}
