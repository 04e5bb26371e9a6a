package graph

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// IsExternal reports whether a tensor's data lives in an external file.
func IsExternal(t *onnxpb.TensorProto) bool {
	return t.GetDataLocation() == onnxpb.TensorProto_EXTERNAL
}

// ExternalRef is a validated reference to a tensor's bytes in an external
// data file.
type ExternalRef struct {
	Location string // as written in the model, relative to the model's folder
	Path     string // resolved path, inside the model's folder
	Offset   int64
	Length   int64
}

// ExternalRef returns where t's data lives, after checking that the location
// stays inside the model's folder and the file holds the bytes claimed.
func (m *Model) ExternalRef(t *onnxpb.TensorProto) (ExternalRef, error) {
	return m.externalRef(t)
}

func (m *Model) externalRef(t *onnxpb.TensorProto) (ExternalRef, error) {
	fail := func(format string, args ...any) (ExternalRef, error) {
		return ExternalRef{}, fmt.Errorf("tensor %q: external data: "+format, append([]any{t.GetName()}, args...)...)
	}
	ref := ExternalRef{Offset: 0, Length: -1}
	for _, kv := range t.ExternalData {
		var err error
		switch kv.GetKey() {
		case "location":
			ref.Location = kv.GetValue()
		case "offset":
			ref.Offset, err = strconv.ParseInt(kv.GetValue(), 10, 64)
		case "length":
			ref.Length, err = strconv.ParseInt(kv.GetValue(), 10, 64)
		}
		if err != nil || ref.Offset < 0 || (kv.GetKey() == "length" && ref.Length < 0) {
			return fail("bad %s %q", kv.GetKey(), kv.GetValue())
		}
	}
	if ref.Location == "" {
		return fail("no location")
	}
	path, err := m.resolve(ref.Location)
	if err != nil {
		return fail("%v", err)
	}
	ref.Path = path
	st, err := os.Stat(path)
	if err != nil {
		return fail("%s: %v", ref.Location, unwrapPathError(err))
	}
	if !st.Mode().IsRegular() {
		return fail("%s is not a regular file", ref.Location)
	}
	if ref.Offset > st.Size() {
		return fail("offset %d is past the end of %s (%d bytes)", ref.Offset, ref.Location, st.Size())
	}
	if ref.Length < 0 {
		ref.Length = st.Size() - ref.Offset
	}
	if ref.Length > st.Size()-ref.Offset {
		return fail("%s is too short: %d bytes at offset %d, file has %d", ref.Location, ref.Length, ref.Offset, st.Size())
	}
	dt := DataType(t.GetDataType())
	if dt.BitSize() > 0 {
		want, err := ByteSize(dt, t.Dims)
		if err != nil {
			return fail("%v", err)
		}
		if want != ref.Length {
			return fail("%v %v needs %d bytes, but %d are declared", dt, t.Dims, want, ref.Length)
		}
	}
	return ref, nil
}

// resolve is resolveInside for the model's folder, remembered per location
// (failures are not, so a fixed folder is seen).
func (m *Model) resolve(location string) (string, error) {
	if p, ok := m.resolved.Load(location); ok {
		return p.(string), nil
	}
	p, err := resolveInside(m.dir, location)
	if err == nil {
		m.resolved.Store(location, p)
	}
	return p, err
}

