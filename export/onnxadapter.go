package export

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"

	flatbuffers "github.com/google/flatbuffers/go"

	"github.com/onnxlora/onnxlora/graph"
)

// The ONNX Runtime LoRA adapter format (.onnx_adapter, ONNX Runtime >= 1.20):
// a flatbuffer with file identifier "TORT" whose schema is written out in
// onnxadapter_schema.fbs. The accessors are hand-written: the reader checks
// every offset, length and alignment before it reads, as flatbuffers'
// C++ verifier (which ONNX Runtime runs) does, so a truncated or corrupt file
// is one error and never a panic.

// OnnxAdapterExt is the file extension ONNX Runtime and Olive use.
const OnnxAdapterExt = ".onnx_adapter"

// OnnxAdapterFormatVersion is the format_version this package writes and
// the only one ONNX Runtime accepts.
const OnnxAdapterFormatVersion = 1

// onnxAdapterIdentifier is the flatbuffers file identifier (bytes 4..8).
const onnxAdapterIdentifier = "TORT"

// maxOnnxAdapterSize is the flatbuffers limit: offsets are 32-bit and the
// C++ verifier refuses buffers of 2 GiB and more.
const maxOnnxAdapterSize = math.MaxInt32

// Vtable slots of the two tables, in schema field order.
const (
	slotAdapterFormatVersion = 0
	slotAdapterVersion       = 1
	slotAdapterModelVersion  = 2
	slotAdapterParameters    = 3

	slotParamName     = 0
	slotParamDims     = 1
	slotParamDataType = 2
	slotParamRawData  = 3
)

// OnnxAdapter is the content of an .onnx_adapter file: named tensors that
// ONNX Runtime feeds to the graph inputs of the same names while the
// adapter is active on a run.
type OnnxAdapter struct {
	// FormatVersion is the file's format_version; Marshal always writes
	// OnnxAdapterFormatVersion.
	FormatVersion int32
	// AdapterVersion and ModelVersion are free-form numbers for the user.
	AdapterVersion int32
	ModelVersion   int32
	// Params are the tensors in file order; names are unique.
	Params []OnnxAdapterParam
}

// OnnxAdapterParam is one tensor of an adapter, for a LoRA adapter named
// "<module>.lora_A.weight" [in, r] or "<module>.lora_B.weight" [r, out].
type OnnxAdapterParam struct {
	Name string
	// DataType is the ONNX element type (TensorProto.DataType numbers).
	DataType graph.DataType
	Dims     []int64
	// Data holds the elements little-endian, row-major. Parsed params
	// share it with the buffer they were parsed from.
	Data []byte
}

// Param returns the parameter called name.
func (a *OnnxAdapter) Param(name string) (*OnnxAdapterParam, bool) {
	for i := range a.Params {
		if a.Params[i].Name == name {
			return &a.Params[i], true
		}
	}
	return nil, false
}

// onnxAdapterDataType reports whether d is in the schema's TensorDataType
// enum with a fixed element size (everything from FLOAT to FLOAT8E5M2FNUZ
// but STRING).
func onnxAdapterDataType(d graph.DataType) bool {
	return d >= 1 && d <= 20 && d != graph.String
}

// checkParam validates one parameter for both the reader and the writer.
func checkParam(p *OnnxAdapterParam) error {
	if p.Name == "" {
		return errors.New("a parameter has no name")
	}
	// ONNX Runtime (1.30) refuses parameters without dims.
	if len(p.Dims) == 0 {
		return fmt.Errorf("parameter %q is a scalar (no dims), which ONNX Runtime refuses; give it shape [1]", p.Name)
	}
	if !onnxAdapterDataType(p.DataType) {
		return fmt.Errorf("parameter %q has data type %v, which an adapter cannot hold", p.Name, p.DataType)
	}
	size, err := graph.ByteSize(p.DataType, p.Dims)
	if err != nil {
		return fmt.Errorf("parameter %q: %v", p.Name, err)
	}
	if size != int64(len(p.Data)) {
		return fmt.Errorf("parameter %q: %v %v needs %d bytes of data, has %d", p.Name, p.DataType, p.Dims, size, len(p.Data))
	}
	return nil
}

