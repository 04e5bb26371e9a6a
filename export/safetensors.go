package export

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"os"
	"sort"
	"strconv"
	"unicode/utf8"

	"github.com/onnxlora/onnxlora/graph"
)

// DType is a safetensors element type, spelled as in the file header.
type DType string

// The element types this package knows. Sub-byte types (F4, F6_*) are not
// supported because their byte size is not a whole number per element.
const (
	DTypeBool   DType = "BOOL"
	DTypeU8     DType = "U8"
	DTypeI8     DType = "I8"
	DTypeF8E5M2 DType = "F8_E5M2"
	DTypeF8E4M3 DType = "F8_E4M3"
	DTypeF8E8M0 DType = "F8_E8M0"
	DTypeI16    DType = "I16"
	DTypeU16    DType = "U16"
	DTypeF16    DType = "F16"
	DTypeBF16   DType = "BF16"
	DTypeI32    DType = "I32"
	DTypeU32    DType = "U32"
	DTypeF32    DType = "F32"
	DTypeC64    DType = "C64"
	DTypeF64    DType = "F64"
	DTypeI64    DType = "I64"
	DTypeU64    DType = "U64"
)

// dtypeInfo gives each dtype's byte size and its rank in the reference
// implementation's Dtype enum; the writer orders tensors by that rank
// (descending) so every tensor stays aligned, exactly like the reference.
var dtypeInfo = map[DType]struct{ size, order int }{
	DTypeBool: {1, 0}, DTypeU8: {1, 1}, DTypeI8: {1, 2},
	DTypeF8E5M2: {1, 3}, DTypeF8E4M3: {1, 4}, DTypeF8E8M0: {1, 5},
	DTypeI16: {2, 6}, DTypeU16: {2, 7}, DTypeF16: {2, 8}, DTypeBF16: {2, 9},
	DTypeI32: {4, 10}, DTypeU32: {4, 11}, DTypeF32: {4, 12},
	DTypeC64: {8, 13}, DTypeF64: {8, 14}, DTypeI64: {8, 15}, DTypeU64: {8, 16},
}

// Size returns the size of one element in bytes, or 0 for an unknown dtype.
func (d DType) Size() int { return dtypeInfo[d].size }

// Known reports whether d is a dtype this package can store and read raw.
func (d DType) Known() bool { _, ok := dtypeInfo[d]; return ok }

// IsFloat reports whether values of d can be decoded to and encoded from
// float32/float64 (F16, BF16, F32, F64).
func (d DType) IsFloat() bool {
	return d == DTypeF16 || d == DTypeBF16 || d == DTypeF32 || d == DTypeF64
}

// maxHeaderSize is the reference implementation's limit; a larger header is
// refused there, so we neither read nor write one.
const maxHeaderSize = 100_000_000

// metadataKey is the reserved header entry holding free-form string metadata.
const metadataKey = "__metadata__"

// FormatError reports a malformed or unusable safetensors file. Its message
// is one line naming the file and the problem.
type FormatError struct {
	Path    string // file name as given to the reader or writer
	Problem string // what is wrong, without the file name
}

func (e *FormatError) Error() string { return "safetensors " + e.Path + ": " + e.Problem }

func formatErr(path, format string, args ...any) error {
	return &FormatError{Path: path, Problem: fmt.Sprintf(format, args...)}
}

// TensorInfo describes one tensor of a safetensors file.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int
	// Begin and End are the data_offsets from the header: byte offsets
	// relative to the start of the data section (just after the header).
	Begin, End int64
}

// NumElements returns the product of the shape (1 for a scalar).
func (t TensorInfo) NumElements() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// SafetensorsFile is an open, validated safetensors file. Tensor data is read
// on demand with ReadAt, so methods are safe for concurrent use.
type SafetensorsFile struct {
	path      string
	r         io.ReaderAt
	closer    io.Closer
	dataStart int64
	tensors   map[string]TensorInfo
	names     []string
	metadata  map[string]string
}

// OpenSafetensors opens and validates the safetensors file at path. Only the
// header is read; call Close when done.
func OpenSafetensors(path string) (*SafetensorsFile, error) {
	f, err := graph.Open(path)
	if err != nil {
		return nil, formatErr(path, "%v", unwrapPathError(err))
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, formatErr(path, "%v", unwrapPathError(err))
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, formatErr(path, "not a regular file")
	}
	sf, err := ParseSafetensors(f, st.Size(), path)
	if err != nil {
		f.Close()
		return nil, err
	}
	sf.closer = f
	return sf, nil
}

