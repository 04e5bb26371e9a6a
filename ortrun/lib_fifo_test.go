//go:build unix

package ortrun

import (
	"errors"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestLibraryPathRefusesFIFO: ONNXLORA_ORT_LIB naming a FIFO is refused at
// once; dlopen would block on it forever.
func TestLibraryPathRefusesFIFO(t *testing.T) {
	p := filepath.Join(t.TempDir(), "libonnxruntime.so.1")
	if err := syscall.Mkfifo(p, 0o644); err != nil {
		t.Skip("no FIFOs here:", err)
	}
	t.Setenv(EnvLib, p)
	done := make(chan error, 1)
	go func() { _, err := LibraryPath(); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrNoLibrary) || !strings.Contains(err.Error(), "FIFO") {
			t.Errorf("LibraryPath: %v; want ErrNoLibrary naming the FIFO", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("LibraryPath blocked on a FIFO")
	}
}
