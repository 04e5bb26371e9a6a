package graph

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

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
