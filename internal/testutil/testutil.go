// Package testutil holds helpers shared by the project's tests: locating the
// shared corpus and test models, and checking written models with the ONNX
// reference checker.
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// RepoRoot returns the repository's root folder.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// TestModel returns the path of a model in testdata/models.
func TestModel(name string) string {
	return filepath.Join(RepoRoot(), "testdata", "models", name)
}

// Corpus returns the path of a file in the shared corpus of real exports
// (../shared/corpus beside the repository), skipping the test when the
// corpus is absent, as it is in a fresh clone.
func Corpus(t testing.TB, name string) string {
	t.Helper()
	dir := filepath.Join(RepoRoot(), "..", "shared", "corpus")
	if _, err := os.Stat(dir); err != nil {
		t.Skipf("shared corpus not found at %s (it sits beside the repository in CI); skipping", dir)
	}
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("corpus file %s is missing: %v", name, err)
	}
	return p
}

// Python is the interpreter that has Debian's python3-onnx; the python3
// first on PATH may be another one without it.
const Python = "/usr/bin/python3"

var (
	checkerOnce sync.Once
	checkerErr  string
)

// checkerAvailable reports whether onnx.checker can be run.
func checkerAvailable() (bool, string) {
	checkerOnce.Do(func() {
		out, err := exec.Command(Python, "-c", "import onnx, onnx.checker").CombinedOutput()
		if err != nil {
			checkerErr = strings.TrimSpace(string(out))
			if checkerErr == "" {
				checkerErr = err.Error()
			}
		}
	})
	return checkerErr == "", checkerErr
}

// CheckONNX runs onnx.checker.check_model with full_check on a written
// model. When python3-onnx is not installed it fails in CI (which installs
// it) and skips elsewhere.
func CheckONNX(t testing.TB, path string) {
	t.Helper()
	if ok, why := checkerAvailable(); !ok {
		if os.Getenv("CI") != "" {
			t.Fatalf("onnx.checker unavailable in CI: %s", why)
		}
		t.Skipf("onnx.checker unavailable (apt-get install python3-onnx): %s", why)
	}
	script := `import sys, onnx
onnx.checker.check_model(sys.argv[1], full_check=True)`
	out, err := exec.Command(Python, "-c", script, path).CombinedOutput()
	if err != nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		last := lines[len(lines)-1]
		if strings.Contains(last, "ir_version is higher than the checker's") || strings.Contains(last, "is under development") {
			// Debian's onnx is older than the model; nothing to check with.
			t.Logf("onnx.checker too old for %s: %s", path, last)
			return
		}
		t.Fatalf("onnx.checker rejects %s: %s", path, last)
	}
}

var (
	baseCheckMu sync.Mutex
	baseCheck   = map[string]string{}
)

// CheckONNXLike checks a written model with onnx.checker when its input
// model passes the checker itself; real exports that are unsorted or use
// contrib ops the checker does not know are logged, not failed, since the
// tool did not make them so.
func CheckONNXLike(t testing.TB, input, output string) {
	t.Helper()
	if ok, _ := checkerAvailable(); ok {
		baseCheckMu.Lock()
		why, seen := baseCheck[input]
		if !seen {
			out, err := exec.Command(Python, "-c", "import sys, onnx\nonnx.checker.check_model(sys.argv[1], full_check=True)", input).CombinedOutput()
			if err != nil {
				lines := strings.Split(strings.TrimSpace(string(out)), "\n")
				why = lines[len(lines)-1]
			}
			baseCheck[input] = why
		}
		baseCheckMu.Unlock()
		if why != "" {
			t.Logf("input %s does not pass onnx.checker itself (%s); output not checked", filepath.Base(input), why)
			return
		}
	}
	CheckONNX(t, output)
}
