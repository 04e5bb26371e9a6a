package graph

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Lazy inline weights. LoadLazy does not copy the raw_data of large inline
// tensors into memory, so a model whose weights live inside the .onnx
// costs only its graph in memory, as one with external data does. It scans
// the file's wire format, leaves each raw_data of at least lazyMin bytes out
// of the bytes it unmarshals, and puts in its place, as an unknown field of
// the tensor, a marker naming the byte range of the file that holds it.
// RawData reads the range when asked; saving copies it file to file
// (copy_file_range). The marker travels with the tensor (proto.Clone keeps
// unknown fields), is dropped as soon as the tensor gets other data, and is
// never written out: every save goes through the layout (inline_layout.go),
// which puts the bytes back where they were. The result is byte for byte
// what proto.Marshal of the fully loaded model gives. The file's wire format
// is read by the scanner in inline_scan.go.

// lazyMin is the smallest raw_data Load leaves in the file.
var lazyMin = 4096 // a variable so tests can lower it

// markerField is the unknown field holding a lazy tensor's marker: the
// largest field number protobuf allows, far from anything ONNX defines.
// Its value is 16 bytes: the source's key and the range's index.
const markerField protowire.Number = 1<<29 - 1

// inlineSource is a loaded file whose bytes lazy tensors point into.
type inlineSource struct {
	path  string
	info  os.FileInfo // the file as loaded, to notice it being replaced
	spans []inlineSpan
}

type inlineSpan struct{ off, n int64 }

// inlineSources maps marker keys to their files, for the whole process: a
// cloned tensor may end up in another Model. Entries are small (a path and
// two integers per tensor) and are kept for the life of the process.
var inlineSources = struct {
	sync.Mutex
	m map[uint64]*inlineSource
}{m: map[uint64]*inlineSource{}}

func newKey() uint64 {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return binary.LittleEndian.Uint64(b[:])
}

var tensorName = (&onnxpb.TensorProto{}).ProtoReflect().Descriptor().FullName()

// rawDataField is TensorProto.raw_data's field number.
const rawDataField = 9

// loadFile parses the model file f (of st.Size() bytes), with lazy inline
// weights when asked. Then the file is read in small windows (pread), not
// mapped, skipping the weights: mapping it would let the kernel map whole
// large folios of weights around each page read, counted as ours.
func loadFile(f *os.File, st os.FileInfo, dir string, lazy bool) (*Model, error) {
	if !lazy {
		data, err := readAll(f, st.Size())
		if err != nil {
			return nil, err
		}
		return parse(data, dir)
	}
	key := newKey()
	s := &scanner{r: &window{f: f, size: st.Size()}, key: key}
	compact, serr := s.message(0, st.Size(), (&onnxpb.ModelProto{}).ProtoReflect().Descriptor(), 0)
	if serr != nil && !errors.Is(serr, errScan) {
		return nil, serr
	}
	if serr != nil || len(s.spans) == 0 {
		// Nothing to leave out, or wire bytes the scanner could not follow:
		// the protobuf library reads (or rejects) the whole file itself.
		data, err := readAll(f, st.Size())
		if err != nil {
			return nil, err
		}
		return parse(data, dir)
	}
	path := f.Name()
	if abs, err := filepath.Abs(path); err == nil {
		path = abs // still found after a change of working folder
	}
	src := &inlineSource{path: path, info: st, spans: s.spans}
	inlineSources.Lock()
	inlineSources.m[key] = src
	inlineSources.Unlock()
	m, err := parse(compact, dir)
	if err != nil {
		inlineSources.Lock()
		delete(inlineSources.m, key)
		inlineSources.Unlock()
		return nil, err
	}
	return m, nil
}

func readAll(f *os.File, size int64) ([]byte, error) {
	data := make([]byte, size)
	if _, err := f.ReadAt(data, 0); err != nil && !(errors.Is(err, io.EOF) && size == 0) {
		return nil, err
	}
	return data, nil
}

func appendMarker(b []byte, key, idx uint64) []byte {
	b = protowire.AppendTag(b, markerField, protowire.BytesType)
	b = protowire.AppendVarint(b, 16)
	b = binary.LittleEndian.AppendUint64(b, key)
	return binary.LittleEndian.AppendUint64(b, idx)
}

// inlineRef returns the file range a lazy tensor's data is in. A tensor is
// lazy while it has a marker and no data of its own.
func inlineRef(t *onnxpb.TensorProto) (*inlineSource, inlineSpan, bool) {
	if t.RawData != nil || IsExternal(t) || len(t.FloatData)+len(t.Int32Data)+len(t.Int64Data)+len(t.DoubleData)+len(t.Uint64Data)+len(t.StringData) > 0 {
		return nil, inlineSpan{}, false
	}
	key, idx, ok := findMarker(t.ProtoReflect().GetUnknown())
	if !ok {
		return nil, inlineSpan{}, false
	}
	inlineSources.Lock()
	src := inlineSources.m[key]
	inlineSources.Unlock()
	if src == nil || idx >= uint64(len(src.spans)) {
		return nil, inlineSpan{}, false
	}
	return src, src.spans[idx], true
}

