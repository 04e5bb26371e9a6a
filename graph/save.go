package graph

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/paths"
)

// ExternalMode says when Save writes tensors to an external data file.
type ExternalMode int

const (
	// ExternalAuto keeps the input's choice: external data when the model
	// already uses it, and also whenever the protobuf would pass 2 GiB.
	ExternalAuto ExternalMode = iota
	// ExternalAlways writes every tensor of at least Threshold bytes externally.
	ExternalAlways
	// ExternalNever stores every tensor inline; it fails past 2 GiB.
	ExternalNever
)

// SaveOptions controls how Save lays out a model.
type SaveOptions struct {
	External ExternalMode
	// Threshold is the smallest tensor, in bytes, that goes to the data
	// file (default 1024). Tensors already external stay external.
	Threshold int64
	// DataFile is the data file's name, beside the output (default: the
	// output's file name + ".data", as ONNX Runtime GenAI writes it). When
	// a file of that name exists (an earlier output), the data goes to a
	// fresh name beside it instead (model.onnx.<random>.data), so the old
	// model stays whole until the new one replaces it; the earlier output's
	// data file is then removed (see PairWriter).
	DataFile string
	// Align is the alignment of each tensor's offset in the data file
	// (default 4096, so runtimes can memory-map weights).
	Align int64
}

// WithDefaults returns the options with every unset field filled in as
// Save fills it for an output at path, and the data file's path beside it.
// It fails when DataFile is not a plain file name.
func (o SaveOptions) WithDefaults(path string) (SaveOptions, string, error) {
	if err := o.defaults(path); err != nil {
		return o, "", fmt.Errorf("%s: %w", path, err)
	}
	return o, filepath.Join(filepath.Dir(path), o.DataFile), nil
}

