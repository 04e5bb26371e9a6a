//go:build !linux

package graph

import (
	"errors"
	"io/fs"
	"os"
)

// exchange is Linux's atomic swap of two paths; elsewhere WriteDirAtomic
// moves the old folder aside instead.
var exchange = func(a, b string) error { return errors.ErrUnsupported }

// linkCount is 1 where it is not known: removing such a file would lose it.
func linkCount(fs.FileInfo) uint64 { return 1 }

// StartWriteback is Linux's sync_file_range hint; elsewhere the final
// fsync does all the work.
func StartWriteback(f *os.File, off, n int64) {}
