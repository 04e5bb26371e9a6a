package graph

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// maxProtoSize is the largest protobuf a model file may be: protobuf's own
// 2 GiB limit. Larger weights must live in external data.
const maxProtoSize = 1<<31 - 1

// Model is a loaded ONNX model: its protobuf and the folder its external data
// is resolved in. A Model reads external data lazily and keeps the files it
// opened until Close.
type Model struct {
	// Proto is the model itself. Edit it freely; tensors keep pointing at the
	// external data of the file the model was loaded from until they are set.
	Proto *onnxpb.ModelProto

	path string // file the model was loaded from; empty for Parse without a path
	dir  string // folder that external data locations are relative to

	mu    sync.Mutex
	files map[string]*os.File // open external data files by resolved path

	// resolved caches resolveInside by location: every tensor of a data
	// file names the same location, and resolving walks each component.
	resolved sync.Map
}

// Load reads the ONNX model at path. External data is validated (it must stay
// inside the model's folder and hold the bytes its tensors claim) but not read.
func Load(path string) (*Model, error) {
	return load(path, false)
}

// LoadLazy is Load that also leaves the model file's large inline weights
// (raw_data) in the file until they are asked for, so they take no memory;
// Save copies them file to file. See inline.go for what differs: the
// tensors hold a marker (an unknown field) instead of their raw_data, so
// proto.Equal sees two loads of one file as different.
func LoadLazy(path string) (*Model, error) {
	return load(path, true)
}

func load(path string, lazy bool) (*Model, error) {
	f, _, err := openRegular(path) // a FIFO must not block
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if st.IsDir() {
		return nil, fmt.Errorf("%s: is a folder, not an ONNX file", path)
	}
	if st.Size() > maxProtoSize {
		return nil, fmt.Errorf("%s: %d bytes is more than a protobuf can hold (2 GiB); is this an external data file?", path, st.Size())
	}
	m, err := loadFile(f, st, filepath.Dir(path), lazy) // inline.go
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	m.path = path
	return m, nil
}

// Parse decodes a serialized model. dir is the folder external data locations
// are relative to; it may be empty for models without external data.
func Parse(data []byte, dir string) (*Model, error) {
	return parse(data, dir)
}

func parse(data []byte, dir string) (*Model, error) {
	mp := &onnxpb.ModelProto{}
	if err := proto.Unmarshal(data, mp); err != nil {
		return nil, fmt.Errorf("not a valid ONNX protobuf: %w", err)
	}
	if mp.Graph == nil {
		return nil, errors.New("not an ONNX model: it has no graph")
	}
	m := &Model{Proto: mp, dir: dir}
	if err := m.validateTensors(); err != nil {
		return nil, err
	}
	return m, nil
}

// NewModel wraps a ModelProto built in memory. External data locations, if
// any, are resolved relative to dir.
func NewModel(mp *onnxpb.ModelProto, dir string) *Model {
	return &Model{Proto: mp, dir: dir}
}

// Path returns the file the model was loaded from, or "".
func (m *Model) Path() string { return m.path }

// Dir returns the folder external data locations are resolved in.
func (m *Model) Dir() string { return m.dir }

// Close releases the external data files the model opened. The model can
// still be used; files are opened again when needed.
func (m *Model) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var first error
	for p, f := range m.files {
		if err := f.Close(); err != nil && first == nil {
			first = err
		}
		delete(m.files, p)
	}
	return first
}

// Opset returns the version of the default ONNX domain the model imports, or 0.
func (m *Model) Opset() int64 {
	return m.OpsetFor("")
}

// OpsetFor returns the imported version of domain ("" or "ai.onnx" for the
// default domain), or 0 when it is not imported.
func (m *Model) OpsetFor(domain string) int64 {
	if domain == "ai.onnx" {
		domain = ""
	}
	for _, op := range m.Proto.OpsetImport {
		d := op.GetDomain()
		if d == "ai.onnx" {
			d = ""
		}
		if d == domain {
			return op.GetVersion()
		}
	}
	return 0
}

