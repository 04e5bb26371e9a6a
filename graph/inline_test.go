package graph

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// lazyModel writes a model with large inline weights (in the main graph,
// a Constant node and an If subgraph) and a small one, and returns its path
// and bytes.
func lazyModel(t *testing.T, big int) (string, []byte, *onnxpb.ModelProto) {
	t.Helper()
	mp := tinyModel()
	g := mp.Graph
	fill := func(n int, seed byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i*31) ^ seed ^ byte(i>>9)
		}
		return b
	}
	g.Initializer = append(g.Initializer,
		&onnxpb.TensorProto{Name: proto.String("big"), DataType: proto.Int32(int32(Float)), Dims: []int64{int64(big / 4)}, RawData: fill(big, 1)},
		&onnxpb.TensorProto{Name: proto.String("small"), DataType: proto.Int32(int32(Float)), Dims: []int64{4}, RawData: fill(16, 2)},
		&onnxpb.TensorProto{Name: proto.String("big16"), DataType: proto.Int32(int32(Float16)), Dims: []int64{64, 64}, RawData: fill(8192, 3)},
	)
	g.Node = append(g.Node, &onnxpb.NodeProto{OpType: proto.String("Constant"), Output: []string{"c"}, Attribute: []*onnxpb.AttributeProto{{
		Name: proto.String("value"), Type: onnxpb.AttributeProto_TENSOR.Enum(),
		T: &onnxpb.TensorProto{DataType: proto.Int32(int32(Float)), Dims: []int64{2048}, RawData: fill(8192, 4)},
	}}})
	path := filepath.Join(t.TempDir(), "model.onnx")
	data := mustMarshal(t, mp)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data, mp
}

