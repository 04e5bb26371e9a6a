package graph

import (
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// tinyModel is a valid model: y = MatMul(x, W) with W an fp32 [2,2]
// initializer of 16 bytes.
func tinyModel() *onnxpb.ModelProto {
	g := &onnxpb.GraphProto{
		Name:        proto.String("tiny"),
		Input:       []*onnxpb.ValueInfoProto{valueInfo("x")},
		Output:      []*onnxpb.ValueInfoProto{valueInfo("y")},
		Initializer: []*onnxpb.TensorProto{rawTensor("W", Float, []int64{2, 2}, le32f(1, 2, 3, 4))},
		Node:        []*onnxpb.NodeProto{node("mm", "MatMul", []string{"x", "W"}, []string{"y"})},
	}
	return newModelProto(g)
}

// externalModel returns tinyModel with W in dir/w.bin at offset 0 (the
// caller writes the file), customised by edit.
func externalModel(edit func(w *onnxpb.TensorProto)) *onnxpb.ModelProto {
	mp := tinyModel()
	w := mp.Graph.Initializer[0]
	SetExternal(w, "w.bin", 0, 16)
	if edit != nil {
		edit(w)
	}
	return mp
}

func setKey(t *onnxpb.TensorProto, key, value string) {
	for _, kv := range t.ExternalData {
		if kv.GetKey() == key {
			kv.Value = proto.String(value)
			return
		}
	}
	t.ExternalData = append(t.ExternalData, &onnxpb.StringStringEntryProto{Key: proto.String(key), Value: proto.String(value)})
}

// checkLoadError loads path and checks the error is one line naming the
// file and containing every want.
func checkLoadError(t *testing.T, path string, want ...string) {
	t.Helper()
	m, err := Load(path)
	if err == nil {
		m.Close()
		t.Fatalf("Load(%s) succeeded, want an error", path)
	}
	msg := err.Error()
	if strings.Contains(msg, "\n") {
		t.Errorf("error is not one line: %q", msg)
	}
	if !strings.Contains(msg, path) {
		t.Errorf("error %q does not name the file %s", msg, path)
	}
	for _, w := range want {
		if !strings.Contains(msg, w) {
			t.Errorf("error %q does not say %q", msg, w)
		}
	}
}

func TestLoadBadInput(t *testing.T) {
	valid := mustMarshal(t, tinyModel())
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "secret.bin"), make([]byte, 64), 0o644); err != nil {
		t.Fatal(err)
	}
	type fixture struct {
		name  string
		model []byte             // model bytes; nil = marshal mp
		mp    *onnxpb.ModelProto //
		files map[string]int     // data files to create in the model's folder, by size
		setup func(dir string)   // more files
		want  []string
	}
	random := make([]byte, 4096)
	rand.New(rand.NewSource(7)).Read(random)
	fixtures := []fixture{
		{name: "truncated", model: valid[:len(valid)/2], want: []string{"not a valid ONNX protobuf"}},
		{name: "random bytes", model: random, want: []string{"ONNX"}},
		{name: "empty file", model: []byte{}, want: []string{"no graph"}},
		{name: "wrong raw_data size", mp: func() *onnxpb.ModelProto {
			mp := tinyModel()
			mp.Graph.Initializer[0].RawData = make([]byte, 12)
			return mp
		}(), want: []string{`"W"`, "raw_data has 12 bytes", "needs 16"}},
		{name: "dims overflow", mp: func() *onnxpb.ModelProto {
			mp := tinyModel()
			mp.Graph.Initializer[0].Dims = []int64{1 << 32, 1 << 32, 1 << 32}
			return mp
		}(), want: []string{`"W"`, "too many elements"}},
		{name: "dims overflow wrapping to a small product", mp: func() *onnxpb.ModelProto {
			// 2^32 * 2^32 wraps to 0 in int64 arithmetic, which would
			// match empty raw_data without an overflow check.
			mp := tinyModel()
			mp.Graph.Initializer[0].Dims = []int64{1 << 32, 1 << 32}
			mp.Graph.Initializer[0].RawData = []byte{}
			return mp
		}(), want: []string{`"W"`, "too many elements"}},
		{name: "negative dims", mp: func() *onnxpb.ModelProto {
			mp := tinyModel()
			mp.Graph.Initializer[0].Dims = []int64{-2, -2}
			return mp
		}(), want: []string{`"W"`, "negative dimension"}},
		{name: "bad tensor in a subgraph attribute", mp: func() *onnxpb.ModelProto {
			mp := tinyModel()
			body := &onnxpb.GraphProto{Initializer: []*onnxpb.TensorProto{rawTensor("inner", Float, []int64{3}, make([]byte, 4))}}
			mp.Graph.Node = append(mp.Graph.Node, node("if", "If", []string{"c"}, []string{"z"}, graphAttr("then_branch", body)))
			return mp
		}(), want: []string{`"inner"`, "raw_data has 4 bytes"}},
		{name: "external missing", mp: externalModel(nil), want: []string{`"W"`, "w.bin", "not found"}},
		{name: "external short", mp: externalModel(nil), files: map[string]int{"w.bin": 10}, want: []string{`"W"`, "w.bin", "too short"}},
		{name: "external length disagrees with dims", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "length", "8") }), files: map[string]int{"w.bin": 16}, want: []string{`"W"`, "needs 16 bytes"}},
		{name: "external offset past end", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "offset", "100") }), files: map[string]int{"w.bin": 16}, want: []string{`"W"`, "offset 100", "past the end"}},
		{name: "external offset not a number", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "offset", "0x10") }), files: map[string]int{"w.bin": 16}, want: []string{`"W"`, "bad offset"}},
		{name: "external negative offset", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "offset", "-16") }), files: map[string]int{"w.bin": 16}, want: []string{`"W"`, "bad offset"}},
		{name: "external negative length", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "length", "-1") }), files: map[string]int{"w.bin": 16}, want: []string{`"W"`, "bad length"}},
		{name: "external no location", mp: externalModel(func(w *onnxpb.TensorProto) { w.ExternalData = w.ExternalData[1:] }), want: []string{`"W"`, "no location"}},
		{name: "location ../x", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "location", "../x") }), want: []string{`"W"`, "outside the model's folder"}},
		{name: "location a/../../x", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "location", "a/../../x") }), want: []string{"outside the model's folder"}},
		{name: `location ..\x`, mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "location", `..\x`) }), want: []string{"outside the model's folder"}},
		{name: "location /etc/passwd", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "location", "/etc/passwd") }), want: []string{`"W"`, "/etc/passwd", "absolute"}},
		{name: "location is a folder", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "location", "sub") }), setup: func(dir string) { os.Mkdir(filepath.Join(dir, "sub"), 0o755) }, want: []string{"not a regular file"}},
		{name: "location is the folder itself", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "location", ".") }), want: []string{"not a regular file"}},
		{name: "symlink pointing outside", mp: externalModel(nil), setup: func(dir string) {
			if err := os.Symlink(filepath.Join(outside, "secret.bin"), filepath.Join(dir, "w.bin")); err != nil {
				t.Skip(err)
			}
		}, want: []string{`"W"`, "symlink"}},
		{name: "symlinked folder pointing outside", mp: externalModel(func(w *onnxpb.TensorProto) { setKey(w, "location", "sub/secret.bin") }), setup: func(dir string) {
			if err := os.Symlink(outside, filepath.Join(dir, "sub")); err != nil {
				t.Skip(err)
			}
		}, want: []string{`"W"`, "symlink"}},
	}
	for _, fx := range fixtures {
		t.Run(fx.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, size := range fx.files {
				if err := os.WriteFile(filepath.Join(dir, name), make([]byte, size), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if fx.setup != nil {
				fx.setup(dir)
			}
			data := fx.model
			if data == nil {
				data = mustMarshal(t, fx.mp)
			}
			path := filepath.Join(dir, "model.onnx")
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			checkLoadError(t, path, fx.want...)
		})
	}
}

