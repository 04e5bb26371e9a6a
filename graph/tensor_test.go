package graph

import (
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Values every tested type holds exactly: small integers and halves.
var exactVals = []float64{0, 1, -2, 0.5, 3.75, -1024, 0.125}

func le16(vals ...uint16) []byte {
	b := make([]byte, 2*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint16(b[2*i:], v)
	}
	return b
}

func le32f(vals ...float32) []byte {
	b := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

func le64f(vals ...float64) []byte {
	b := make([]byte, 8*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint64(b[8*i:], math.Float64bits(v))
	}
	return b
}

func TestTypedViews(t *testing.T) {
	// The same seven values stored every way ONNX allows, with the raw bytes
	// written out by hand: fp16 1.0 is 0x3c00, bf16 1.0 is 0x3f80, ...
	f16 := []uint16{0x0000, 0x3c00, 0xc000, 0x3800, 0x4380, 0xe400, 0x3000}
	bf16 := []uint16{0x0000, 0x3f80, 0xc000, 0x3f00, 0x4070, 0xc480, 0x3e00}
	f32 := []float32{0, 1, -2, 0.5, 3.75, -1024, 0.125}
	dims := []int64{7}
	i32 := func(u []uint16) []int32 {
		out := make([]int32, len(u))
		for i, v := range u {
			out[i] = int32(v)
		}
		return out
	}
	tests := []struct {
		name string
		t    *onnxpb.TensorProto
		raw  []byte
	}{
		{"float raw", rawTensor("a", Float, dims, le32f(f32...)), le32f(f32...)},
		{"float float_data", &onnxpb.TensorProto{Name: proto.String("b"), DataType: proto.Int32(int32(Float)), Dims: dims, FloatData: f32}, le32f(f32...)},
		{"float16 raw", rawTensor("c", Float16, dims, le16(f16...)), le16(f16...)},
		{"float16 int32_data", &onnxpb.TensorProto{Name: proto.String("d"), DataType: proto.Int32(int32(Float16)), Dims: dims, Int32Data: i32(f16)}, le16(f16...)},
		{"bfloat16 raw", rawTensor("e", BFloat16, dims, le16(bf16...)), le16(bf16...)},
		{"bfloat16 int32_data", &onnxpb.TensorProto{Name: proto.String("f"), DataType: proto.Int32(int32(BFloat16)), Dims: dims, Int32Data: i32(bf16)}, le16(bf16...)},
		{"double raw", rawTensor("g", Double, dims, le64f(exactVals...)), le64f(exactVals...)},
		{"double double_data", &onnxpb.TensorProto{Name: proto.String("h"), DataType: proto.Int32(int32(Double)), Dims: dims, DoubleData: exactVals}, le64f(exactVals...)},
	}
	m := NewModel(newModelProto(&onnxpb.GraphProto{}), "")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := m.RawData(tc.t)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(raw, tc.raw) {
				t.Fatalf("RawData = %x, want %x", raw, tc.raw)
			}
			f64, err := m.Float64s(tc.t)
			if err != nil {
				t.Fatal(err)
			}
			if !equalFloats(f64, exactVals) {
				t.Fatalf("Float64s = %v, want %v", f64, exactVals)
			}
			f32s, err := m.Float32s(tc.t)
			if err != nil {
				t.Fatal(err)
			}
			for i := range f32s {
				if float64(f32s[i]) != exactVals[i] {
					t.Fatalf("Float32s = %v, want %v", f32s, exactVals)
				}
			}
			// Writing values back stores them as raw_data in the same type
			// and drops the typed field.
			dt := tc.t.GetDataType()
			c := proto.Clone(tc.t).(*onnxpb.TensorProto)
			doubled := make([]float64, len(exactVals))
			for i, v := range exactVals {
				doubled[i] = 2 * v
			}
			if err := SetFloat64s(c, doubled); err != nil {
				t.Fatal(err)
			}
			if c.GetDataType() != dt || c.FloatData != nil || c.Int32Data != nil || c.DoubleData != nil {
				t.Fatalf("SetFloat64s left type %v or typed fields: %v", c.GetDataType(), c)
			}
			if int64(len(c.RawData)) != 7*int64(DataType(dt).BitSize()/8) {
				t.Fatalf("raw_data has %d bytes", len(c.RawData))
			}
			got, err := m.Float64s(c)
			if err != nil {
				t.Fatal(err)
			}
			if !equalFloats(got, doubled) {
				t.Fatalf("after SetFloat64s: %v, want %v", got, doubled)
			}
			// The original is untouched.
			if again, _ := m.Float64s(tc.t); !equalFloats(again, exactVals) {
				t.Fatalf("SetFloat64s on a clone changed the original")
			}
		})
	}
}

