package graph

import (
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// mapFile maps a model file read-only, so that scanning it touches only the
// pages it reads. Small files, and files the system will not map, are read.
func mapFile(f *os.File, size int64) ([]byte, func(), error) {
	if size >= 1<<20 {
		if data, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED); err == nil {
			return data, func() { unix.Munmap(data) }, nil
		}
	}
	return readFile(f, size)
}

func readFile(f *os.File, size int64) ([]byte, func(), error) {
	data := make([]byte, size)
	if _, err := io.ReadFull(f, data); err != nil {
		return nil, nil, err
	}
	return data, func() {}, nil
}
