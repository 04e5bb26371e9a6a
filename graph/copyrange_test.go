package graph

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func TestCopyRange(t *testing.T) {
	dir := t.TempDir()
	data := make([]byte, 3<<20+17)
	for i := range data {
		data[i] = byte(i*7 + i>>11)
	}
	srcPath := filepath.Join(dir, "src")
	if err := os.WriteFile(srcPath, data, 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(srcPath)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.Create(filepath.Join(dir, "dst"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()

	// Four goroutines copy interleaved pieces to shuffled places at once;
	// explicit offsets keep them from disturbing each other.
	const pieces = 8
	size := int64(len(data)-17) / pieces
	var wg sync.WaitGroup
	errs := make([]error, pieces)
	for i := 0; i < pieces; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = CopyRange(dst, int64(pieces-1-i)*size, src, int64(i)*size+17, size)
		}(i)
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(dst.Name())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < pieces; i++ {
		want := data[int64(i)*size+17 : int64(i+1)*size+17]
		have := got[int64(pieces-1-i)*size : int64(pieces-i)*size]
		if !bytes.Equal(want, have) {
			t.Fatalf("piece %d landed wrong", i)
		}
	}

	// Asking for more than the source holds is an error, not a short copy.
	if err := CopyRange(dst, 0, src, int64(len(data))-10, 20); err == nil {
		t.Fatal("copy past the end of the source succeeded")
	}
}
