package graph

import (
	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

func isDefaultDomain(d string) bool { return d == "" || d == "ai.onnx" }

// IsStandardOp reports whether n is an operator of the default ONNX domain
// ("" or "ai.onnx"), not a contrib or custom op of the same name.
func IsStandardOp(n *onnxpb.NodeProto) bool { return isDefaultDomain(n.GetDomain()) }

// constantValue returns the tensor a Constant node produces, for the value
// attribute; the value_float(s)/value_int(s) forms are returned as tensors too.
func constantValue(n *onnxpb.NodeProto) *onnxpb.TensorProto {
	for _, a := range n.Attribute {
		switch a.GetName() {
		case "value":
			return a.T
		case "value_float":
			return &onnxpb.TensorProto{DataType: proto.Int32(int32(Float)), FloatData: []float32{a.GetF()}}
		case "value_floats":
			return &onnxpb.TensorProto{DataType: proto.Int32(int32(Float)), Dims: []int64{int64(len(a.Floats))}, FloatData: a.Floats}
		case "value_int":
			return &onnxpb.TensorProto{DataType: proto.Int32(int32(Int64)), Int64Data: []int64{a.GetI()}}
		case "value_ints":
			return &onnxpb.TensorProto{DataType: proto.Int32(int32(Int64)), Dims: []int64{int64(len(a.Ints))}, Int64Data: a.Ints}
		}
	}
	return nil
}

// Attr returns the node attribute called name, or nil.
func Attr(n *onnxpb.NodeProto, name string) *onnxpb.AttributeProto {
	for _, a := range n.Attribute {
		if a.GetName() == name {
			return a
		}
	}
	return nil
}

// AttrInt returns an INT attribute's value, or def when absent.
func AttrInt(n *onnxpb.NodeProto, name string, def int64) int64 {
	if a := Attr(n, name); a != nil {
		return a.GetI()
	}
	return def
}

// AttrFloat returns a FLOAT attribute's value, or def when absent.
func AttrFloat(n *onnxpb.NodeProto, name string, def float32) float32 {
	if a := Attr(n, name); a != nil {
		return a.GetF()
	}
	return def
}

// AttrInts returns an INTS attribute's values, or nil when absent.
func AttrInts(n *onnxpb.NodeProto, name string) []int64 {
	if a := Attr(n, name); a != nil {
		return a.Ints
	}
	return nil
}
