package graph

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// TestLoadRefusesDataThatDisagreesWithDims: a tensor must hold exactly the
// values its dims claim, whichever field holds them, or Load refuses it
// (a tiny file declaring a huge tensor must not be accepted and later
// allocated for).
func TestLoadRefusesDataThatDisagreesWithDims(t *testing.T) {
	dir := t.TempDir()
	big := []int64{1 << 20, 1 << 20}
	for _, tc := range []struct {
		name string
		t    *onnxpb.TensorProto
		want string
	}{
		{"no data for [2^36,16]", &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float)), Dims: []int64{1 << 36, 16}}, "holds no data"},
		{"4 float_data for [2^20,2^20]", &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float)), Dims: big, FloatData: []float32{1, 2, 3, 4}}, "needs 1099511627776 values in float_data, the tensor holds 4"},
		{"int64_data for a float", &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float)), Dims: []int64{2}, Int64Data: []int64{1, 2}}, "must be in float_data"},
		{"too many int32_data for fp16", &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float16)), Dims: []int64{2}, Int32Data: []int32{1, 2, 3}}, "needs 2 values in int32_data, the tensor holds 3"},
		{"string_data short", &onnxpb.TensorProto{Name: proto.String("s"), DataType: proto.Int32(int32(String)), Dims: []int64{3}, StringData: [][]byte{[]byte("a")}}, "needs 3 values in string_data"},
		{"raw and typed", &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float)), Dims: []int64{1}, RawData: make([]byte, 4), FloatData: []float32{1}}, "both raw_data and"},
		{"external_data entries with DEFAULT location", &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(Float)), Dims: []int64{1 << 30},
			ExternalData: []*onnxpb.StringStringEntryProto{{Key: proto.String("location"), Value: proto.String("w.bin")}}}, "data_location is not EXTERNAL"},
		{"packed int4 count", &onnxpb.TensorProto{Name: proto.String("q"), DataType: proto.Int32(int32(onnxpb.TensorProto_INT4)), Dims: []int64{5}, Int32Data: []int32{1, 2}}, "needs 3 values in int32_data"},
	} {
		g := &onnxpb.GraphProto{Initializer: []*onnxpb.TensorProto{tc.t}}
		p := writeModel(t, dir, "m.onnx", newModelProto(g))
		_, err := Load(p)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Load error %v, want %q", tc.name, err, tc.want)
		}
	}
	// What agrees loads: typed fields of each kind, empty tensors, strings.
	ok := []*onnxpb.TensorProto{
		{Name: proto.String("f"), DataType: proto.Int32(int32(Float)), Dims: []int64{2}, FloatData: []float32{1, 2}},
		{Name: proto.String("h"), DataType: proto.Int32(int32(Float16)), Dims: []int64{2}, Int32Data: []int32{1, 2}},
		{Name: proto.String("c"), DataType: proto.Int32(int32(onnxpb.TensorProto_COMPLEX64)), Dims: []int64{1}, FloatData: []float32{1, 2}},
		{Name: proto.String("u"), DataType: proto.Int32(int32(onnxpb.TensorProto_UINT32)), Dims: []int64{1}, Uint64Data: []uint64{7}},
		{Name: proto.String("e"), DataType: proto.Int32(int32(Float)), Dims: []int64{0, 4}},
		{Name: proto.String("s"), DataType: proto.Int32(int32(String)), Dims: []int64{1}, StringData: [][]byte{[]byte("x")}},
		{Name: proto.String("q"), DataType: proto.Int32(int32(onnxpb.TensorProto_INT4)), Dims: []int64{3}, Int32Data: []int32{0x21, 0x3}},
	}
	p := writeModel(t, dir, "ok.onnx", newModelProto(&onnxpb.GraphProto{Initializer: ok}))
	if _, err := Load(p); err != nil {
		t.Errorf("a model whose tensors agree with their dims: %v", err)
	}
}

func TestCheckAlloc(t *testing.T) {
	if err := CheckAlloc(1<<20, "x"); err != nil {
		t.Error(err)
	}
	err := CheckAlloc(1<<62, "input x")
	if err == nil || !strings.Contains(err.Error(), "input x: needs 4.0 EiB of memory, more than this machine has") {
		t.Errorf("CheckAlloc(2^62): %v", err)
	}
}

