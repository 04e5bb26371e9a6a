package export

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"unicode/utf8"

	"github.com/onnxlora/onnxlora/graph"
)

// TensorData is one tensor to write: raw little-endian, row-major bytes.
type TensorData struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
}

// NewFloat32Tensor encodes values as a tensor of dtype dt (F16, BF16, F32 or
// F64), checking that shape holds exactly len(values) elements.
func NewFloat32Tensor(name string, dt DType, shape []int, values []float32) (TensorData, error) {
	n, ok := byteSize(DTypeU8, shape)
	if !ok || n != uint64(len(values)) {
		return TensorData{}, fmt.Errorf("tensor %q: shape %v does not hold %d values", name, shape, len(values))
	}
	data, err := EncodeFloat32(dt, values)
	if err != nil {
		return TensorData{}, fmt.Errorf("tensor %q: %v", name, err)
	}
	return TensorData{Name: name, DType: dt, Shape: append([]int{}, shape...), Data: data}, nil
}

// WriteSafetensorsTo serializes tensors and metadata in the reference
// implementation's layout: tensors ordered by dtype alignment (widest first)
// then name, header JSON with __metadata__ first (keys sorted), padded with
// spaces to a multiple of 8 bytes. The same input always gives the same bytes.
func WriteSafetensorsTo(w io.Writer, tensors []TensorData, metadata map[string]string) error {
	header, order, err := buildHeader(tensors, metadata)
	if err != nil {
		return err
	}
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(header)))
	if _, err := w.Write(lenBuf[:]); err != nil {
		return err
	}
	if _, err := w.Write(header); err != nil {
		return err
	}
	for _, i := range order {
		if _, err := w.Write(tensors[i].Data); err != nil {
			return err
		}
	}
	return nil
}

// WriteSafetensors writes tensors and metadata to path atomically: a
// temporary file in the same folder is written, synced and renamed over
// path, and removed on any error.
func WriteSafetensors(path string, tensors []TensorData, metadata map[string]string) error {
	if _, _, err := buildHeader(tensors, metadata); err != nil {
		return formatErr(path, "%v", err)
	}
	if err := writeFileAtomic(path, func(w io.Writer) error {
		return WriteSafetensorsTo(w, tensors, metadata)
	}); err != nil {
		return formatErr(path, "%v", err)
	}
	return nil
}

// buildHeader validates the tensors and returns the padded header and the
// order in which tensor data follows it.
func buildHeader(tensors []TensorData, metadata map[string]string) ([]byte, []int, error) {
	seen := make(map[string]bool, len(tensors))
	for _, t := range tensors {
		switch {
		case t.Name == metadataKey:
			return nil, nil, fmt.Errorf("tensor name %q is reserved", metadataKey)
		case !utf8.ValidString(t.Name):
			return nil, nil, fmt.Errorf("tensor name %q is not valid UTF-8", t.Name)
		case seen[t.Name]:
			return nil, nil, fmt.Errorf("duplicate tensor name %q", t.Name)
		case !t.DType.Known():
			return nil, nil, fmt.Errorf("tensor %q: unsupported dtype %q", t.Name, t.DType)
		}
		seen[t.Name] = true
		want, ok := byteSize(t.DType, t.Shape)
		if !ok {
			return nil, nil, fmt.Errorf("tensor %q: shape %v is invalid or overflows", t.Name, t.Shape)
		}
		if uint64(len(t.Data)) != want {
			return nil, nil, fmt.Errorf("tensor %q: %d data bytes but shape %v of %s needs %d", t.Name, len(t.Data), t.Shape, t.DType, want)
		}
	}
	for k, v := range metadata {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return nil, nil, fmt.Errorf("metadata entry %q is not valid UTF-8", k)
		}
	}
	order := make([]int, len(tensors))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(i, j int) bool {
		a, b := tensors[order[i]], tensors[order[j]]
		if oa, ob := dtypeInfo[a.DType].order, dtypeInfo[b.DType].order; oa != ob {
			return oa > ob
		}
		return a.Name < b.Name
	})

	var h bytes.Buffer
	h.WriteByte('{')
	first := true
	comma := func() {
		if !first {
			h.WriteByte(',')
		}
		first = false
	}
	if len(metadata) > 0 {
		comma()
		writeJSONString(&h, metadataKey)
		h.WriteString(":{")
		keys := make([]string, 0, len(metadata))
		for k := range metadata {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for i, k := range keys {
			if i > 0 {
				h.WriteByte(',')
			}
			writeJSONString(&h, k)
			h.WriteByte(':')
			writeJSONString(&h, metadata[k])
		}
		h.WriteByte('}')
	}
	var off uint64
	for _, i := range order {
		t := tensors[i]
		comma()
		writeJSONString(&h, t.Name)
		h.WriteString(`:{"dtype":`)
		writeJSONString(&h, string(t.DType))
		h.WriteString(`,"shape":[`)
		for j, d := range t.Shape {
			if j > 0 {
				h.WriteByte(',')
			}
			h.WriteString(strconv.Itoa(d))
		}
		end := off + uint64(len(t.Data))
		fmt.Fprintf(&h, `],"data_offsets":[%d,%d]}`, off, end)
		off = end
	}
	h.WriteByte('}')
	for h.Len()%8 != 0 {
		h.WriteByte(' ')
	}
	if h.Len() > maxHeaderSize {
		return nil, nil, fmt.Errorf("header would be %d bytes, over the %d-byte limit readers accept", h.Len(), maxHeaderSize)
	}
	return h.Bytes(), order, nil
}

// writeJSONString escapes like serde_json (the reference writer): only '"',
// '\\' and control characters, so our headers match its bytes. Go's
// encoding/json would also escape <, >, & and U+2028/U+2029.
func writeJSONString(b *bytes.Buffer, s string) {
	const hex = "0123456789abcdef"
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			b.WriteString(`\"`)
		case c == '\\':
			b.WriteString(`\\`)
		case c == '\b':
			b.WriteString(`\b`)
		case c == '\f':
			b.WriteString(`\f`)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '\r':
			b.WriteString(`\r`)
		case c == '\t':
			b.WriteString(`\t`)
		case c < 0x20:
			b.WriteString(`\u00`)
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&0xf])
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
}

// writeFileAtomic is graph.WriteFileAtomic returning the bare cause of a
// failure, for callers that name the file in their own way.
func writeFileAtomic(path string, write func(io.Writer) error) error {
	if err := graph.WriteFileAtomic(path, write); err != nil {
		if cause := errors.Unwrap(err); cause != nil {
			return cause
		}
		return err
	}
	return nil
}
