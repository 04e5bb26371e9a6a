package export

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"unsafe"

	flatbuffers "github.com/google/flatbuffers/go"

	"github.com/onnxlora/onnxlora/graph"
)

// adaptersDir holds the files testdata/adapters/generate.py writes with
// Python's flatbuffers package.
var adaptersDir = filepath.Join("..", "testdata", "adapters")

// pyAdapter is one file as generate.py decoded it.
type pyAdapter struct {
	FormatVersion  int32 `json:"format_version"`
	AdapterVersion int32 `json:"adapter_version"`
	ModelVersion   int32 `json:"model_version"`
	Params         []struct {
		Name       string  `json:"name"`
		DataType   int32   `json:"data_type"`
		Dims       []int64 `json:"dims"`
		Data       string  `json:"data"`
		DataOffset int     `json:"data_offset"`
	} `json:"params"`
}

func readPyExpected(t *testing.T) map[string]pyAdapter {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(adaptersDir, "adapters_expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var want map[string]pyAdapter
	if err := json.Unmarshal(raw, &want); err != nil {
		t.Fatal(err)
	}
	if len(want) != 3 {
		t.Fatalf("adapters_expected.json has %d files, want 3", len(want))
	}
	return want
}

// checkSame compares a Go-decoded adapter with a Python-decoded one.
func checkSame(t *testing.T, label string, got *OnnxAdapter, want pyAdapter) {
	t.Helper()
	if got.FormatVersion != want.FormatVersion || got.AdapterVersion != want.AdapterVersion || got.ModelVersion != want.ModelVersion {
		t.Errorf("%s: versions %d/%d/%d, want %d/%d/%d", label, got.FormatVersion, got.AdapterVersion, got.ModelVersion,
			want.FormatVersion, want.AdapterVersion, want.ModelVersion)
	}
	if len(got.Params) != len(want.Params) {
		t.Fatalf("%s: %d params, want %d", label, len(got.Params), len(want.Params))
	}
	for i, w := range want.Params {
		g := got.Params[i]
		if g.Name != w.Name || int32(g.DataType) != w.DataType || !reflect.DeepEqual(g.Dims, append([]int64{}, w.Dims...)) {
			t.Errorf("%s param %d: %q %v %v, want %q %v %v", label, i, g.Name, g.DataType, g.Dims, w.Name, graph.DataType(w.DataType), w.Dims)
		}
		if hex.EncodeToString(g.Data) != w.Data {
			t.Errorf("%s param %q: data %x, want %s", label, g.Name, g.Data, w.Data)
		}
	}
}

func TestReadOnnxAdapterWrittenByPython(t *testing.T) {
	for name, want := range readPyExpected(t) {
		a, err := ReadOnnxAdapter(filepath.Join(adaptersDir, name))
		if err != nil {
			t.Fatal(err)
		}
		checkSame(t, name, a, want)
	}
}

// dataOffset returns where p.Data starts inside buf (it aliases buf).
func dataOffset(buf []byte, p *OnnxAdapterParam) int {
	if len(p.Data) == 0 {
		return -1
	}
	return int(uintptr(unsafe.Pointer(&p.Data[0])) - uintptr(unsafe.Pointer(&buf[0])))
}

func TestOnnxAdapterRoundTrip(t *testing.T) {
	for name, want := range readPyExpected(t) {
		a, err := ReadOnnxAdapter(filepath.Join(adaptersDir, name))
		if err != nil {
			t.Fatal(err)
		}
		buf, err := a.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		b, err := ParseOnnxAdapter(buf, "marshalled")
		if err != nil {
			t.Fatal(err)
		}
		checkSame(t, name+" rewritten", b, want)
		for i := range b.Params {
			if off := dataOffset(buf, &b.Params[i]); off >= 0 && off%8 != 0 {
				t.Errorf("%s: raw_data of %q at offset %d, not 8-aligned", name, b.Params[i].Name, off)
			}
		}
		again, err := b.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, again) {
			t.Errorf("%s: marshalling is not deterministic", name)
		}
	}
}