// TestOpenRefusesFIFO: a FIFO as the model or as its external data is
// refused at once; it used to block open(2) forever.
func TestOpenRefusesFIFO(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "model.onnx")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Skip("no FIFOs here:", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := Load(fifo)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "FIFO") {
			t.Errorf("Load(FIFO): %v, want a FIFO refused", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Load blocked on a FIFO")
	}
	if _, err := ReadFile(fifo, 0); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("ReadFile(FIFO): %v", err)
	}
	if err := CheckRegular(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("CheckRegular(folder): %v", err)
	}
}

// TestAllowSymlinksUnder builds a Hugging Face cache snapshot (data file a
// symlink to ../../blobs/<hash>): refused by default, loaded with the
// cache allowed, and still refused for links out of the allowed root.
func TestAllowSymlinksUnder(t *testing.T) {
	hub := t.TempDir()
	repo := filepath.Join(hub, "models--org--tiny")
	snap := filepath.Join(repo, "snapshots", "abc123")
	blobs := filepath.Join(repo, "blobs")
	os.MkdirAll(snap, 0o755)
	os.MkdirAll(blobs, 0o755)
	m := atomicModel(7)
	w := m.Proto.Graph.Initializer[0]
	SetExternal(w, "model.onnx.data", 0, 64)
	os.WriteFile(filepath.Join(blobs, "d0d0"), make([]byte, 64), 0o644)
	os.WriteFile(filepath.Join(blobs, "m0m0"), mustMarshal(t, m.Proto), 0o644)
	if err := os.Symlink("../../blobs/d0d0", filepath.Join(snap, "model.onnx.data")); err != nil {
		t.Skip("no symlinks:", err)
	}
	os.Symlink("../../blobs/m0m0", filepath.Join(snap, "model.onnx"))
	p := filepath.Join(snap, "model.onnx")
	defer AllowSymlinksUnder()
	if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "--allow-symlinks") {
		t.Fatalf("default: %v, want a refusal naming --allow-symlinks", err)
	}
	if err := AllowSymlinksUnder(hub); err != nil {
		t.Fatal(err)
	}
	got, err := Load(p)
	if err != nil {
		t.Fatalf("with the cache allowed: %v", err)
	}
	if raw, err := got.RawData(got.Proto.Graph.Initializer[0]); err != nil || len(raw) != 64 {
		t.Errorf("reading through the link: %v", err)
	}
	got.Close()
	// A root that does not hold the blob does not allow it.
	if err := AllowSymlinksUnder(snap); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(p); err == nil {
		t.Error("a link leaving the allowed root was followed")
	}
	if err := AllowSymlinksUnder(filepath.Join(hub, "nope")); err == nil {
		t.Error("a missing root was accepted")
	}
}

