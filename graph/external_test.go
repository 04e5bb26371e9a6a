package graph

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// mixedModel has tensors of several sizes and storages: a 4 KiB fp16
// initializer (raw), a 2 KiB float initializer in float_data, a 40-byte
// bias, a 1200-byte Constant node value, and a 2 KiB initializer inside an
// If branch.
func mixedModel() *onnxpb.ModelProto {
	big := make([]uint16, 2048)
	for i := range big {
		big[i] = uint16(i*7 + 1)
	}
	floats := make([]float32, 512)
	for i := range floats {
		floats[i] = float32(i) / 4
	}
	constVals := make([]float32, 300)
	for i := range constVals {
		constVals[i] = -float32(i)
	}
	inner := make([]byte, 2048)
	for i := range inner {
		inner[i] = byte(i * 13)
	}
	branch := &onnxpb.GraphProto{
		Name:        proto.String("then"),
		Initializer: []*onnxpb.TensorProto{rawTensor("inner.weight", Float, []int64{512}, inner)},
		Node:        []*onnxpb.NodeProto{node("inner_add", "Add", []string{"h", "inner.weight"}, []string{"t"})},
		Output:      []*onnxpb.ValueInfoProto{valueInfo("t")},
	}
	g := &onnxpb.GraphProto{
		Name:  proto.String("mixed"),
		Input: []*onnxpb.ValueInfoProto{valueInfo("x"), valueInfo("cond")},
		Initializer: []*onnxpb.TensorProto{
			rawTensor("big.weight", Float16, []int64{32, 64}, le16(big...)),
			{Name: proto.String("typed.weight"), DataType: proto.Int32(int32(Float)), Dims: []int64{512}, FloatData: floats},
			rawTensor("bias", Float, []int64{10}, le32f(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)),
		},
		Node: []*onnxpb.NodeProto{
			node("c", "Constant", nil, []string{"cv"}, &onnxpb.AttributeProto{
				Name: proto.String("value"), Type: onnxpb.AttributeProto_TENSOR.Enum(),
				T: rawTensor("", Float, []int64{300}, le32f(constVals...)),
			}),
			node("mm", "MatMul", []string{"x", "big.weight"}, []string{"h"}),
			node("if", "If", []string{"cond"}, []string{"y"}, graphAttr("then_branch", branch), graphAttr("else_branch", &onnxpb.GraphProto{
				Name: proto.String("else"), Node: []*onnxpb.NodeProto{node("id", "Identity", []string{"cv"}, []string{"e"})},
				Output: []*onnxpb.ValueInfoProto{valueInfo("e")},
			})),
		},
		Output: []*onnxpb.ValueInfoProto{valueInfo("y")},
	}
	return newModelProto(g)
}

// allTensors lists a model's tensors in the fixed order Tensors visits them.
func allTensors(mp *onnxpb.ModelProto) []*onnxpb.TensorProto {
	var ts []*onnxpb.TensorProto
	NewModel(mp, "").Tensors(func(t *onnxpb.TensorProto) { ts = append(ts, t) })
	return ts
}

// inlined returns a copy of m's protobuf with every tensor's data read (from
// typed fields, raw_data or external files) into raw_data, so two models
// that hold the same data the same way compare proto-equal whatever their
// storage.
func inlined(t *testing.T, m *Model) *onnxpb.ModelProto {
	t.Helper()
	c := proto.Clone(m.Proto).(*onnxpb.ModelProto)
	orig, copies := allTensors(m.Proto), allTensors(c)
	for i, ot := range orig {
		ct := copies[i]
		if DataType(ot.GetDataType()).BitSize() == 0 && !IsExternal(ot) {
			continue // strings and the like stay as they are
		}
		var raw []byte
		var err error
		if IsExternal(ot) {
			raw, err = m.readExternal(ot)
		} else {
			raw, err = m.RawData(ot)
		}
		if err != nil {
			t.Fatalf("tensor %d %q: %v", i, ot.GetName(), err)
		}
		setInline(ct, append([]byte{}, raw...))
	}
	return c
}

// sameData checks that two models are equal once every tensor's data is
// inline, and compares every tensor's bytes one by one for a readable
// failure.
func sameData(t *testing.T, want, got *Model) {
	t.Helper()
	w, g := inlined(t, want), inlined(t, got)
	wt, gt := allTensors(w), allTensors(g)
	if len(wt) != len(gt) {
		t.Fatalf("%d tensors, want %d", len(gt), len(wt))
	}
	for i := range wt {
		if !bytes.Equal(wt[i].RawData, gt[i].RawData) {
			t.Fatalf("tensor %q: bytes differ", wt[i].GetName())
		}
	}
	if !proto.Equal(w, g) {
		t.Fatal("models differ once tensor data is inlined")
	}
}

