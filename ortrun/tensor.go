package ortrun

import (
	"fmt"
	"math"
	"unsafe"
)

// Tensor is a named dense tensor in host memory, the unit that Session.Run
// takes and returns. Keeping the elements as raw bytes lets every fixed-size
// ONNX type pass through unchanged, including float16 and bfloat16.
type Tensor struct {
	// Name is the graph input or output name.
	Name string
	// DType is the element type.
	DType DType
	// Shape holds the dimensions; empty for a scalar. Dims may be 0.
	Shape []int64
	// Data holds the elements in row-major order, little-endian, with
	// sub-byte types packed as ONNX packs them (two int4 per byte).
	Data []byte
}

// Element lists the Go types that map one to one onto a DType.
type Element interface {
	float32 | float64 | F16 | BF16 |
		int8 | uint8 | int16 | uint16 | int32 | uint32 | int64 | uint64 | bool
}

// DTypeOf returns the DType whose elements have Go type T.
func DTypeOf[T Element]() DType {
	var z T
	switch any(z).(type) {
	case float32:
		return Float32
	case float64:
		return Float64
	case F16:
		return Float16
	case BF16:
		return BFloat16
	case int8:
		return Int8
	case uint8:
		return Uint8
	case int16:
		return Int16
	case uint16:
		return Uint16
	case int32:
		return Int32
	case uint32:
		return Uint32
	case int64:
		return Int64
	case uint64:
		return Uint64
	case bool:
		return Bool
	}
	panic("unreachable")
}

// NumElements returns the product of shape (1 for a scalar), or an error
// for a negative dim or an overflowing product.
func NumElements(shape []int64) (int64, error) {
	n := int64(1)
	for _, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("negative dimension in shape %v", shape)
		}
		if d != 0 && n > math.MaxInt64/d {
			return 0, fmt.Errorf("shape %v has too many elements", shape)
		}
		n *= d
	}
	return n, nil
}

// byteSize returns how many bytes n elements of d take.
func byteSize(d DType, n int64) (int64, error) {
	bits := int64(d.Bits())
	if bits == 0 {
		return 0, fmt.Errorf("dtype %v has no fixed element size", d)
	}
	if n > (math.MaxInt64-7)/bits {
		return 0, fmt.Errorf("%d elements of %v overflow", n, d)
	}
	return (n*bits + 7) / 8, nil
}

// NewTensor returns a tensor holding a copy of data with the DType of T.
func NewTensor[T Element](name string, shape []int64, data []T) (Tensor, error) {
	n, err := NumElements(shape)
	if err != nil {
		return Tensor{}, err
	}
	if int64(len(data)) != n {
		return Tensor{}, fmt.Errorf("tensor %q: shape %v needs %d elements, got %d", name, shape, n, len(data))
	}
	var raw []byte
	if len(data) > 0 {
		// Element types have no padding and the host is little-endian,
		// which is ORT's layout.
		size := len(data) * int(unsafe.Sizeof(data[0]))
		raw = make([]byte, size)
		copy(raw, unsafe.Slice((*byte)(unsafe.Pointer(&data[0])), size))
	}
	return Tensor{Name: name, DType: DTypeOf[T](), Shape: append([]int64{}, shape...), Data: raw}, nil
}

// Zeros returns a tensor of any fixed-size dtype filled with zero bytes,
// which is 0 (or false) for every numeric type.
func Zeros(name string, d DType, shape []int64) (Tensor, error) {
	n, err := NumElements(shape)
	if err != nil {
		return Tensor{}, err
	}
	size, err := byteSize(d, n)
	if err != nil {
		return Tensor{}, err
	}
	return Tensor{Name: name, DType: d, Shape: append([]int64{}, shape...), Data: make([]byte, size)}, nil
}

// FromFloat64 builds a tensor of dtype d from float64 values: floats are
// rounded to nearest even, integers must be integral and in range, bool is
// v != 0. It is the one entry point for feeding inputs of any numeric type.
func FromFloat64(name string, d DType, shape []int64, values []float64) (Tensor, error) {
	n, err := NumElements(shape)
	if err != nil {
		return Tensor{}, err
	}
	if int64(len(values)) != n {
		return Tensor{}, fmt.Errorf("tensor %q: shape %v needs %d elements, got %d", name, shape, n, len(values))
	}
	switch d {
	case Float32:
		return convertFrom(name, shape, values, func(v float64) (float32, error) { return float32(v), nil })
	case Float64:
		return convertFrom(name, shape, values, func(v float64) (float64, error) { return v, nil })
	case Float16:
		return convertFrom(name, shape, values, func(v float64) (F16, error) { return F16FromFloat64(v), nil })
	case BFloat16:
		return convertFrom(name, shape, values, func(v float64) (BF16, error) { return BF16FromFloat64(v), nil })
	case Bool:
		return convertFrom(name, shape, values, func(v float64) (bool, error) { return v != 0, nil })
	case Int8:
		return convertFrom(name, shape, values, intConv[int8](math.MinInt8, math.MaxInt8))
	case Uint8:
		return convertFrom(name, shape, values, intConv[uint8](0, math.MaxUint8))
	case Int16:
		return convertFrom(name, shape, values, intConv[int16](math.MinInt16, math.MaxInt16))
	case Uint16:
		return convertFrom(name, shape, values, intConv[uint16](0, math.MaxUint16))
	case Int32:
		return convertFrom(name, shape, values, intConv[int32](math.MinInt32, math.MaxInt32))
	case Uint32:
		return convertFrom(name, shape, values, intConv[uint32](0, math.MaxUint32))
	case Int64:
		// 2^63 is the first float64 past MaxInt64.
		return convertFrom(name, shape, values, intConv[int64](math.MinInt64, math.Ldexp(1, 63)-1024))
	case Uint64:
		return convertFrom(name, shape, values, intConv[uint64](0, math.Ldexp(1, 64)-2048))
	}
	return Tensor{}, fmt.Errorf("tensor %q: no conversion from float64 to %v", name, d)
}