// TestStaleTemporaryOfDeadProcessRemoved: holding the destination's lock,
// a write removes every temporary of that destination (a live writer would
// hold the lock), however young; a staged file, which waits without the
// lock, goes only when its process no longer runs.
func TestStaleTemporaryOfDeadProcessRemoved(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out.onnx")
	// A pid that is surely not running (past the kernel's limit), and one
	// that always is (init).
	deadStage := ".out.onnx.onnxlora-stage-99999999-0123456789ab"
	liveStage := ".out.onnx.onnxlora-stage-1-0123456789ab"
	liveTmp := ".out.onnx.onnxlora-tmp-1-0123456789ab"
	for _, n := range []string{deadStage, liveStage, liveTmp} {
		os.WriteFile(filepath.Join(dir, n), []byte("x"), 0o644)
	}
	if err := WriteFileAtomic(p, writeString("m")); err != nil {
		t.Fatal(err)
	}
	if names := listDir(t, dir); !slices.Equal(names, []string{liveStage, "out.onnx"}) {
		t.Errorf("after the write: %v", names)
	}
	// Without the lock (a staged write), a temporary of a live pid stays.
	os.WriteFile(filepath.Join(dir, liveTmp), []byte("x"), 0o644)
	s, err := StageFile(p, writeString("n"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Abort()
	if names := listDir(t, dir); !slices.Contains(names, liveTmp) || !slices.Contains(names, liveStage) {
		t.Errorf("a staged write removed a live process's temporary: %v", names)
	}
}

// TestJournalRemovesOrphanedData: a writer killed between renaming the
// data file and the model leaves a data file no model uses; the lock
// file's record lets the next writer remove it (and only it).
func TestJournalRemovesOrphanedData(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out.onnx")
	opts := SaveOptions{External: ExternalAlways, Threshold: 1}
	if err := atomicModel(1).Save(p, opts); err != nil {
		t.Fatal(err)
	}
	before := listDir(t, dir)
	// What a killed commit leaves: its data file renamed into place, the
	// record naming it, the old model still there.
	orphan := filepath.Join(dir, "out.onnx.0123456789ab.data")
	os.WriteFile(orphan, make([]byte, 64), 0o644)
	os.WriteFile(lockPath(p), []byte("out.onnx.0123456789ab.data\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "mine.data"), []byte("user"), 0o644)
	if err := atomicModel(2).Save(filepath.Join(dir, "other.onnx"), SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(orphan); err != nil {
		t.Fatal("another destination's write touched out.onnx's record")
	}
	if err := WriteFileAtomic(p+".json", writeString("{}")); err != nil {
		t.Fatal(err)
	}
	// The next write of out.onnx itself recovers.
	if err := atomicModel(3).Save(p, opts); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(orphan); err == nil {
		t.Error("the orphaned data file is still there")
	}
	if _, err := os.Stat(filepath.Join(dir, "mine.data")); err != nil {
		t.Error("a file not in the record was removed")
	}
	back := mustLoad(t, p)
	if raw, _ := back.RawData(back.Proto.Graph.Initializer[0]); raw[0] != 3 {
		t.Errorf("model reads %v", raw[:2])
	}
	if len(listDir(t, dir)) != len(before)+3 { // + mine.data, other.onnx, out.onnx.json
		t.Errorf("folder: %v", listDir(t, dir))
	}
}

// TestConcurrentSavesOneConsistentPair: 8 saves of different models into
// one path at once end with one complete pair: the model reads its own
// data, and one data file is left.
func TestConcurrentSavesOneConsistentPair(t *testing.T) {
	for round := range 20 {
		dir := t.TempDir()
		p := filepath.Join(dir, "out.onnx")
		var wg sync.WaitGroup
		errs := make([]error, 8)
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				m := atomicModel(byte(i + 1))
				m.SetMetadata("run", string(rune('1'+i)))
				errs[i] = m.Save(p, SaveOptions{External: ExternalAlways, Threshold: 1})
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: save %d: %v", round, i, err)
			}
		}
		back := mustLoad(t, p)
		raw, err := back.RawData(back.Proto.Graph.Initializer[0])
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		run, _ := back.Metadata("run")
		for _, b := range raw {
			if b != run[0]-'0' {
				t.Fatalf("round %d: the model of run %s holds data %v", round, run, raw)
			}
		}
		if names := listDir(t, dir); len(names) != 2 {
			t.Fatalf("round %d: left %v", round, names)
		}
	}
}

// TestStageFile: a staged file changes nothing until Commit; Abort leaves
// nothing; errors name the folder that is missing, not a temporary.
func TestStageFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "man.json")
	os.WriteFile(p, []byte("old"), 0o644)
	s, err := StageFile(p, writeString("new"))
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "old" {
		t.Errorf("staging changed the file: %q", b)
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "new" {
		t.Errorf("after commit: %q", b)
	}
	s, _ = StageFile(p, writeString("newer"))
	s.Abort()
	if b, _ := os.ReadFile(p); string(b) != "new" {
		t.Errorf("after abort: %q", b)
	}
	if names := listDir(t, dir); !slices.Equal(names, []string{"man.json"}) {
		t.Errorf("left %v", names)
	}
	_, err = StageFile(filepath.Join(dir, "no", "x.json"), writeString(""))
	if err == nil || !strings.Contains(err.Error(), "folder "+filepath.Join(dir, "no")+" does not exist") || strings.Contains(err.Error(), tmpMarker) {
		t.Errorf("missing folder: %v", err)
	}
	if err := WriteFileAtomic(dir, writeString("")); err == nil || !strings.Contains(err.Error(), "is a folder") {
		t.Errorf("a folder as the destination: %v", err)
	}
}
