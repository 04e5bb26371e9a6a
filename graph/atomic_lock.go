package graph

import (
	"bufio"
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

// destLock is the exclusive lock of one destination's writers (see the
// comment at the top of atomic.go). Its file doubles as a journal: before a
// PairWriter renames anything it records there the files a crash between
// its renames could leave unreferenced, and clears the record once done.
// A nil *destLock (no lock could be taken: no folder, no flock) is valid
// and does nothing.
type destLock struct {
	f    *os.File
	path string
	dest string
}

const lockSuffix = ".onnxlora-lock"

func lockPath(dest string) string {
	return filepath.Join(filepath.Dir(dest), "."+filepath.Base(dest)+lockSuffix)
}

// lockDest waits for and takes the lock on writes to dest, then finishes
// what a crashed holder left half done.
func lockDest(dest string) *destLock {
	lp := lockPath(dest)
	for range 100 {
		f, err := os.OpenFile(lp, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil // the write itself will report the folder's problem
		}
		if flock(f) != nil {
			f.Close()
			return nil
		}
		// The holder before us removes the file as it unlocks; a lock on a
		// removed file guards nothing, so open the current one again.
		fst, err1 := f.Stat()
		pst, err2 := os.Lstat(lp)
		if err1 == nil && err2 == nil && os.SameFile(fst, pst) {
			l := &destLock{f: f, path: lp, dest: dest}
			l.recover()
			return l
		}
		f.Close()
	}
	return nil
}

// unlock removes the lock file (while still holding it, so a waiter can
// tell) and releases it.
func (l *destLock) unlock() {
	if l == nil {
		return
	}
	os.Remove(l.path)
	l.f.Close()
}

// record replaces the journal with files (paths beside dest), synced.
func (l *destLock) record(files []string) {
	if l == nil {
		return
	}
	var b strings.Builder
	for _, f := range files {
		b.WriteString(filepath.Base(f) + "\n")
	}
	if l.f.Truncate(0) == nil {
		l.f.WriteAt([]byte(b.String()), 0)
		l.f.Sync()
	}
}

// recover removes the files a crashed holder recorded that the model now
// at dest does not use: a data file renamed into place without its model,
// or the old data files of a model that was replaced. Either way no model
// written here refers to them any more.
func (l *destLock) recover() {
	st, err := l.f.Stat()
	if err != nil || st.Size() == 0 || st.Size() > 1<<16 {
		return
	}
	used, ok := dataLocations(l.dest)
	if !ok {
		return // cannot tell: keep everything
	}
	inUse := map[string]bool{filepath.Base(l.dest): true}
	for _, u := range used {
		inUse[u] = true
	}
	sc := bufio.NewScanner(io.NewSectionReader(l.f, 0, st.Size()))
	for sc.Scan() {
		name := sc.Text()
		if name == "" || name == "." || name == ".." || strings.ContainsAny(name, `/\`) || inUse[name] {
			continue
		}
		p := filepath.Join(filepath.Dir(l.dest), name)
		if st, err := os.Lstat(p); err == nil && st.Mode().IsRegular() {
			os.Remove(p)
		}
	}
	l.record(nil)
}

// checkWritable refuses a destination that is a folder, or whose folder
// does not exist, with an error that says so (rather than naming a
// temporary file).
func checkWritable(path string) error {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return fmt.Errorf("%s: is a folder; give a file name", path)
	}
	if _, err := os.Stat(filepath.Dir(path)); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s: %w", path, missingFolder(path))
	}
	return nil
}

func missingFolder(path string) error {
	dir := filepath.Dir(path)
	for {
		parent := filepath.Dir(dir)
		if _, err := os.Stat(parent); err == nil || parent == dir {
			break
		}
		dir = parent
	}
	return fmt.Errorf("folder %s does not exist", dir)
}

// StagedFile is a file written in full to a temporary beside its
// destination, switched into place later by Commit: a command with several
// outputs writes them all before it replaces any, so a failure leaves the
// earlier outputs as they were.
type StagedFile struct {
	path, tmp string
}

// StageFile writes path's new contents to a synced temporary file (mode
// 0644 less the umask). Nothing at path changes until Commit.
func StageFile(path string, write func(io.Writer) error) (*StagedFile, error) {
	if err := checkWritable(path); err != nil {
		return nil, err
	}
	removeStale(path, nil, nil)
	var f *os.File
	var err error
	for range 100 {
		name := filepath.Join(filepath.Dir(path), stagePrefix(path)+strconv.Itoa(os.Getpid())+"-"+randomSuffix())
		f, err = os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, unwrapPathError(err))
	}
	if err := fill(f, write); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &StagedFile{path: path, tmp: f.Name()}, nil
}

// stageMarker names StageFile's temporaries, which wait for their Commit
// without the destination's lock: ".<name>.onnxlora-stage-<pid>-<random>".
const stageMarker = ".onnxlora-stage-"

func stagePrefix(dest string) string { return "." + filepath.Base(dest) + stageMarker }

// Commit renames the staged file over its destination. It does nothing a
// second time.
func (s *StagedFile) Commit() error {
	if s.tmp == "" {
		return nil
	}
	lock := lockDest(s.path)
	defer lock.unlock()
	tmp := s.tmp
	s.tmp = ""
	if err := os.Rename(tmp, s.path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("%s: %w", s.path, unwrapLinkError(err))
	}
	syncDir(filepath.Dir(s.path))
	return nil
}

// Abort removes the staged file; it does nothing after Commit.
func (s *StagedFile) Abort() {
	if s.tmp != "" {
		os.Remove(s.tmp)
		s.tmp = ""
	}
}

// syncDelay makes every fsync of the atomic writer wait this long first
// (ONNXLORA_DEBUG_SYNC_DELAY, a Go duration such as 20ms): a slow disk for
// the crash tests, which then kill writers inside the windows between
// syncs and renames. Unset, it is zero.
var syncDelay = func() time.Duration {
	d, err := time.ParseDuration(os.Getenv("ONNXLORA_DEBUG_SYNC_DELAY"))
	if err != nil || d < 0 || d > time.Minute {
		return 0
	}
	return d
}()

func slowSync() {
	if syncDelay > 0 {
		time.Sleep(syncDelay)
	}
}
