package paths

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestGuard(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "m")
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	model := filepath.Join(dir, "model.onnx")
	data := filepath.Join(dir, "model.onnx.data")
	os.WriteFile(model, []byte("m"), 0o644)
	os.WriteFile(data, []byte("d"), 0o644)
	os.Symlink(model, filepath.Join(root, "link.onnx"))
	os.Link(data, filepath.Join(root, "hard"))
	// A folder reached through a link, so that "linkdir/.." is root, not
	// the folder the link sits in.
	os.Symlink(filepath.Join(dir, "sub"), filepath.Join(root, "linkdir"))

	var g Guard
	g.Input("the model", model)
	g.Input("the data", data, "", Stdout)
	for _, tc := range []struct {
		out, want string
	}{
		{model, "is the input file " + model + " (the model): refusing"},
		{filepath.Join(root, "link.onnx"), "under another name"},
		{dir + "/sub/../model.onnx", "(the model)"},
		{filepath.Join(root, "hard"), "(the data) under another name"},
		{root + "/linkdir/../model.onnx", "(the model)"},
	} {
		err := g.Output("-o", tc.out)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("-o %s: %v; want %q", tc.out, err, tc.want)
		}
	}
	// Outputs that do not exist yet are told apart by their resolved paths.
	out := filepath.Join(root, "out.onnx")
	if err := g.Output("-o", out); err != nil {
		t.Fatal(err)
	}
	if err := g.Output("--manifest", root+"/linkdir/../../out.onnx"); err == nil || !strings.Contains(err.Error(), "are the same file") {
		t.Errorf("two spellings of one new output: %v", err)
	}
	if err := g.Output("--manifest", filepath.Join(root, "out.json")); err != nil {
		t.Error(err)
	}
	if err := g.Output("-o", Stdout); err != nil {
		t.Error("Stdout is the caller's to refuse")
	}
}

func TestResolve(t *testing.T) {
	root, _ := filepath.EvalSymlinks(t.TempDir())
	os.MkdirAll(filepath.Join(root, "a", "b"), 0o755)
	os.Symlink(filepath.Join(root, "a", "b"), filepath.Join(root, "l"))
	for in, want := range map[string]string{
		root + "/l/new":            filepath.Join(root, "a", "b", "new"),
		root + "/l/../new":         filepath.Join(root, "a", "new"),
		root + "/missing/x/y":      filepath.Join(root, "missing", "x", "y"),
		root + "/a/./b/../z":       filepath.Join(root, "a", "z"),
		root + "/l/../b/../../out": filepath.Join(root, "out"),
	} {
		if got := Resolve(in); got != want {
			t.Errorf("Resolve(%s) = %s, want %s", in, got, want)
		}
	}
}
