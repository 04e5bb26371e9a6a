package graph

import (
	"encoding/binary"
	"fmt"
	"os"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

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
