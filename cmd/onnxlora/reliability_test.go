package main

import (
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// copyTree copies the regular files of src into a new folder dst.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	es, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if !e.Type().IsRegular() {
			continue
		}
		copyFile(t, filepath.Join(src, e.Name()), filepath.Join(dst, e.Name()))
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

func listNames(t *testing.T, dir string) []string {
	t.Helper()
	es, _ := os.ReadDir(dir)
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

// snapshot hashes every regular file under dir, by path.
func snapshot(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	sums := map[string][32]byte{}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			sums[p] = sha256.Sum256(b)
		}
		return nil
	})
	return sums
}

// TestOutputThatIsAnInputRefused runs every command with an output that
// is, or leads to, a file the command reads: each must refuse with a usage
// error before writing, and every input must stay byte for byte the same.
func TestOutputThatIsAnInputRefused(t *testing.T) {
	root := t.TempDir()
	m := filepath.Join(root, "m")
	copyTree(t, model("tiny-gpt-extdata"), m)
	model := filepath.Join(m, "model.onnx")
	data := filepath.Join(m, "model.onnx.data")
	trained := trainedModel(t, "tiny-gpt.onnx", "q_proj")
	ad := filepath.Join(root, "adapter")
	mustRun(t, "export-adapter", trained, "-o", ad, "-q")
	adWeights := filepath.Join(ad, "adapter_model.safetensors")
	os.Mkdir(filepath.Join(m, "sub"), 0o755)
	link := filepath.Join(root, "link.onnx")
	if err := os.Symlink(model, link); err != nil {
		t.Fatal(err)
	}
	hard := filepath.Join(root, "hard.bin")
	if err := os.Link(data, hard); err != nil {
		t.Fatal(err)
	}
	trainedLink := filepath.Join(root, "trained-link.onnx")
	if err := os.Link(trained, trainedLink); err != nil {
		t.Fatal(err)
	}
	jsonl := filepath.Join(root, "rows.jsonl")
	os.WriteFile(jsonl, []byte(`{"input_ids": [1, 2, 3]}`+"\n"), 0o644)
	out := filepath.Join(root, "out.onnx")
	// A model saved under the name of an adapter file, for export-adapter.
	exp := filepath.Join(root, "exp")
	os.Mkdir(exp, 0o755)
	copyFile(t, trained, filepath.Join(exp, "adapter_model.safetensors"))
	before := snapshot(t, root)

	for _, tc := range []struct {
		name string
		args []string
	}{
		{"inspect -o the data file", []string{"inspect", model, "-o", data}},
		{"inject --manifest the data file", []string{"inject", model, "-o", out, "--target", "q_proj", "--manifest", data}},
		{"merge -o the adapter's weights", []string{"merge", model, "--adapter", ad, "-o", adWeights}},
		{"-o a symlink to the model", []string{"inject", model, "-o", link, "--target", "q_proj"}},
		{"-o the model through ..", []string{"inject", model, "-o", m + "/sub/../model.onnx", "--target", "q_proj"}},
		{"-o a hard link to the data", []string{"grad", model, "-o", hard}},
		{"-o the data file", []string{"grad", model, "-o", data}},
		{"--manifest the data file of -o", []string{"inject", model, "-o", out, "--target", "q_proj", "--manifest", out + ".data"}},
		{"-o and --manifest the same", []string{"inject", model, "-o", out, "--target", "q_proj", "--manifest", out}},
		{"train checkpoint over --data", []string{"train", trained, "--data", filepath.Join(root, "out.onnx.ckpt"), "-o", out}},
		{"train --plot the model", []string{"train", trained, "--data", jsonl, "-o", out, "--plot", filepath.Join(m, "..", "link.onnx.svg")}},
		{"convert-adapter -o its input", []string{"convert-adapter", ad, "-o", adWeights}},
		{"resize -o a hard link to its input", []string{"resize", trained, "--rank", "2", "-o", trainedLink}},
		{"export-adapter over the model", []string{"export-adapter", filepath.Join(exp, "adapter_model.safetensors"), "-o", exp}},
	} {
		if tc.name == "train --plot the model" {
			// The plot path resolves to a file the command reads.
			os.Symlink(jsonl, filepath.Join(root, "link.onnx.svg"))
			tc.args = []string{"train", trained, "--data", filepath.Join(root, "link.onnx.svg"), "-o", out, "--plot", filepath.Join(m, "..", "link.onnx.svg")}
		}
		if tc.name == "train checkpoint over --data" {
			os.WriteFile(filepath.Join(root, "out.onnx.ckpt"), []byte(`{"input_ids": [1]}`+"\n"), 0o644)
			before = snapshot(t, root)
		}
		r := run(t, tc.args...)
		if r.code != 2 || strings.Count(r.stderr, "\n") != 1 || !(strings.Contains(r.stderr, "refusing to overwrite") || strings.Contains(r.stderr, "same file")) {
			t.Errorf("%s: exit %d, stderr %q; want exit 2 and one line refusing", tc.name, r.code, r.stderr)
		}
		for p, sum := range before {
			b, err := os.ReadFile(p)
			if err != nil || sha256.Sum256(b) != sum {
				t.Errorf("%s: input %s changed (%v)", tc.name, p, err)
			}
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("%s: wrote %s", tc.name, out)
			os.Remove(out)
		}
	}
}

