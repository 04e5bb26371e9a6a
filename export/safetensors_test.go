package export

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/x448/float16"
)

type dtypesExpected struct {
	Names          []string            `json:"names"`
	Metadata       map[string]string   `json:"metadata"`
	Shapes         map[string][]int    `json:"shapes"`
	DTypes         map[string]DType    `json:"dtypes"`
	Values         map[string][]string `json:"values"`
	RawHex         map[string]string   `json:"raw_hex"`
	NarrowF32Bits  []uint32            `json:"narrow_f32_bits"`
	NarrowBF16Bits []uint16            `json:"narrow_bf16_bits"`
	NarrowF16Bits  []uint16            `json:"narrow_f16_bits"`
}

func loadJSON(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func sameFloat(a, b float64) bool {
	if math.IsNaN(a) || math.IsNaN(b) {
		return math.IsNaN(a) && math.IsNaN(b)
	}
	return a == b && math.Signbit(a) == math.Signbit(b)
}

// TestDTypesFixture checks the reader against a file and values written by
// the Python fixture script with PyTorch.
func TestDTypesFixture(t *testing.T) {
	var want dtypesExpected
	loadJSON(t, "testdata/dtypes_expected.json", &want)
	f, err := OpenSafetensors("testdata/dtypes.safetensors")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !reflect.DeepEqual(f.Names(), want.Names) {
		t.Fatalf("names %v, want %v", f.Names(), want.Names)
	}
	if !reflect.DeepEqual(f.Metadata(), want.Metadata) {
		t.Errorf("metadata %v, want %v", f.Metadata(), want.Metadata)
	}
	for _, name := range want.Names {
		info, ok := f.Tensor(name)
		if !ok {
			t.Fatalf("tensor %q missing", name)
		}
		if info.DType != want.DTypes[name] || !reflect.DeepEqual(info.Shape, want.Shapes[name]) {
			t.Errorf("%s: %s %v, want %s %v", name, info.DType, info.Shape, want.DTypes[name], want.Shapes[name])
		}
		raw, err := f.ReadRaw(name)
		if err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(raw); got != want.RawHex[name] {
			t.Errorf("%s raw %s, want %s", name, got, want.RawHex[name])
		}
		vals, isFloat := want.Values[name]
		if !isFloat {
			if _, err := f.ReadFloat32(name); err == nil {
				t.Errorf("%s: ReadFloat32 of %s should fail", name, info.DType)
			}
			continue
		}
		got64, err := f.ReadFloat64(name)
		if err != nil {
			t.Fatal(err)
		}
		got32, err := f.ReadFloat32(name)
		if err != nil {
			t.Fatal(err)
		}
		if len(got64) != len(vals) || len(got32) != len(vals) {
			t.Fatalf("%s: %d/%d values, want %d", name, len(got64), len(got32), len(vals))
		}
		for i, s := range vals {
			w, err := strconv.ParseFloat(s, 64)
			if err != nil {
				t.Fatal(err)
			}
			if !sameFloat(got64[i], w) {
				t.Errorf("%s[%d] float64 %v, want %v", name, i, got64[i], w)
			}
			if !sameFloat(float64(got32[i]), float64(float32(w))) {
				t.Errorf("%s[%d] float32 %v, want %v", name, i, got32[i], float32(w))
			}
		}
	}
}

// TestNarrowingMatchesTorch compares our float32 -> bfloat16/float16
// rounding with PyTorch's on halfway cases, overflow, subnormals and NaN.
func TestNarrowingMatchesTorch(t *testing.T) {
	var want dtypesExpected
	loadJSON(t, "testdata/dtypes_expected.json", &want)
	for i, b := range want.NarrowF32Bits {
		f := math.Float32frombits(b)
		bf := BFloat16FromFloat32(f)
		h := float16.Fromfloat32(f).Bits()
		if f != f {
			// torch's NaN payloads vary by code path; only NaN-ness matters.
			if v := BFloat16ToFloat32(bf); v == v {
				t.Errorf("bf16(%#08x) = %#04x, not NaN", b, bf)
			}
			if !float16.Frombits(h).IsNaN() {
				t.Errorf("f16(%#08x) = %#04x, not NaN", b, h)
			}
			continue
		}
		if bf != want.NarrowBF16Bits[i] {
			t.Errorf("bf16(%#08x) = %#04x, torch %#04x", b, bf, want.NarrowBF16Bits[i])
		}
		if h != want.NarrowF16Bits[i] {
			t.Errorf("f16(%#08x) = %#04x, torch %#04x", b, h, want.NarrowF16Bits[i])
		}
	}
	// A NaN with payload only in the low half must not turn into infinity.
	if v := BFloat16ToFloat32(BFloat16FromFloat32(math.Float32frombits(0x7f800001))); v == v {
		t.Errorf("low-payload NaN narrowed to %v", v)
	}
	if got := BFloat16FromFloat32(float32(math.Copysign(0, -1))); got != 0x8000 {
		t.Errorf("bf16(-0) = %#04x", got)
	}
}

// rewrite reads every tensor of f and writes them back with our writer.
func rewrite(t *testing.T, f *SafetensorsFile) []byte {
	t.Helper()
	var ts []TensorData
	for _, name := range f.Names() {
		info, _ := f.Tensor(name)
		raw, err := f.ReadRaw(name)
		if err != nil {
			t.Fatal(err)
		}
		ts = append(ts, TensorData{Name: name, DType: info.DType, Shape: info.Shape, Data: raw})
	}
	var buf bytes.Buffer
	if err := WriteSafetensorsTo(&buf, ts, f.Metadata()); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestWriterMatchesFixtureBytes: rewriting the Python-made files must give
// the same bytes (ordering, offsets, compact JSON, space padding).
func TestWriterMatchesFixtureBytes(t *testing.T) {
	for _, path := range []string{"testdata/dtypes.safetensors", "testdata/peft_adapter/adapter_model.safetensors"} {
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		f, err := OpenSafetensors(path)
		if err != nil {
			t.Fatal(err)
		}
		got := rewrite(t, f)
		f.Close()
		if !bytes.Equal(got, want) {
			t.Errorf("%s: rewrite differs\n got %q\nwant %q", path, got[:min(len(got), 200)], want[:min(len(want), 200)])
		}
	}
}

func f32le(vals ...float32) []byte {
	b := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

// TestWriterReferenceVectors uses byte vectors from the reference
// implementation's own tests.
func TestWriterReferenceVectors(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteSafetensorsTo(&buf, nil, nil); err != nil {
		t.Fatal(err)
	}
	if want := []byte{8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '}; !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("empty: %v", buf.Bytes())
	}
	buf.Reset()
	if err := WriteSafetensorsTo(&buf, nil, map[string]string{"framework": "pt"}); err != nil {
		t.Fatal(err)
	}
	want := append([]byte{40, 0, 0, 0, 0, 0, 0, 0}, `{"__metadata__":{"framework":"pt"}}     `...)
	if !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("metadata only: %q", buf.Bytes())
	}
	buf.Reset()
	ts := []TensorData{{Name: "attn0", DType: DTypeF32, Shape: []int{1, 1, 2, 3}, Data: f32le(0, 1, 2, 3, 4, 5)}}
	if err := WriteSafetensorsTo(&buf, ts, nil); err != nil {
		t.Fatal(err)
	}
	want = append([]byte{72, 0, 0, 0, 0, 0, 0, 0}, `{"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}}       `...)
	want = append(want, f32le(0, 1, 2, 3, 4, 5)...)
	if !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("forced alignment:\n got %q\nwant %q", buf.Bytes(), want)
	}
}

func TestWriterOrderAndEscaping(t *testing.T) {
	ts := []TensorData{
		{Name: "b", DType: DTypeU8, Shape: []int{3}, Data: []byte{1, 2, 3}},
		{Name: "a<&>\"\\\n\x01é", DType: DTypeF64, Shape: []int{}, Data: make([]byte, 8)},
		{Name: "a", DType: DTypeU8, Shape: []int{1}, Data: []byte{9}},
		{Name: "c", DType: DTypeBF16, Shape: []int{2}, Data: []byte{1, 2, 3, 4}},
	}
	var buf bytes.Buffer
	if err := WriteSafetensorsTo(&buf, ts, map[string]string{"z": "1", "a": "2"}); err != nil {
		t.Fatal(err)
	}
	n := binary.LittleEndian.Uint64(buf.Bytes())
	header := string(buf.Bytes()[8 : 8+n])
	wantHeader := `{"__metadata__":{"a":"2","z":"1"},"a<&>\"\\\n\u0001é":{"dtype":"F64","shape":[],"data_offsets":[0,8]},` +
		`"c":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"U8","shape":[1],"data_offsets":[12,13]},` +
		`"b":{"dtype":"U8","shape":[3],"data_offsets":[13,16]}}`
	if strings.TrimRight(header, " ") != wantHeader || len(header)%8 != 0 {
		t.Errorf("header\n got %q\nwant %q", header, wantHeader)
	}
	f, err := ParseSafetensors(bytes.NewReader(buf.Bytes()), int64(buf.Len()), "mem")
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range ts {
		raw, err := f.ReadRaw(in.Name)
		if err != nil || !bytes.Equal(raw, in.Data) {
			t.Errorf("%q: %v %v", in.Name, raw, err)
		}
	}
}

// TestRoundTrip writes random tensors of every dtype to a file and reads
// them back, leaving no temporary files behind.
func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	var ts []TensorData
	for dt := range dtypeInfo {
		for k, shape := range [][]int{{}, {3}, {2, 5}, {0, 4}, {2, 1, 3}} {
			n, _ := byteSize(dt, shape)
			data := make([]byte, n)
			rng.Read(data)
			ts = append(ts, TensorData{Name: string(dt) + "." + strconv.Itoa(k), DType: dt, Shape: shape, Data: data})
		}
	}
	meta := map[string]string{"format": "pt", "ünïcode": "ok"}
	dir := t.TempDir()
	path := filepath.Join(dir, "x.safetensors")
	if err := WriteSafetensors(path, ts, meta); err != nil {
		t.Fatal(err)
	}
	// Writing twice gives identical bytes.
	first, _ := os.ReadFile(path)
	rng.Shuffle(len(ts), func(i, j int) { ts[i], ts[j] = ts[j], ts[i] })
	if err := WriteSafetensors(path, ts, meta); err != nil {
		t.Fatal(err)
	}
	second, _ := os.ReadFile(path)
	if !bytes.Equal(first, second) {
		t.Error("writer output depends on input order")
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o644 {
		t.Errorf("mode %v", st.Mode())
	}
	f, err := OpenSafetensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !reflect.DeepEqual(f.Metadata(), meta) {
		t.Errorf("metadata %v", f.Metadata())
	}
	if len(f.Names()) != len(ts) {
		t.Fatalf("%d tensors, want %d", len(f.Names()), len(ts))
	}
	for _, in := range ts {
		info, ok := f.Tensor(in.Name)
		if !ok || info.DType != in.DType || !reflect.DeepEqual(info.Shape, in.Shape) {
			t.Fatalf("%s: %+v", in.Name, info)
		}
		raw, err := f.ReadRaw(in.Name)
		if err != nil || !bytes.Equal(raw, in.Data) {
			t.Fatalf("%s: data differs (%v)", in.Name, err)
		}
		if info.Begin%int64(in.DType.Size()) != 0 {
			t.Errorf("%s: offset %d not aligned", in.Name, info.Begin)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("leftover files: %v", entries)
	}
}

func TestFloatConversionsRoundTrip(t *testing.T) {
	vals := []float32{0, 1, -2.5, 0.1, 3e38, float32(math.Inf(-1)), 1e-40}
	for _, dt := range []DType{DTypeF16, DTypeBF16, DTypeF32, DTypeF64} {
		tensor, err := NewFloat32Tensor("x", dt, []int{len(vals)}, vals)
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeFloat32(dt, tensor.Data)
		if err != nil {
			t.Fatal(err)
		}
		for i, v := range vals {
			var want float32
			switch dt {
			case DTypeF16:
				want = float16.Fromfloat32(v).Float32()
			case DTypeBF16:
				want = BFloat16ToFloat32(BFloat16FromFloat32(v))
			default:
				want = v
			}
			if got[i] != want {
				t.Errorf("%s[%d] = %v, want %v", dt, i, got[i], want)
			}
		}
	}
	b, _ := EncodeFloat64(DTypeF64, []float64{math.Pi})
	if v, _ := DecodeFloat64(DTypeF64, b); v[0] != math.Pi {
		t.Errorf("f64 round trip %v", v)
	}
	if _, err := NewFloat32Tensor("x", DTypeF32, []int{2, 2}, vals); err == nil {
		t.Error("shape/value count mismatch accepted")
	}
	if _, err := EncodeFloat32(DTypeI32, vals); err == nil {
		t.Error("encoding floats as I32 accepted")
	}
}

func TestWriterRejects(t *testing.T) {
	good := TensorData{Name: "a", DType: DTypeF32, Shape: []int{2}, Data: make([]byte, 8)}
	cases := map[string][]TensorData{
		"reserved":  {{Name: "__metadata__", DType: DTypeU8, Shape: []int{1}, Data: []byte{0}}},
		"duplicate": {good, good},
		"dtype":     {{Name: "x", DType: "F4", Shape: []int{2}, Data: []byte{0}}},
		"size":      {{Name: "x", DType: DTypeF32, Shape: []int{3}, Data: make([]byte, 8)}},
		"negative":  {{Name: "x", DType: DTypeF32, Shape: []int{-1}, Data: nil}},
		"utf8":      {{Name: "\xff", DType: DTypeU8, Shape: []int{1}, Data: []byte{0}}},
	}
	for name, ts := range cases {
		dir := t.TempDir()
		path := filepath.Join(dir, "out.safetensors")
		if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
		err := WriteSafetensors(path, ts, nil)
		var fe *FormatError
		if !errors.As(err, &fe) || !strings.Contains(err.Error(), path) {
			t.Errorf("%s: error %v", name, err)
		}
		if data, _ := os.ReadFile(path); string(data) != "old" {
			t.Errorf("%s: existing file changed", name)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 1 {
			t.Errorf("%s: leftover files %v", name, entries)
		}
	}
	// A write error midway (here: the folder does not exist) leaves nothing.
	if err := WriteSafetensors(filepath.Join(t.TempDir(), "missing", "x.safetensors"), []TensorData{good}, nil); err == nil {
		t.Error("write into a missing folder succeeded")
	}
}

// failingWriter fails after n bytes, to test partial-write cleanup.
type failingWriter struct{ n int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) > w.n {
		return 0, errors.New("disk full")
	}
	w.n -= len(p)
	return len(p), nil
}

func TestAtomicWriteCleansUp(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	err := writeFileAtomic(path, func(w io.Writer) error {
		w.Write([]byte("partial"))
		return errors.New("boom")
	})
	if err == nil {
		t.Fatal("no error")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("leftover files %v", entries)
	}
	if err := WriteSafetensorsTo(&failingWriter{n: 10}, []TensorData{{Name: "a", DType: DTypeU8, Shape: []int{1}, Data: []byte{1}}}, nil); err == nil {
		t.Error("writer error not reported")
	}
}

// file builds a safetensors byte image from a raw header and data.
func file(header string, data []byte) []byte {
	b := make([]byte, 8, 8+len(header)+len(data))
	binary.LittleEndian.PutUint64(b, uint64(len(header)))
	return append(append(b, header...), data...)
}

func TestReaderValidation(t *testing.T) {
	hugeLen := make([]byte, 16)
	binary.LittleEndian.PutUint64(hugeLen, 200_000_000)
	overLen := make([]byte, 16)
	binary.LittleEndian.PutUint64(overLen, 9)
	cases := []struct {
		name, want string
		data       []byte
	}{
		{"short", "shorter than the 8-byte header length", []byte{1, 2, 3}},
		{"huge header", "exceeds the 100000000-byte limit", hugeLen},
		{"header past end", "exceeds the 8 bytes after", overLen},
		{"utf8", "not valid UTF-8", file("{\"\xff\":1}", nil)},
		{"start", "does not start with '{'", file(` {}`, nil)},
		{"json", "header JSON", file(`{"a":`, nil)},
		{"trailing", "after the header object", file(`{} x`, nil)},
		{"trailing NUL", "after the header object", file("{}\x00", nil)},
		{"dup tensor", `duplicate tensor name "a"`, file(`{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}`, nil)},
		{"dup metadata", `duplicate "__metadata__"`, file(`{"__metadata__":{},"__metadata__":{}}`, nil)},
		{"metadata type", "must be a string", file(`{"__metadata__":{"a":1}}`, nil)},
		{"metadata obj", "must be an object of strings", file(`{"__metadata__":[1]}`, nil)},
		{"dtype", `unsupported dtype "F4"`, file(`{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}`, []byte{0})},
		{"unknown field", `unknown field "x"`, file(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}`, []byte{0})},
		{"no dtype", "missing dtype", file(`{"a":{"shape":[1],"data_offsets":[0,1]}}`, []byte{0})},
		{"no shape", "missing shape", file(`{"a":{"dtype":"U8","data_offsets":[0,1]}}`, []byte{0})},
		{"no offsets", "missing data_offsets", file(`{"a":{"dtype":"U8","shape":[1]}}`, []byte{0})},
		{"entry type", "must be an object", file(`{"a":[1]}`, nil)},
		{"negative dim", "not a non-negative 64-bit integer", file(`{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}`, []byte{0})},
		{"float dim", "not a non-negative 64-bit integer", file(`{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}`, []byte{0})},
		{"string dim", "array of non-negative integers", file(`{"a":{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}}`, []byte{0})},
		{"offsets len", "exactly 2 elements", file(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}`, []byte{0})},
		{"offsets short", "exactly 2 elements", file(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}}`, []byte{0})},
		{"reversed", "end before they begin", file(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}`, []byte{0})},
		{"overlap", "overlap the previous tensor", file(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}`, []byte{0, 0, 0})},
		{"gap", "leave a gap", file(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, []byte{0, 0})},
		{"span", "span 2 bytes but shape [1] of F32 needs 4", file(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,2]}}`, []byte{0, 0})},
		{"past end", "run past the 2-byte data section", file(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, []byte{0, 0})},
		{"uncovered", "trailing bytes not described", file(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, []byte{0, 0})},
		{"overflow", "overflows the byte count", file(`{"a":{"dtype":"F64","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}`, nil)},
		{"overflow dtype", "overflows the byte count", file(`{"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}}`, nil)},
		{"huge offsets", "are too large", file(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}}`, nil)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.safetensors")
			if err := os.WriteFile(path, c.data, 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := OpenSafetensors(path)
			if err == nil {
				f.Close()
				t.Fatalf("accepted")
			}
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("error %T %v is not a *FormatError", err, err)
			}
			msg := err.Error()
			if !strings.Contains(msg, c.want) || !strings.HasPrefix(msg, "safetensors "+path+": ") || strings.Contains(msg, "\n") {
				t.Errorf("error %q, want one line naming the file and containing %q", msg, c.want)
			}
		})
	}
}

func TestReaderAcceptsEdgeCases(t *testing.T) {
	for name, data := range map[string][]byte{
		"empty object":   file(`{}`, nil),
		"null metadata":  file(`{"__metadata__":null}`, nil),
		"padding":        file(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}    `, []byte{7}),
		"any key order":  file(`{"b":{"data_offsets":[1,2],"shape":[1],"dtype":"U8"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, []byte{7, 8}),
		"zero-size pair": file(`{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0,5],"data_offsets":[0,0]}}`, nil),
	} {
		f, err := ParseSafetensors(bytes.NewReader(data), int64(len(data)), name)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		for _, n := range f.Names() {
			if _, err := f.ReadRaw(n); err != nil {
				t.Errorf("%s: %v", name, err)
			}
		}
	}
}

func TestReadErrors(t *testing.T) {
	f, err := OpenSafetensors("testdata/dtypes.safetensors")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadRaw("nope"); err == nil || !strings.Contains(err.Error(), `no tensor named "nope"`) {
		t.Errorf("missing tensor: %v", err)
	}
	if _, err := f.ReadFloat64("i64"); err == nil || !strings.Contains(err.Error(), "not a float type") {
		t.Errorf("int as float: %v", err)
	}
	if _, err := OpenSafetensors("testdata/does-not-exist"); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing file: %v", err)
	}
	if _, err := OpenSafetensors("testdata"); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("folder: %v", err)
	}
}

// countingReaderAt records how many bytes were read, to check laziness.
type countingReaderAt struct {
	r *bytes.Reader
	n atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

func TestReaderIsLazy(t *testing.T) {
	big := make([]byte, 1<<20)
	var buf bytes.Buffer
	err := WriteSafetensorsTo(&buf, []TensorData{
		{Name: "big", DType: DTypeU8, Shape: []int{len(big)}, Data: big},
		{Name: "small", DType: DTypeF32, Shape: []int{2}, Data: f32le(1, 2)},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cr := &countingReaderAt{r: bytes.NewReader(buf.Bytes())}
	f, err := ParseSafetensors(cr, int64(buf.Len()), "mem")
	if err != nil {
		t.Fatal(err)
	}
	if n := cr.n.Load(); n > 4096 {
		t.Errorf("parsing read %d bytes", n)
	}
	before := cr.n.Load()
	v, err := f.ReadFloat32("small")
	if err != nil || !reflect.DeepEqual(v, []float32{1, 2}) {
		t.Fatalf("small: %v %v", v, err)
	}
	if n := cr.n.Load() - before; n != 8 {
		t.Errorf("reading an 8-byte tensor read %d bytes", n)
	}
}

func FuzzSafetensorsRead(f *testing.F) {
	for _, p := range []string{"testdata/dtypes.safetensors", "testdata/peft_adapter/adapter_model.safetensors"} {
		if data, err := os.ReadFile(p); err == nil {
			f.Add(data)
		}
	}
	f.Add(file(`{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"__metadata__":{"k":"v"}}`, []byte{1, 2, 3, 4}))
	f.Add(file(`{"a":{"dtype":"F64","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}`, nil))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		sf, err := ParseSafetensors(bytes.NewReader(data), int64(len(data)), "fuzz")
		if err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("bad error %T %q", err, err)
			}
			return
		}
		var ts []TensorData
		for _, name := range sf.Names() {
			info, _ := sf.Tensor(name)
			raw, err := sf.ReadRaw(name)
			if err != nil {
				t.Fatalf("validated tensor %q unreadable: %v", name, err)
			}
			if int64(len(raw)) != info.End-info.Begin {
				t.Fatalf("tensor %q: %d bytes", name, len(raw))
			}
			if info.DType.IsFloat() {
				if _, err := sf.ReadFloat64(name); err != nil {
					t.Fatal(err)
				}
			}
			ts = append(ts, TensorData{Name: name, DType: info.DType, Shape: info.Shape, Data: raw})
		}
		// Whatever we accept, we can write back and read again unchanged.
		var buf bytes.Buffer
		if err := WriteSafetensorsTo(&buf, ts, sf.Metadata()); err != nil {
			t.Fatalf("rewrite: %v", err)
		}
		again, err := ParseSafetensors(bytes.NewReader(buf.Bytes()), int64(buf.Len()), "rewrite")
		if err != nil {
			t.Fatalf("rewrite unreadable: %v", err)
		}
		if !reflect.DeepEqual(again.Names(), sf.Names()) || len(again.Metadata()) != len(sf.Metadata()) {
			t.Fatal("rewrite changed names or metadata")
		}
		for _, in := range ts {
			raw, err := again.ReadRaw(in.Name)
			if err != nil || !bytes.Equal(raw, in.Data) {
				t.Fatalf("rewrite changed %q", in.Name)
			}
		}
	})
}

