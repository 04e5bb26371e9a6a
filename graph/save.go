package graph

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
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
	// output's file name + ".data", as ONNX Runtime GenAI writes it).
	DataFile string
	// Align is the alignment of each tensor's offset in the data file
	// (default 4096, so runtimes can memory-map weights).
	Align int64
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
// folder that are synced and renamed into place, and on any error nothing is
// left at the output path. The in-memory model is unchanged by Save.
func (m *Model) Save(path string, opts SaveOptions) error {
	if err := opts.defaults(path); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	dir := filepath.Dir(path)
	dataPath := filepath.Join(dir, opts.DataFile)
	if err := m.refuseOverwritingInputs(path, dataPath); err != nil {
		return err
	}
	external := opts.External == ExternalAlways
	if opts.External == ExternalAuto {
		external = m.hasExternal() || proto.Size(m.Proto) > maxProtoSize
	}
	if !external {
		return m.saveInline(path)
	}
	return m.saveExternal(path, dataPath, opts)
}

func (m *Model) hasExternal() bool {
	found := false
	m.Tensors(func(t *onnxpb.TensorProto) { found = found || IsExternal(t) })
	return found
}

// refuseOverwritingInputs stops a save that would replace the input model or
// one of its data files.
func (m *Model) refuseOverwritingInputs(outputs ...string) error {
	inputs := map[string]bool{}
	if m.path != "" {
		inputs[m.path] = true
	}
	m.Tensors(func(t *onnxpb.TensorProto) {
		if IsExternal(t) {
			if ref, err := m.externalRef(t); err == nil {
				inputs[ref.Path] = true
			}
		}
	})
	for _, out := range outputs {
		ost, err := os.Stat(out)
		if err != nil {
			continue
		}
		for in := range inputs {
			if ist, err := os.Stat(in); err == nil && os.SameFile(ist, ost) {
				return fmt.Errorf("%s: refusing to overwrite the input file %s; choose another output", out, in)
			}
		}
	}
	return nil
}

// saveInline writes a single self-contained protobuf, reading any external
// tensors into memory for the duration of the write.
func (m *Model) saveInline(path string) error {
	var saved []tensorState
	defer func() { restore(saved) }()
	var err error
	m.Tensors(func(t *onnxpb.TensorProto) {
		if err != nil || !IsExternal(t) {
			return
		}
		var raw []byte
		if raw, err = m.RawData(t); err == nil {
			saved = append(saved, snapshot(t))
			setInline(t, raw)
		}
	})
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if size := proto.Size(m.Proto); size > maxProtoSize {
		return fmt.Errorf("%s: the model is %d bytes, more than a protobuf can hold; save with external data", path, size)
	}
	data, err := proto.Marshal(m.Proto)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return WriteFileAtomic(path, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// saveExternal writes large tensors to one aligned data file beside the
// model, streaming tensors that were already external from their old file.
func (m *Model) saveExternal(path, dataPath string, opts SaveOptions) (err error) {
	dir := filepath.Dir(path)
	dataTmp, err := os.CreateTemp(dir, "."+filepath.Base(dataPath)+".tmp*")
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer func() {
		dataTmp.Close()
		if err != nil {
			os.Remove(dataTmp.Name())
		}
	}()

	var saved []tensorState
	defer func() { restore(saved) }()
	var offset int64
	buf := make([]byte, 1<<20)
	m.Tensors(func(t *onnxpb.TensorProto) {
		if err != nil {
			return
		}
		dt := DataType(t.GetDataType())
		if dt.BitSize() == 0 || t.Segment != nil {
			return
		}
		size, serr := ByteSize(dt, t.Dims)
		if serr != nil {
			err = fmt.Errorf("tensor %q: %w", t.GetName(), serr)
			return
		}
		if !IsExternal(t) && size < opts.Threshold {
			return
		}
		offset = (offset + opts.Align - 1) / opts.Align * opts.Align
		if err = m.copyTensorTo(dataTmp, offset, t, buf); err != nil {
			return
		}
		saved = append(saved, snapshot(t))
		setExternal(t, opts.DataFile, offset, size)
		offset += size
	})
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err = dataTmp.Sync(); err != nil {
		return fmt.Errorf("%s: %w", dataPath, err)
	}
	if size := proto.Size(m.Proto); size > maxProtoSize {
		return fmt.Errorf("%s: the model's graph alone is %d bytes, more than a protobuf can hold", path, size)
	}
	data, err := proto.Marshal(m.Proto)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	// The data file goes first: a model file never points at missing data.
	if len(saved) > 0 {
		if err = dataTmp.Close(); err != nil {
			return fmt.Errorf("%s: %w", dataPath, err)
		}
		if err = os.Rename(dataTmp.Name(), dataPath); err != nil {
			return fmt.Errorf("%s: %w", dataPath, err)
		}
	} else {
		os.Remove(dataTmp.Name())
	}
	err = WriteFileAtomic(path, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
	if err != nil && len(saved) > 0 {
		os.Remove(dataPath)
	}
	return err
}

// copyTensorTo writes t's bytes at offset in f, streaming external data.
func (m *Model) copyTensorTo(f *os.File, offset int64, t *onnxpb.TensorProto, buf []byte) error {
	w := io.NewOffsetWriter(f, offset)
	if IsExternal(t) {
		r, _, err := m.externalReader(t)
		if err != nil {
			return err
		}
		if _, err := io.CopyBuffer(w, r, buf); err != nil {
			return fmt.Errorf("tensor %q: copying external data: %w", t.GetName(), err)
		}
		return nil
	}
	raw, err := m.RawData(t)
	if err != nil {
		return err
	}
	_, err = w.Write(raw)
	return err
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
}

func snapshot(t *onnxpb.TensorProto) tensorState {
	return tensorState{t, t.RawData, t.FloatData, t.Int32Data, t.Int64Data, t.DoubleData, t.Uint64Data, t.ExternalData, t.DataLocation}
}

func restore(states []tensorState) {
	for _, s := range states {
		t := s.t
		t.RawData, t.FloatData, t.Int32Data, t.Int64Data = s.raw, s.floats, s.int32s, s.int64s
		t.DoubleData, t.Uint64Data, t.ExternalData, t.DataLocation = s.doubles, s.uint64s, s.externalData, s.location
	}
}

// WriteFileAtomic writes a file through a temporary file in the same folder,
// synced and then renamed over path, so readers see the old file or the
// complete new one and a failed write leaves nothing at path.
func WriteFileAtomic(path string, write func(io.Writer) error) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("%s: %w", path, unwrapPathError(err))
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err = write(tmp); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err = os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("%s: %w", path, errors.Unwrap(err))
	}
	return nil
}