// TestPythonReadsGoAdapter decodes a Go-written file with flatbuffers'
// Python accessors (generate.py --dump).
func TestPythonReadsGoAdapter(t *testing.T) {
	const python = "/usr/bin/python3"
	if err := exec.Command(python, "-c", "import flatbuffers").Run(); err != nil {
		t.Skipf("skipping: %s with the flatbuffers package is not available (apt-get install python3-flatbuffers): %v", python, err)
	}
	for name, want := range readPyExpected(t) {
		a, err := ReadOnnxAdapter(filepath.Join(adaptersDir, name))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(t.TempDir(), name)
		if err := WriteOnnxAdapter(p, a); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(python, filepath.Join(adaptersDir, "generate.py"), "--dump", p).Output()
		if err != nil {
			t.Fatalf("generate.py --dump %s: %v", p, err)
		}
		var got pyAdapter
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatal(err)
		}
		for _, gp := range got.Params {
			if gp.Data != "" && gp.DataOffset%8 != 0 {
				t.Errorf("%s: Python finds raw_data of %q at offset %d, not 8-aligned", name, gp.Name, gp.DataOffset)
			}
		}
		// Compare what Python read with what Python wrote, field by field.
		back := &OnnxAdapter{FormatVersion: got.FormatVersion, AdapterVersion: got.AdapterVersion, ModelVersion: got.ModelVersion}
		for _, gp := range got.Params {
			data, _ := hex.DecodeString(gp.Data)
			back.Params = append(back.Params, OnnxAdapterParam{Name: gp.Name, DataType: graph.DataType(gp.DataType), Dims: append([]int64{}, gp.Dims...), Data: data})
		}
		checkSame(t, name+" read by Python", back, want)
	}
}

func TestOnnxAdapterFloats(t *testing.T) {
	a, err := ReadOnnxAdapter(filepath.Join(adaptersDir, "mixed.onnx_adapter"))
	if err != nil {
		t.Fatal(err)
	}
	d, _ := a.Param("double")
	vals, err := d.Float64s()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(vals, []float64{math.Pi, -1e300}) {
		t.Errorf("double = %v", vals)
	}
	// Each float param rebuilt from its decoded values gives the same bytes.
	for _, name := range []string{"half", "brain", "double", "empty"} {
		p, ok := a.Param(name)
		if !ok {
			t.Fatalf("no param %q", name)
		}
		v, err := p.Float64s()
		if err != nil {
			t.Fatal(err)
		}
		q, err := NewOnnxAdapterParam(p.Name, p.DataType, p.Dims, v)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(q.Data, p.Data) {
			t.Errorf("%s: rebuilt %x, file has %x", name, q.Data, p.Data)
		}
	}
	s, _ := a.Param("one")
	if _, err := s.Float64s(); err == nil || !strings.Contains(err.Error(), "not a float type") {
		t.Errorf("Float64s of an INT64 param: %v", err)
	}
	// Rounding happens once, from float64: 1+2^-11+2^-30 is just above the
	// float16 tie, so it rounds up (rounding to float32 first would not).
	p, err := NewOnnxAdapterParam("x", graph.Float16, []int64{1}, []float64{1 + 0x1p-11 + 0x1p-30})
	if err != nil {
		t.Fatal(err)
	}
	if got := uint16(p.Data[0]) | uint16(p.Data[1])<<8; got != 0x3c01 {
		t.Errorf("float16 rounding: %#04x, want 0x3c01", got)
	}
	if _, err := NewOnnxAdapterParam("x", graph.Float, []int64{2, 2}, []float64{1}); err == nil {
		t.Error("NewOnnxAdapterParam accepted 1 value for 4 elements")
	}
}

// rawParam describes a Parameter table for buildRaw, which can write what
// Marshal refuses to.
type rawParam struct {
	name          *string
	dims          []int64
	noDims        bool
	dataType      int32
	data          []byte
	noData        bool
	misalignField bool
}

func strp(s string) *string { return &s }

func buildRaw(formatVersion int32, params []rawParam, noParams bool, ident string) []byte {
	b := flatbuffers.NewBuilder(256)
	offs := make([]flatbuffers.UOffsetT, len(params))
	for i, p := range params {
		var name, dims, data flatbuffers.UOffsetT
		if p.name != nil {
			name = b.CreateString(*p.name)
		}
		if !p.noDims {
			b.StartVector(8, len(p.dims), 8)
			for d := len(p.dims) - 1; d >= 0; d-- {
				b.PrependInt64(p.dims[d])
			}
			dims = b.EndVector(len(p.dims))
		}
		if !p.noData {
			data = b.CreateByteVector(p.data)
		}
		b.StartObject(4)
		if p.name != nil {
			b.PrependUOffsetTSlot(0, name, 0)
		}
		if !p.noDims {
			b.PrependUOffsetTSlot(1, dims, 0)
		}
		b.PrependInt32Slot(2, p.dataType, 0)
		if !p.noData {
			b.PrependUOffsetTSlot(3, data, 0)
		}
		offs[i] = b.EndObject()
	}
	var pv flatbuffers.UOffsetT
	if !noParams {
		b.StartVector(4, len(offs), 4)
		for i := len(offs) - 1; i >= 0; i-- {
			b.PrependUOffsetT(offs[i])
		}
		pv = b.EndVector(len(offs))
	}
	b.StartObject(4)
	b.PrependInt32Slot(0, formatVersion, 0)
	if !noParams {
		b.PrependUOffsetTSlot(3, pv, 0)
	}
	b.FinishWithFileIdentifier(b.EndObject(), []byte(ident))
	return b.FinishedBytes()
}

