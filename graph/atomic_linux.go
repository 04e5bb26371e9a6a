package graph

import (
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// exchange swaps two paths atomically (renameat2 RENAME_EXCHANGE); it fails
// on file systems and kernels without it. A variable so tests can take the
// fallback.
var exchange = func(a, b string) error {
	return unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_EXCHANGE)
}

func linkCount(st fs.FileInfo) uint64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return uint64(s.Nlink)
	}
	return 1
}

// StartWriteback asks the kernel to start writing n bytes of f at off to
// disk now, without waiting, so writeback overlaps the rest of the work and
// the final fsync (which still gives the guarantee) has little left to do.
// It is only a hint: errors are ignored.
func StartWriteback(f *os.File, off, n int64) {
	unix.SyncFileRange(int(f.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE)
}
