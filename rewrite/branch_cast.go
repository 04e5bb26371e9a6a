package rewrite

import (
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// castBranch is the LoRA branch with float32 factors beside a float16 or
// bfloat16 layer, as PEFT keeps adapters in float32 on half-precision
// bases (its Linear.forward casts x to lora_A's dtype and the result back):
//
//	y = base(x) + Cast<dt>(S * ((dropout(transpose(Cast<f32>(x))) · A) · B))
//
// A [in, r], B [r, out] and S are float32, so training updates them in
// float32; merge still adds S·A·B to the weight in float64 and rounds once.
// The values between the Casts are float32 and are not declared.
func castBranch(dt graph.DataType) *branchKind {
	toF32 := &onnxpb.AttributeProto{Name: strp("to"), Type: onnxpb.AttributeProto_INT.Enum(), I: int64p(int64(graph.Float))}
	toDT := &onnxpb.AttributeProto{Name: strp("to"), Type: onnxpb.AttributeProto_INT.Enum(), I: int64p(int64(dt))}
	return &branchKind{
		Name:    "lora float32 on " + dt.String(),
		BaseOps: []string{"MatMul", "Gemm"},
		Params:  loraParams(),
		Nodes: []branchNode{
			{Name: "Cast_x", Op: "Cast", In: []operand{theLayerInput}, Attrs: []*onnxpb.AttributeProto{toF32}},
			{Name: "Transpose_A", Op: "Transpose", In: []operand{nodeOut("Cast_x")}, When: whenTransA,
				Attrs: []*onnxpb.AttributeProto{intsAttr("perm", 1, 0)}},
			{Name: "Dropout", Op: "Dropout", In: []operand{nodeOut("Transpose_A"), paramIn("ratio")}, When: whenDropout,
				MoreInputs: true, SpareOutputs: true},
			{Name: "MatMul_A", Op: "MatMul", In: []operand{nodeOut("Dropout"), paramIn("A")}},
			{Name: "MatMul_B", Op: "MatMul", In: []operand{nodeOut("MatMul_A"), paramIn("B")}},
			{Name: "Mul_scaling", Op: "Mul", In: []operand{nodeOut("MatMul_B"), paramIn("S")}, Commutes: true},
			{Name: "Cast_out", Op: "Cast", In: []operand{nodeOut("Mul_scaling")}, Attrs: []*onnxpb.AttributeProto{toDT}, Shape: shapeLayerOut},
			{Name: "Add", Op: "Add", In: []operand{theLayerOutput, nodeOut("Cast_out")}, Commutes: true},
		},
	}
}

var (
	castBranchF16  = castBranch(graph.Float16)
	castBranchBF16 = castBranch(graph.BFloat16)
)

// castBranchFor returns the float32-factor branch for a layer computing in
// dt, or nil when dt is not a half-precision type.
func castBranchFor(dt graph.DataType) *branchKind {
	switch dt {
	case graph.Float16:
		return castBranchF16
	case graph.BFloat16:
		return castBranchBF16
	}
	return nil
}

// paramDType is the element type of a branch's factors and scaling beside
// a layer computing in layerDT.
func (k *branchKind) paramDType(layerDT graph.DataType) graph.DataType {
	if k == castBranchF16 || k == castBranchBF16 {
		return graph.Float
	}
	return layerDT
}

func strp(s string) *string { return &s }
func int64p(v int64) *int64 { return &v }
