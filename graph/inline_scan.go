package graph

import (
	"errors"
	"io"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/reflect/protoreflect"
)

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