// ReadOnnxAdapter reads and verifies an .onnx_adapter file.
func ReadOnnxAdapter(path string) (*OnnxAdapter, error) {
	f, err := graph.Open(path)
	if err != nil {
		return nil, fmt.Errorf("onnx adapter %s: %w", path, unwrapPathError(err))
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("onnx adapter %s: %w", path, unwrapPathError(err))
	}
	if st.IsDir() {
		return nil, fmt.Errorf("onnx adapter %s: is a directory", path)
	}
	if st.Size() >= maxOnnxAdapterSize {
		return nil, fmt.Errorf("onnx adapter %s: %d bytes, over the format's 2 GiB limit", path, st.Size())
	}
	buf := make([]byte, st.Size())
	if _, err := io.ReadFull(f, buf); err != nil {
		return nil, fmt.Errorf("onnx adapter %s: %w", path, err)
	}
	return ParseOnnxAdapter(buf, path)
}

// ParseOnnxAdapter verifies and decodes an .onnx_adapter buffer; name is
// used in errors. The params' Data share buf's memory.
func ParseOnnxAdapter(buf []byte, name string) (*OnnxAdapter, error) {
	a, err := parseOnnxAdapter(buf)
	if err != nil {
		return nil, fmt.Errorf("onnx adapter %s: %w", name, err)
	}
	return a, nil
}

func parseOnnxAdapter(buf []byte) (*OnnxAdapter, error) {
	r := fbReader{buf: buf}
	if len(buf) < 8 {
		return nil, fmt.Errorf("%d bytes is too short for an adapter file (truncated?)", len(buf))
	}
	if len(buf) >= maxOnnxAdapterSize {
		return nil, errors.New("over the format's 2 GiB limit")
	}
	if id := buf[4:8]; string(id) != onnxAdapterIdentifier {
		return nil, fmt.Errorf("not an ONNX Runtime adapter file (file identifier %q, want %q)", id, onnxAdapterIdentifier)
	}
	root, err := r.offsetAt(0)
	if err != nil {
		return nil, fmt.Errorf("root table: %w", err)
	}
	at, err := r.table(root)
	if err != nil {
		return nil, fmt.Errorf("adapter table: %w", err)
	}
	a := &OnnxAdapter{}
	ints := []*int32{&a.FormatVersion, &a.AdapterVersion, &a.ModelVersion}
	for slot, dst := range ints {
		if *dst, err = at.int32Field(slot); err != nil {
			return nil, fmt.Errorf("adapter table: %w", err)
		}
	}
	if a.FormatVersion != OnnxAdapterFormatVersion {
		return nil, fmt.Errorf("format_version %d is not supported (ONNX Runtime reads %d)", a.FormatVersion, OnnxAdapterFormatVersion)
	}
	pv, ok, err := at.offsetField(slotAdapterParameters)
	if err != nil {
		return nil, fmt.Errorf("parameters: %w", err)
	}
	if !ok {
		return nil, errors.New("the adapter has no parameters vector")
	}
	start, n, err := r.vector(pv, 4)
	if err != nil {
		return nil, fmt.Errorf("parameters: %w", err)
	}
	a.Params = make([]OnnxAdapterParam, n)
	seen := make(map[string]bool, n)
	for i := range a.Params {
		p := &a.Params[i]
		if err := r.param(start+4*i, p); err != nil {
			return nil, fmt.Errorf("parameter %d: %w", i, err)
		}
		if err := checkParam(p); err != nil {
			return nil, err
		}
		if seen[p.Name] {
			return nil, fmt.Errorf("parameter %q appears twice", p.Name)
		}
		seen[p.Name] = true
	}
	return a, nil
}

