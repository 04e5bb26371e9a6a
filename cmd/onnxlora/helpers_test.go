package main

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
)

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
