package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/ with the current output")

const (
	modelsDir = "../../testdata/models"
	// corpusDir is the shared corpus of real exports, ../shared/corpus from
	// the repository root.
	corpusDir = "../../../shared/corpus"
)

// model returns the path of a test model made by this project.
func model(name string) string { return filepath.Join(modelsDir, name) }

// corpusModel returns the path of a corpus model, skipping the test when
// the corpus is absent (a fresh clone has no ../shared).
func corpusModel(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(corpusDir, name)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("skipping: corpus model %s not found (%v); the shared corpus lives in ../shared/corpus beside the repository", name, err)
	}
	return p
}

// result is one run of the CLI.
type result struct {
	code   int
	stdout string
	stderr string
}

// run runs onnxlora with args against buffers, as a non-terminal, with a
// fixed build information.
func run(t *testing.T, args ...string) result {
	t.Helper()
	ios, _, out, errOut := TestIO()
	f := NewFactory(ios)
	f.BuildInfo = func() (*debug.BuildInfo, bool) {
		return &debug.BuildInfo{GoVersion: "go1.24.0", Main: debug.Module{Path: "github.com/onnxlora/onnxlora", Version: "(devel)"}}, true
	}
	code := Main(f, args)
	return result{code: code, stdout: out.String(), stderr: errOut.String()}
}

// mustRun runs the CLI and fails the test unless it exits 0.
func mustRun(t *testing.T, args ...string) result {
	t.Helper()
	r := run(t, args...)
	if r.code != 0 {
		t.Fatalf("onnxlora %s: exit %d\nstderr: %s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r
}

// golden compares got with testdata/<name>, or rewrites it with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden file: %v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("output differs from %s (run go test -update if the change is intended)\n%s", path, diff(string(want), string(got)))
	}
}

// diff shows the first differing lines of two texts.
func diff(want, got string) string {
	wl, gl := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	shown := 0
	for i := 0; i < len(wl) || i < len(gl); i++ {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			b.WriteString("line " + strconv.Itoa(i+1) + ":\n  want: " + w + "\n  got:  " + g + "\n")
			if shown++; shown == 5 {
				b.WriteString("...\n")
				break
			}
		}
	}
	return b.String()
}