// param decodes the Parameter table that the offset at pos points to.
func (r fbReader) param(pos int, p *OnnxAdapterParam) error {
	tp, err := r.offsetAt(pos)
	if err != nil {
		return err
	}
	t, err := r.table(tp)
	if err != nil {
		return err
	}
	sp, ok, err := t.offsetField(slotParamName)
	if err != nil {
		return fmt.Errorf("name: %w", err)
	}
	if ok {
		if p.Name, err = r.str(sp); err != nil {
			return fmt.Errorf("name: %w", err)
		}
	}
	dt, err := t.int32Field(slotParamDataType)
	if err != nil {
		return fmt.Errorf("data_type: %w", err)
	}
	p.DataType = graph.DataType(dt)
	// ONNX Runtime dereferences dims and raw_data unconditionally, so a
	// file without them would crash it: refuse it here.
	dp, ok, err := t.offsetField(slotParamDims)
	if err != nil {
		return fmt.Errorf("dims: %w", err)
	}
	if !ok {
		return fmt.Errorf("parameter %q has no dims", p.Name)
	}
	ds, nd, err := r.vector(dp, 8)
	if err != nil {
		return fmt.Errorf("dims: %w", err)
	}
	p.Dims = make([]int64, nd)
	for i := range p.Dims {
		p.Dims[i] = int64(binary.LittleEndian.Uint64(r.buf[ds+8*i:]))
	}
	rp, ok, err := t.offsetField(slotParamRawData)
	if err != nil {
		return fmt.Errorf("raw_data: %w", err)
	}
	if !ok {
		return fmt.Errorf("parameter %q has no raw_data", p.Name)
	}
	rs, nr, err := r.vector(rp, 1)
	if err != nil {
		return fmt.Errorf("raw_data: %w", err)
	}
	p.Data = r.buf[rs : rs+nr : rs+nr]
	return nil
}

// fbReader reads flatbuffer primitives with bounds and alignment checks.
type fbReader struct{ buf []byte }

var errOutOfRange = errors.New("offset out of range (truncated or corrupt file)")

func (r fbReader) u32(pos int) (uint32, error) {
	if pos < 0 || pos > len(r.buf)-4 {
		return 0, errOutOfRange
	}
	if pos%4 != 0 {
		return 0, fmt.Errorf("misaligned 4-byte value at %d", pos)
	}
	return binary.LittleEndian.Uint32(r.buf[pos:]), nil
}

func (r fbReader) u16(pos int) (int, error) {
	if pos < 0 || pos > len(r.buf)-2 {
		return 0, errOutOfRange
	}
	if pos%2 != 0 {
		return 0, fmt.Errorf("misaligned 2-byte value at %d", pos)
	}
	return int(binary.LittleEndian.Uint16(r.buf[pos:])), nil
}

// offsetAt follows the uoffset stored at pos (relative to pos itself).
func (r fbReader) offsetAt(pos int) (int, error) {
	u, err := r.u32(pos)
	if err != nil {
		return 0, err
	}
	t := int64(pos) + int64(u)
	if u == 0 || t >= int64(len(r.buf)) {
		return 0, errOutOfRange
	}
	return int(t), nil
}

// vector checks the vector at pos (uint32 length, then elements) and
// returns where its elements start and how many there are.
func (r fbReader) vector(pos, elemSize int) (start, n int, err error) {
	u, err := r.u32(pos)
	if err != nil {
		return 0, 0, err
	}
	start = pos + 4
	if int64(u)*int64(elemSize) > int64(len(r.buf)-start) {
		return 0, 0, fmt.Errorf("vector of %d elements runs past the end of the file (truncated?)", u)
	}
	return start, int(u), nil
}

// str reads the string at pos, which must be NUL-terminated in the buffer.
func (r fbReader) str(pos int) (string, error) {
	start, n, err := r.vector(pos, 1)
	if err != nil {
		return "", err
	}
	if start+n >= len(r.buf) || r.buf[start+n] != 0 {
		return "", errors.New("string is not NUL-terminated (truncated or corrupt file)")
	}
	return string(r.buf[start : start+n]), nil
}

// fbTable is a verified table: its vtable and inline size are in range.
type fbTable struct {
	r              fbReader
	pos, vt        int
	vtSize, tbSize int
}

