package graph

import (
	"fmt"
	"math"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// DataType is an ONNX tensor element type (TensorProto.DataType).
type DataType int32

// Element types used by name in this module.
const (
	Undefined = DataType(onnxpb.TensorProto_UNDEFINED)
	Float     = DataType(onnxpb.TensorProto_FLOAT)
	Uint8     = DataType(onnxpb.TensorProto_UINT8)
	Int8      = DataType(onnxpb.TensorProto_INT8)
	Int32     = DataType(onnxpb.TensorProto_INT32)
	Int64     = DataType(onnxpb.TensorProto_INT64)
	String    = DataType(onnxpb.TensorProto_STRING)
	Bool      = DataType(onnxpb.TensorProto_BOOL)
	Float16   = DataType(onnxpb.TensorProto_FLOAT16)
	Double    = DataType(onnxpb.TensorProto_DOUBLE)
	BFloat16  = DataType(onnxpb.TensorProto_BFLOAT16)
)

// String returns the ONNX name of the type, such as FLOAT16.
func (d DataType) String() string {
	if name, ok := onnxpb.TensorProto_DataType_name[int32(d)]; ok {
		return name
	}
	return fmt.Sprintf("DataType(%d)", int32(d))
}

// IsFloat reports whether d is one of the floating-point types that LoRA
// weights can have and the typed views read and write.
func (d DataType) IsFloat() bool {
	return d == Float || d == Float16 || d == BFloat16 || d == Double
}

// BitSize returns the size of one element in bits, or 0 when the type has no
// fixed size (STRING, UNDEFINED, unknown values).
func (d DataType) BitSize() int {
	switch onnxpb.TensorProto_DataType(d) {
	case onnxpb.TensorProto_FLOAT, onnxpb.TensorProto_INT32, onnxpb.TensorProto_UINT32:
		return 32
	case onnxpb.TensorProto_UINT8, onnxpb.TensorProto_INT8, onnxpb.TensorProto_BOOL,
		onnxpb.TensorProto_FLOAT8E4M3FN, onnxpb.TensorProto_FLOAT8E4M3FNUZ,
		onnxpb.TensorProto_FLOAT8E5M2, onnxpb.TensorProto_FLOAT8E5M2FNUZ,
		onnxpb.TensorProto_FLOAT8E8M0:
		return 8
	case onnxpb.TensorProto_UINT16, onnxpb.TensorProto_INT16,
		onnxpb.TensorProto_FLOAT16, onnxpb.TensorProto_BFLOAT16:
		return 16
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

// maxElements bounds element counts so that byte sizes never overflow int64.
const maxElements = int64(1) << 56

// NumElements returns the product of dims, or an error when a dim is
// negative or the product would overflow.
func NumElements(dims []int64) (int64, error) {
	n := int64(1)
	for _, d := range dims {
		if d < 0 {
			return 0, fmt.Errorf("negative dimension %d in %v", d, dims)
		}
		if d != 0 && n > maxElements/d {
			return 0, fmt.Errorf("dimensions %v hold too many elements", dims)
		}
		n *= d
	}
	return n, nil
}

// ByteSize returns the number of bytes a tensor of the given type and dims
// occupies in raw_data (sub-byte types are packed), or an error for types
// without a fixed size or impossible dims.
func ByteSize(dt DataType, dims []int64) (int64, error) {
	bits := dt.BitSize()
	if bits == 0 {
		return 0, fmt.Errorf("data type %v has no fixed element size", dt)
	}
	n, err := NumElements(dims)
	if err != nil {
		return 0, err
	}
	if n > (math.MaxInt64-7)/int64(bits) {
		return 0, fmt.Errorf("dimensions %v of %v hold too many bytes", dims, dt)
	}
	return (n*int64(bits) + 7) / 8, nil
}