// EncodeFloat64 rounds once from float64: 1 + 2^-11 + 2^-40 lies just above
// the tie between two halves (and two bfloat16s, for 1 + 2^-8 + 2^-40), so it
// rounds up, where going through float32 first would make it the tie itself
// and round to even (down).
func TestEncodeFloat64RoundsOnce(t *testing.T) {
	for _, tc := range []struct {
		dt   DType
		v    float64
		want uint16
	}{
		{DTypeF16, 1 + 0x1p-11 + 0x1p-40, 0x3c01},
		{DTypeF16, 1 + 0x1p-11, 0x3c00},
		{DTypeBF16, 1 + 0x1p-8 + 0x1p-40, 0x3f81},
		{DTypeBF16, 1 + 0x1p-8, 0x3f80},
	} {
		b, err := EncodeFloat64(tc.dt, []float64{tc.v})
		if err != nil {
			t.Fatal(err)
		}
		if got := binary.LittleEndian.Uint16(b); got != tc.want {
			t.Errorf("EncodeFloat64(%s, %v) = %#04x, want %#04x", tc.dt, tc.v, got, tc.want)
		}
	}
	if _, err := EncodeFloat64(DTypeI32, []float64{1}); err == nil {
		t.Error("EncodeFloat64 to I32 succeeded")
	}
	if _, err := DecodeFloat64(DTypeF16, []byte{1, 2, 3}); err == nil {
		t.Error("DecodeFloat64 of 3 bytes of F16 succeeded")
	}
}
