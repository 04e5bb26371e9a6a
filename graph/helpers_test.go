package graph

import (
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// libonnxDir is where Debian's libonnx-testdata package installs its models.
const libonnxDir = "/usr/share/libonnx-testdata/data"

// corpusDir is the shared corpus of real exported models, relative to this
// package's folder (../shared/corpus from the repository root).
const corpusDir = "../../shared/corpus"

// corpusPath returns the path of a corpus file, skipping the test when the
// corpus is not there (a fresh clone outside CI has no ../shared).
func corpusPath(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(corpusDir, name)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("skipping: corpus model %s not found (%v); the shared corpus lives in ../shared/corpus beside the repository", name, err)
	}
	return p
}

// mustLoad loads a model or fails the test.
func mustLoad(t testing.TB, path string) *Model {
	t.Helper()
	m, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// mustMarshal serializes a message or fails the test.
func mustMarshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatalf("Marshal: %v", err)
	}
	return b
}

// writeModel serializes mp to dir/name and returns the path.
func writeModel(t testing.TB, dir, name string, mp *onnxpb.ModelProto) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, mustMarshal(t, mp), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// rawTensor builds a tensor with raw data.
func rawTensor(name string, dt DataType, dims []int64, raw []byte) *onnxpb.TensorProto {
	return &onnxpb.TensorProto{
		Name:     proto.String(name),
		DataType: proto.Int32(int32(dt)),
		Dims:     dims,
		RawData:  raw,
	}
}

// node builds a node in the default domain.
func node(name, op string, inputs, outputs []string, attrs ...*onnxpb.AttributeProto) *onnxpb.NodeProto {
	n := &onnxpb.NodeProto{OpType: proto.String(op), Input: inputs, Output: outputs, Attribute: attrs}
	if name != "" {
		n.Name = proto.String(name)
	}
	return n
}

func valueInfo(name string) *onnxpb.ValueInfoProto {
	return &onnxpb.ValueInfoProto{Name: proto.String(name)}
}

func graphAttr(name string, g *onnxpb.GraphProto) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_GRAPH.Enum(), G: g}
}

func intsAttr(name string, v ...int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INTS.Enum(), Ints: v}
}

func intAttr(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

// newModelProto wraps a graph in a ModelProto importing opset 17.
func newModelProto(g *onnxpb.GraphProto) *onnxpb.ModelProto {
	return &onnxpb.ModelProto{
		IrVersion:    proto.Int64(8),
		ProducerName: proto.String("onnxlora-test"),
		OpsetImport:  []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(17)}},
		Graph:        g,
	}
}