// unwrapPathError drops the *os.PathError wrapper so the path is not
// repeated in our own one-line message.
func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// ParseSafetensors validates the safetensors content of r, which holds size
// bytes; name is used in error messages. The returned file reads tensors
// from r lazily; its Close does not close r.
func ParseSafetensors(r io.ReaderAt, size int64, name string) (*SafetensorsFile, error) {
	if size < 8 {
		return nil, formatErr(name, "file is %d bytes, shorter than the 8-byte header length", size)
	}
	var lenBuf [8]byte
	if _, err := r.ReadAt(lenBuf[:], 0); err != nil {
		return nil, formatErr(name, "reading header length: %v", err)
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > maxHeaderSize {
		return nil, formatErr(name, "header length %d exceeds the %d-byte limit", n, maxHeaderSize)
	}
	if n > uint64(size-8) {
		return nil, formatErr(name, "header length %d exceeds the %d bytes after the length field", n, size-8)
	}
	// n is now bounded by both the file size and maxHeaderSize.
	header := make([]byte, n)
	if _, err := r.ReadAt(header, 8); err != nil {
		return nil, formatErr(name, "reading %d-byte header: %v", n, err)
	}
	dataStart := 8 + int64(n)
	dataSize := size - dataStart
	tensors, names, meta, err := parseHeader(header, dataSize)
	if err != nil {
		return nil, formatErr(name, "%s", err.Error())
	}
	return &SafetensorsFile{
		path: name, r: r, dataStart: dataStart,
		tensors: tensors, names: names, metadata: meta,
	}, nil
}

// parseHeader decodes and validates the JSON header against a data section
// of dataSize bytes. It mirrors the reference implementation's checks:
// offsets must tile the data section exactly, in order, without gaps,
// overlaps or trailing bytes, and each span must equal shape * dtype size.
func parseHeader(header []byte, dataSize int64) (map[string]TensorInfo, []string, map[string]string, error) {
	if !utf8.Valid(header) {
		return nil, nil, nil, errors.New("header is not valid UTF-8")
	}
	if len(header) == 0 || header[0] != '{' {
		return nil, nil, nil, errors.New("header does not start with '{'")
	}
	dec := json.NewDecoder(bytes.NewReader(header))
	dec.UseNumber()
	if _, err := dec.Token(); err != nil { // the '{' checked above
		return nil, nil, nil, fmt.Errorf("header JSON: %v", err)
	}
	tensors := map[string]TensorInfo{}
	var meta map[string]string
	seenMeta := false
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("header JSON: %v", err)
		}
		key := tok.(string) // object keys are always strings
		if key == metadataKey {
			if seenMeta {
				return nil, nil, nil, fmt.Errorf("duplicate %q entry", metadataKey)
			}
			seenMeta = true
			if meta, err = parseMetadata(dec); err != nil {
				return nil, nil, nil, err
			}
			continue
		}
		if _, dup := tensors[key]; dup {
			return nil, nil, nil, fmt.Errorf("duplicate tensor name %q", key)
		}
		info, err := parseTensorEntry(dec, key)
		if err != nil {
			return nil, nil, nil, err
		}
		tensors[key] = info
	}
	if _, err := dec.Token(); err != nil { // closing '}'
		return nil, nil, nil, fmt.Errorf("header JSON: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, nil, nil, errors.New("unexpected data after the header object (only space padding is allowed)")
	}

	byOffset := make([]TensorInfo, 0, len(tensors))
	for _, t := range tensors {
		byOffset = append(byOffset, t)
	}
	sort.Slice(byOffset, func(i, j int) bool {
		a, b := byOffset[i], byOffset[j]
		if a.Begin != b.Begin {
			return a.Begin < b.Begin
		}
		if a.End != b.End {
			return a.End < b.End
		}
		return a.Name < b.Name
	})
	var pos int64
	for _, t := range byOffset {
		if t.End < t.Begin {
			return nil, nil, nil, fmt.Errorf("tensor %q: data_offsets [%d, %d] end before they begin", t.Name, t.Begin, t.End)
		}
		if t.Begin < pos {
			return nil, nil, nil, fmt.Errorf("tensor %q: data_offsets [%d, %d] overlap the previous tensor, which ends at %d", t.Name, t.Begin, t.End, pos)
		}
		if t.Begin > pos {
			return nil, nil, nil, fmt.Errorf("tensor %q: data_offsets [%d, %d] leave a gap after byte %d of the data section", t.Name, t.Begin, t.End, pos)
		}
		if t.End > dataSize {
			return nil, nil, nil, fmt.Errorf("tensor %q: data_offsets [%d, %d] run past the %d-byte data section", t.Name, t.Begin, t.End, dataSize)
		}
		want, ok := byteSize(t.DType, t.Shape)
		if !ok {
			return nil, nil, nil, fmt.Errorf("tensor %q: shape %v of %s overflows the byte count", t.Name, t.Shape, t.DType)
		}
		if uint64(t.End-t.Begin) != want {
			return nil, nil, nil, fmt.Errorf("tensor %q: data_offsets [%d, %d] span %d bytes but shape %v of %s needs %d", t.Name, t.Begin, t.End, t.End-t.Begin, t.Shape, t.DType, want)
		}
		pos = t.End
	}
	if pos != dataSize {
		return nil, nil, nil, fmt.Errorf("tensors cover %d bytes but the data section has %d (trailing bytes not described by the header)", pos, dataSize)
	}
	names := make([]string, 0, len(tensors))
	for name := range tensors {
		names = append(names, name)
	}
	sort.Strings(names)
	return tensors, names, meta, nil
}

