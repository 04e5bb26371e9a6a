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

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Atomic output. Every file the project writes goes through this file: a
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

// PairWriter writes a model and its external data file so that they replace
// an earlier output together: the data goes to a temporary file the caller
// fills (Data, at any offsets), and Commit renames the data file, then the
// model, into place. The data file's name is the one asked for unless a file
// of that name exists; then it is a fresh name beside it (DataName), so the
// old model keeps pointing at its own, intact data until the new model
// replaces it. After the switch, the data file the old model at the same
// path used is removed, if it was one this writer would have made for that
// path and it is no input.
type PairWriter struct {
	// Data is the temporary data file.
	Data *os.File
	// DataName is the data file's name beside the model: the location the
	// model's external tensors must give.
	DataName string

	path, dataFile string
	keep           []string
	done           bool
	lock           *destLock
}

// NewPairWriter starts writing a model to path with its data in dataFile
// (a plain file name) beside it. The files in keep (the inputs) are never
// removed.
func NewPairWriter(path, dataFile string, keep ...string) (*PairWriter, error) {
	if err := checkWritable(path); err != nil {
		return nil, err
	}
	// Held until Commit or Abort: the data file name chosen here stays free.
	lock := lockDest(path)
	removeStale(path, nil, lock)
	dataName := dataFile
	if _, err := os.Lstat(filepath.Join(filepath.Dir(path), dataFile)); err == nil {
		dataName = uniqueDataName(dataFile)
	}
	f, err := createTemp(path)
	if err != nil {
		lock.unlock()
		return nil, fmt.Errorf("%s: %w", path, unwrapPathError(err))
	}
	return &PairWriter{Data: f, DataName: dataName, path: path, dataFile: dataFile, keep: keep, lock: lock}, nil
}

// uniqueDataName inserts a random part before the data file's extension:
// model.onnx.data becomes model.onnx.1a2b3c4d5e6f.data.
func uniqueDataName(dataFile string) string {
	ext := filepath.Ext(dataFile)
	return strings.TrimSuffix(dataFile, ext) + "." + randomSuffix() + ext
}

// isDataName reports whether name is dataFile or a uniqueDataName of it.
func isDataName(name, dataFile string) bool {
	if name == dataFile {
		return true
	}
	ext := filepath.Ext(dataFile)
	stem := strings.TrimSuffix(dataFile, ext) + "."
	if !strings.HasPrefix(name, stem) || !strings.HasSuffix(name, ext) || len(name) != len(stem)+12+len(ext) {
		return false
	}
	_, err := hex.DecodeString(name[len(stem) : len(stem)+12])
	return err == nil
}

// Abort removes the temporary data file. It does nothing after Commit.
func (p *PairWriter) Abort() {
	if p.done {
		return
	}
	p.done = true
	p.Data.Close()
	os.Remove(p.Data.Name())
	p.lock.unlock()
}

// Commit writes the model bytes and switches both files into place. With
// withData false the data file is dropped and only the model is written
// (nothing of it went external). On error nothing new is left at either
// name and the earlier output is as it was.
func (p *PairWriter) Commit(model []byte, withData bool) (err error) {
	return p.CommitWith(func(f *os.File) error {
		_, err := f.Write(model)
		return err
	}, withData)
}

// CommitWith is Commit with the model file written by write, which gets
// the temporary model file (empty, at offset 0) and may write it at any
// offsets, and at once from several goroutines; the file is synced after.
func (p *PairWriter) CommitWith(write func(*os.File) error, withData bool) (err error) {
	if p.done {
		return errors.New("pair writer already finished")
	}
	defer p.Abort()
	dir := filepath.Dir(p.path)
	dataPath := filepath.Join(dir, p.DataName)
	if withData {
		if err := finishFile(p.Data); err != nil {
			return fmt.Errorf("%s: %w", dataPath, err)
		}
	}
	modelTmp, err := writeTempFile(p.path, write)
	if err != nil {
		return fmt.Errorf("%s: %w", p.path, err)
	}
	old := p.oldDataFiles()
	// Should this process die between the renames, the next writer of
	// path learns from the lock file which files to remove.
	journal := old
	if withData {
		journal = append([]string{dataPath}, old...)
	}
	p.lock.record(journal)
	if withData {
		// The data file goes first: a model file never points at missing data.
		if err := os.Rename(p.Data.Name(), dataPath); err != nil {
			os.Remove(modelTmp)
			return fmt.Errorf("%s: %w", dataPath, unwrapLinkError(err))
		}
		// Durable before the model's rename: after a power cut the model
		// must not be found without its data.
		syncDir(dir)
	}
	if err := os.Rename(modelTmp, p.path); err != nil {
		os.Remove(modelTmp)
		if withData {
			os.Remove(dataPath)
		}
		return fmt.Errorf("%s: %w", p.path, unwrapLinkError(err))
	}
	syncDir(dir)
	for _, f := range old {
		if !withData || !sameFile(f, dataPath) {
			os.Remove(f)
		}
	}
	p.lock.record(nil)
	return nil
}

// oldDataFiles lists the data files of the model now at the output path
// that this writer may remove once the new model is in place: those named
// like its own data files, beside the model, that are not inputs.
func (p *PairWriter) oldDataFiles() []string {
	locs, _ := dataLocations(p.path)
	var out []string
outer:
	for _, loc := range locs {
		if !isDataName(loc, p.dataFile) {
			continue
		}
		path := filepath.Join(filepath.Dir(p.path), loc)
		for _, k := range p.keep {
			if sameFile(path, k) {
				continue outer
			}
		}
		out = append(out, path)
	}
	return out
}

// dataLocations lists the plain-named external data files (beside it) that
// the model at path uses. ok is false when the file exists but cannot be
// read; a missing file or one that is not a model uses none.
func dataLocations(path string) (locs []string, ok bool) {
	f, st, err := openRegular(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, true
	}
	if errors.Is(err, ErrNotRegular) {
		return nil, true
	}
	if err != nil {
		return nil, false
	}
	defer f.Close()
	if st.Size() > maxProtoSize {
		return nil, false
	}
	raw := make([]byte, st.Size())
	if _, err := io.ReadFull(f, raw); err != nil {
		return nil, false
	}
	mp := &onnxpb.ModelProto{}
	if proto.Unmarshal(raw, mp) != nil {
		return nil, true
	}
	seen := map[string]bool{}
	NewModel(mp, "").Tensors(func(t *onnxpb.TensorProto) {
		if !IsExternal(t) {
			return
		}
		for _, kv := range t.ExternalData {
			loc := kv.GetValue()
			if kv.GetKey() != "location" || seen[loc] || loc == "" || loc == "." || loc == ".." || strings.ContainsAny(loc, `/\`) {
				continue
			}
			seen[loc] = true
			locs = append(locs, loc)
		}
	})
	return locs, true
}

func sameFile(a, b string) bool {
	sa, err := os.Stat(a)
	if err != nil {
		return false
	}
	sb, err := os.Stat(b)
	return err == nil && os.SameFile(sa, sb)
}

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

func unwrapLinkError(err error) error {
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Err
	}
	return err
}
