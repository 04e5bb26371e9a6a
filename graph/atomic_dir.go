package graph

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// DirFile is one file of a folder written by WriteDirAtomic.
type DirFile struct {
	Name  string // a plain file name
	Write func(io.Writer) error
}

// WriteDirAtomic writes files into the folder dir so that they all change
// at once: they are written to a temporary folder beside dir, which then
// takes dir's place (on Linux by an atomic exchange of the two; elsewhere
// dir is moved aside for an instant). Other files already in dir stay (they
// are linked into the new folder), as do subfolders (moved across right
// after the switch). The old versions of the written files are removed.
func WriteDirAtomic(dir string, files []DirFile) (err error) {
	dir = filepath.Clean(dir)
	ours := map[string]bool{}
	for _, f := range files {
		if f.Name == "" || f.Name == "." || f.Name == ".." || strings.ContainsAny(f.Name, `/\`) || ours[f.Name] {
			return fmt.Errorf("%s: bad or repeated file name %q", dir, f.Name)
		}
		ours[f.Name] = true
	}
	st, statErr := os.Stat(dir)
	exists := statErr == nil
	if exists && !st.IsDir() {
		return fmt.Errorf("%s: not a folder", dir)
	}
	if exists {
		// A link to a folder: replace the folder, keep the link.
		if real, err := filepath.EvalSymlinks(dir); err == nil {
			dir = real
		}
	}
	lock := lockDest(dir)
	defer lock.unlock()
	removeStale(dir, ours, lock)
	parent := filepath.Dir(dir)
	tmp := filepath.Join(parent, tmpPrefix(dir)+randomSuffix())
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return fmt.Errorf("%s: %w", dir, unwrapPathError(err))
	}
	defer func() {
		if err != nil {
			removeOurs(tmp, ours)
			os.Remove(tmp)
		}
	}()
	for _, f := range files {
		out, err := os.OpenFile(filepath.Join(tmp, f.Name), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err == nil {
			err = fill(out, f.Write)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(dir, f.Name), unwrapPathError(err))
		}
	}
	if exists {
		if err := linkExtras(dir, tmp, ours); err != nil {
			return fmt.Errorf("%s: %w", dir, err)
		}
	}
	syncDir(tmp)
	if !exists {
		if err := os.Rename(tmp, dir); err != nil {
			return fmt.Errorf("%s: %w", dir, unwrapLinkError(err))
		}
		syncDir(parent)
		return nil
	}
	old, err := swapDirs(tmp, dir)
	if err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	syncDir(parent)
	// What is left in the old folder: the old versions of our files, links
	// to the extras (now also in dir) and anything that cannot be linked or
	// appeared meanwhile, which moves across.
	entries, _ := os.ReadDir(old)
	for _, e := range entries {
		p := filepath.Join(old, e.Name())
		if ours[e.Name()] || linkedElsewhere(p) {
			os.Remove(p)
			continue
		}
		if _, err := os.Lstat(filepath.Join(dir, e.Name())); errors.Is(err, fs.ErrNotExist) {
			os.Rename(p, filepath.Join(dir, e.Name()))
		}
	}
	os.Remove(old) // only if empty: nothing is lost
	syncDir(dir)
	syncDir(parent)
	return nil
}

// linkExtras hard-links the regular files and copies the symbolic links of
// dir that are not written anew into tmp, so the new folder keeps them.
// Subfolders and other entries are moved after the switch instead.
func linkExtras(dir, tmp string, ours map[string]bool) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return unwrapPathError(err)
	}
	for _, e := range entries {
		if ours[e.Name()] {
			continue
		}
		src, dst := filepath.Join(dir, e.Name()), filepath.Join(tmp, e.Name())
		switch {
		case e.Type().IsRegular():
			if err := os.Link(src, dst); err != nil {
				return unwrapLinkError(err)
			}
		case e.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(src)
			if err != nil {
				return unwrapPathError(err)
			}
			if err := os.Symlink(target, dst); err != nil {
				return unwrapLinkError(err)
			}
		}
	}
	return nil
}

// linkedElsewhere reports whether p is a symbolic link or a regular file
// with another hard link, i.e. removing it loses nothing.
func linkedElsewhere(p string) bool {
	st, err := os.Lstat(p)
	if err != nil {
		return false
	}
	return st.Mode()&fs.ModeSymlink != 0 || (st.Mode().IsRegular() && linkCount(st) > 1)
}

// swapDirs puts the folder tmp in dir's place and returns where the old
// folder is now. An atomic exchange where the system has one; otherwise dir
// is moved aside (to a temporary name, so a crash leaves it recognisable)
// and tmp renamed into its place.
func swapDirs(tmp, dir string) (string, error) {
	if exchange(tmp, dir) == nil {
		return tmp, nil
	}
	aside := filepath.Join(filepath.Dir(dir), tmpPrefix(dir)+randomSuffix())
	if err := os.Rename(dir, aside); err != nil {
		return "", unwrapLinkError(err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		os.Rename(aside, dir)
		return "", unwrapLinkError(err)
	}
	return aside, nil
}