// byteSize returns prod(shape) * dtype size, multiplying left to right with
// overflow checks like the reference (which fails on overflow even when a
// later dimension is 0). The result also fits in an int64.
func byteSize(dt DType, shape []int) (uint64, bool) {
	n := uint64(1)
	for _, d := range shape {
		if d < 0 {
			return 0, false
		}
		hi, lo := bits.Mul64(n, uint64(d))
		if hi != 0 {
			return 0, false
		}
		n = lo
	}
	hi, lo := bits.Mul64(n, uint64(dt.Size()))
	if hi != 0 || lo > math.MaxInt64 {
		return 0, false
	}
	return lo, true
}

func parseMetadata(dec *json.Decoder) (map[string]string, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("header JSON in %q: %v", metadataKey, err)
	}
	if tok == nil { // null is accepted by the reference (an Option)
		return nil, nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("%q must be an object of strings, found %v", metadataKey, tok)
	}
	meta := map[string]string{}
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("header JSON in %q: %v", metadataKey, err)
		}
		k := kt.(string)
		if _, dup := meta[k]; dup {
			return nil, fmt.Errorf("duplicate %q key %q", metadataKey, k)
		}
		vt, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("header JSON in %q: %v", metadataKey, err)
		}
		v, ok := vt.(string)
		if !ok {
			return nil, fmt.Errorf("%q value for key %q must be a string", metadataKey, k)
		}
		meta[k] = v
	}
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("header JSON in %q: %v", metadataKey, err)
	}
	return meta, nil
}

func parseTensorEntry(dec *json.Decoder, name string) (TensorInfo, error) {
	info := TensorInfo{Name: name}
	bad := func(format string, args ...any) (TensorInfo, error) {
		return TensorInfo{}, fmt.Errorf("tensor %q: %s", name, fmt.Sprintf(format, args...))
	}
	tok, err := dec.Token()
	if err != nil {
		return bad("header JSON: %v", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return bad("entry must be an object with dtype, shape and data_offsets")
	}
	var haveDType, haveShape, haveOffsets bool
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return bad("header JSON: %v", err)
		}
		switch field := kt.(string); field {
		case "dtype":
			if haveDType {
				return bad("duplicate dtype")
			}
			haveDType = true
			vt, err := dec.Token()
			if err != nil {
				return bad("header JSON: %v", err)
			}
			s, ok := vt.(string)
			if !ok {
				return bad("dtype must be a string")
			}
			info.DType = DType(s)
			if !info.DType.Known() {
				return bad("unsupported dtype %q", s)
			}
		case "shape":
			if haveShape {
				return bad("duplicate shape")
			}
			haveShape = true
			dims, err := parseUintArray(dec, -1)
			if err != nil {
				return bad("shape %v", err)
			}
			info.Shape = make([]int, len(dims))
			for i, d := range dims {
				if d > math.MaxInt64 {
					return bad("shape dimension %d is too large", d)
				}
				info.Shape[i] = int(d)
			}
		case "data_offsets":
			if haveOffsets {
				return bad("duplicate data_offsets")
			}
			haveOffsets = true
			offs, err := parseUintArray(dec, 2)
			if err != nil {
				return bad("data_offsets %v", err)
			}
			if offs[0] > math.MaxInt64 || offs[1] > math.MaxInt64 {
				return bad("data_offsets [%d, %d] are too large", offs[0], offs[1])
			}
			info.Begin, info.End = int64(offs[0]), int64(offs[1])
		default:
			return bad("unknown field %q (expected dtype, shape, data_offsets)", field)
		}
	}
	if _, err := dec.Token(); err != nil {
		return bad("header JSON: %v", err)
	}
	switch {
	case !haveDType:
		return bad("missing dtype")
	case !haveShape:
		return bad("missing shape")
	case !haveOffsets:
		return bad("missing data_offsets")
	}
	return info, nil
}

