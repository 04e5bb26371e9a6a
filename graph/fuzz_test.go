package graph

import (
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// fuzzSeeds are small valid models covering the features Parse and the
// index handle: external data (in the fuzz folder's w.bin), typed fields,
// Constant nodes, nested subgraphs, transposed and shared weights.
func fuzzSeeds() map[string]*onnxpb.ModelProto {
	ext := tinyModel()
	SetExternal(ext.Graph.Initializer[0], "w.bin", 16, 16)
	nested := newModelProto(nestedModel())
	weights := newModelProto(weightsModel())
	for _, t := range weights.Graph.Initializer {
		t.RawData = t.RawData[:min(len(t.RawData), 16)]
		t.Dims = []int64{int64(len(t.RawData) / 4)}
	}
	typed := tinyModel()
	typed.Graph.Initializer = append(typed.Graph.Initializer,
		&onnxpb.TensorProto{Name: proto.String("h"), DataType: proto.Int32(int32(Float16)), Dims: []int64{2}, Int32Data: []int32{0x3c00, 0x7e00}},
		&onnxpb.TensorProto{Name: proto.String("d"), DataType: proto.Int32(int32(Double)), Dims: []int64{1}, DoubleData: []float64{2.5}},
		&onnxpb.TensorProto{Name: proto.String("b"), DataType: proto.Int32(int32(BFloat16)), Dims: []int64{1}, RawData: le16(0x3f80)},
		&onnxpb.TensorProto{Name: proto.String("i4"), DataType: proto.Int32(int32(onnxpb.TensorProto_INT4)), Dims: []int64{3}, Int32Data: []int32{0x21, 0x3}},
	)
	return map[string]*onnxpb.ModelProto{"tiny": tinyModel(), "external": ext, "nested": nested, "weights": weights, "typed": typed}
}

// FuzzLoad feeds Parse arbitrary bytes and, when they parse, exercises the
// index, Toposort, weight resolution, typed views and editing on the
// result. None of it may panic or hang.
//
//	go test ./graph/ -run '^$' -fuzz FuzzLoad -fuzztime 60s
func FuzzLoad(f *testing.F) {
	for _, mp := range fuzzSeeds() {
		data, err := proto.Marshal(mp)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	// Models with subgraphs from libonnx-testdata, when installed.
	for _, name := range []string{"test_if", "test_if_seq", "test_loop11", "test_loop13_seq", "test_scan9_sum", "test_sequence_map_add_2_sequences"} {
		if data, err := os.ReadFile(filepath.Join(libonnxDir, "node", name, "model.onnx")); err == nil {
			f.Add(data)
		}
	}
	dir := f.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "w.bin"), append(make([]byte, 16), le32f(1, 2, 3, 4)...), 0o644); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Parse(data, dir)
		if err != nil {
			if m != nil {
				t.Fatal("Parse returned a model and an error")
			}
			return
		}
		defer m.Close()
		m.Tensors(func(tp *onnxpb.TensorProto) {
			raw, err := m.RawData(tp)
			if err == nil {
				if size, serr := ByteSize(DataType(tp.GetDataType()), tp.Dims); serr != nil || int64(len(raw)) != size {
					t.Fatalf("RawData of %q gave %d bytes, ByteSize %d, %v", tp.GetName(), len(raw), size, serr)
				}
			}
			if DataType(tp.GetDataType()).IsFloat() {
				if vals, err := m.Float64s(tp); err == nil {
					c := proto.Clone(tp).(*onnxpb.TensorProto)
					if err := SetFloat64s(c, vals); err != nil {
						t.Fatalf("SetFloat64s of the values just read: %v", err)
					}
				}
			}
		})
		g := m.Graph()
		g.Walk(func(s *Graph) {
			for _, n := range s.Proto.Node {
				for _, in := range n.Input {
					if w := s.ResolveWeight(in); w != nil {
						s.IsShared(w, n)
						w.Dims()
					}
				}
			}
		})
		g.UniqueName("x")
		if err := g.Toposort(); err == nil {
			g.Reindex()
		}
		g.Cleanup()
		proto.Marshal(m.Proto)
	})
}