func (r fbReader) table(pos int) (fbTable, error) {
	u, err := r.u32(pos)
	if err != nil {
		return fbTable{}, err
	}
	vt := int64(pos) - int64(int32(u))
	if vt < 0 || vt > int64(len(r.buf)-4) {
		return fbTable{}, errors.New("vtable out of range (truncated or corrupt file)")
	}
	t := fbTable{r: r, pos: pos, vt: int(vt)}
	if t.vtSize, err = r.u16(t.vt); err != nil {
		return fbTable{}, err
	}
	if t.tbSize, err = r.u16(t.vt + 2); err != nil {
		return fbTable{}, err
	}
	if t.vtSize < 4 || t.vtSize%2 != 0 || t.vt+t.vtSize > len(r.buf) {
		return fbTable{}, fmt.Errorf("bad vtable size %d", t.vtSize)
	}
	if t.tbSize < 4 || pos+t.tbSize > len(r.buf) {
		return fbTable{}, fmt.Errorf("bad table size %d", t.tbSize)
	}
	return t, nil
}

// field returns the absolute position of the field in slot, which holds
// size bytes, or ok=false when the field is absent (default value).
func (t fbTable) field(slot, size int) (pos int, ok bool, err error) {
	e := 4 + 2*slot
	if e+2 > t.vtSize {
		return 0, false, nil
	}
	off, err := t.r.u16(t.vt + e)
	if err != nil || off == 0 {
		return 0, false, err
	}
	if off < 4 || off+size > t.tbSize {
		return 0, false, fmt.Errorf("field %d lies outside its table", slot)
	}
	pos = t.pos + off
	if pos%size != 0 {
		return 0, false, fmt.Errorf("field %d is misaligned", slot)
	}
	return pos, true, nil
}

func (t fbTable) int32Field(slot int) (int32, error) {
	pos, ok, err := t.field(slot, 4)
	if err != nil || !ok {
		return 0, err
	}
	u, err := t.r.u32(pos)
	return int32(u), err
}

func (t fbTable) offsetField(slot int) (int, bool, error) {
	pos, ok, err := t.field(slot, 4)
	if err != nil || !ok {
		return 0, false, err
	}
	target, err := t.r.offsetAt(pos)
	return target, err == nil, err
}

// Marshal encodes a as an .onnx_adapter buffer (format_version 1, every
// raw_data 8-byte aligned as the schema asks, so ONNX Runtime can use the
// memory-mapped file in place). Params must have unique names, fixed-size
// data types and Data of exactly their dims' size.
func (a *OnnxAdapter) Marshal() ([]byte, error) {
	seen := make(map[string]bool, len(a.Params))
	size := int64(64)
	for i := range a.Params {
		p := &a.Params[i]
		if err := checkParam(p); err != nil {
			return nil, err
		}
		if seen[p.Name] {
			return nil, fmt.Errorf("parameter %q appears twice", p.Name)
		}
		seen[p.Name] = true
		size += int64(len(p.Data)) + int64(len(p.Name)) + 8*int64(len(p.Dims)) + 64
	}
	// The builder panics past 2 GiB, so refuse early with a clear error.
	if size >= maxOnnxAdapterSize {
		return nil, fmt.Errorf("the adapter needs about %d bytes, over the format's 2 GiB limit", size)
	}
	b := flatbuffers.NewBuilder(int(size))
	offs := make([]flatbuffers.UOffsetT, len(a.Params))
	for i := range a.Params {
		p := &a.Params[i]
		name := b.CreateString(p.Name)
		b.StartVector(8, len(p.Dims), 8)
		for d := len(p.Dims) - 1; d >= 0; d-- {
			b.PrependInt64(p.Dims[d])
		}
		dims := b.EndVector(len(p.Dims))
		// Align the bytes themselves (after the length word) to 8.
		b.Prep(8, len(p.Data))
		raw := b.CreateByteVector(p.Data)
		b.StartObject(4)
		b.PrependUOffsetTSlot(slotParamName, name, 0)
		b.PrependUOffsetTSlot(slotParamDims, dims, 0)
		b.PrependInt32Slot(slotParamDataType, int32(p.DataType), 0)
		b.PrependUOffsetTSlot(slotParamRawData, raw, 0)
		offs[i] = b.EndObject()
	}
	b.StartVector(4, len(offs), 4)
	for i := len(offs) - 1; i >= 0; i-- {
		b.PrependUOffsetT(offs[i])
	}
	params := b.EndVector(len(offs))
	b.StartObject(4)
	b.PrependInt32Slot(slotAdapterFormatVersion, OnnxAdapterFormatVersion, 0)
	b.PrependInt32Slot(slotAdapterVersion, a.AdapterVersion, 0)
	b.PrependInt32Slot(slotAdapterModelVersion, a.ModelVersion, 0)
	b.PrependUOffsetTSlot(slotAdapterParameters, params, 0)
	b.FinishWithFileIdentifier(b.EndObject(), []byte(onnxAdapterIdentifier))
	return b.FinishedBytes(), nil
}

