//go:build !unix

package graph

import "os"

// openNoBlock is os.Open where there are no FIFOs to block on.
func openNoBlock(path string) (*os.File, error) { return os.Open(path) }
