package graph

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// atomicModel is a model with one 64-byte initializer (external at
// Threshold 1) whose bytes are all b.
func atomicModel(b byte) *Model {
	raw := make([]byte, 64)
	for i := range raw {
		raw[i] = b
	}
	g := &onnxpb.GraphProto{Initializer: []*onnxpb.TensorProto{rawTensor("w", Float, []int64{16}, raw)}}
	return NewModel(newModelProto(g), "")
}

func mode(t *testing.T, p string) os.FileMode {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func writeString(s string) func(io.Writer) error {
	return func(w io.Writer) error { _, err := io.WriteString(w, s); return err }
}

func TestStaleTemporariesRemoved(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out.onnx")
	old := time.Now().Add(-2 * staleAfter)
	mk := func(name string, age time.Time) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		os.Chtimes(filepath.Join(dir, name), age, age)
	}
	mk(".out.onnx.onnxlora-tmp-0123456789ab", old)   // ours, stale: removed
	mk(".out.onnx.onnxlora-tmp-fresh", time.Now())   // ours and young, but we hold the lock: no live writer has it
	mk(".other.onnx.onnxlora-tmp-0123456789ab", old) // another destination's: kept
	mk(".out.onnx.tmp123", old)                      // not named by us: kept
	mk("out.onnx.onnxlora-tmp-x", old)               // not hidden: not ours
	// A stale folder of WriteDirAtomic's loses only what we wrote into it.
	sd := filepath.Join(dir, ".out.onnx.onnxlora-tmp-dir000000000")
	os.Mkdir(sd, 0o755)
	os.WriteFile(filepath.Join(sd, "user-notes.txt"), []byte("keep"), 0o644)
	os.Chtimes(sd, old, old)
	if err := WriteFileAtomic(p, writeString("m")); err != nil {
		t.Fatal(err)
	}
	want := []string{".other.onnx.onnxlora-tmp-0123456789ab", ".out.onnx.onnxlora-tmp-dir000000000", ".out.onnx.tmp123", "out.onnx", "out.onnx.onnxlora-tmp-x"}
	if names := listDir(t, dir); !slices.Equal(names, want) {
		t.Errorf("after the write: %v\nwant %v", names, want)
	}
	if b, err := os.ReadFile(filepath.Join(sd, "user-notes.txt")); err != nil || string(b) != "keep" {
		t.Errorf("a file we did not write was removed from a stale folder: %v", err)
	}
}

// TestSavePairSwitchesTogether saves over an earlier external-data output
// again and again: each save's data file has a name the previous model does
// not use, the previous data file is removed after the switch, and the
// saved model always reads back its own values.
func TestSavePairSwitchesTogether(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out.onnx")
	opts := SaveOptions{External: ExternalAlways, Threshold: 1}
	var prevData string
	for i := byte(1); i <= 4; i++ {
		if err := atomicModel(i).Save(p, opts); err != nil {
			t.Fatal(err)
		}
		back := mustLoad(t, p)
		w, _ := back.Graph().Initializer("w")
		ref, err := back.ExternalRef(w)
		if err != nil {
			t.Fatal(err)
		}
		if raw, _ := back.RawData(w); raw[0] != i || raw[63] != i {
			t.Fatalf("save %d reads back %v", i, raw[:4])
		}
		if ref.Location == prevData {
			t.Errorf("save %d reused the data file name %s of the model it replaced", i, prevData)
		}
		if !isDataName(ref.Location, "out.onnx.data") {
			t.Errorf("data file %s is not named after out.onnx.data", ref.Location)
		}
		if names := listDir(t, dir); !slices.Equal(names, []string{"out.onnx", ref.Location}) {
			t.Errorf("save %d left %v", i, names)
		}
		for _, f := range []string{p, ref.Path} {
			if m := mode(t, f); m != 0o644 {
				t.Errorf("%s has mode %v", f, m)
			}
		}
		prevData = ref.Location
	}
}

func TestPairKeepsOthersData(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out.onnx")
	// The earlier output used a data file with another name: not one this
	// writer makes, so it stays.
	if err := atomicModel(1).Save(p, SaveOptions{External: ExternalAlways, Threshold: 1, DataFile: "weights.bin"}); err != nil {
		t.Fatal(err)
	}
	if err := atomicModel(2).Save(p, SaveOptions{External: ExternalAlways, Threshold: 1}); err != nil {
		t.Fatal(err)
	}
	if names := listDir(t, dir); !slices.Equal(names, []string{"out.onnx", "out.onnx.data", "weights.bin"}) {
		t.Errorf("after saving over an output with another data file: %v", names)
	}
	// An earlier output's data file that is an input of this write stays.
	if err := atomicModel(3).Save(p, SaveOptions{External: ExternalAlways, Threshold: 1}); err != nil {
		t.Fatal(err)
	}
	in := mustLoad(t, p)
	w, _ := in.Graph().Initializer("w")
	inRef, _ := in.ExternalRef(w)
	pw, err := NewPairWriter(p, "out.onnx.data", inRef.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := pw.Commit(mustMarshal(t, atomicModel(4).Proto), false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(inRef.Path); err != nil {
		t.Errorf("the input's data file %s was removed: %v", inRef.Location, err)
	}
}

func TestPairFailureLeavesOldOutput(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out.onnx")
	if err := atomicModel(1).Save(p, SaveOptions{External: ExternalAlways, Threshold: 1}); err != nil {
		t.Fatal(err)
	}
	before := listDir(t, dir)
	oldModel, _ := os.ReadFile(p)
	// The model's rename fails (its destination becomes a non-empty
	// folder): the new data file must go, the old pair stay.
	pw, err := NewPairWriter(filepath.Join(dir, "sub"), "out.onnx.data")
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "sub", "x"), 0o755)
	pw.Data.WriteAt([]byte("data"), 0)
	if err := pw.Commit([]byte("model"), true); err == nil {
		t.Fatal("commit over a folder succeeded")
	}
	os.RemoveAll(filepath.Join(dir, "sub"))
	if names := listDir(t, dir); !slices.Equal(names, before) {
		t.Errorf("a failed pair left %v, had %v", names, before)
	}
	// Abort leaves nothing either.
	pw, err = NewPairWriter(p, "out.onnx.data")
	if err != nil {
		t.Fatal(err)
	}
	pw.Abort()
	if names := listDir(t, dir); !slices.Equal(names, before) {
		t.Errorf("an aborted pair left %v, had %v", names, before)
	}
	if now, _ := os.ReadFile(p); !slices.Equal(now, oldModel) {
		t.Error("the old model changed")
	}
}