func TestLoadLazyLeavesWeightsInFile(t *testing.T) {
	path, data, mp := lazyModel(t, 1<<20)
	m, err := LoadLazy(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	got := allTensors(m.Proto)
	orig := allTensors(mp)
	if len(got) != len(orig) {
		t.Fatalf("%d tensors, want %d", len(got), len(orig))
	}
	lazy := 0
	for i, tp := range got {
		if tp.RawData == nil && orig[i].RawData != nil {
			lazy++
			if len(orig[i].RawData) < lazyMin {
				t.Errorf("tensor %q of %d bytes left in the file", tp.GetName(), len(orig[i].RawData))
			}
		}
		raw, err := m.RawData(tp)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(raw, orig[i].RawData) {
			t.Errorf("tensor %q: RawData differs from the file's", tp.GetName())
		}
	}
	if lazy != 3 {
		t.Errorf("%d tensors left in the file, want 3 (big, big16, the Constant's)", lazy)
	}
	// Serialized again, the model is the file, byte for byte.
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, data) {
		t.Fatal("Marshal differs from the file")
	}
	out := filepath.Join(t.TempDir(), "out.onnx")
	if err := m.Save(out, SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	if saved, _ := os.ReadFile(out); !bytes.Equal(saved, data) {
		t.Fatal("Save differs from the file")
	}
	// A clone in another Model still finds its bytes.
	c := NewModel(proto.Clone(m.Proto).(*onnxpb.ModelProto), "")
	raw, err := c.RawData(c.Proto.Graph.Initializer[len(c.Proto.Graph.Initializer)-3])
	if err != nil || !bytes.Equal(raw, orig[len(mp.Graph.Initializer)-3].RawData) {
		t.Fatalf("clone: %v", err)
	}
	// External data: the lazy bytes go to the data file and load back.
	ext := filepath.Join(t.TempDir(), "ext.onnx")
	if err := m.Save(ext, SaveOptions{External: ExternalAlways}); err != nil {
		t.Fatal(err)
	}
	em := mustLoad(t, ext)
	if !IsExternal(em.Proto.Graph.Initializer[len(em.Proto.Graph.Initializer)-3]) {
		t.Fatal("big tensor not external")
	}
	sameData(t, mustLoad(t, path), em)
}

func TestLoadLazyEdits(t *testing.T) {
	path, _, mp := lazyModel(t, 64<<10)
	m, err := LoadLazy(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	// A tensor given new data drops its marker and saves its new bytes.
	g := m.Proto.Graph
	big := g.Initializer[len(g.Initializer)-3]
	repl := bytes.Repeat([]byte{7}, 64<<10)
	if err := SetRawData(big, repl); err != nil {
		t.Fatal(err)
	}
	mp.Graph.Initializer[len(mp.Graph.Initializer)-3].RawData = repl
	out := filepath.Join(t.TempDir(), "out.onnx")
	if err := m.Save(out, SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	saved, _ := os.ReadFile(out)
	if !bytes.Equal(saved, mustMarshal(t, mp)) {
		t.Fatal("edited model saved wrong")
	}
	// Pending tensors are laid out at offsets the caller fills.
	big16 := g.Initializer[len(g.Initializer)-1]
	l, err := m.LayoutProto(map[*onnxpb.TensorProto]int64{big16: 8192})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "pending.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := l.WriteTo(f); err != nil {
		t.Fatal(err)
	}
	fresh := bytes.Repeat([]byte{9}, 8192)
	if _, err := f.WriteAt(fresh, l.Offsets[big16]); err != nil {
		t.Fatal(err)
	}
	mp.Graph.Initializer[len(mp.Graph.Initializer)-1].RawData = fresh
	got, _ := os.ReadFile(f.Name())
	if !bytes.Equal(got, mustMarshal(t, mp)) || int64(len(got)) != l.Size {
		t.Fatal("pending layout wrong")
	}
	// The input replaced after loading: an error, not other bytes.
	if err := os.WriteFile(path, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	m.Close()
	if _, err := m.RawData(big16); err == nil || !strings.Contains(err.Error(), "changed after the model was loaded") {
		t.Fatalf("RawData of a replaced file: %v", err)
	}
}

func TestLoadLazyMemory(t *testing.T) {
	path, _, _ := lazyModel(t, 64<<20)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	m, err := LoadLazy(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 4<<20 {
		t.Fatalf("loading a 64 MiB model allocated %d bytes", grew)
	}
}

func TestLoadLazyLibonnxTestdata(t *testing.T) {
	// Every model saves byte-identical to what the eager Load saves, with
	// every raw_data of 16 bytes or more left in the file.
	defer func(n int) { lazyMin = n }(lazyMin)
	lazyMin = 16
	paths := libonnxModels(t)
	tmp := t.TempDir()
	lazy := 0
	for _, p := range paths {
		m, err := LoadLazy(p)
		if err != nil {
			t.Errorf("%s: LoadLazy: %v", p, err)
			continue
		}
		e, err := Load(p)
		if err != nil {
			t.Fatal(err)
		}
		want, err := proto.Marshal(e.Proto)
		if err != nil {
			t.Fatal(err)
		}
		m.Tensors(func(tp *onnxpb.TensorProto) {
			if _, _, ok := inlineRef(tp); ok {
				lazy++
			}
		})
		out := filepath.Join(tmp, "model.onnx")
		if err := m.Save(out, SaveOptions{}); err != nil {
			t.Errorf("%s: Save: %v", p, err)
			continue
		}
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: lazy save differs from the eager one", p)
		}
		m.Close()
	}
	if lazy == 0 {
		t.Error("no tensor was left in its file")
	}
	t.Logf("%d tensors left in their files over %d models", lazy, len(paths))
}

func TestLoadLazyDamagedFiles(t *testing.T) {
	// Truncated or damaged files: LoadLazy accepts exactly what Load
	// accepts, and what it accepts serializes as Load's model does.
	_, data, _ := lazyModel(t, 16<<10)
	dir := t.TempDir()
	path := filepath.Join(dir, "m.onnx")
	try := func(b []byte) {
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		e, eerr := Load(path)
		l, lerr := LoadLazy(path)
		if (eerr == nil) != (lerr == nil) {
			t.Fatalf("%d bytes: Load: %v, LoadLazy: %v", len(b), eerr, lerr)
		}
		if eerr != nil {
			return
		}
		want, _ := proto.Marshal(e.Proto)
		got, err := l.Marshal()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%d bytes: lazy model serializes differently (%v)", len(b), err)
		}
		l.Close()
	}
	for n := 0; n < len(data); n += 1 + n/16 {
		try(data[:n])
	}
	for i := 0; i < len(data); i += 97 {
		for _, x := range []byte{0x01, 0x80, 0xff} {
			b := append([]byte(nil), data...)
			b[i] ^= x
			try(b)
		}
	}
}

func TestLoadLazyFunctionDefaultTensor(t *testing.T) {
	// A tensor in a function's default attribute, which Model.Tensors does
	// not visit, keeps its bytes through a lazy load and save.
	mp := tinyModel()
	big := make([]byte, 8192)
	for i := range big {
		big[i] = byte(i * 13)
	}
	mp.Functions = []*onnxpb.FunctionProto{{
		Name: proto.String("f"), Domain: proto.String("custom"),
		AttributeProto: []*onnxpb.AttributeProto{{
			Name: proto.String("w"), Type: onnxpb.AttributeProto_TENSOR.Enum(),
			T: &onnxpb.TensorProto{DataType: proto.Int32(int32(Float)), Dims: []int64{2048}, RawData: big},
		}},
	}}
	data := mustMarshal(t, mp)
	path := filepath.Join(t.TempDir(), "model.onnx")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := LoadLazy(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Proto.Functions[0].AttributeProto[0].T.RawData != nil {
		t.Fatal("the function's tensor was read into memory")
	}
	out := filepath.Join(t.TempDir(), "out.onnx")
	if err := m.Save(out, SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	if saved, _ := os.ReadFile(out); !bytes.Equal(saved, data) {
		t.Fatal("saved model differs from the file")
	}
}
