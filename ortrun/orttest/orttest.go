// Package orttest helps tests that need ONNX Runtime: they skip, with a
// message naming scripts/install-ort.sh, when the library is not installed.
package orttest

import (
	"errors"
	"os"
	"testing"

	"github.com/onnxlora/onnxlora/ortrun"
)

// EnvRequire, when set to a non-empty value, turns the skip into a failure,
// so that CI cannot pass by silently skipping every ORT test.
const EnvRequire = "ONNXLORA_REQUIRE_ORT"

// Require loads ONNX Runtime (ortrun.Init) or ends the test: Skip when the
// library is not installed (Fatal instead if ONNXLORA_REQUIRE_ORT is set),
// Fatal when it is installed but fails to load.
func Require(t testing.TB) {
	t.Helper()
	err := ortrun.Init()
	if err == nil {
		return
	}
	if errors.Is(err, ortrun.ErrNoLibrary) && os.Getenv(EnvRequire) == "" {
		t.Skipf("skipping ONNX Runtime test: %v", err)
	}
	t.Fatal(err)
}

// Open is Require followed by ortrun.Open with default options; the session
// is closed when the test ends.
func Open(t testing.TB, path string) *ortrun.Session {
	t.Helper()
	Require(t)
	s, err := ortrun.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