func equalFloats(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] && !(math.IsNaN(a[i]) && math.IsNaN(b[i])) {
			return false
		}
	}
	return true
}

func TestSetFloat64sRounds(t *testing.T) {
	// 1 + 2^-11 is a tie between fp16 1.0 (0x3c00, even) and 0x3c01;
	// 1 + 3*2^-11 is a tie between 0x3c01 and 0x3c02 (even).
	tt := &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float16)), Dims: []int64{3}}
	if err := SetFloat64s(tt, []float64{1 + 0x1p-11, 1 + 0x3p-11, 1e6}); err != nil {
		t.Fatal(err)
	}
	if want := le16(0x3c00, 0x3c02, 0x7c00); !bytes.Equal(tt.RawData, want) {
		t.Fatalf("raw_data = %x, want %x", tt.RawData, want)
	}
	// float32: 1 + 2^-24 is a tie between 1 and 1+2^-23; even is 1.
	tt = &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float)), Dims: []int64{1}}
	if err := SetFloat64s(tt, []float64{1 + 0x1p-24}); err != nil {
		t.Fatal(err)
	}
	if want := le32f(1); !bytes.Equal(tt.RawData, want) {
		t.Fatalf("raw_data = %x, want %x", tt.RawData, want)
	}
	// Float32s of a DOUBLE tensor rounds to nearest even.
	m := NewModel(newModelProto(&onnxpb.GraphProto{}), "")
	d := rawTensor("d", Double, []int64{2}, le64f(1+0x1p-24, 1+0x3p-24))
	f, err := m.Float32s(d)
	if err != nil {
		t.Fatal(err)
	}
	if f[0] != 1 || f[1] != 1+0x1p-22 {
		t.Fatalf("Float32s = %v", f)
	}
}

func TestTypedViewErrors(t *testing.T) {
	m := NewModel(newModelProto(&onnxpb.GraphProto{}), "")
	cases := []struct {
		name string
		t    *onnxpb.TensorProto
		want string
	}{
		{"not float", rawTensor("i", Int64, []int64{1}, make([]byte, 8)), "not a floating-point type"},
		{"short raw", rawTensor("s", Float, []int64{4}, make([]byte, 12)), "raw_data has 12 bytes"},
		{"long raw", rawTensor("l", Float16, []int64{4}, make([]byte, 10)), "raw_data has 10 bytes"},
		{"few floats", &onnxpb.TensorProto{Name: proto.String("f"), DataType: proto.Int32(int32(Float)), Dims: []int64{3}, FloatData: []float32{1}}, "needs 3 values"},
		{"few halves", &onnxpb.TensorProto{Name: proto.String("h"), DataType: proto.Int32(int32(Float16)), Dims: []int64{2, 2}, Int32Data: []int32{1, 2, 3}}, "needs 4 values"},
		// A huge declared shape with almost no data must be refused before
		// anything of that size is allocated.
		{"huge typed", &onnxpb.TensorProto{Name: proto.String("x"), DataType: proto.Int32(int32(Float)), Dims: []int64{1 << 40, 1 << 10}, FloatData: []float32{1}}, "needs"},
		{"negative dim", &onnxpb.TensorProto{Name: proto.String("n"), DataType: proto.Int32(int32(Float)), Dims: []int64{-1}, FloatData: []float32{1}}, "negative dimension"},
		{"overflow", &onnxpb.TensorProto{Name: proto.String("o"), DataType: proto.Int32(int32(Double)), Dims: []int64{1 << 31, 1 << 31, 1 << 31}}, "too many elements"},
	}
	for _, tc := range cases {
		_, err := m.Float64s(tc.t)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.t.GetName()) {
			t.Errorf("%s: Float64s error = %v, want one naming the tensor and saying %q", tc.name, err, tc.want)
		}
	}
	tt := rawTensor("w", Float, []int64{2}, make([]byte, 8))
	if err := SetFloat64s(tt, []float64{1}); err == nil {
		t.Error("SetFloat64s with too few values succeeded")
	}
	if err := SetRawData(tt, make([]byte, 7)); err == nil {
		t.Error("SetRawData with 7 bytes for 2 floats succeeded")
	}
	if err := SetFloat64s(rawTensor("i", Int32, []int64{1}, make([]byte, 4)), []float64{1}); err == nil {
		t.Error("SetFloat64s on an INT32 tensor succeeded")
	}
}

