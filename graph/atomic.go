package graph

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Atomic output. Every file the project writes goes through here (PairWriter
// in atomic_pair.go, WriteDirAtomic in atomic_dir.go): a
// temporary beside the destination, synced, then renamed over it, with the
// folder synced so the rename survives a crash. Readers see the old output
// or the complete new one, and a failed write leaves the old one as it was.
//
// Writers of one destination take turns: each holds an exclusive lock
// (flock on ".<destination name>.onnxlora-lock", removed when done) for its
// whole write, so concurrent writes end with one complete output, never a
// mix (StageFile takes it only for its rename).
//
// Temporaries are named ".<destination name>.onnxlora-tmp-<pid>-<random>",
// so a later write to the same destination recognises the ones a crashed run
// left and removes them (see removeStale; a write in progress is left
// alone). Nothing else is ever deleted, except the data file an earlier
// model output at the same path used (see PairWriter) and the data file a
// killed PairWriter renamed into place without its model (recorded in the
// destination's lock file). New files get mode 0644 less the umask, like
// any file a program creates.

const tmpMarker = ".onnxlora-tmp-"

// staleAfter is how old a temporary must be before another write to the
// same destination treats it as left by a crash. A write in progress keeps
// touching its files; one that stopped an hour ago is not coming back.
var staleAfter = time.Hour

func tmpPrefix(dest string) string { return "." + filepath.Base(dest) + tmpMarker }

// tmpName is a fresh temporary name for dest, carrying this process's id so
// that a later write can tell a crashed run's files from a live one's.
func tmpName(dest string) string {
	return filepath.Join(filepath.Dir(dest), tmpPrefix(dest)+strconv.Itoa(os.Getpid())+"-"+randomSuffix())
}

// isStale reports whether a temporary of ours (name after the prefix) was
// left by a crash: its process is gone, or it is older than staleAfter.
func isStale(rest string, mod time.Time) bool {
	if time.Since(mod) >= staleAfter {
		return true
	}
	pid, _, ok := strings.Cut(rest, "-")
	if !ok {
		return false
	}
	n, err := strconv.Atoi(pid)
	return err == nil && n > 0 && n != os.Getpid() && !processAlive(n)
}

func randomSuffix() string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return hex.EncodeToString(b[:])
}

// createTemp creates a new temporary file for dest, beside it.
func createTemp(dest string) (*os.File, error) {
	for range 100 {
		f, err := os.OpenFile(tmpName(dest), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, missingFolder(dest)
		}
		if !errors.Is(err, fs.ErrExist) {
			return f, err
		}
	}
	return nil, fmt.Errorf("cannot create a temporary file beside %s", dest)
}

// removeStale removes the temporaries a crashed write to dest left behind.
// Files are removed; a folder (WriteDirAtomic) is emptied of what only it
// holds a link to when the write's own files are named in ours, and removed
// if that empties it. Holding dest's lock, every temporary of dest is a
// crashed writer's (a live one would hold the lock); staged files, which
// wait without it, and temporaries found without the lock go by isStale.
func removeStale(dest string, ours map[string]bool, lock *destLock) {
	dir, prefix, stage := filepath.Dir(dest), tmpPrefix(dest), stagePrefix(dest)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, isTmp := strings.CutPrefix(e.Name(), prefix)
		if !isTmp {
			if rest, isTmp = strings.CutPrefix(e.Name(), stage); !isTmp {
				continue
			}
			isTmp = false // a staged file
		}
		p := filepath.Join(dir, e.Name())
		st, err := os.Lstat(p)
		if err != nil || !(isTmp && lock != nil) && !isStale(rest, st.ModTime()) {
			continue
		}
		switch {
		case st.Mode().IsRegular():
			os.Remove(p)
		case st.IsDir():
			removeOurs(p, ours)
			os.Remove(p) // only if now empty
		}
	}
}

// removeOurs removes from a temporary folder the files WriteDirAtomic put
// there: the ones it writes (named in ours) and links to files that are
// also linked elsewhere. Anything else stays.
func removeOurs(dir string, ours map[string]bool) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if ours[e.Name()] || linkedElsewhere(p) {
			os.Remove(p)
		}
	}
}

// syncDir syncs a folder so that renames in it are durable. Some file
// systems refuse to sync a folder; that is not worth failing a write for.
func syncDir(dir string) {
	slowSync()
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// finishFile syncs and closes a file.
func finishFile(f *os.File) error {
	slowSync()
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// writeTemp writes a complete, synced temporary file for dest and returns
// its name; on error nothing is left behind.
func writeTemp(dest string, write func(io.Writer) error) (string, error) {
	f, err := createTemp(dest)
	if err != nil {
		return "", unwrapPathError(err)
	}
	return f.Name(), fill(f, write)
}

// writeTempFile is writeTemp for a writer that needs the file itself.
func writeTempFile(dest string, write func(*os.File) error) (string, error) {
	f, err := createTemp(dest)
	if err != nil {
		return "", unwrapPathError(err)
	}
	if err = write(f); err == nil {
		err = finishFile(f)
	} else {
		f.Close()
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// fill writes f through a buffer, syncs and closes it, and removes it on
// error.
func fill(f *os.File, write func(io.Writer) error) (err error) {
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	if err = write(bw); err != nil {
		return err
	}
	if err = bw.Flush(); err != nil {
		return err
	}
	return finishFile(f)
}

// WriteFileAtomic writes path through a temporary file in the same folder,
// synced and renamed over it (the folder synced too), so readers see the
// old file or the complete new one and a failed write leaves nothing new
// behind. Errors name path. The file gets mode 0644 less the umask.
func WriteFileAtomic(path string, write func(io.Writer) error) error {
	if err := checkWritable(path); err != nil {
		return err
	}
	// Held for the whole write, so no other writer takes our temporary
	// for a crashed one's.
	lock := lockDest(path)
	defer lock.unlock()
	removeStale(path, nil, lock)
	tmp, err := writeTemp(path, write)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("%s: %w", path, unwrapLinkError(err))
	}
	syncDir(filepath.Dir(path))
	return nil
}

// unwrapLinkError drops the rename's "rename a b:" wrapper, so callers can
// name the destination themselves.
func unwrapLinkError(err error) error {
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Err
	}
	return err
}
