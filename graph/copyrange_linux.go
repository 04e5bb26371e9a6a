package graph

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// copyFileRange copies as much as the kernel will with copy_file_range and
// returns how far it got; the caller finishes the rest by hand. Errors that
// only mean "not here" (other file systems, old kernels) end the kernel copy
// quietly.
func copyFileRange(dst *os.File, dstOff int64, src *os.File, srcOff, n int64) (int64, error) {
	var done int64
	for done < n {
		in, out := srcOff+done, dstOff+done
		chunk := min(n-done, 1<<30)
		c, err := unix.CopyFileRange(int(src.Fd()), &in, int(dst.Fd()), &out, int(chunk), 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) ||
				errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPERM) {
				return done, nil
			}
			return done, err
		}
		if c == 0 { // end of the source file: let the caller report it
			return done, nil
		}
		done += int64(c)
	}
	return done, nil
}
