package ortrun

import (
	"fmt"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// DType is a tensor element type. Its values are those of ONNX
// TensorProto.DataType, which ORT's ONNXTensorElementDataType shares, so a
// graph data type converts with a plain DType(x).
type DType int32

// Element types that have Go names. Other ONNX types (float8, int4,
// complex...) still travel as raw bytes under their numeric value.
const (
	Undefined DType = 0
	Float32   DType = 1
	Uint8     DType = 2
	Int8      DType = 3
	Uint16    DType = 4
	Int16     DType = 5
	Int32     DType = 6
	Int64     DType = 7
	String    DType = 8
	Bool      DType = 9
	Float16   DType = 10
	Float64   DType = 11
	Uint32    DType = 12
	Uint64    DType = 13
	BFloat16  DType = 16
)

var dtypeNames = map[DType]string{
	Undefined: "undefined", Float32: "float32", Uint8: "uint8", Int8: "int8",
	Uint16: "uint16", Int16: "int16", Int32: "int32", Int64: "int64",
	String: "string", Bool: "bool", Float16: "float16", Float64: "float64",
	Uint32: "uint32", Uint64: "uint64", BFloat16: "bfloat16",
}

// String returns a numpy-style name such as "float16", or the lower-cased
// ONNX name for types without a Go name.
func (d DType) String() string {
	if n, ok := dtypeNames[d]; ok {
		return n
	}
	if n, ok := onnxpb.TensorProto_DataType_name[int32(d)]; ok {
		return strings.ToLower(n)
	}
	return fmt.Sprintf("dtype(%d)", int32(d))
}

// Bits returns the storage size of one element in bits, or 0 for types
// without a fixed size (string, undefined, unknown values).
func (d DType) Bits() int { return graph.DataType(d).BitSize() }

// IsFloat reports whether d is float16, bfloat16, float32 or float64.
func (d DType) IsFloat() bool {
	return d == Float16 || d == BFloat16 || d == Float32 || d == Float64
}

// F16 holds the bits of an IEEE 754 half-precision number, the Go element
// type of Float16 tensors.
type F16 uint16

// BF16 holds the bits of a bfloat16 number, the Go element type of BFloat16
// tensors.
type BF16 uint16

// F16FromFloat64 rounds x to the nearest half (ties to even), once, from
// float64. Values beyond the half range become ±Inf; NaN stays NaN.
func F16FromFloat64(x float64) F16 { return F16(graph.Float16Bits(x)) }

// Float64 returns the exact value of h.
func (h F16) Float64() float64 { return graph.Float16Value(uint16(h)) }

// BF16FromFloat64 rounds x to the nearest bfloat16 (ties to even), with the
// same overflow and NaN rules as F16FromFloat64.
func BF16FromFloat64(x float64) BF16 { return BF16(graph.BFloat16Bits(x)) }

// Float64 returns the exact value of b.
func (b BF16) Float64() float64 { return graph.BFloat16Value(uint16(b)) }
