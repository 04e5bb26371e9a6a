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
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

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
// never written out: every save goes through the layout below, which puts
// the bytes back where they were. The result is byte for byte what
// proto.Marshal of the fully loaded model gives.

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

// window reads a file through a small buffer, for the scanner's headers.
type window struct {
	f    io.ReaderAt
	size int64
	buf  []byte
	off  int64 // file offset of buf[0]
}

const windowSize = 64 << 10

// peek returns up to n bytes at off (fewer at the end of the file).
func (w *window) peek(off int64, n int) ([]byte, error) {
	if off >= w.off && off+int64(n) <= w.off+int64(len(w.buf)) {
		return w.buf[off-w.off : off-w.off+int64(n)], nil
	}
	size := min(int64(max(n, windowSize)), w.size-off)
	if size < 0 {
		size = 0
	}
	if int64(cap(w.buf)) < size {
		w.buf = make([]byte, size)
	}
	w.buf = w.buf[:size]
	w.off = off
	got, err := w.f.ReadAt(w.buf, off)
	if got < int(size) {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return w.buf[:min(int64(n), size)], nil
}

// appendRange appends the n file bytes at off to b.
func (w *window) appendRange(b []byte, off, n int64) ([]byte, error) {
	if n <= windowSize {
		v, err := w.peek(off, int(n))
		if err != nil {
			return nil, err
		}
		if int64(len(v)) < n {
			return nil, errScan
		}
		return append(b, v...), nil
	}
	l := len(b)
	b = append(b, make([]byte, n)...)
	if _, err := w.f.ReadAt(b[l:], off); err != nil {
		return nil, err
	}
	return b, nil
}

// scanner rewrites a serialized model, leaving out large raw_data fields.
type scanner struct {
	r     *window
	key   uint64
	spans []inlineSpan
}

// errScan means bytes the scanner does not follow (malformed, or groups);
// Load then hands the whole file to the protobuf library.
var errScan = errors.New("malformed protobuf")

// header reads the tag at off and, for a length-delimited field, its
// length: it returns the field number, wire type, the header's size and
// the value's length (for other types, the size of the value).
func (s *scanner) header(off, end int64) (protowire.Number, protowire.Type, int, int64, error) {
	h, err := s.r.peek(off, int(min(20, end-off)))
	if err != nil {
		return 0, 0, 0, 0, err
	}
	num, typ, n := protowire.ConsumeTag(h)
	if n < 0 {
		return 0, 0, 0, 0, errScan
	}
	switch typ {
	case protowire.BytesType:
		l, m := protowire.ConsumeVarint(h[n:])
		if m < 0 || l > uint64(end-off) {
			return 0, 0, 0, 0, errScan
		}
		return num, typ, n + m, int64(l), nil
	case protowire.VarintType, protowire.Fixed32Type, protowire.Fixed64Type:
		m := protowire.ConsumeFieldValue(num, typ, h[n:])
		if m < 0 {
			return 0, 0, 0, 0, errScan
		}
		return num, typ, n, int64(m), nil
	}
	return 0, 0, 0, 0, errScan // groups: not in ONNX
}

// message returns the message at [off, end) of the file with large
// raw_data fields replaced by markers.
func (s *scanner) message(off, end int64, md protoreflect.MessageDescriptor, depth int) ([]byte, error) {
	if depth > 10000 { // protobuf's own recursion limit
		return nil, errScan
	}
	tensor := md.FullName() == tensorName
	if tensor {
		// Several raw_data fields (the last wins): leave them to protobuf.
		c := 0
		for pos := off; pos < end; {
			num, typ, hl, vl, err := s.header(pos, end)
			if err != nil {
				return nil, err
			}
			if num == rawDataField && typ == protowire.BytesType {
				c++
			}
			pos += int64(hl) + vl
		}
		tensor = c == 1
	}
	fields := md.Fields()
	var out []byte
	for pos := off; pos < end; {
		num, typ, hl, vl, err := s.header(pos, end)
		if err != nil {
			return nil, err
		}
		next := pos + int64(hl) + vl
		if next > end {
			return nil, errScan
		}
		if typ == protowire.BytesType {
			switch fd := fields.ByNumber(num); {
			case tensor && num == rawDataField && vl >= int64(lazyMin):
				out = append(out, s.marker(pos+int64(hl), vl)...)
				pos = next
				continue
			case fd != nil && fd.Message() != nil:
				sub, err := s.message(pos+int64(hl), next, fd.Message(), depth+1)
				if err != nil {
					return nil, err
				}
				out = protowire.AppendBytes(protowire.AppendTag(out, num, protowire.BytesType), sub)
				pos = next
				continue
			}
		}
		if out, err = s.r.appendRange(out, pos, next-pos); err != nil {
			return nil, err
		}
		pos = next
	}
	return out, nil
}

// marker records a range and returns the unknown field that stands for it.
func (s *scanner) marker(off, n int64) []byte {
	idx := uint64(len(s.spans))
	s.spans = append(s.spans, inlineSpan{off, n})
	return appendMarker(nil, s.key, idx)
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

// ProtoLayout is the serialized model, laid out for writing: the graph's
// bytes in memory, and the places of the weights that are copied from the
// input file or that the caller writes itself (pending tensors).
type ProtoLayout struct {
	// Size is the length of the serialized model.
	Size int64
	// Offsets gives, for each pending tensor, where its raw_data bytes go.
	Offsets map[*onnxpb.TensorProto]int64

	m      *Model
	pieces []piece
}

// piece is a run of the output: literal bytes, a lazy tensor's range, or a
// pending tensor's place.
type piece struct {
	lit     []byte
	src     *inlineSource
	span    inlineSpan
	pending *onnxpb.TensorProto
}

// ProtoSize returns the length of the model's serialized protobuf,
// counting the inline weights Load left in the file.
func (m *Model) ProtoSize() (int64, error) {
	l, err := m.LayoutProto(nil)
	if err != nil {
		return 0, err
	}
	return l.Size, nil
}

// LayoutProto serializes the model with the raw_data of each pending tensor
// left for the caller to write: it is laid out as raw_data of the given
// length, whatever the tensor holds now. The in-memory model is unchanged.
func (m *Model) LayoutProto(pending map[*onnxpb.TensorProto]int64) (*ProtoLayout, error) {
	type target struct {
		t    *onnxpb.TensorProto
		src  *inlineSource
		span inlineSpan
	}
	var targets []target
	var saved []tensorState
	defer func() { restore(saved) }()
	key := newKey()
	token := func(idx int) []byte {
		b := binary.LittleEndian.AppendUint64(make([]byte, 0, 16), key)
		return binary.LittleEndian.AppendUint64(b, uint64(idx))
	}
	seen := map[*onnxpb.TensorProto]bool{}
	// Every TensorProto anywhere in the model, not only those Tensors
	// visits (a function's default attributes hold tensors too): a lazy one
	// missed here would lose its bytes.
	everyTensor(m.Proto.ProtoReflect(), func(t *onnxpb.TensorProto) {
		if seen[t] {
			return
		}
		seen[t] = true
		u := t.ProtoReflect().GetUnknown()
		n, isPending := pending[t]
		src, sp, lazy := inlineRef(t)
		stripped := stripMarkers(u)
		if !isPending && !lazy && len(stripped) == len(u) {
			return
		}
		saved = append(saved, snapshot(t))
		t.ProtoReflect().SetUnknown(stripped)
		switch {
		case isPending:
			// Laid out as inline raw_data only, like SetRawData leaves it.
			setInline(t, nil)
			targets = append(targets, target{t: t, span: inlineSpan{n: n}})
		case lazy:
			targets = append(targets, target{t: t, src: src, span: sp})
		default:
			return
		}
		t.RawData = token(len(targets) - 1)
	})
	b, err := proto.Marshal(m.Proto)
	if err != nil {
		return nil, err
	}
	l := &ProtoLayout{m: m, Offsets: map[*onnxpb.TensorProto]int64{}}
	if len(targets) == 0 {
		l.pieces, l.Size = []piece{{lit: b}}, int64(len(b))
		return l, nil
	}
	sp := &splicer{key: key, resolve: func(idx uint64) (piece, bool) {
		if idx >= uint64(len(targets)) {
			return piece{}, false
		}
		tg := targets[idx]
		if tg.src == nil {
			return piece{pending: tg.t, span: tg.span}, true
		}
		return piece{src: tg.src, span: tg.span}, true
	}}
	pieces, size, _, err := sp.message(b, (&onnxpb.ModelProto{}).ProtoReflect().Descriptor())
	if err != nil {
		return nil, err
	}
	l.pieces, l.Size = pieces, size
	var off int64
	for _, p := range pieces {
		switch {
		case p.lit != nil:
			off += int64(len(p.lit))
		default:
			if p.pending != nil {
				l.Offsets[p.pending] = off
			}
			off += p.span.n
		}
	}
	for t := range pending {
		if _, ok := l.Offsets[t]; !ok {
			return nil, fmt.Errorf("tensor %q is not part of the model", t.GetName())
		}
	}
	return l, nil
}

// everyTensor calls fn for every TensorProto in the message, at any depth.
func everyTensor(m protoreflect.Message, fn func(*onnxpb.TensorProto)) {
	if t, ok := m.Interface().(*onnxpb.TensorProto); ok {
		fn(t)
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Message() == nil {
			return true
		}
		if fd.IsList() {
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				everyTensor(l.Get(i).Message(), fn)
			}
		} else if !fd.IsMap() {
			everyTensor(v.Message(), fn)
		}
		return true
	})
}

