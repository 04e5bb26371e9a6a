package export

import (
	"fmt"

	"github.com/onnxlora/onnxlora/graph"
)

// Float conversions of safetensors data, all through graph's single
// implementation of the 16-bit formats.

// BFloat16FromFloat32 narrows f to bfloat16 bits (the top half of a float32)
// with round-to-nearest-even (graph.BFloat16Bits). NaN stays a quiet NaN of
// the same sign, so a NaN whose payload lives only in the low bits does not
// become infinity.
func BFloat16FromFloat32(f float32) uint16 { return graph.BFloat16Bits(float64(f)) }

// BFloat16ToFloat32 widens bfloat16 bits to float32 exactly.
func BFloat16ToFloat32(b uint16) float32 { return float32(graph.BFloat16Value(b)) }

func notFloat(dt DType) error {
	return fmt.Errorf("dtype %s is not a float type (F16, BF16, F32, F64)", dt)
}

// DecodeFloat32 converts little-endian raw data of dtype dt to float32 (F64
// values are rounded to nearest even).
func DecodeFloat32(dt DType, raw []byte) ([]float32, error) {
	v, err := DecodeFloat64(dt, raw)
	if err != nil {
		return nil, err
	}
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float32(x)
	}
	return out, nil
}

// DecodeFloat64 converts little-endian raw data of dtype dt to float64.
func DecodeFloat64(dt DType, raw []byte) ([]float64, error) {
	gt, ok := graphFloatType[dt]
	if !ok {
		return nil, notFloat(dt)
	}
	if len(raw)%dt.Size() != 0 {
		return nil, fmt.Errorf("%d bytes is not a whole number of %s elements", len(raw), dt)
	}
	out := make([]float64, len(raw)/dt.Size())
	graph.DecodeFloatsInto(gt, out, raw)
	return out, nil
}

// EncodeFloat32 converts values to little-endian bytes of dtype dt (F16 and
// BF16 round to nearest even).
func EncodeFloat32(dt DType, values []float32) ([]byte, error) {
	f64 := make([]float64, len(values))
	for i, v := range values {
		f64[i] = float64(v)
	}
	return EncodeFloat64(dt, f64)
}

// EncodeFloat64 converts values to little-endian bytes of dtype dt, each
// rounded once to nearest even from float64 (F64 is exact).
func EncodeFloat64(dt DType, values []float64) ([]byte, error) {
	gt, ok := graphFloatType[dt]
	if !ok {
		return nil, notFloat(dt)
	}
	out := make([]byte, len(values)*dt.Size())
	graph.EncodeFloatsInto(gt, out, values)
	return out, nil
}

// graphFloatType maps the float dtypes to graph's element types, whose
// conversions these use.
var graphFloatType = map[DType]graph.DataType{
	DTypeF16: graph.Float16, DTypeBF16: graph.BFloat16, DTypeF32: graph.Float, DTypeF64: graph.Double,
}