// listDir returns the names in dir, sorted.
func listDir(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

func TestSaveExternalAlways(t *testing.T) {
	src := NewModel(mixedModel(), "")
	before := proto.Clone(src.Proto)
	dir := t.TempDir()
	out := filepath.Join(dir, "m.onnx")
	if err := src.Save(out, SaveOptions{External: ExternalAlways, Threshold: 1024, Align: 4096}); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(before, src.Proto) {
		t.Fatal("Save changed the in-memory model")
	}
	if got := listDir(t, dir); strings.Join(got, " ") != "m.onnx m.onnx.data" {
		t.Fatalf("output folder holds %v", got)
	}
	m := mustLoad(t, out)
	sameData(t, src, m)
	// Tensors of 1024 bytes or more are in the one data file, aligned; the
	// 40-byte bias stays inline.
	wantExternal := map[string]int64{"big.weight": 4096, "typed.weight": 2048, "": 1200, "inner.weight": 2048}
	seen := map[int64]bool{}
	var end int64
	for _, tt := range allTensors(m.Proto) {
		size, ok := wantExternal[tt.GetName()]
		if !ok {
			if IsExternal(tt) {
				t.Errorf("%q is external", tt.GetName())
			}
			continue
		}
		ref, err := m.ExternalRef(tt)
		if err != nil || !IsExternal(tt) {
			t.Fatalf("%q: not external: %v", tt.GetName(), err)
		}
		if ref.Location != "m.onnx.data" || ref.Offset%4096 != 0 || ref.Length != size || seen[ref.Offset] {
			t.Errorf("%q: %+v", tt.GetName(), ref)
		}
		seen[ref.Offset] = true
		end = max(end, ref.Offset+ref.Length)
	}
	if len(seen) != 4 {
		t.Errorf("%d external tensors, want 4", len(seen))
	}
	if st, err := os.Stat(filepath.Join(dir, "m.onnx.data")); err != nil || st.Size() != end {
		t.Errorf("data file: %v, %v; want %d bytes", st, err, end)
	}
	for _, name := range []string{"m.onnx", "m.onnx.data"} {
		if st, _ := os.Stat(filepath.Join(dir, name)); st.Mode().Perm() != 0o644 {
			t.Errorf("%s has mode %v, want 0644", name, st.Mode().Perm())
		}
	}

	// Saved again (now streaming from m.onnx.data) with other options.
	dir2 := t.TempDir()
	out2 := filepath.Join(dir2, "again.onnx")
	if err := m.Save(out2, SaveOptions{External: ExternalAlways, Threshold: 2048, DataFile: "weights.bin", Align: 64}); err != nil {
		t.Fatal(err)
	}
	m2 := mustLoad(t, out2)
	sameData(t, src, m2)
	for _, tt := range allTensors(m2.Proto) {
		if IsExternal(tt) {
			ref, _ := m2.ExternalRef(tt)
			if ref.Location != "weights.bin" || ref.Offset%64 != 0 {
				t.Errorf("%q: %+v", tt.GetName(), ref)
			}
		}
	}
	if got := listDir(t, dir2); strings.Join(got, " ") != "again.onnx weights.bin" {
		t.Fatalf("output folder holds %v", got)
	}
}

func TestSaveModes(t *testing.T) {
	// An inline model saved in auto mode stays one file.
	src := NewModel(mixedModel(), "")
	dir := t.TempDir()
	if err := src.Save(filepath.Join(dir, "inline.onnx"), SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := listDir(t, dir); len(got) != 1 {
		t.Fatalf("auto mode on an inline model wrote %v", got)
	}
	data, _ := os.ReadFile(filepath.Join(dir, "inline.onnx"))
	if !bytes.Equal(data, mustMarshal(t, src.Proto)) {
		t.Fatal("auto mode did not write the model as it is")
	}

	// A model with external data keeps it in auto mode.
	if err := src.Save(filepath.Join(dir, "ext.onnx"), SaveOptions{External: ExternalAlways}); err != nil {
		t.Fatal(err)
	}
	ext := mustLoad(t, filepath.Join(dir, "ext.onnx"))
	dir2 := t.TempDir()
	if err := ext.Save(filepath.Join(dir2, "auto.onnx"), SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	auto := mustLoad(t, filepath.Join(dir2, "auto.onnx"))
	if !auto.hasExternal() {
		t.Fatal("auto mode dropped external data")
	}
	sameData(t, src, auto)

	// Never: one file, external tensors read in.
	if err := ext.Save(filepath.Join(dir2, "never.onnx"), SaveOptions{External: ExternalNever}); err != nil {
		t.Fatal(err)
	}
	never := mustLoad(t, filepath.Join(dir2, "never.onnx"))
	if never.hasExternal() {
		t.Fatal("ExternalNever wrote external data")
	}
	sameData(t, src, never)
	if got := listDir(t, dir2); strings.Join(got, " ") != "auto.onnx auto.onnx.data never.onnx" {
		t.Fatalf("folder holds %v", got)
	}

	// A tensor changed in memory is saved with its new values.
	w := ext.Proto.Graph.Initializer[0]
	vals, err := ext.Float64s(w)
	if err != nil {
		t.Fatal(err)
	}
	vals[0] = 42
	if err := SetFloat64s(w, vals); err != nil {
		t.Fatal(err)
	}
	if err := ext.Save(filepath.Join(dir2, "edited.onnx"), SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	edited := mustLoad(t, filepath.Join(dir2, "edited.onnx"))
	ew := edited.Proto.Graph.Initializer[0]
	if !IsExternal(ew) {
		t.Error("the edited 4 KiB tensor was not written to the data file in auto mode")
	}
	if got, err := edited.Float64s(ew); err != nil || got[0] != 42 || got[1] != vals[1] {
		t.Fatalf("edited tensor reads back %v, %v", got[:2], err)
	}
}

func TestSaveBadDataFileName(t *testing.T) {
	m := NewModel(mixedModel(), "")
	dir := t.TempDir()
	for _, name := range []string{"sub/w.bin", `..\w.bin`, "..", "."} {
		err := m.Save(filepath.Join(dir, "m.onnx"), SaveOptions{External: ExternalAlways, DataFile: name})
		if err == nil || !strings.Contains(err.Error(), "plain file name") {
			t.Errorf("DataFile %q: %v", name, err)
		}
	}
	if got := listDir(t, dir); len(got) != 0 {
		t.Fatalf("failed saves left %v", got)
	}
}

// copyDir copies the regular files of src into a new temp folder.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	for _, name := range listDir(t, src) {
		data, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

type fileState struct {
	data  []byte
	mtime time.Time
}

func snapshotDir(t *testing.T, dir string) map[string]fileState {
	t.Helper()
	s := map[string]fileState{}
	for _, name := range listDir(t, dir) {
		p := filepath.Join(dir, name)
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(p)
		s[name] = fileState{data, st.ModTime()}
	}
	return s
}

func checkDirUnchanged(t *testing.T, dir string, before map[string]fileState) {
	t.Helper()
	after := snapshotDir(t, dir)
	if len(after) != len(before) {
		t.Errorf("%s: files %v, before %d files", dir, listDir(t, dir), len(before))
	}
	for name, b := range before {
		a, ok := after[name]
		if !ok || !bytes.Equal(a.data, b.data) || !a.mtime.Equal(b.mtime) {
			t.Errorf("%s changed", name)
		}
	}
}

// externalFixture saves mixedModel with external data into a fresh folder
// and returns the model's path.
func externalFixture(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "model.onnx")
	if err := NewModel(mixedModel(), "").Save(path, SaveOptions{External: ExternalAlways}); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestSaveNeverTouchesInput(t *testing.T) {
	path := externalFixture(t)
	dir := filepath.Dir(path)
	// Old mtimes, so that any rewrite shows.
	old := time.Now().Add(-time.Hour).Truncate(time.Second)
	for _, name := range listDir(t, dir) {
		os.Chtimes(filepath.Join(dir, name), old, old)
	}
	before := snapshotDir(t, dir)
	m := mustLoad(t, path)

	out := t.TempDir()
	for i, opts := range []SaveOptions{{}, {External: ExternalAlways, Threshold: 1}, {External: ExternalNever}} {
		if err := m.Save(filepath.Join(out, "o"+string(rune('a'+i))+".onnx"), opts); err != nil {
			t.Fatal(err)
		}
	}
	// Saving beside the input under another name is fine too.
	if err := m.Save(filepath.Join(dir, "copy.onnx"), SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	before["copy.onnx"], before["copy.onnx.data"] = snapshotDir(t, dir)["copy.onnx"], snapshotDir(t, dir)["copy.onnx.data"]

	// Overwriting the input or its data file is refused, by any name.
	link := filepath.Join(t.TempDir(), "link.onnx")
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	hard := filepath.Join(t.TempDir(), "hard.data")
	if err := os.Link(path+".data", hard); err != nil {
		t.Fatal(err)
	}
	refused := []struct {
		path string
		opts SaveOptions
	}{
		{path, SaveOptions{}},
		{path, SaveOptions{External: ExternalNever}},
		{filepath.Join(dir, "other.onnx"), SaveOptions{DataFile: "model.onnx.data"}},
		{filepath.Join(dir, "other.onnx"), SaveOptions{External: ExternalAlways, DataFile: "model.onnx.data"}},
		{link, SaveOptions{}},
		{filepath.Join(filepath.Dir(hard), "x.onnx"), SaveOptions{DataFile: "hard.data"}},
		{filepath.Join(dir, ".", "model.onnx"), SaveOptions{}},
	}
	for _, r := range refused {
		err := m.Save(r.path, r.opts)
		if err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
			t.Errorf("Save(%s, %+v) = %v, want a refusal", r.path, r.opts, err)
		}
	}
	checkDirUnchanged(t, dir, before)
	if _, err := os.Lstat(filepath.Join(dir, "other.onnx")); err == nil {
		t.Error("a refused save left other.onnx")
	}
}

// checkNoTemps fails if dir holds any of Save's temporary files.
func checkNoTemps(t *testing.T, dir string) {
	t.Helper()
	for _, name := range listDir(t, dir) {
		if strings.Contains(name, ".tmp") {
			t.Errorf("temporary file %s left in %s", name, dir)
		}
	}
}

func TestSaveAtomic(t *testing.T) {
	t.Run("external data shrank after Load", func(t *testing.T) {
		path := externalFixture(t)
		m := mustLoad(t, path)
		before := proto.Clone(m.Proto)
		// Cut the input's data file so the last tensor is short.
		st, _ := os.Stat(path + ".data")
		if err := os.Truncate(path+".data", st.Size()-100); err != nil {
			t.Fatal(err)
		}
		for _, mode := range []ExternalMode{ExternalAuto, ExternalAlways, ExternalNever} {
			out := t.TempDir()
			err := m.Save(filepath.Join(out, "m.onnx"), SaveOptions{External: mode})
			if err == nil || !strings.Contains(err.Error(), "too short") || !strings.Contains(err.Error(), "m.onnx") {
				t.Errorf("mode %d: Save = %v, want a too-short error naming the output", mode, err)
			}
			if got := listDir(t, out); len(got) != 0 {
				t.Errorf("mode %d: failed save left %v", mode, got)
			}
		}
		if !proto.Equal(before, m.Proto) {
			t.Error("a failed Save changed the in-memory model")
		}
	})

	t.Run("failure keeps the previous output", func(t *testing.T) {
		path := externalFixture(t)
		m := mustLoad(t, path)
		out := t.TempDir()
		target := filepath.Join(out, "m.onnx")
		if err := m.Save(target, SaveOptions{}); err != nil {
			t.Fatal(err)
		}
		before := snapshotDir(t, out)
		// The next save fails reading its source: the old output, model
		// and data file, must be exactly as they were.
		os.Truncate(path+".data", 10)
		if err := m.Save(target, SaveOptions{}); err == nil {
			t.Fatal("Save succeeded with a truncated source")
		}
		checkDirUnchanged(t, out, before)
		if m2 := mustLoad(t, target); m2 == nil {
			t.Fatal("old output no longer loads")
		}
	})

	t.Run("output path is a folder", func(t *testing.T) {
		m := mustLoad(t, externalFixture(t))
		out := t.TempDir()
		os.Mkdir(filepath.Join(out, "m.onnx"), 0o755)
		os.WriteFile(filepath.Join(out, "m.onnx.data"), []byte("old data"), 0o644)
		before := snapshotDir(t, out)
		err := m.Save(filepath.Join(out, "m.onnx"), SaveOptions{})
		if err == nil || !strings.Contains(err.Error(), "m.onnx") {
			t.Fatalf("Save = %v", err)
		}
		checkDirUnchanged(t, out, before)
		checkNoTemps(t, out)
	})

	t.Run("unwritable output folder", func(t *testing.T) {
		if os.Geteuid() == 0 {
			t.Skip("skipping: root can write to a read-only folder")
		}
		m := mustLoad(t, externalFixture(t))
		out := t.TempDir()
		if err := os.Chmod(out, 0o555); err != nil {
			t.Fatal(err)
		}
		defer os.Chmod(out, 0o755)
		for _, mode := range []ExternalMode{ExternalAuto, ExternalNever} {
			err := m.Save(filepath.Join(out, "m.onnx"), SaveOptions{External: mode})
			if err == nil || !strings.Contains(err.Error(), "m.onnx") {
				t.Errorf("Save = %v", err)
			}
		}
		if got := listDir(t, out); len(got) != 0 {
			t.Errorf("failed save left %v", got)
		}
	})

	t.Run("missing output folder", func(t *testing.T) {
		m := NewModel(mixedModel(), "")
		out := filepath.Join(t.TempDir(), "no", "such", "m.onnx")
		for _, mode := range []ExternalMode{ExternalNever, ExternalAlways} {
			err := m.Save(out, SaveOptions{External: mode})
			if err == nil || !strings.Contains(err.Error(), out) || strings.Contains(err.Error(), "\n") {
				t.Errorf("Save = %v, want a one-line error naming %s", err, out)
			}
		}
	})

	t.Run("WriteFileAtomic writer error", func(t *testing.T) {
		dir := t.TempDir()
		p := filepath.Join(dir, "f")
		os.WriteFile(p, []byte("old"), 0o600)
		boom := errors.New("boom")
		err := WriteFileAtomic(p, func(w io.Writer) error {
			w.Write([]byte("partial"))
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("err = %v", err)
		}
		if data, _ := os.ReadFile(p); string(data) != "old" {
			t.Fatalf("file now holds %q", data)
		}
		checkNoTemps(t, dir)
		if err := WriteFileAtomic(p, func(w io.Writer) error { _, err := w.Write([]byte("new")); return err }); err != nil {
			t.Fatal(err)
		}
		if data, _ := os.ReadFile(p); string(data) != "new" {
			t.Fatalf("file now holds %q", data)
		}
		checkNoTemps(t, dir)
	})
}

func TestSaveUnknownTypeExternal(t *testing.T) {
	// A tensor of a data type this package does not know (a future ONNX
	// type) stored externally is copied as its declared bytes, not left
	// pointing at an offset in a data file that Save rewrites.
	dir := t.TempDir()
	payload := []byte("0123456789abcdefXYZ")
	os.WriteFile(filepath.Join(dir, "model.onnx.data"), payload, 0o644)
	mp := tinyModel()
	future := &onnxpb.TensorProto{Name: proto.String("future"), DataType: proto.Int32(1000), Dims: []int64{3}}
	SetExternal(future, "model.onnx.data", 16, 3)
	mp.Graph.Initializer = append(mp.Graph.Initializer, future)
	path := writeModel(t, dir, "model.onnx", mp)
	m := mustLoad(t, path)
	out := t.TempDir()
	for _, mode := range []ExternalMode{ExternalAuto, ExternalNever} {
		p := filepath.Join(out, "m.onnx")
		if err := m.Save(p, SaveOptions{External: mode, Align: 8}); err != nil {
			t.Fatal(err)
		}
		back := mustLoad(t, p)
		ft := back.Proto.Graph.Initializer[1]
		var got []byte
		if IsExternal(ft) {
			var err error
			if got, err = back.readExternal(ft); err != nil {
				t.Fatal(err)
			}
		} else {
			got = ft.RawData
		}
		if string(got) != "XYZ" {
			t.Fatalf("mode %d: future tensor holds %q", mode, got)
		}
	}
}

func TestRoundTripExternalCorpus(t *testing.T) {
	for _, name := range []string{"llama-tiny-fp16-extdata/model.onnx", "quantized-qdq-extdata/conv_qdq_external_ini.onnx"} {
		t.Run(name, func(t *testing.T) {
			path := corpusPath(t, name)
			dir := filepath.Dir(path)
			before := snapshotDir(t, dir)
			m := mustLoad(t, path)
			if !m.hasExternal() {
				t.Fatal("corpus model has no external data")
			}
			for _, mode := range []ExternalMode{ExternalAuto, ExternalAlways, ExternalNever} {
				out := filepath.Join(t.TempDir(), "model.onnx")
				if err := m.Save(out, SaveOptions{External: mode}); err != nil {
					t.Fatal(err)
				}
				back := mustLoad(t, out)
				if (mode == ExternalNever) == back.hasExternal() {
					t.Errorf("mode %d: external = %v", mode, back.hasExternal())
				}
				sameData(t, m, back)
				// Every tensor that was external still is (auto and always).
				if mode != ExternalNever {
					orig, saved := allTensors(m.Proto), allTensors(back.Proto)
					for i := range orig {
						if IsExternal(orig[i]) && !IsExternal(saved[i]) {
							t.Errorf("%q is no longer external", orig[i].GetName())
						}
					}
				}
			}
			checkDirUnchanged(t, dir, before)
		})
	}
}