// splicer expands the placeholder tokens of a marshaled model into pieces,
// fixing up the length of every message around them.
type splicer struct {
	key     uint64
	resolve func(idx uint64) (piece, bool)
}

func (s *splicer) message(b []byte, md protoreflect.MessageDescriptor) (pieces []piece, size int64, changed bool, err error) {
	tensor := md.FullName() == tensorName
	fields := md.Fields()
	last := 0
	flush := func(end int) {
		if end > last {
			pieces = append(pieces, piece{lit: b[last:end]})
		}
	}
	for i := 0; i < len(b); {
		num, typ, n := protowire.ConsumeTag(b[i:])
		if n < 0 {
			return nil, 0, false, errScan
		}
		start := i
		i += n
		if typ != protowire.BytesType {
			m := protowire.ConsumeFieldValue(num, typ, b[i:])
			if m < 0 {
				return nil, 0, false, errScan
			}
			i += m
			size += int64(n + m)
			continue
		}
		v, m := protowire.ConsumeBytes(b[i:])
		if m < 0 {
			return nil, 0, false, errScan
		}
		i += m
		if tensor && num == rawDataField && len(v) == 16 && binary.LittleEndian.Uint64(v) == s.key {
			if p, ok := s.resolve(binary.LittleEndian.Uint64(v[8:])); ok {
				flush(start)
				head := protowire.AppendVarint(protowire.AppendTag(nil, num, protowire.BytesType), uint64(p.span.n))
				pieces = append(pieces, piece{lit: head}, p)
				size += int64(len(head)) + p.span.n
				last, changed = i, true
				continue
			}
		}
		if fd := fields.ByNumber(num); fd != nil && fd.Message() != nil {
			sub, subSize, subChanged, err := s.message(v, fd.Message())
			if err != nil {
				return nil, 0, false, err
			}
			if subChanged {
				flush(start)
				head := protowire.AppendVarint(protowire.AppendTag(nil, num, protowire.BytesType), uint64(subSize))
				pieces = append(append(pieces, piece{lit: head}), sub...)
				size += int64(len(head)) + subSize
				last, changed = i, true
				continue
			}
		}
		size += int64(i - start)
	}
	flush(len(b))
	return pieces, size, changed, nil
}

