//go:build !linux

package graph

import (
	"io"
	"os"
)

// mapFile reads a model file; only Linux builds map it.
func mapFile(f *os.File, size int64) ([]byte, func(), error) {
	return readFile(f, size)
}

func readFile(f *os.File, size int64) ([]byte, func(), error) {
	data := make([]byte, size)
	if _, err := io.ReadFull(f, data); err != nil {
		return nil, nil, err
	}
	return data, func() {}, nil
}