// TestDashOutput: "-" is standard output where a command writes text, and
// refused where it writes a file.
func TestDashOutput(t *testing.T) {
	dir := t.TempDir()
	wd, _ := os.Getwd()
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	defer os.Chdir(wd)
	m := filepath.Join(wd, model("tiny-gpt.onnx"))
	r := mustRun(t, "inspect", m, "-o", "-")
	if !strings.Contains(r.stdout, "q_proj") {
		t.Errorf("inspect -o - printed %q", r.stdout)
	}
	for _, args := range [][]string{
		{"inject", m, "-o", "-", "--target", "q_proj"},
		{"inject", m, "-o", "out.onnx", "--target", "q_proj", "--manifest", "-"},
		{"merge", m, "-o", "-"},
		{"grad", m, "-o", "-"},
		{"export-adapter", m, "-o", "-"},
	} {
		r := run(t, args...)
		if r.code != 2 || !strings.Contains(r.stderr, "standard output") {
			t.Errorf("%v: exit %d, stderr %q; want 2 and a word on standard output", args, r.code, r.stderr)
		}
	}
	if names, _ := os.ReadDir(dir); len(names) != 0 {
		t.Errorf("left %v", names)
	}
}

// TestFIFOInputsDoNotHang gives each command a FIFO where it reads a file:
// each must fail at once with one line naming it, not block in open(2).
func TestFIFOInputsDoNotHang(t *testing.T) {
	dir := t.TempDir()
	fifo := func(name string) string {
		p := filepath.Join(dir, name)
		if err := syscall.Mkfifo(p, 0o644); err != nil {
			t.Skip("no FIFOs here:", err)
		}
		return p
	}
	trained := trainedModel(t, "tiny-gpt.onnx", "q_proj")
	cfgDir := filepath.Join(dir, "ad-config")
	mustRun(t, "export-adapter", trained, "-o", cfgDir, "-q")
	wDir := filepath.Join(dir, "ad-weights")
	mustRun(t, "export-adapter", trained, "-o", wDir, "-q")
	os.Remove(filepath.Join(cfgDir, "adapter_config.json"))
	syscall.Mkfifo(filepath.Join(cfgDir, "adapter_config.json"), 0o644)
	os.Remove(filepath.Join(wDir, "adapter_model.safetensors"))
	syscall.Mkfifo(filepath.Join(wDir, "adapter_model.safetensors"), 0o644)
	out := filepath.Join(dir, "out.onnx")
	for _, args := range [][]string{
		{"inspect", fifo("model.onnx")},
		{"inject", filepath.Join(dir, "model.onnx"), "-o", out, "--target", "q_proj"},
		{"merge", fifo("lora.onnx"), "-o", out},
		{"merge", model("tiny-gpt.onnx"), "--adapter", cfgDir, "-o", out},
		{"merge", model("tiny-gpt.onnx"), "--adapter", wDir, "-o", out},
		{"inspect", fifo("a.onnx_adapter")},
		{"convert-adapter", filepath.Join(dir, "a.onnx_adapter"), "-o", filepath.Join(dir, "peft")},
		{"train", trained, "--data", fifo("rows.jsonl"), "-o", out},
		{"verify", trained, trained, "--inputs", fifo("inputs.json")},
	} {
		done := make(chan result, 1)
		go func() { done <- run(t, args...) }()
		select {
		case r := <-done:
			if r.code == 0 || strings.Count(r.stderr, "\n") != 1 || !strings.Contains(r.stderr, "FIFO") {
				t.Errorf("%v: exit %d, stderr %q; want a one-line error naming the FIFO", args, r.code, r.stderr)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("%v: still running after 10 s: blocked on a FIFO", args)
		}
	}
}

// TestHugeAllocationsRefused: inputs that declare more data than exists, or
// ask for more memory than the machine has, fail with one line instead of
// Go's fatal "out of memory" (or a hang swapping).
func TestHugeAllocationsRefused(t *testing.T) {
	dir := t.TempDir()
	tiny := func(name string, w *onnxpb.TensorProto) string {
		g := &onnxpb.GraphProto{
			Name:        proto.String("g"),
			Initializer: []*onnxpb.TensorProto{w},
			Node:        []*onnxpb.NodeProto{{Name: proto.String("/fc/MatMul"), OpType: proto.String("MatMul"), Input: []string{"x", w.GetName()}, Output: []string{"y"}}},
			Input:       []*onnxpb.ValueInfoProto{{Name: proto.String("x")}},
			Output:      []*onnxpb.ValueInfoProto{{Name: proto.String("y")}},
		}
		mp := &onnxpb.ModelProto{IrVersion: proto.Int64(8), OpsetImport: []*onnxpb.OperatorSetIdProto{{Version: proto.Int64(17)}}, Graph: g}
		b, _ := proto.Marshal(mp)
		p := filepath.Join(dir, name)
		os.WriteFile(p, b, 0o644)
		return p
	}
	noData := tiny("nodata.onnx", &onnxpb.TensorProto{Name: proto.String("fc.weight"), DataType: proto.Int32(int32(graph.Float)), Dims: []int64{1 << 36, 16}})
	fewValues := tiny("few.onnx", &onnxpb.TensorProto{Name: proto.String("fc.weight"), DataType: proto.Int32(int32(graph.Float)), Dims: []int64{1 << 20, 1 << 20}, FloatData: []float32{1, 2, 3, 4}})
	out := filepath.Join(dir, "out.onnx")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"inject", model("tiny-gpt.onnx"), "-o", out, "--target", "q_proj", "--rank", "2147483648"}, "min(in, out)"},
		{[]string{"inject", model("tiny-gpt.onnx"), "-o", out, "--target", "q_proj", "--rank", "1099511627776", "--allow-large-rank"}, "more than this machine has"},
		{[]string{"inspect", noData}, "holds no data"},
		{[]string{"inject", noData, "-o", out, "--target", "fc"}, "holds no data"},
		{[]string{"merge", fewValues, "-o", out}, "the tensor holds 4"},
	} {
		r := run(t, tc.args...)
		if r.code != 1 || strings.Count(r.stderr, "\n") != 1 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 1 and one line with %q", tc.args[:2], r.code, r.stderr, tc.want)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("an output was written")
	}
	orttest.Require(t)
	r := run(t, "verify", model("tiny-gpt.onnx"), model("tiny-gpt.onnx"), "--dim", "sequence=2147483648")
	if r.code != 1 || strings.Count(r.stderr, "\n") != 1 || !strings.Contains(r.stderr, "more than this machine has") {
		t.Errorf("verify --dim sequence=2^31: exit %d, stderr %q", r.code, r.stderr)
	}
}