func TestWriteDirAtomic(t *testing.T) {
	for _, fallback := range []bool{false, true} {
		name := "exchange"
		if fallback {
			name = "move-aside"
		}
		t.Run(name, func(t *testing.T) {
			if fallback {
				saved := exchange
				exchange = func(a, b string) error { return errors.ErrUnsupported }
				defer func() { exchange = saved }()
			}
			parent := t.TempDir()
			dir := filepath.Join(parent, "adapter")
			files := func(v string) []DirFile {
				return []DirFile{{"adapter_config.json", writeString("config " + v)}, {"adapter_model.safetensors", writeString("weights " + v)}}
			}
			if err := WriteDirAtomic(dir, files("1")); err != nil {
				t.Fatal(err)
			}
			// Files of the user's in the folder survive the replacement.
			os.WriteFile(filepath.Join(dir, "README.md"), []byte("mine"), 0o644)
			os.MkdirAll(filepath.Join(dir, "checkpoint-1"), 0o755)
			os.WriteFile(filepath.Join(dir, "checkpoint-1", "state"), []byte("s"), 0o644)
			os.Symlink("README.md", filepath.Join(dir, "link"))
			if err := WriteDirAtomic(dir, files("2")); err != nil {
				t.Fatal(err)
			}
			for f, want := range map[string]string{"adapter_config.json": "config 2", "adapter_model.safetensors": "weights 2",
				"README.md": "mine", "checkpoint-1/state": "s", "link": "mine"} {
				if b, err := os.ReadFile(filepath.Join(dir, f)); err != nil || string(b) != want {
					t.Errorf("%s: %q, %v; want %q", f, b, err, want)
				}
			}
			if m := mode(t, filepath.Join(dir, "adapter_config.json")); m != 0o644 {
				t.Errorf("mode %v", m)
			}
			if names := listDir(t, parent); !slices.Equal(names, []string{"adapter"}) {
				t.Errorf("left beside the folder: %v", names)
			}
			// A failed write changes nothing.
			bad := []DirFile{{"adapter_config.json", writeString("config 3")}, {"adapter_model.safetensors", func(io.Writer) error { return errors.New("boom") }}}
			if err := WriteDirAtomic(dir, bad); err == nil {
				t.Fatal("a failing write succeeded")
			}
			if b, _ := os.ReadFile(filepath.Join(dir, "adapter_config.json")); string(b) != "config 2" {
				t.Errorf("a failed write changed the config: %q", b)
			}
			if names := listDir(t, parent); !slices.Equal(names, []string{"adapter"}) {
				t.Errorf("a failed write left %v", names)
			}
			if err := WriteDirAtomic(dir, []DirFile{{"../x", writeString("")}}); err == nil {
				t.Error("a file name with a path was accepted")
			}
		})
	}
}

func TestWriteDirAtomicThroughLink(t *testing.T) {
	parent := t.TempDir()
	real := filepath.Join(parent, "real")
	os.Mkdir(real, 0o755)
	os.WriteFile(filepath.Join(real, "config"), []byte("old"), 0o644)
	link := filepath.Join(parent, "link")
	if err := os.Symlink("real", link); err != nil {
		t.Skip("no symbolic links here:", err)
	}
	if err := WriteDirAtomic(link, []DirFile{{"config", writeString("new")}}); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Lstat(link); err != nil || st.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the link was replaced: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(real, "config")); string(b) != "new" {
		t.Errorf("the linked folder holds %q", b)
	}
	if names := listDir(t, parent); !slices.Equal(names, []string{"link", "real"}) {
		t.Errorf("left beside: %v", names)
	}
}

// Saving inline over an output that had external data removes its data file.
func TestSaveInlineOverExternalOutput(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out.onnx")
	if err := atomicModel(1).Save(p, SaveOptions{External: ExternalAlways, Threshold: 1}); err != nil {
		t.Fatal(err)
	}
	if err := atomicModel(2).Save(p, SaveOptions{External: ExternalNever}); err != nil {
		t.Fatal(err)
	}
	if names := listDir(t, dir); !slices.Equal(names, []string{"out.onnx"}) {
		t.Errorf("after an inline save over an external one: %v", names)
	}
	w, _ := mustLoad(t, p).Graph().Initializer("w")
	if IsExternal(w) || w.RawData[0] != 2 {
		t.Error("the inline model is not the second one")
	}
}
