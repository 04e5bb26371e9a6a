package ortrun

import (
	"fmt"
	"math"
	"strings"

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
func (d DType) Bits() int {
	switch onnxpb.TensorProto_DataType(d) {
	case onnxpb.TensorProto_UINT8, onnxpb.TensorProto_INT8, onnxpb.TensorProto_BOOL,
		onnxpb.TensorProto_FLOAT8E4M3FN, onnxpb.TensorProto_FLOAT8E4M3FNUZ,
		onnxpb.TensorProto_FLOAT8E5M2, onnxpb.TensorProto_FLOAT8E5M2FNUZ,
		onnxpb.TensorProto_FLOAT8E8M0:
		return 8
	case onnxpb.TensorProto_UINT16, onnxpb.TensorProto_INT16,
		onnxpb.TensorProto_FLOAT16, onnxpb.TensorProto_BFLOAT16:
		return 16
	case onnxpb.TensorProto_FLOAT, onnxpb.TensorProto_INT32, onnxpb.TensorProto_UINT32:
		return 32
	case onnxpb.TensorProto_INT64, onnxpb.TensorProto_UINT64,
		onnxpb.TensorProto_DOUBLE, onnxpb.TensorProto_COMPLEX64:
		return 64
	case onnxpb.TensorProto_COMPLEX128:
		return 128
	case onnxpb.TensorProto_UINT4, onnxpb.TensorProto_INT4, onnxpb.TensorProto_FLOAT4E2M1:
		return 4
	case onnxpb.TensorProto_UINT2, onnxpb.TensorProto_INT2:
		return 2
	}
	return 0
}

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

// F16FromFloat64 rounds x to the nearest half (ties to even). Values beyond
// the half range become ±Inf; NaN becomes a quiet NaN.
func F16FromFloat64(x float64) F16 { return F16(roundSmallFloat(x, 5, 10)) }

// Float64 returns the exact value of h.
func (h F16) Float64() float64 { return expandSmallFloat(uint16(h), 5, 10) }

// BF16FromFloat64 rounds x to the nearest bfloat16 (ties to even), with the
// same overflow and NaN rules as F16FromFloat64.
func BF16FromFloat64(x float64) BF16 { return BF16(roundSmallFloat(x, 8, 7)) }

// Float64 returns the exact value of b.
func (b BF16) Float64() float64 { return expandSmallFloat(uint16(b), 8, 7) }

// roundSmallFloat encodes x in a 16-bit binary float with expBits exponent
// and mantBits fraction bits. Done directly from float64 so a value is
// rounded once (going through float32 could round twice).
func roundSmallFloat(x float64, expBits, mantBits uint) uint16 {
	var sign uint16
	if math.Signbit(x) {
		sign = 1 << (expBits + mantBits)
	}
	expMax := uint64(1)<<expBits - 1
	if math.IsNaN(x) {
		return sign | uint16(expMax<<mantBits) | 1<<(mantBits-1)
	}
	a := math.Abs(x)
	if math.IsInf(a, 0) {
		return sign | uint16(expMax<<mantBits)
	}
	bias := int(1)<<(expBits-1) - 1
	minExp := 1 - bias // exponent of the smallest normal
	var bits uint64
	if a < math.Ldexp(1, minExp) {
		// Subnormal: count units of the smallest subnormal; a carry to
		// 1<<mantBits lands exactly on the smallest normal's encoding.
		bits = uint64(math.RoundToEven(math.Ldexp(a, int(mantBits)-minExp)))
	} else {
		frac, e := math.Frexp(a) // a = frac * 2^e, frac in [0.5, 1)
		e--
		// Scaling by powers of two is exact, so only RoundToEven rounds; a
		// mantissa carry moves into the exponent field as it should.
		m := uint64(math.RoundToEven((frac*2 - 1) * float64(uint64(1)<<mantBits)))
		if e-minExp+1 >= int(expMax) {
			return sign | uint16(expMax<<mantBits)
		}
		bits = uint64(e-minExp+1)<<mantBits + m
	}
	if bits >= expMax<<mantBits {
		return sign | uint16(expMax<<mantBits)
	}
	return sign | uint16(bits)
}

// expandSmallFloat is the exact inverse of roundSmallFloat.
func expandSmallFloat(h uint16, expBits, mantBits uint) float64 {
	sign := 1.0
	if h>>(expBits+mantBits)&1 == 1 {
		sign = -1
	}
	expMax := uint16(1)<<expBits - 1
	e := h >> mantBits & expMax
	m := float64(h & (1<<mantBits - 1))
	bias := int(1)<<(expBits-1) - 1
	switch e {
	case 0:
		return sign * math.Ldexp(m, 1-bias-int(mantBits))
	case expMax:
		if m != 0 {
			return math.NaN()
		}
		return math.Inf(int(sign))
	}
	return sign * math.Ldexp(1+m/float64(uint64(1)<<mantBits), int(e)-bias)
}