func convertFrom[T Element](name string, shape []int64, values []float64, conv func(float64) (T, error)) (Tensor, error) {
	out := make([]T, len(values))
	for i, v := range values {
		x, err := conv(v)
		if err != nil {
			return Tensor{}, fmt.Errorf("tensor %q element %d: %w", name, i, err)
		}
		out[i] = x
	}
	return NewTensor(name, shape, out)
}

func intConv[T int8 | uint8 | int16 | uint16 | int32 | uint32 | int64 | uint64](lo, hi float64) func(float64) (T, error) {
	return func(v float64) (T, error) {
		if v != math.Trunc(v) || v < lo || v > hi {
			return 0, fmt.Errorf("%v is not a %v", v, DTypeOf[T]())
		}
		return T(v), nil
	}
}

// NumElements returns the element count of t's shape (1 for a scalar).
func (t Tensor) NumElements() (int64, error) { return NumElements(t.Shape) }

// Validate checks that Data has exactly the size that DType and Shape call
// for.
func (t Tensor) Validate() error {
	n, err := NumElements(t.Shape)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	size, err := byteSize(t.DType, n)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	if int64(len(t.Data)) != size {
		return fmt.Errorf("tensor %q: %v%v needs %d bytes, has %d", t.Name, t.DType, t.Shape, size, len(t.Data))
	}
	return nil
}

// Values returns a copy of t's elements as []T; T must match t.DType.
func Values[T Element](t Tensor) ([]T, error) {
	if want := DTypeOf[T](); t.DType != want {
		return nil, fmt.Errorf("tensor %q is %v, not %v", t.Name, t.DType, want)
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	n, _ := t.NumElements()
	out := make([]T, n)
	if n == 0 {
		return out, nil
	}
	dst := unsafe.Slice((*byte)(unsafe.Pointer(&out[0])), len(t.Data))
	copy(dst, t.Data)
	if t.DType == Bool {
		// A Go bool must be 0 or 1; ONNX only promises zero/non-zero.
		for i, b := range dst {
			if b != 0 {
				dst[i] = 1
			}
		}
	}
	return out, nil
}

// Float64s converts the elements of any numeric dtype (floats, integers,
// bool) to float64, exactly except for 64-bit integers beyond 2^53. It is
// meant for comparing outputs.
func (t Tensor) Float64s() ([]float64, error) {
	switch t.DType {
	case Float32:
		return toFloat64[float32](t, func(v float32) float64 { return float64(v) })
	case Float64:
		return toFloat64[float64](t, func(v float64) float64 { return v })
	case Float16:
		return toFloat64[F16](t, F16.Float64)
	case BFloat16:
		return toFloat64[BF16](t, BF16.Float64)
	case Int8:
		return toFloat64[int8](t, func(v int8) float64 { return float64(v) })
	case Uint8:
		return toFloat64[uint8](t, func(v uint8) float64 { return float64(v) })
	case Int16:
		return toFloat64[int16](t, func(v int16) float64 { return float64(v) })
	case Uint16:
		return toFloat64[uint16](t, func(v uint16) float64 { return float64(v) })
	case Int32:
		return toFloat64[int32](t, func(v int32) float64 { return float64(v) })
	case Uint32:
		return toFloat64[uint32](t, func(v uint32) float64 { return float64(v) })
	case Int64:
		return toFloat64[int64](t, func(v int64) float64 { return float64(v) })
	case Uint64:
		return toFloat64[uint64](t, func(v uint64) float64 { return float64(v) })
	case Bool:
		return toFloat64[bool](t, func(v bool) float64 {
			if v {
				return 1
			}
			return 0
		})
	}
	return nil, fmt.Errorf("tensor %q: no conversion from %v to float64", t.Name, t.DType)
}

func toFloat64[T Element](t Tensor, conv func(T) float64) ([]float64, error) {
	vals, err := Values[T](t)
	if err != nil {
		return nil, err
	}
	out := make([]float64, len(vals))
	for i, v := range vals {
		out[i] = conv(v)
	}
	return out, nil
}
