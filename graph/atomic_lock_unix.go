//go:build unix

package graph

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// flock waits for an exclusive lock on f. The kernel releases it when the
// process ends, however it ends.
func flock(f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			return err
		}
	}
}

// processAlive reports whether a process with this id runs (or may run:
// one we may not signal counts as alive).
func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