func TestOnnxAdapterReject(t *testing.T) {
	f32 := func(n int) []byte { return make([]byte, 4*n) }
	good := rawParam{name: strp("a"), dims: []int64{2, 3}, dataType: 1, data: f32(6)}
	if _, err := ParseOnnxAdapter(buildRaw(1, []rawParam{good}, false, "TORT"), "good"); err != nil {
		t.Fatalf("the valid base case fails: %v", err)
	}
	with := func(mod func(*rawParam)) []rawParam { p := good; mod(&p); return []rawParam{p} }
	cases := []struct {
		name string
		buf  []byte
		want string
	}{
		{"empty", nil, "too short"},
		{"identifier", buildRaw(1, []rawParam{good}, false, "ORTM"), "file identifier"},
		{"format version 0", buildRaw(0, []rawParam{good}, false, "TORT"), "format_version 0"},
		{"format version 2", buildRaw(2, []rawParam{good}, false, "TORT"), "format_version 2"},
		{"no parameters", buildRaw(1, nil, true, "TORT"), "no parameters vector"},
		{"no name", buildRaw(1, with(func(p *rawParam) { p.name = nil }), false, "TORT"), "has no name"},
		{"no dims", buildRaw(1, with(func(p *rawParam) { p.noDims = true }), false, "TORT"), "has no dims"},
		{"no raw_data", buildRaw(1, with(func(p *rawParam) { p.noData = true }), false, "TORT"), "has no raw_data"},
		{"short data", buildRaw(1, with(func(p *rawParam) { p.data = f32(5) }), false, "TORT"), "needs 24 bytes of data, has 20"},
		{"negative dim", buildRaw(1, with(func(p *rawParam) { p.dims = []int64{-2, -3} }), false, "TORT"), "negative dimension"},
		{"overflowing dims", buildRaw(1, with(func(p *rawParam) { p.dims = []int64{1 << 40, 1 << 40} }), false, "TORT"), "too many elements"},
		{"string type", buildRaw(1, with(func(p *rawParam) { p.dataType = 8 }), false, "TORT"), "data type STRING"},
		{"undefined type", buildRaw(1, with(func(p *rawParam) { p.dataType = 0 }), false, "TORT"), "data type UNDEFINED"},
		{"type outside the enum", buildRaw(1, with(func(p *rawParam) { p.dataType = 21 }), false, "TORT"), "which an adapter cannot hold"},
		{"duplicate", buildRaw(1, []rawParam{good, good}, false, "TORT"), `"a" appears twice`},
		{"scalar", buildRaw(1, with(func(p *rawParam) { p.dims, p.data = []int64{}, f32(1) }), false, "TORT"), "is a scalar (no dims)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseOnnxAdapter(c.buf, "x.onnx_adapter")
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "onnx adapter x.onnx_adapter: ") {
				t.Fatalf("got %v, want an error containing %q", err, c.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error spans lines: %q", err)
			}
		})
	}
}

