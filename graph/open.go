package graph

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// ErrNotRegular is wrapped by OpenFile's error for a path that exists but is
// not a regular file (a folder, a FIFO, a device, a socket).
var ErrNotRegular = errors.New("not a regular file")

// OpenFile opens path for reading, refusing anything but a regular file
// without blocking: a FIFO or device would otherwise block open(2) or a
// read forever. The error names path. Every reader of a user's path in
// this module opens it through here.
func OpenFile(path string) (*os.File, fs.FileInfo, error) {
	f, st, err := openRegular(path)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, st, nil
}

// Open is os.Open for a regular file only, without blocking (see
// OpenFile); errors are *os.PathError, as os.Open's.
func Open(path string) (*os.File, error) {
	f, _, err := openRegular(path)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return f, nil
}

// ReadFile is os.ReadFile through Open, refusing a file larger than limit
// bytes (limit <= 0: no limit but the machine's memory).
func ReadFile(path string, limit int64) ([]byte, error) {
	f, st, err := openRegular(path)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer f.Close()
	if limit > 0 && st.Size() > limit {
		return nil, fmt.Errorf("%s: %d bytes is more than the %d this file may have", path, st.Size(), limit)
	}
	if err := CheckAlloc(st.Size(), path); err != nil {
		return nil, err
	}
	buf := make([]byte, st.Size())
	n, err := f.ReadAt(buf, 0)
	if err != nil && n != len(buf) {
		return nil, fmt.Errorf("%s: %w", path, unwrapPathError(err))
	}
	return buf, nil
}

// openRegular is OpenFile with the bare cause as error.
func openRegular(path string) (*os.File, fs.FileInfo, error) {
	f, err := openNoBlock(path)
	if err != nil {
		return nil, nil, unwrapPathError(err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, unwrapPathError(err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		if st.IsDir() {
			return nil, nil, fmt.Errorf("is a directory (a folder), %w", ErrNotRegular)
		}
		return nil, nil, fmt.Errorf("is a %s, %w", fileKind(st.Mode()), ErrNotRegular)
	}
	return f, st, nil
}

// CheckRegular reports, without blocking, an error unless path is a regular
// file (for paths another library opens, such as a shared library).
func CheckRegular(path string) error {
	f, _, err := OpenFile(path)
	if err != nil {
		return err
	}
	return f.Close()
}

func fileKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeNamedPipe != 0:
		return "FIFO (named pipe)"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return "special file"
}

// InputFiles lists the files the model reads: the file it was loaded from
// and its external data files. A writer must never replace one of them.
func (m *Model) InputFiles() []string { return m.inputFiles() }
