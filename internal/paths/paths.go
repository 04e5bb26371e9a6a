// Package paths keeps a command from writing over a file it reads. A Guard
// collects the files a command reads (the model, its external data, an
// adapter's files, inputs files) and then checks each output path against
// them and against the other outputs: the same path, the same file through
// symbolic links or "..", or the same file under another name (a hard
// link: same device and inode).
package paths

import (
	"fmt"
	"os"
	"path/filepath"
)

// Stdout is the output path that means standard output.
const Stdout = "-"

// Guard is the set of files a command reads and the outputs checked so
// far. The zero Guard is ready to use.
type Guard struct {
	inputs  []file
	outputs []file
}

type file struct {
	what, path string
	real       string      // absolute, symbolic links resolved as far as the path exists
	info       os.FileInfo // nil when the file does not exist (yet)
}

func newFile(what, path string) file {
	f := file{what: what, path: path, real: Resolve(path)}
	if st, err := os.Stat(path); err == nil {
		f.info = st
	}
	return f
}

// Input records files the command reads, described by what ("the model",
// "the adapter's weights"). Empty paths and Stdout are skipped; a file
// that does not exist is recorded by its path (its reader will fail).
func (g *Guard) Input(what string, paths ...string) {
	for _, p := range paths {
		if p != "" && p != Stdout {
			g.inputs = append(g.inputs, newFile(what, p))
		}
	}
}

// Output checks that path, an output described by what ("-o", "--manifest",
// "the data file of -o"), is none of the inputs and no earlier output, and
// records it. The error says which file it would overwrite.
func (g *Guard) Output(what, path string) error {
	if path == "" || path == Stdout {
		return nil
	}
	out := newFile(what, path)
	for _, in := range g.inputs {
		if same(out, in) {
			alias := ""
			if filepath.Clean(in.path) != filepath.Clean(path) {
				alias = " under another name"
			}
			return fmt.Errorf("%s %s is the input file %s (%s)%s: refusing to overwrite it; choose another path", what, path, in.path, in.what, alias)
		}
	}
	for _, o := range g.outputs {
		if same(out, o) {
			return fmt.Errorf("%s %s and %s %s are the same file; give each output its own path", o.what, o.path, what, path)
		}
	}
	g.outputs = append(g.outputs, out)
	return nil
}

// Same reports whether a and b name one file (see the package comment).
func Same(a, b string) bool { return same(newFile("", a), newFile("", b)) }

func same(a, b file) bool {
	if a.info != nil && b.info != nil {
		return os.SameFile(a.info, b.info)
	}
	return a.real == b.real
}

// Resolve returns path made absolute with every symbolic link in the part
// that exists resolved and "." and ".." applied the way the system does
// (after the link before them), so two spellings of a file that does not
// exist yet compare equal.
func Resolve(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return filepath.Clean(path)
	}
	if real, err := filepath.EvalSymlinks(path); err == nil {
		if r, err := filepath.Abs(real); err == nil {
			return r
		}
	}
	// The last element does not exist: resolve the folder, then add it.
	// filepath.Abs cleaned away a "dir/link/.." already, so resolve the
	// raw folder part.
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	if base == "." || base == ".." || filepath.Clean(dir) == filepath.Clean(path) {
		return abs
	}
	return filepath.Join(Resolve(dir), base)
}
