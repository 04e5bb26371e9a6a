// Package ortrun runs ONNX models with ONNX Runtime (ORT) for tests and
// `onnxlora verify`. It is the only package of the module that uses cgo: it
// loads libonnxruntime.so.1 at run time (see scripts/install-ort.sh), so
// building it needs a C compiler but not the library.
//
// It calls the ORT C API through a thin shim of its own rather than
// github.com/yalue/onnxruntime_go, whose v1.27.0 cannot return float16,
// bfloat16 or scalar outputs of dynamic shape and cannot build scalar or
// empty float16 inputs, all of which LLM graphs have.
package ortrun

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/onnxlora/onnxlora/graph"
)

// ORTVersion is the ONNX Runtime release that scripts/install-ort.sh
// installs and whose cache folder LibraryPath looks in.
const ORTVersion = "1.30.0"

// Environment variables read by LibraryPath.
const (
	// EnvLib names the library file to load, overriding the cache.
	EnvLib = "ONNXLORA_ORT_LIB"
	// EnvCache is the cache root shared with scripts/install-ort.sh.
	EnvCache = "ONNXLORA_CACHE"
)

// ErrNoLibrary is wrapped by the errors of LibraryPath, Init and Open when
// the ORT library is not installed, so tests can skip on it alone.
var ErrNoLibrary = errors.New("ONNX Runtime not available")

// DefaultLibraryPath returns where scripts/install-ort.sh puts the library:
// $ONNXLORA_CACHE (default $HOME/.cache/onnxlora)/ort-<ORTVersion>/libonnxruntime.so.1.
func DefaultLibraryPath() (string, error) {
	root := os.Getenv(EnvCache)
	if root == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("%w: no cache folder (%v); set %s", ErrNoLibrary, err, EnvLib)
		}
		root = filepath.Join(home, ".cache", "onnxlora")
	}
	return filepath.Join(root, "ort-"+ORTVersion, "libonnxruntime.so.1"), nil
}

// LibraryPath returns the ORT library to load: $ONNXLORA_ORT_LIB if set,
// else DefaultLibraryPath. The error wraps ErrNoLibrary when the file is
// missing and tells how to install it.
func LibraryPath() (string, error) {
	path, from := os.Getenv(EnvLib), EnvLib
	if path == "" {
		var err error
		if path, err = DefaultLibraryPath(); err != nil {
			return "", err
		}
		from = "default path"
	}
	if st, err := os.Stat(path); err != nil || st.IsDir() {
		return "", fmt.Errorf("%w: %s (%s) does not exist; run scripts/install-ort.sh or set %s",
			ErrNoLibrary, path, from, EnvLib)
	}
	// dlopen would block forever on a FIFO.
	if err := graph.CheckRegular(path); err != nil {
		return "", fmt.Errorf("%w: %s (%s): %v", ErrNoLibrary, from, path, errors.Unwrap(err))
	}
	return path, nil
}

var (
	initOnce    sync.Once
	initErr     error
	initVersion string
)

// Init loads the library from LibraryPath and creates the process-wide ORT
// environment. Only the first call does work; later ones return its result,
// so it is safe to call from every test. Open calls it.
func Init() error {
	initOnce.Do(func() {
		path, err := LibraryPath()
		if err != nil {
			initErr = err
			return
		}
		initVersion, err = cLoad(path)
		if err != nil {
			initErr = fmt.Errorf("loading ONNX Runtime from %s: %w", path, err)
		}
	})
	return initErr
}

// Version calls Init and returns the loaded ORT version, such as "1.30.0",
// or "" if Init failed.
func Version() string {
	if Init() != nil {
		return ""
	}
	return initVersion
}