// resolveInside joins a relative location to dir and refuses anything that
// would escape dir: absolute paths, "..", and symlinks pointing outside.
func resolveInside(dir, location string) (string, error) {
	if dir == "" {
		dir = "."
	}
	loc := filepath.FromSlash(strings.ReplaceAll(location, `\`, "/"))
	if filepath.IsAbs(loc) || strings.HasPrefix(location, "/") || filepath.VolumeName(loc) != "" {
		return "", fmt.Errorf("location %q is absolute; it must be relative to the model's folder", location)
	}
	clean := filepath.Clean(loc)
	if clean == ".." || strings.HasPrefix(clean, ".."+string(filepath.Separator)) {
		return "", fmt.Errorf("location %q points outside the model's folder", location)
	}
	path := filepath.Join(dir, clean)
	realDir, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", err
	}
	realPath, err := filepath.EvalSymlinks(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("%s: file not found beside the model", location)
		}
		return "", err
	}
	if !within(realDir, realPath) && !inSymlinkRoot(realPath) {
		return "", fmt.Errorf("location %q leads outside the model's folder through a symlink (to allow links into a folder such as a Hugging Face cache, use --allow-symlinks DIR)", location)
	}
	return path, nil
}

// within reports whether path is dir or inside it (both resolved).
func within(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) && !filepath.IsAbs(rel)
}

// symlinkRoots are the folders external data may reach through symbolic
// links, besides the model's own folder (AllowSymlinksUnder).
var symlinkRoots struct {
	sync.Mutex
	dirs []string
}

// AllowSymlinksUnder lets external data locations lead, through symbolic
// links, to files inside these folders as well as the model's own: a
// Hugging Face cache snapshot links model.onnx.data to ../../blobs/<hash>.
// Locations themselves must still be relative and free of "..". Each call
// replaces the list; no argument restores the default (the model's folder
// only). It is process-wide, for a command line's flag.
func AllowSymlinksUnder(dirs ...string) error {
	var real []string
	for _, d := range dirs {
		r, err := filepath.EvalSymlinks(d)
		if err != nil {
			return fmt.Errorf("%s: %w", d, unwrapPathError(err))
		}
		if st, err := os.Stat(r); err != nil || !st.IsDir() {
			return fmt.Errorf("%s is not a folder", d)
		}
		if r, err = filepath.Abs(r); err != nil {
			return err
		}
		real = append(real, r)
	}
	symlinkRoots.Lock()
	symlinkRoots.dirs = real
	symlinkRoots.Unlock()
	return nil
}

func inSymlinkRoot(realPath string) bool {
	abs, err := filepath.Abs(realPath)
	if err != nil {
		return false
	}
	symlinkRoots.Lock()
	defer symlinkRoots.Unlock()
	for _, d := range symlinkRoots.dirs {
		if within(d, abs) {
			return true
		}
	}
	return false
}

// openData returns a shared handle on an external data file.
func (m *Model) openData(path string) (*os.File, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if f, ok := m.files[path]; ok {
		return f, nil
	}
	f, _, err := openRegular(path)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	if m.files == nil {
		m.files = map[string]*os.File{}
	}
	m.files[path] = f
	return f, nil
}

// externalReader returns a reader over an external tensor's bytes.
func (m *Model) externalReader(t *onnxpb.TensorProto) (*io.SectionReader, ExternalRef, error) {
	ref, err := m.externalRef(t)
	if err != nil {
		return nil, ref, err
	}
	f, err := m.openData(ref.Path)
	if err != nil {
		return nil, ref, fmt.Errorf("tensor %q: %w", t.GetName(), err)
	}
	return io.NewSectionReader(f, ref.Offset, ref.Length), ref, nil
}

// setInline replaces t's data with raw little-endian bytes held in memory,
// dropping typed fields and any external reference.
func setInline(t *onnxpb.TensorProto, raw []byte) {
	t.RawData = raw
	t.FloatData, t.Int32Data, t.Int64Data, t.DoubleData, t.Uint64Data = nil, nil, nil, nil, nil
	t.ExternalData = nil
	t.DataLocation = nil
	dropMarker(t) // the data Load left in the file is no longer t's
}

// SetExternal points t at length bytes at offset in an external data file
// (location is relative to the model's folder), dropping inline data.
func SetExternal(t *onnxpb.TensorProto, location string, offset, length int64) {
	setInline(t, nil)
	t.DataLocation = onnxpb.TensorProto_EXTERNAL.Enum()
	t.ExternalData = []*onnxpb.StringStringEntryProto{
		{Key: proto.String("location"), Value: proto.String(location)},
		{Key: proto.String("offset"), Value: proto.String(strconv.FormatInt(offset, 10))},
		{Key: proto.String("length"), Value: proto.String(strconv.FormatInt(length, 10))},
	}
}
