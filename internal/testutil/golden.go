package testutil

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// update is registered in every test binary that imports testutil, so
// `go test ./inspect ./cmd/onnxlora -update` rewrites both packages' goldens.
var update = flag.Bool("update", false, "rewrite the golden files in testdata/ with the current output")

// Golden compares got with the golden file testdata/<name> of the package
// under test, or, with -update, writes got there (creating folders).
func Golden(t testing.TB, name string, got []byte) {
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
		t.Errorf("output differs from %s (run go test -update if the change is intended)\n%s", path, Diff(string(want), string(got)))
	}
}

// Diff shows the first five differing lines of two texts, by line number.
func Diff(want, got string) string {
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
