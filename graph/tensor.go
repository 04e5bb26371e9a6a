package graph

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// RawData returns t's elements as little-endian bytes in t's own type, read
// from raw_data, the typed fields, or the external data file, whichever holds
// them. The result may share memory with t.RawData: copy before changing it.
func (m *Model) RawData(t *onnxpb.TensorProto) ([]byte, error) {
	dt := DataType(t.GetDataType())
	size, err := ByteSize(dt, t.Dims)
	if err != nil {
		return nil, fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	if IsExternal(t) {
		r, _, err := m.externalReader(t)
		if err != nil {
			return nil, err
		}
		buf := make([]byte, size)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, fmt.Errorf("tensor %q: reading external data: %w", t.GetName(), err)
		}
		return buf, nil
	}
	if raw, ok, err := m.readInline(t); ok {
		return raw, err
	}
	if t.RawData != nil || size == 0 {
		if int64(len(t.RawData)) != size {
			return nil, fmt.Errorf("tensor %q: raw_data has %d bytes, but %v %v needs %d", t.GetName(), len(t.RawData), dt, t.Dims, size)
		}
		return t.RawData, nil
	}
	return typedToRaw(t, dt, size)
}

// typedToRaw encodes the typed fields (float_data, int32_data, ...) as raw
// little-endian bytes. The number of values is checked before anything is
// allocated, so a tiny file declaring a huge shape cannot exhaust memory.
func typedToRaw(t *onnxpb.TensorProto, dt DataType, size int64) ([]byte, error) {
	n, _ := NumElements(t.Dims)
	var have int
	field := "values"
	switch onnxpb.TensorProto_DataType(dt) {
	case onnxpb.TensorProto_FLOAT:
		have = len(t.FloatData)
	case onnxpb.TensorProto_COMPLEX64:
		have, n = len(t.FloatData), 2*n // real and imaginary parts
	case onnxpb.TensorProto_DOUBLE:
		have = len(t.DoubleData)
	case onnxpb.TensorProto_COMPLEX128:
		have, n = len(t.DoubleData), 2*n
	case onnxpb.TensorProto_INT64:
		have = len(t.Int64Data)
	case onnxpb.TensorProto_UINT32, onnxpb.TensorProto_UINT64:
		have = len(t.Uint64Data)
	default:
		bits := dt.BitSize()
		if bits > 32 {
			return nil, fmt.Errorf("tensor %q: %v data in typed fields is not supported", t.GetName(), dt)
		}
		have = len(t.Int32Data)
		if bits < 8 {
			// Sub-byte types are packed two or four to an int32_data entry.
			n, field = size, "packed values"
		}
	}
	if int64(have) != n {
		return nil, fmt.Errorf("tensor %q: %v %v needs %d %s, the tensor holds %d", t.GetName(), dt, t.Dims, n, field, have)
	}
	buf := make([]byte, size)
	switch onnxpb.TensorProto_DataType(dt) {
	case onnxpb.TensorProto_FLOAT, onnxpb.TensorProto_COMPLEX64:
		for i, v := range t.FloatData {
			binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(v))
		}
	case onnxpb.TensorProto_DOUBLE, onnxpb.TensorProto_COMPLEX128:
		for i, v := range t.DoubleData {
			binary.LittleEndian.PutUint64(buf[8*i:], math.Float64bits(v))
		}
	case onnxpb.TensorProto_INT64:
		for i, v := range t.Int64Data {
			binary.LittleEndian.PutUint64(buf[8*i:], uint64(v))
		}
	case onnxpb.TensorProto_UINT32, onnxpb.TensorProto_UINT64:
		w := dt.BitSize() / 8
		for i, v := range t.Uint64Data {
			putUint(buf[w*i:], w, v)
		}
	default:
		if dt.BitSize() < 8 {
			for i, v := range t.Int32Data {
				buf[i] = byte(v)
			}
			return buf, nil
		}
		w := dt.BitSize() / 8
		for i, v := range t.Int32Data {
			putUint(buf[w*i:], w, uint64(uint32(v)))
		}
	}
	return buf, nil
}

func putUint(b []byte, width int, v uint64) {
	for i := 0; i < width; i++ {
		b[i] = byte(v >> (8 * i))
	}
}

// Float64s decodes a floating-point tensor (FLOAT, FLOAT16, BFLOAT16, DOUBLE)
// to float64, exactly.
func (m *Model) Float64s(t *onnxpb.TensorProto) ([]float64, error) {
	dt := DataType(t.GetDataType())
	if !dt.IsFloat() {
		return nil, fmt.Errorf("tensor %q: %v is not a floating-point type", t.GetName(), dt)
	}
	raw, err := m.RawData(t)
	if err != nil {
		return nil, err
	}
	return DecodeFloats(dt, raw), nil
}

// Float32s decodes a floating-point tensor to float32. DOUBLE values are
// rounded to nearest even; the other types convert exactly.
func (m *Model) Float32s(t *onnxpb.TensorProto) ([]float32, error) {
	vals, err := m.Float64s(t)
	if err != nil {
		return nil, err
	}
	out := make([]float32, len(vals))
	for i, v := range vals {
		out[i] = float32(v)
	}
	return out, nil
}

// DecodeFloats decodes little-endian raw bytes of a floating-point type.
// The caller guarantees dt.IsFloat() and a length that is a multiple of the
// element size.
func DecodeFloats(dt DataType, raw []byte) []float64 {
	out := make([]float64, len(raw)/(dt.BitSize()/8))
	DecodeFloatsInto(dt, out, raw)
	return out
}

// EncodeFloats encodes values as little-endian raw bytes of a floating-point
// type, rounding each value once to nearest even.
func EncodeFloats(dt DataType, vals []float64) ([]byte, error) {
	if !dt.IsFloat() {
		return nil, fmt.Errorf("%v is not a floating-point type", dt)
	}
	buf := make([]byte, len(vals)*(dt.BitSize()/8))
	EncodeFloatsInto(dt, buf, vals)
	return buf, nil
}

// SetFloat64s replaces t's data with vals encoded in t's own type (rounded to
// nearest even), stored inline in raw_data. The element count must match t's
// dims. A tensor that pointed at external data stops doing so; Save decides
// again where it goes.
func SetFloat64s(t *onnxpb.TensorProto, vals []float64) error {
	dt := DataType(t.GetDataType())
	n, err := NumElements(t.Dims)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	if int64(len(vals)) != n {
		return fmt.Errorf("tensor %q: %d values for dims %v", t.GetName(), len(vals), t.Dims)
	}
	raw, err := EncodeFloats(dt, vals)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	setInline(t, raw)
	return nil
}

// SetRawData replaces t's data with raw little-endian bytes in t's own type.
func SetRawData(t *onnxpb.TensorProto, raw []byte) error {
	want, err := ByteSize(DataType(t.GetDataType()), t.Dims)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	if int64(len(raw)) != want {
		return fmt.Errorf("tensor %q: %d bytes for %v %v, want %d", t.GetName(), len(raw), DataType(t.GetDataType()), t.Dims, want)
	}
	setInline(t, raw)
	return nil
}

// NewFloatTensor builds an initializer of a floating-point type from float64
// values, rounding each once to dt.
func NewFloatTensor(name string, dt DataType, dims []int64, vals []float64) (*onnxpb.TensorProto, error) {
	t := &onnxpb.TensorProto{
		Name:     proto.String(name),
		DataType: proto.Int32(int32(dt)),
		Dims:     append([]int64(nil), dims...),
	}
	if err := SetFloat64s(t, vals); err != nil {
		return nil, err
	}
	return t, nil
}