func TestLoadGoodExternalData(t *testing.T) {
	// The counterparts of the refused cases that are fine: a symlink that
	// stays inside the folder, a file in a subfolder, an offset, no length
	// (the rest of the file), and a model whose folder is reached through
	// a symlink.
	dir := t.TempDir()
	data := append([]byte("0123456789abcdef"), le32f(1, 2, 3, 4)...)
	os.Mkdir(filepath.Join(dir, "weights"), 0o755)
	if err := os.WriteFile(filepath.Join(dir, "weights", "real.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join("weights", "real.bin"), filepath.Join(dir, "w.bin")); err != nil {
		t.Skip(err)
	}
	// Backslashes, as models written on Windows have them, are separators.
	for _, loc := range []string{"w.bin", "weights/real.bin", "./weights/../w.bin", `weights\real.bin`} {
		mp := externalModel(func(w *onnxpb.TensorProto) {
			setKey(w, "location", loc)
			setKey(w, "offset", "16")
			w.ExternalData = w.ExternalData[:2] // no length: to the end of the file
		})
		path := writeModel(t, dir, "model.onnx", mp)
		link := filepath.Join(t.TempDir(), "link")
		if err := os.Symlink(dir, link); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{path, filepath.Join(link, "model.onnx")} {
			m := mustLoad(t, p)
			w := m.Proto.Graph.Initializer[0]
			got, err := m.Float64s(w)
			if err != nil {
				t.Fatalf("%s via %s: %v", loc, p, err)
			}
			if !equalFloats(got, []float64{1, 2, 3, 4}) {
				t.Fatalf("%s: %v", loc, got)
			}
		}
	}
}

func TestLoadCorpusPathTraversal(t *testing.T) {
	path := corpusPath(t, "bad-external-data-path-traversal.onnx")
	checkLoadError(t, path, "outside the model's folder")
}

func TestLoadNotAFile(t *testing.T) {
	dir := t.TempDir()
	checkLoadError(t, dir, "folder")
	checkLoadError(t, filepath.Join(dir, "missing.onnx"), "no such file")
}

func TestModelMetadataAndOpset(t *testing.T) {
	mp := tinyModel()
	mp.OpsetImport = append(mp.OpsetImport, &onnxpb.OperatorSetIdProto{Domain: proto.String("com.microsoft"), Version: proto.Int64(1)})
	m := NewModel(mp, "")
	if m.Opset() != 17 || m.OpsetFor("ai.onnx") != 17 || m.OpsetFor("com.microsoft") != 1 || m.OpsetFor("x") != 0 {
		t.Errorf("opsets: %d %d %d %d", m.Opset(), m.OpsetFor("ai.onnx"), m.OpsetFor("com.microsoft"), m.OpsetFor("x"))
	}
	m.SetMetadata("a", "1")
	m.SetMetadata("b", "2")
	m.SetMetadata("a", "3")
	if v, ok := m.Metadata("a"); !ok || v != "3" {
		t.Errorf("a = %q, %v", v, ok)
	}
	if len(mp.MetadataProps) != 2 || mp.MetadataProps[0].GetKey() != "a" {
		t.Errorf("metadata order changed: %v", mp.MetadataProps)
	}
	m.DeleteMetadata("a")
	if _, ok := m.Metadata("a"); ok || len(mp.MetadataProps) != 1 {
		t.Errorf("after delete: %v", mp.MetadataProps)
	}
}