func (o *SaveOptions) defaults(path string) error {
	if o.Threshold <= 0 {
		o.Threshold = 1024
	}
	if o.Align <= 0 {
		o.Align = 4096
	}
	if o.DataFile == "" {
		o.DataFile = filepath.Base(path) + ".data"
	}
	if strings.ContainsAny(o.DataFile, `/\`) || o.DataFile == "." || o.DataFile == ".." {
		return fmt.Errorf("data file name %q must be a plain file name", o.DataFile)
	}
	return nil
}

// Save writes the model to path. It never modifies the file the model came
// from or its external data: writes go to temporary files in the destination
// folder that are synced and renamed into place (WriteFileAtomic, or
// PairWriter with external data), and on any error an earlier output at
// path is left as it was. The in-memory model is unchanged by Save.
func (m *Model) Save(path string, opts SaveOptions) error {
	opts, dataPath, err := opts.WithDefaults(path)
	if err != nil {
		return err
	}
	if err := m.CheckOutputs(path, dataPath); err != nil {
		return err
	}
	external := opts.External == ExternalAlways
	if opts.External == ExternalAuto {
		size, err := m.ProtoSize()
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		external = m.hasExternal() || size > maxProtoSize
	}
	if !external {
		return m.saveInline(path, opts)
	}
	return m.saveExternal(path, opts)
}

func (m *Model) hasExternal() bool {
	found := false
	m.Tensors(func(t *onnxpb.TensorProto) { found = found || IsExternal(t) })
	return found
}

// CheckOutputs refuses output paths that are folders, or that are the file
// the model was loaded from or one of its external data files (through any
// link): writing there would change the input.
func (m *Model) CheckOutputs(outputs ...string) error {
	for _, out := range outputs {
		if st, err := os.Stat(out); err == nil && st.IsDir() {
			return fmt.Errorf("%s: is a folder; Save needs a file name", out)
		}
	}
	var g paths.Guard
	g.Input("a file of the model", m.inputFiles()...)
	for _, out := range outputs {
		if err := g.Output("output", out); err != nil {
			return err
		}
	}
	return nil
}

// inputFiles lists the file the model was loaded from and its external
// data files.
func (m *Model) inputFiles() []string {
	var files []string
	seen := map[string]bool{}
	add := func(p string) {
		if p != "" && !seen[p] {
			seen[p] = true
			files = append(files, p)
		}
	}
	add(m.path)
	m.Tensors(func(t *onnxpb.TensorProto) {
		if IsExternal(t) {
			if ref, err := m.externalRef(t); err == nil {
				add(ref.Path)
			}
		}
	})
	return files
}

// saveInline writes a single self-contained protobuf, reading any external
// tensors into memory for the duration of the write.
func (m *Model) saveInline(path string, opts SaveOptions) error {
	var saved []tensorState
	defer func() { restore(saved) }()
	var err error
	m.Tensors(func(t *onnxpb.TensorProto) {
		if err != nil || !IsExternal(t) {
			return
		}
		var raw []byte
		if raw, err = m.readExternal(t); err == nil {
			saved = append(saved, snapshot(t))
			setInline(t, raw)
		}
	})
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	// Laid out with the inline weights Load left in the input copied
	// file to file (inline.go).
	layout, err := m.layoutFor(path, "the model is %d bytes, more than a protobuf can hold; save with external data")
	if err != nil {
		return err
	}
	// Through the pair writer, without data, so that the data file of an
	// earlier output at path goes too.
	pw, err := m.NewPairWriter(path, opts.DataFile)
	if err != nil {
		return err
	}
	return pw.CommitWith(layout.WriteTo, false)
}

// readExternal reads all the bytes an external tensor's reference covers,
// whatever its data type.
func (m *Model) readExternal(t *onnxpb.TensorProto) ([]byte, error) {
	r, ref, err := m.externalReader(t)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, ref.Length)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, fmt.Errorf("tensor %q: reading external data %s: %w", t.GetName(), ref.Location, err)
	}
	return buf, nil
}

// saveExternal writes large tensors to one aligned data file beside the
// model, streaming tensors that were already external from their old file.
// Both files are written in full before either replaces an earlier output
// (PairWriter), so a failed write leaves that output as it was.
func (m *Model) saveExternal(path string, opts SaveOptions) (err error) {
	pw, err := m.NewPairWriter(path, opts.DataFile)
	if err != nil {
		return err
	}
	defer pw.Abort()

	var saved []tensorState
	defer func() { restore(saved) }()
	var offset int64
	m.Tensors(func(t *onnxpb.TensorProto) {
		if err != nil {
			return
		}
		var size int64
		if IsExternal(t) {
			// Tensors already external are copied whatever their type,
			// so none keeps pointing at a location that no longer holds
			// its bytes.
			ref, rerr := m.externalRef(t)
			if rerr != nil {
				err = rerr
				return
			}
			size = ref.Length
		} else {
			dt := DataType(t.GetDataType())
			if dt.BitSize() == 0 || t.Segment != nil {
				return
			}
			var serr error
			if size, serr = ByteSize(dt, t.Dims); serr != nil {
				err = fmt.Errorf("tensor %q: %w", t.GetName(), serr)
				return
			}
			if size < opts.Threshold {
				return
			}
		}
		offset = (offset + opts.Align - 1) / opts.Align * opts.Align
		if err = m.copyTensorTo(pw.Data, offset, t); err != nil {
			return
		}
		StartWriteback(pw.Data, offset, size) // overlaps the next copies; Commit still syncs
		saved = append(saved, snapshot(t))
		SetExternal(t, pw.DataName, offset, size)
		offset += size
	})
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	layout, err := m.layoutFor(path, "the model's graph alone is %d bytes, more than a protobuf can hold")
	if err != nil {
		return err
	}
	return pw.CommitWith(layout.WriteTo, len(saved) > 0)
}

// NewPairWriter starts writing this model (or one derived from it) to path
// with external data in dataFile beside it; the model's own files are
// never removed. See PairWriter.
func (m *Model) NewPairWriter(path, dataFile string) (*PairWriter, error) {
	return NewPairWriter(path, dataFile, m.inputFiles()...)
}

// copyTensorTo writes t's bytes at offset in f. External data is copied
// file to file (CopyRange), never through memory.
func (m *Model) copyTensorTo(f *os.File, offset int64, t *onnxpb.TensorProto) error {
	if ok, err := m.copyInline(f, offset, t); ok {
		return err
	}
	if !IsExternal(t) {
		raw, err := m.RawData(t)
		if err != nil {
			return err
		}
		_, err = f.WriteAt(raw, offset)
		return err
	}
	ref, err := m.externalRef(t)
	if err != nil {
		return err
	}
	src, err := m.openData(ref.Path)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	if err := CopyRange(f, offset, src, ref.Offset, ref.Length); err != nil {
		return fmt.Errorf("tensor %q: copying external data: %w", t.GetName(), err)
	}
	return nil
}

// tensorState remembers a tensor's storage fields so Save can lay tensors out
// for writing and then put the in-memory model back as it was.
type tensorState struct {
	t            *onnxpb.TensorProto
	raw          []byte
	floats       []float32
	int32s       []int32
	int64s       []int64
	doubles      []float64
	uint64s      []uint64
	externalData []*onnxpb.StringStringEntryProto
	location     *onnxpb.TensorProto_DataLocation
	unknown      []byte // with the marker of data Load left in the file
}

func snapshot(t *onnxpb.TensorProto) tensorState {
	return tensorState{t, t.RawData, t.FloatData, t.Int32Data, t.Int64Data, t.DoubleData, t.Uint64Data, t.ExternalData, t.DataLocation, t.ProtoReflect().GetUnknown()}
}

func restore(states []tensorState) {
	for _, s := range states {
		t := s.t
		t.RawData, t.FloatData, t.Int32Data, t.Int64Data = s.raw, s.floats, s.int32s, s.int64s
		t.DoubleData, t.Uint64Data, t.ExternalData, t.DataLocation = s.doubles, s.uint64s, s.externalData, s.location
		t.ProtoReflect().SetUnknown(s.unknown)
	}
}

// layoutFor is LayoutProto for a save to path, refusing a layout past
// protobuf's size limit with tooBig (which has a %d for the size).
func (m *Model) layoutFor(path, tooBig string) (*ProtoLayout, error) {
	layout, err := m.LayoutProto(nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if layout.Size > maxProtoSize {
		return nil, fmt.Errorf("%s: "+tooBig, path, layout.Size)
	}
	return layout, nil
}