// WriteOnnxAdapter writes a to path atomically (temporary file, fsync,
// rename): on error nothing is left at path.
func WriteOnnxAdapter(path string, a *OnnxAdapter) error {
	buf, err := a.Marshal()
	if err != nil {
		return fmt.Errorf("onnx adapter %s: %w", path, err)
	}
	if err := writeFileAtomic(path, func(w io.Writer) error {
		_, err := io.Copy(w, bytes.NewReader(buf))
		return err
	}); err != nil {
		return fmt.Errorf("onnx adapter %s: %w", path, err)
	}
	return nil
}

// Float64s returns the parameter's elements widened to float64; it works
// for FLOAT, FLOAT16, BFLOAT16 and DOUBLE parameters.
func (p *OnnxAdapterParam) Float64s() ([]float64, error) {
	if err := checkParam(p); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	d := p.Data
	switch p.DataType {
	case graph.Float:
		out := make([]float64, len(d)/4)
		for i := range out {
			out[i] = float64(math.Float32frombits(le.Uint32(d[4*i:])))
		}
		return out, nil
	case graph.Double:
		out := make([]float64, len(d)/8)
		for i := range out {
			out[i] = math.Float64frombits(le.Uint64(d[8*i:]))
		}
		return out, nil
	case graph.Float16, graph.BFloat16:
		conv := graph.Float16Value
		if p.DataType == graph.BFloat16 {
			conv = graph.BFloat16Value
		}
		out := make([]float64, len(d)/2)
		for i := range out {
			out[i] = conv(le.Uint16(d[2*i:]))
		}
		return out, nil
	}
	return nil, fmt.Errorf("parameter %q is %v, not a float type", p.Name, p.DataType)
}

// NewOnnxAdapterParam builds a float parameter (FLOAT, FLOAT16, BFLOAT16
// or DOUBLE) from values, rounding each once to dt.
func NewOnnxAdapterParam(name string, dt graph.DataType, dims []int64, values []float64) (OnnxAdapterParam, error) {
	n, err := graph.NumElements(dims)
	if err != nil {
		return OnnxAdapterParam{}, fmt.Errorf("parameter %q: %v", name, err)
	}
	if n != int64(len(values)) {
		return OnnxAdapterParam{}, fmt.Errorf("parameter %q: dims %v hold %d elements, got %d values", name, dims, n, len(values))
	}
	if !dt.IsFloat() {
		return OnnxAdapterParam{}, fmt.Errorf("parameter %q: %v is not a float type", name, dt)
	}
	le := binary.LittleEndian
	data := make([]byte, len(values)*dt.BitSize()/8)
	for i, v := range values {
		switch dt {
		case graph.Float:
			le.PutUint32(data[4*i:], math.Float32bits(float32(v)))
		case graph.Double:
			le.PutUint64(data[8*i:], math.Float64bits(v))
		case graph.Float16:
			le.PutUint16(data[2*i:], graph.Float16Bits(v))
		case graph.BFloat16:
			le.PutUint16(data[2*i:], graph.BFloat16Bits(v))
		}
	}
	return OnnxAdapterParam{Name: name, DataType: dt, Dims: append([]int64{}, dims...), Data: data}, nil
}