func TestByteSize(t *testing.T) {
	tests := []struct {
		dt   DataType
		dims []int64
		want int64
	}{
		{Float, []int64{2, 3}, 24},
		{Float16, nil, 2}, // a scalar has one element
		{Double, []int64{0, 5}, 0},
		{DataType(onnxpb.TensorProto_INT4), []int64{3}, 2}, // packed, rounded up
		{DataType(onnxpb.TensorProto_COMPLEX128), []int64{2}, 32},
	}
	for _, tc := range tests {
		if got, err := ByteSize(tc.dt, tc.dims); err != nil || got != tc.want {
			t.Errorf("ByteSize(%v, %v) = %d, %v; want %d", tc.dt, tc.dims, got, err, tc.want)
		}
	}
	for _, bad := range []struct {
		dt   DataType
		dims []int64
	}{
		{Float, []int64{-1}},
		{Float, []int64{1 << 32, 1 << 32}},
		{Float, []int64{math.MaxInt64, 2}},
		{DataType(onnxpb.TensorProto_COMPLEX128), []int64{1 << 56}}, // 2^63 bytes
		{String, []int64{1}},
	} {
		if got, err := ByteSize(bad.dt, bad.dims); err == nil {
			t.Errorf("ByteSize(%v, %v) = %d, want an error", bad.dt, bad.dims, got)
		}
	}
}

