//go:build unix

package graph

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

func TestWriteFileAtomicModeAndFailure(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "report.json")
	for _, tc := range []struct {
		umask int
		want  os.FileMode
	}{{0o022, 0o644}, {0o077, 0o600}, {0, 0o644}} {
		old := syscall.Umask(tc.umask)
		err := WriteFileAtomic(p, writeString("v1"))
		syscall.Umask(old)
		if err != nil {
			t.Fatal(err)
		}
		if m := mode(t, p); m != tc.want {
			t.Errorf("umask %03o: mode %v, want %v", tc.umask, m, tc.want)
		}
	}
	boom := errors.New("boom")
	err := WriteFileAtomic(p, func(w io.Writer) error {
		io.WriteString(w, "partial")
		return boom
	})
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), p) {
		t.Errorf("error %v, want boom naming %s", err, p)
	}
	if b, _ := os.ReadFile(p); string(b) != "v1" {
		t.Errorf("a failed write changed the file: %q", b)
	}
	if names := listDir(t, dir); !slices.Equal(names, []string{"report.json"}) {
		t.Errorf("left behind: %v", names)
	}
}