// Metadata returns the value of a metadata_props key and whether it exists.
func (m *Model) Metadata(key string) (string, bool) {
	for _, p := range m.Proto.MetadataProps {
		if p.GetKey() == key {
			return p.GetValue(), true
		}
	}
	return "", false
}

// SetMetadata sets a metadata_props key, replacing an existing value in place
// so that the order of the other entries is kept.
func (m *Model) SetMetadata(key, value string) {
	for _, p := range m.Proto.MetadataProps {
		if p.GetKey() == key {
			p.Value = proto.String(value)
			return
		}
	}
	m.Proto.MetadataProps = append(m.Proto.MetadataProps, &onnxpb.StringStringEntryProto{
		Key: proto.String(key), Value: proto.String(value),
	})
}

// DeleteMetadata removes a metadata_props key if present.
func (m *Model) DeleteMetadata(key string) {
	props := m.Proto.MetadataProps[:0]
	for _, p := range m.Proto.MetadataProps {
		if p.GetKey() != key {
			props = append(props, p)
		}
	}
	m.Proto.MetadataProps = props
}

// Tensors calls fn for every tensor in the model that may hold data:
// initializers, sparse initializers' values and indices, and tensor
// attributes of nodes, in graphs, subgraphs, functions and training graphs.
func (m *Model) Tensors(fn func(*onnxpb.TensorProto)) {
	walkModelGraphs(m.Proto, func(g *onnxpb.GraphProto) {
		for _, t := range g.Initializer {
			fn(t)
		}
		for _, st := range g.SparseInitializer {
			sparseTensors(st, fn)
		}
		for _, n := range g.Node {
			nodeTensors(n, fn)
		}
	})
	for _, f := range m.Proto.Functions {
		for _, n := range f.Node {
			nodeTensors(n, fn)
		}
	}
}

func sparseTensors(st *onnxpb.SparseTensorProto, fn func(*onnxpb.TensorProto)) {
	if st.Values != nil {
		fn(st.Values)
	}
	if st.Indices != nil {
		fn(st.Indices)
	}
}

func nodeTensors(n *onnxpb.NodeProto, fn func(*onnxpb.TensorProto)) {
	for _, a := range n.Attribute {
		if a.T != nil {
			fn(a.T)
		}
		for _, t := range a.Tensors {
			fn(t)
		}
		if a.SparseTensor != nil {
			sparseTensors(a.SparseTensor, fn)
		}
		for _, st := range a.SparseTensors {
			sparseTensors(st, fn)
		}
	}
}

// walkModelGraphs calls fn for the main graph, every subgraph held in node
// attributes (at any depth), and the graphs of training_info and functions'
// node attributes.
func walkModelGraphs(mp *onnxpb.ModelProto, fn func(*onnxpb.GraphProto)) {
	if mp.Graph != nil {
		walkGraphs(mp.Graph, fn)
	}
	for _, ti := range mp.TrainingInfo {
		if ti.Initialization != nil {
			walkGraphs(ti.Initialization, fn)
		}
		if ti.Algorithm != nil {
			walkGraphs(ti.Algorithm, fn)
		}
	}
	for _, f := range mp.Functions {
		for _, n := range f.Node {
			for _, sub := range nodeSubgraphs(n) {
				walkGraphs(sub, fn)
			}
		}
	}
}

func walkGraphs(g *onnxpb.GraphProto, fn func(*onnxpb.GraphProto)) {
	fn(g)
	for _, n := range g.Node {
		for _, sub := range nodeSubgraphs(n) {
			walkGraphs(sub, fn)
		}
	}
}

// nodeSubgraphs returns the graphs held in a node's attributes.
func nodeSubgraphs(n *onnxpb.NodeProto) []*onnxpb.GraphProto {
	var subs []*onnxpb.GraphProto
	for _, a := range n.Attribute {
		if a.G != nil {
			subs = append(subs, a.G)
		}
		subs = append(subs, a.Graphs...)
	}
	return subs
}

// validateTensors checks every tensor's declared size against its data, and
// every external data reference against the file it names, without reading
// any tensor data.
func (m *Model) validateTensors() error {
	var err error
	m.Tensors(func(t *onnxpb.TensorProto) {
		if err == nil {
			err = m.validateTensor(t)
		}
	})
	return err
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