// findMarker returns the last marker in a tensor's unknown fields.
func findMarker(u []byte) (key, idx uint64, ok bool) {
	for len(u) > 0 {
		num, typ, n := protowire.ConsumeTag(u)
		if n < 0 {
			break
		}
		m := protowire.ConsumeFieldValue(num, typ, u[n:])
		if m < 0 {
			break
		}
		if num == markerField && typ == protowire.BytesType {
			if v, _ := protowire.ConsumeBytes(u[n:]); len(v) == 16 {
				key, idx, ok = binary.LittleEndian.Uint64(v), binary.LittleEndian.Uint64(v[8:]), true
			}
		}
		u = u[n+m:]
	}
	return key, idx, ok
}

// stripMarkers returns u without marker fields (u itself when it has none).
func stripMarkers(u []byte) []byte {
	var out []byte
	changed := false
	for rest := u; len(rest) > 0; {
		num, typ, n := protowire.ConsumeTag(rest)
		if n < 0 {
			return u
		}
		m := protowire.ConsumeFieldValue(num, typ, rest[n:])
		if m < 0 {
			return u
		}
		if num == markerField {
			changed = true
		} else {
			out = append(out, rest[:n+m]...)
		}
		rest = rest[n+m:]
	}
	if !changed {
		return u
	}
	return out
}

// dropMarker removes a lazy tensor's marker, once the tensor has other data.
func dropMarker(t *onnxpb.TensorProto) {
	if u := t.ProtoReflect().GetUnknown(); len(u) > 0 {
		if s := stripMarkers(u); len(s) != len(u) {
			t.ProtoReflect().SetUnknown(s)
		}
	}
}

// validateInline checks a lazy tensor's range against its declared size,
// as Load checks raw_data held in memory.
func validateInline(t *onnxpb.TensorProto) error {
	_, sp, ok := inlineRef(t)
	if !ok {
		return nil
	}
	if DataType(t.GetDataType()) == String {
		return fmt.Errorf("tensor %q: STRING data cannot be in raw_data", t.GetName())
	}
	return checkInlineSize(t, sp)
}

func checkInlineSize(t *onnxpb.TensorProto, sp inlineSpan) error {
	dt := DataType(t.GetDataType())
	if dt.BitSize() == 0 || t.Segment != nil {
		return nil
	}
	want, err := ByteSize(dt, t.Dims)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	if sp.n != want {
		return fmt.Errorf("tensor %q: raw_data has %d bytes, but %v %v needs %d", t.GetName(), sp.n, dt, t.Dims, want)
	}
	return nil
}

// openInline opens a lazy tensor's file, refusing one replaced or resized
// since it was loaded.
func (m *Model) openInline(src *inlineSource) (*os.File, error) {
	f, err := m.openData(src.path)
	if err != nil {
		return nil, fmt.Errorf("reading inline weights from %s: %w", src.path, unwrapPathError(err))
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !os.SameFile(st, src.info) || st.Size() != src.info.Size() || !st.ModTime().Equal(src.info.ModTime()) {
		return nil, fmt.Errorf("%s changed after the model was loaded from it", src.path)
	}
	return f, nil
}

// readInline returns a lazy tensor's bytes, read from its file; ok is false
// for any other tensor.
func (m *Model) readInline(t *onnxpb.TensorProto) (raw []byte, ok bool, err error) {
	src, sp, ok := inlineRef(t)
	if !ok {
		return nil, false, nil
	}
	if err := checkInlineSize(t, sp); err != nil {
		return nil, true, err
	}
	f, err := m.openInline(src)
	if err != nil {
		return nil, true, fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	buf := make([]byte, sp.n)
	if _, err := f.ReadAt(buf, sp.off); err != nil {
		return nil, true, fmt.Errorf("tensor %q: reading raw_data from %s: %w", t.GetName(), src.path, err)
	}
	return buf, true, nil
}

// InlineRef returns where in the model file a tensor's inline raw_data
// lies when Load left it there (ok false otherwise), in the form of an
// external data reference: Path is the .onnx file itself. The bytes are
// the tensor's until it is given other data.
func (m *Model) InlineRef(t *onnxpb.TensorProto) (ref ExternalRef, ok bool, err error) {
	src, sp, ok := inlineRef(t)
	if !ok {
		return ExternalRef{}, false, nil
	}
	if err := checkInlineSize(t, sp); err != nil {
		return ExternalRef{}, true, err
	}
	if _, err := m.openInline(src); err != nil {
		return ExternalRef{}, true, fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	return ExternalRef{Path: src.path, Offset: sp.off, Length: sp.n}, true, nil
}

// copyInline writes a lazy tensor's bytes at offset in f, file to file.
func (m *Model) copyInline(f *os.File, offset int64, t *onnxpb.TensorProto) (bool, error) {
	src, sp, ok := inlineRef(t)
	if !ok {
		return false, nil
	}
	if err := checkInlineSize(t, sp); err != nil {
		return true, err
	}
	in, err := m.openInline(src)
	if err != nil {
		return true, fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	if err := CopyRange(f, offset, in, sp.off, sp.n); err != nil {
		return true, fmt.Errorf("tensor %q: copying raw_data: %w", t.GetName(), err)
	}
	return true, nil
}