func TestExternalTypedView(t *testing.T) {
	dir := t.TempDir()
	data := append(make([]byte, 16), le16(0x3c00, 0xc000, 0x7c00)...)
	if err := os.WriteFile(filepath.Join(dir, "w.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	tt := &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float16)), Dims: []int64{3}}
	SetExternal(tt, "w.bin", 16, 6)
	m := NewModel(newModelProto(&onnxpb.GraphProto{Initializer: []*onnxpb.TensorProto{tt}}), dir)
	defer m.Close()
	got, err := m.Float64s(tt)
	if err != nil {
		t.Fatal(err)
	}
	if !equalFloats(got, []float64{1, -2, math.Inf(1)}) {
		t.Fatalf("Float64s = %v", got)
	}
	ref, err := m.ExternalRef(tt)
	if err != nil || ref.Offset != 16 || ref.Length != 6 || ref.Location != "w.bin" || ref.Path != filepath.Join(dir, "w.bin") {
		t.Fatalf("ExternalRef = %+v, %v", ref, err)
	}
	// SetFloat64s moves the tensor inline; the file is untouched.
	if err := SetFloat64s(tt, []float64{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if IsExternal(tt) || tt.ExternalData != nil || !bytes.Equal(tt.RawData, le16(0x3c00, 0x4000, 0x4200)) {
		t.Fatalf("after SetFloat64s: %v", tt)
	}
	if now, _ := os.ReadFile(filepath.Join(dir, "w.bin")); !bytes.Equal(now, data) {
		t.Fatal("SetFloat64s changed the external data file")
	}
}

func TestRawDataTypedFields(t *testing.T) {
	typed := func(dt onnxpb.TensorProto_DataType, dims []int64, fill func(*onnxpb.TensorProto)) *onnxpb.TensorProto {
		tp := &onnxpb.TensorProto{Name: proto.String(dt.String()), DataType: proto.Int32(int32(dt)), Dims: dims}
		fill(tp)
		return tp
	}
	tests := []struct {
		t    *onnxpb.TensorProto
		want []byte
	}{
		{typed(onnxpb.TensorProto_INT8, []int64{3}, func(x *onnxpb.TensorProto) { x.Int32Data = []int32{-1, 2, -128} }), []byte{0xff, 0x02, 0x80}},
		{typed(onnxpb.TensorProto_BOOL, []int64{2}, func(x *onnxpb.TensorProto) { x.Int32Data = []int32{1, 0} }), []byte{1, 0}},
		{typed(onnxpb.TensorProto_INT16, []int64{2}, func(x *onnxpb.TensorProto) { x.Int32Data = []int32{-2, 0x1234} }), []byte{0xfe, 0xff, 0x34, 0x12}},
		{typed(onnxpb.TensorProto_INT32, []int64{1}, func(x *onnxpb.TensorProto) { x.Int32Data = []int32{-2} }), []byte{0xfe, 0xff, 0xff, 0xff}},
		{typed(onnxpb.TensorProto_INT64, []int64{1}, func(x *onnxpb.TensorProto) { x.Int64Data = []int64{-2} }), []byte{0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
		{typed(onnxpb.TensorProto_UINT32, []int64{1}, func(x *onnxpb.TensorProto) { x.Uint64Data = []uint64{0xdeadbeef} }), []byte{0xef, 0xbe, 0xad, 0xde}},
		{typed(onnxpb.TensorProto_UINT64, []int64{1}, func(x *onnxpb.TensorProto) { x.Uint64Data = []uint64{1 << 63} }), []byte{0, 0, 0, 0, 0, 0, 0, 0x80}},
		// Three INT4 values packed two to an int32_data entry, low nibble first.
		{typed(onnxpb.TensorProto_INT4, []int64{3}, func(x *onnxpb.TensorProto) { x.Int32Data = []int32{0x21, 0x03} }), []byte{0x21, 0x03}},
		// COMPLEX64 is pairs of floats in float_data, COMPLEX128 pairs of doubles.
		{typed(onnxpb.TensorProto_COMPLEX64, []int64{2}, func(x *onnxpb.TensorProto) { x.FloatData = []float32{1, 2, 3, 4} }), le32f(1, 2, 3, 4)},
		{typed(onnxpb.TensorProto_COMPLEX128, []int64{1}, func(x *onnxpb.TensorProto) { x.DoubleData = []float64{1, -1} }), le64f(1, -1)},
		{typed(onnxpb.TensorProto_FLOAT, []int64{0}, func(x *onnxpb.TensorProto) {}), nil},
	}
	m := NewModel(newModelProto(&onnxpb.GraphProto{}), "")
	for _, tc := range tests {
		got, err := m.RawData(tc.t)
		if err != nil || !bytes.Equal(got, tc.want) {
			t.Errorf("%s: RawData = %x, %v; want %x", tc.t.GetName(), got, err, tc.want)
		}
	}
	// Wrong counts are errors, not short or padded buffers.
	for _, bad := range []*onnxpb.TensorProto{
		typed(onnxpb.TensorProto_INT4, []int64{3}, func(x *onnxpb.TensorProto) { x.Int32Data = []int32{0x21, 0x03, 0} }),
		typed(onnxpb.TensorProto_COMPLEX64, []int64{2}, func(x *onnxpb.TensorProto) { x.FloatData = []float32{1, 2} }),
		typed(onnxpb.TensorProto_UINT64, []int64{2}, func(x *onnxpb.TensorProto) { x.Uint64Data = []uint64{1} }),
		typed(onnxpb.TensorProto_FLOAT, nil, func(x *onnxpb.TensorProto) {}), // a scalar needs one value
	} {
		if got, err := m.RawData(bad); err == nil {
			t.Errorf("%s %v: RawData = %x, want an error", bad.GetName(), bad.Dims, got)
		}
	}
}