// parseUintArray reads a JSON array of non-negative integers; want >= 0
// requires exactly that many elements.
func parseUintArray(dec *json.Decoder, want int) ([]uint64, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("header JSON: %v", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, errors.New("must be an array of non-negative integers")
	}
	var out []uint64
	for dec.More() {
		vt, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("header JSON: %v", err)
		}
		num, ok := vt.(json.Number)
		if !ok {
			return nil, errors.New("must be an array of non-negative integers")
		}
		v, err := strconv.ParseUint(string(num), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("value %s is not a non-negative 64-bit integer", num)
		}
		if want >= 0 && len(out) == want {
			return nil, fmt.Errorf("must have exactly %d elements", want)
		}
		out = append(out, v)
	}
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("header JSON: %v", err)
	}
	if want >= 0 && len(out) != want {
		return nil, fmt.Errorf("must have exactly %d elements", want)
	}
	if out == nil {
		out = []uint64{}
	}
	return out, nil
}

// Close releases the underlying file, if OpenSafetensors opened one.
func (f *SafetensorsFile) Close() error {
	if f.closer == nil {
		return nil
	}
	err := f.closer.Close()
	f.closer = nil
	return err
}

// Path returns the file name used in error messages.
func (f *SafetensorsFile) Path() string { return f.path }

// Names returns the tensor names in sorted order.
func (f *SafetensorsFile) Names() []string { return append([]string(nil), f.names...) }

// Tensor returns the header entry of the named tensor.
func (f *SafetensorsFile) Tensor(name string) (TensorInfo, bool) {
	t, ok := f.tensors[name]
	if ok {
		t.Shape = append([]int{}, t.Shape...)
	}
	return t, ok
}

// Metadata returns a copy of the __metadata__ entry (nil when absent).
func (f *SafetensorsFile) Metadata() map[string]string {
	if f.metadata == nil {
		return nil
	}
	m := make(map[string]string, len(f.metadata))
	for k, v := range f.metadata {
		m[k] = v
	}
	return m
}

// ReadRaw reads the named tensor's bytes (little-endian, row-major).
func (f *SafetensorsFile) ReadRaw(name string) ([]byte, error) {
	t, ok := f.tensors[name]
	if !ok {
		return nil, formatErr(f.path, "no tensor named %q", name)
	}
	buf := make([]byte, t.End-t.Begin)
	if len(buf) == 0 {
		return buf, nil
	}
	if _, err := f.r.ReadAt(buf, f.dataStart+t.Begin); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, formatErr(f.path, "reading tensor %q: %v", name, err)
	}
	return buf, nil
}

// ReadFloat32 reads the named tensor as float32 values; its dtype must be
// F16, BF16, F32 or F64 (F64 is rounded to nearest).
func (f *SafetensorsFile) ReadFloat32(name string) ([]float32, error) {
	raw, err := f.ReadRaw(name)
	if err != nil {
		return nil, err
	}
	v, err := DecodeFloat32(f.tensors[name].DType, raw)
	if err != nil {
		return nil, formatErr(f.path, "tensor %q: %v", name, err)
	}
	return v, nil
}

// ReadFloat64 reads the named tensor as float64 values; its dtype must be
// F16, BF16, F32 or F64 (all convert exactly).
func (f *SafetensorsFile) ReadFloat64(name string) ([]float64, error) {
	raw, err := f.ReadRaw(name)
	if err != nil {
		return nil, err
	}
	v, err := DecodeFloat64(f.tensors[name].DType, raw)
	if err != nil {
		return nil, formatErr(f.path, "tensor %q: %v", name, err)
	}
	return v, nil
}