// TestMergeWarnsNonFinite: a merge that turns weights into Inf or NaN
// says so on stderr (even with --quiet) and fails with --safe.
func TestMergeWarnsNonFinite(t *testing.T) {
	dir := t.TempDir()
	lora := filepath.Join(dir, "lora.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", lora, "--target", "q_proj", "-q")
	m, err := graph.Load(lora)
	if err != nil {
		t.Fatal(err)
	}
	for _, ti := range m.Proto.Graph.Initializer {
		if strings.HasSuffix(ti.GetName(), ".lora_A.weight") || strings.HasSuffix(ti.GetName(), ".lora_B.weight") {
			n, _ := graph.NumElements(ti.Dims)
			v := make([]float64, n)
			for i := range v {
				v[i] = 1e30 // A·B overflows float32
			}
			graph.SetFloat64s(ti, v)
		}
	}
	huge := filepath.Join(dir, "huge.onnx")
	if err := m.Save(huge, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	m.Close()
	r := mustRun(t, "merge", huge, "-o", filepath.Join(dir, "out.onnx"), "-q")
	if !strings.Contains(r.stderr, "warning: merging") || !strings.Contains(r.stderr, "NaN or infinite") {
		t.Errorf("merge into Inf: stderr %q; want a warning", r.stderr)
	}
	r = run(t, "merge", huge, "-o", filepath.Join(dir, "safe.onnx"), "--safe")
	if r.code != 1 || !strings.Contains(r.stderr, "NaN or infinite") {
		t.Errorf("--safe: exit %d, stderr %q", r.code, r.stderr)
	}
}

// TestControlCharactersQuoted: names holding control characters (here an
// escape sequence that clears the screen) are printed quoted by inspect,
// inject and merge, and in errors and warnings.
func TestControlCharactersQuoted(t *testing.T) {
	dir := t.TempDir()
	const evil = "evil\x1b[2J"
	d := int64(8)
	vals := make([]float64, d*d)
	for i := range vals {
		vals[i] = float64(i%7) * 0.1
	}
	w, _ := graph.NewFloatTensor(evil+".fc.weight", graph.Float, []int64{d, d}, vals)
	g := &onnxpb.GraphProto{
		Name:        proto.String("g"),
		Initializer: []*onnxpb.TensorProto{w},
		Node:        []*onnxpb.NodeProto{{Name: proto.String("/" + evil + "/fc/MatMul"), OpType: proto.String("MatMul"), Input: []string{"x", w.GetName()}, Output: []string{"y"}}},
		Input:       []*onnxpb.ValueInfoProto{{Name: proto.String("x")}},
		Output:      []*onnxpb.ValueInfoProto{{Name: proto.String("y")}},
	}
	mp := &onnxpb.ModelProto{IrVersion: proto.Int64(8), OpsetImport: []*onnxpb.OperatorSetIdProto{{Version: proto.Int64(17)}}, Graph: g}
	p := filepath.Join(dir, "evil.onnx")
	if err := graph.NewModel(mp, "").Save(p, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	lora := filepath.Join(dir, "lora.onnx")
	outs := []result{
		mustRun(t, "inspect", p),
		mustRun(t, "inject", p, "-o", lora, "--target", "fc", "--dry-run"),
		mustRun(t, "inject", p, "-o", lora, "--target", "fc"),
		mustRun(t, "merge", lora, "-o", filepath.Join(dir, "merged.onnx")),
		run(t, "inject", lora, "-o", filepath.Join(dir, "again.onnx"), "--target", "fc"),
	}
	for i, r := range outs {
		if strings.Contains(r.stdout+r.stderr, "\x1b") {
			t.Errorf("run %d printed a raw escape character:\n%q\n%q", i, r.stdout, r.stderr)
		}
	}
	if !strings.Contains(outs[0].stdout, `\x1b[2J`) {
		t.Errorf("inspect does not show the name quoted:\n%s", outs[0].stdout)
	}
	if outs[4].code == 0 || !strings.Contains(outs[4].stderr, `\x1b[2J`) {
		t.Errorf("the error naming the module: exit %d, %q", outs[4].code, outs[4].stderr)
	}
}

// TestFailedOutputsLeaveNothing: a command that fails part way writes no
// output at all: inject whose --manifest cannot be written leaves no model,
// export-adapter that finds no adapter leaves no folder, merge into a
// missing folder says so (not the name of a temporary file), and inspect -o
// a folder says it is one.
func TestFailedOutputsLeaveNothing(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out.onnx")
	r := run(t, "inject", model("tiny-gpt.onnx"), "-o", out, "--target", "q_proj", "--manifest", filepath.Join(dir, "no", "such", "man.json"))
	if r.code != 1 || !strings.Contains(r.stderr, "does not exist") {
		t.Errorf("inject --manifest in a missing folder: exit %d, %q", r.code, r.stderr)
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("inject wrote the model though the manifest failed")
	}
	ad := filepath.Join(dir, "adapter")
	r = run(t, "export-adapter", model("tiny-gpt.onnx"), "-o", ad)
	if r.code == 0 {
		t.Error("export-adapter of a model without adapters succeeded")
	}
	if _, err := os.Stat(ad); err == nil {
		t.Error("a failed export-adapter left its -o folder")
	}
	trained := trainedModel(t, "tiny-gpt.onnx", "q_proj")
	r = run(t, "merge", trained, "-o", filepath.Join(dir, "missing", "merged.onnx"))
	if r.code != 1 || !strings.Contains(r.stderr, "folder "+filepath.Join(dir, "missing")+" does not exist") || strings.Contains(r.stderr, "onnxlora-tmp") {
		t.Errorf("merge into a missing folder: exit %d, %q", r.code, r.stderr)
	}
	r = run(t, "inspect", model("tiny-gpt.onnx"), "-o", dir)
	if r.code != 1 || !strings.Contains(r.stderr, "is a folder") || strings.Contains(r.stderr, "file exists") {
		t.Errorf("inspect -o a folder: exit %d, %q", r.code, r.stderr)
	}
	if names := listNames(t, dir); len(names) != 0 {
		t.Errorf("left %v", names)
	}
}

// TestStreamedMergeFileModes: a merge with external data writes the data
// file with the model's mode (the streamed merge once made it 0600).
func TestStreamedMergeFileModes(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := t.TempDir()
	trained := trainedModel(t, "tiny-gpt.onnx", "q_proj")
	out := filepath.Join(dir, "merged.onnx")
	mustRun(t, "merge", trained, "-o", out, "--external", "always", "-q")
	for _, n := range listNames(t, dir) {
		st, _ := os.Stat(filepath.Join(dir, n))
		if st.Mode().Perm() != 0o644 {
			t.Errorf("%s has mode %v, want 0644", n, st.Mode().Perm())
		}
	}
	if len(listNames(t, dir)) != 2 {
		t.Errorf("expected a model and its data file: %v", listNames(t, dir))
	}
}

// TestAllowSymlinksHubCache: a model in a Hugging Face cache snapshot (the
// files are symlinks into ../../blobs) is refused by default and read with
// --allow-symlinks naming the cache.
func TestAllowSymlinksHubCache(t *testing.T) {
	hub := t.TempDir()
	snap := filepath.Join(hub, "models--org--tiny", "snapshots", "0123abcd")
	blobs := filepath.Join(hub, "models--org--tiny", "blobs")
	os.MkdirAll(snap, 0o755)
	os.MkdirAll(blobs, 0o755)
	copyFile(t, model("tiny-gpt-extdata/model.onnx"), filepath.Join(blobs, "aaa"))
	copyFile(t, model("tiny-gpt-extdata/model.onnx.data"), filepath.Join(blobs, "bbb"))
	if err := os.Symlink("../../blobs/aaa", filepath.Join(snap, "model.onnx")); err != nil {
		t.Skip("no symlinks:", err)
	}
	os.Symlink("../../blobs/bbb", filepath.Join(snap, "model.onnx.data"))
	p := filepath.Join(snap, "model.onnx")
	r := run(t, "inspect", p)
	if r.code != 1 || !strings.Contains(r.stderr, "--allow-symlinks") {
		t.Errorf("default: exit %d, %q; want a refusal naming --allow-symlinks", r.code, r.stderr)
	}
	r = mustRun(t, "inspect", p, "--allow-symlinks", hub)
	if !strings.Contains(r.stdout, "model.onnx.data") {
		t.Errorf("inspect through the cache: %s", r.stdout)
	}
	out := filepath.Join(t.TempDir(), "lora.onnx")
	mustRun(t, "inject", p, "-o", out, "--target", "q_proj", "--allow-symlinks", hub, "-q")
	// The setting does not outlive the command.
	if r := run(t, "inspect", p); r.code != 1 {
		t.Errorf("a later command without the flag read the cache: exit %d", r.code)
	}
}