// TestOnnxAdapterTruncatedAndCorrupt: every prefix of a valid file, and the
// file with each byte flipped, is an error or (for flips) a valid decode,
// never a panic.
func TestOnnxAdapterTruncatedAndCorrupt(t *testing.T) {
	buf, err := os.ReadFile(filepath.Join(adaptersDir, "mixed.onnx_adapter"))
	if err != nil {
		t.Fatal(err)
	}
	full, err := ParseOnnxAdapter(buf, "full")
	if err != nil {
		t.Fatal(err)
	}
	for n := 0; n < len(buf); n++ {
		a, err := ParseOnnxAdapter(buf[:n:n], "t")
		if err != nil {
			continue
		}
		// Only the trailing alignment padding may go without loss.
		if n <= len(buf)-8 || !reflect.DeepEqual(a, full) {
			t.Fatalf("prefix of %d of %d bytes accepted", n, len(buf))
		}
	}
	for i := range buf {
		for _, x := range []byte{0x01, 0x80, 0xff} {
			c := bytes.Clone(buf)
			c[i] ^= x
			if a, err := ParseOnnxAdapter(c, "c"); err == nil {
				if _, err := a.Marshal(); err != nil {
					t.Fatalf("flip at %d decodes but does not re-encode: %v", i, err)
				}
			}
		}
	}
	p := filepath.Join(t.TempDir(), "trunc.onnx_adapter")
	if err := os.WriteFile(p, buf[:len(buf)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadOnnxAdapter(p); err == nil || !strings.Contains(err.Error(), p) {
		t.Errorf("truncated file: %v", err)
	}
	if _, err := ReadOnnxAdapter(t.TempDir()); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("directory: %v", err)
	}
	if _, err := ReadOnnxAdapter(filepath.Join(t.TempDir(), "missing")); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing file: %v", err)
	}
}

func TestWriteOnnxAdapter(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out.onnx_adapter")
	ok := &OnnxAdapter{AdapterVersion: 2, Params: []OnnxAdapterParam{{Name: "w", DataType: graph.Float, Dims: []int64{1}, Data: f32bytes(1.5)}}}
	if err := WriteOnnxAdapter(p, ok); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(p)
	bad := []*OnnxAdapter{
		{Params: []OnnxAdapterParam{{Name: "w", DataType: graph.Float, Dims: []int64{2}, Data: f32bytes(1.5)}}},
		{Params: []OnnxAdapterParam{ok.Params[0], ok.Params[0]}},
		{Params: []OnnxAdapterParam{{Name: "", DataType: graph.Float, Dims: []int64{1}, Data: f32bytes(1)}}},
		{Params: []OnnxAdapterParam{{Name: "s", DataType: graph.String, Dims: []int64{1}, Data: nil}}},
		{Params: []OnnxAdapterParam{{Name: "scalar", DataType: graph.Float, Dims: []int64{}, Data: f32bytes(1)}}},
	}
	for i, a := range bad {
		if err := WriteOnnxAdapter(p, a); err == nil {
			t.Errorf("bad adapter %d written", i)
		}
	}
	after, _ := os.ReadFile(p)
	if !bytes.Equal(before, after) {
		t.Error("a failed write changed the existing file")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("failed writes left files behind: %v", ents)
	}
	got, err := ReadOnnxAdapter(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.AdapterVersion != 2 || got.FormatVersion != 1 || !reflect.DeepEqual(got.Params[0].Data, f32bytes(1.5)) {
		t.Errorf("read back %+v", got)
	}
	if err := WriteOnnxAdapter(filepath.Join(dir, "no", "such", "dir.onnx_adapter"), ok); err == nil {
		t.Error("writing into a missing folder succeeded")
	}
}

func f32bytes(vs ...float32) []byte {
	out := make([]byte, 4*len(vs))
	for i, v := range vs {
		u := math.Float32bits(v)
		out[4*i], out[4*i+1], out[4*i+2], out[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
	}
	return out
}

func FuzzOnnxAdapterRead(f *testing.F) {
	for _, name := range []string{"adapter2.onnx_adapter", "mixed.onnx_adapter"} {
		buf, err := os.ReadFile(filepath.Join(adaptersDir, name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(buf)
		f.Add(buf[:len(buf)/2])
	}
	f.Add(buildRaw(1, []rawParam{{name: strp("a"), dims: []int64{1}, dataType: 7, data: make([]byte, 8)}}, false, "TORT"))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := ParseOnnxAdapter(data, "fuzz")
		if err != nil {
			return
		}
		// Whatever decodes must re-encode to a file that decodes the same.
		buf, err := a.Marshal()
		if err != nil {
			t.Fatalf("decoded but cannot re-encode: %v", err)
		}
		b, err := ParseOnnxAdapter(buf, "again")
		if err != nil {
			t.Fatal(err)
		}
		if len(a.Params) != len(b.Params) || a.AdapterVersion != b.AdapterVersion || a.ModelVersion != b.ModelVersion {
			t.Fatalf("re-encoding changed the adapter")
		}
		for i := range a.Params {
			x, y := a.Params[i], b.Params[i]
			if x.Name != y.Name || x.DataType != y.DataType || !reflect.DeepEqual(x.Dims, y.Dims) || !bytes.Equal(x.Data, y.Data) {
				t.Fatalf("param %d changed on re-encoding", i)
			}
		}
	})
}
