package graph

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// exampleModel is testdata/example/model.onnx: y = x·Wqᵀ + x·Wk where
// q.weight (FLOAT16 [2,3] = 1..6) reaches its MatMul through a Transpose and
// k.weight (FLOAT [3,2] = 0.5..3) directly; both live in model.onnx.data.
func exampleModel(t *testing.T, dir string) {
	q := &onnxpb.TensorProto{Name: proto.String("q.weight"), DataType: proto.Int32(int32(Float16)), Dims: []int64{2, 3}}
	k := &onnxpb.TensorProto{Name: proto.String("k.weight"), DataType: proto.Int32(int32(Float)), Dims: []int64{3, 2}}
	qb := le16(0x3c00, 0x4000, 0x4200, 0x4400, 0x4500, 0x4600) // 1 2 3 4 5 6
	kb := le32f(0.5, 1, 1.5, 2, 2.5, 3)
	data := append(append(append([]byte{}, qb...), make([]byte, 4)...), kb...) // k at offset 16
	SetExternal(q, "model.onnx.data", 0, int64(len(qb)))
	SetExternal(k, "model.onnx.data", 16, int64(len(kb)))
	g := &onnxpb.GraphProto{
		Name:        proto.String("example"),
		Input:       []*onnxpb.ValueInfoProto{valueInfo("x")},
		Initializer: []*onnxpb.TensorProto{q, k},
		Node: []*onnxpb.NodeProto{
			node("q_t", "Transpose", []string{"q.weight"}, []string{"q.weight_t"}, intsAttr("perm", 1, 0)),
			node("q_cast", "Cast", []string{"q.weight_t"}, []string{"q.weight_f"}, intAttr("to", int64(Float))),
			node("q_proj", "MatMul", []string{"x", "q.weight_f"}, []string{"q"}),
			node("k_proj", "MatMul", []string{"x", "k.weight"}, []string{"k"}),
			node("sum", "Add", []string{"q", "k"}, []string{"y"}),
		},
		Output: []*onnxpb.ValueInfoProto{valueInfo("y")},
	}
	if err := os.WriteFile(filepath.Join(dir, "model.onnx.data"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	writeModel(t, dir, "model.onnx", newModelProto(g))
}

// TestWriteFixtures rewrites the files under testdata from the code above
// when ONNXLORA_WRITE_FIXTURES=1.
func TestWriteFixtures(t *testing.T) {
	if os.Getenv("ONNXLORA_WRITE_FIXTURES") != "1" {
		t.Skip("set ONNXLORA_WRITE_FIXTURES=1 to rewrite testdata/example and testdata/fuzz/FuzzLoad")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzLoad")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, mp := range fuzzSeeds() {
		data := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", mustMarshal(t, mp))
		if err := os.WriteFile(filepath.Join(dir, "seed-"+name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ex := filepath.Join("testdata", "example")
	if err := os.MkdirAll(ex, 0o755); err != nil {
		t.Fatal(err)
	}
	exampleModel(t, ex)
}