// WriteTo writes the layout to f from its start: the graph's bytes and the
// lazy weights, copied from the input file. The pending tensors' places
// are left for the caller (they read as zeros until written).
func (l *ProtoLayout) WriteTo(f *os.File) error {
	if l.Size > maxProtoSize {
		return fmt.Errorf("the model is %d bytes, more than a protobuf can hold; save with external data", l.Size)
	}
	var off int64
	buf := make([]byte, 0, 1<<20)
	bufOff := int64(0)
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		_, err := f.WriteAt(buf, bufOff)
		buf = buf[:0]
		return err
	}
	for _, p := range l.pieces {
		if p.lit != nil {
			if len(buf)+len(p.lit) > cap(buf) {
				if err := flush(); err != nil {
					return err
				}
			}
			if len(buf) == 0 {
				bufOff = off
			}
			if len(p.lit) >= cap(buf) {
				if _, err := f.WriteAt(p.lit, off); err != nil {
					return err
				}
			} else {
				buf = append(buf, p.lit...)
			}
			off += int64(len(p.lit))
			continue
		}
		if err := flush(); err != nil {
			return err
		}
		if p.src != nil {
			in, err := l.m.openInline(p.src)
			if err != nil {
				return err
			}
			if err := CopyRange(f, off, in, p.span.off, p.span.n); err != nil {
				return fmt.Errorf("copying inline weights from %s: %w", p.src.path, err)
			}
			StartWriteback(f, off, p.span.n)
		}
		off += p.span.n
	}
	if err := flush(); err != nil {
		return err
	}
	// The file ends where the layout does, even when it ends in a pending
	// tensor not written yet.
	return f.Truncate(off)
}

// Bytes returns the whole serialized model in memory (no pending tensors).
func (l *ProtoLayout) Bytes() ([]byte, error) {
	out := make([]byte, 0, l.Size)
	for _, p := range l.pieces {
		switch {
		case p.lit != nil:
			out = append(out, p.lit...)
		case p.pending != nil:
			return nil, fmt.Errorf("tensor %q has no data yet", p.pending.GetName())
		default:
			in, err := l.m.openInline(p.src)
			if err != nil {
				return nil, err
			}
			n := len(out)
			out = out[:n+int(p.span.n)]
			if _, err := in.ReadAt(out[n:], p.span.off); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// Marshal serializes the model as proto.Marshal would had every weight been
// read into memory. Prefer Save (or LayoutProto), which copy the weights
// Load left in the file without holding them.
func (m *Model) Marshal() ([]byte, error) {
	l, err := m.LayoutProto(nil)
	if err != nil {
		return nil, err
	}
	return l.Bytes()
}
