package graph

import (
	"fmt"
	"io"
	"os"
)

// CopyRange copies n bytes from src at srcOff to dst at dstOff, using
// explicit offsets (never the files' own offsets), so several goroutines may
// copy into one file at once. On Linux the kernel copies file to file
// (copy_file_range) without passing the bytes through user memory; where it
// cannot, a buffered copy takes over.
func CopyRange(dst *os.File, dstOff int64, src *os.File, srcOff, n int64) error {
	done, err := copyFileRange(dst, dstOff, src, srcOff, n)
	if err != nil {
		return err
	}
	if done == n {
		return nil
	}
	r := io.NewSectionReader(src, srcOff+done, n-done)
	w := io.NewOffsetWriter(dst, dstOff+done)
	copied, err := io.CopyBuffer(w, r, make([]byte, min(n-done, 1<<20)))
	if err != nil {
		return err
	}
	if copied != n-done {
		return fmt.Errorf("%s ended after %d of %d bytes", src.Name(), done+copied, n)
	}
	return nil
}
