package rewrite

import (
	"fmt"
	"math"
	"os"
	"sort"
	"sync"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Streaming save: MergeFile for models with external data.

// save carries out the plan and writes the model to path: streaming when
// the output has external data, in memory otherwise.
func (p *plan) save(path string, opts graph.SaveOptions) (*MergeReport, error) {
	external := opts.External == graph.ExternalAlways || (opts.External == graph.ExternalAuto && hasExternal(p.m))
	if !external {
		return p.streamInline(path, opts)
	}
	return p.stream(path, opts)
}

// inputRefs returns where every external tensor's bytes are, captured
// before the graph changes.
func (p *plan) inputRefs() (map[*onnxpb.TensorProto]*graph.ExternalRef, error) {
	refs := map[*onnxpb.TensorProto]*graph.ExternalRef{}
	var rerr error
	p.m.Tensors(func(t *onnxpb.TensorProto) {
		if rerr != nil || !graph.IsExternal(t) {
			return
		}
		ref, err := p.m.ExternalRef(t)
		if err != nil {
			rerr = err
			return
		}
		refs[t] = &ref
	})
	return refs, rerr
}

// fileRef returns where t's bytes are in an input file: its external data,
// or the model file itself for inline raw_data that Load left there.
func (p *plan) fileRef(refs map[*onnxpb.TensorProto]*graph.ExternalRef, t *onnxpb.TensorProto) (*graph.ExternalRef, error) {
	if ref := refs[t]; ref != nil {
		return ref, nil
	}
	ref, ok, err := p.m.InlineRef(t)
	if !ok || err != nil {
		return nil, err
	}
	return &ref, nil
}

// sources finds where each update reads its base values.
func (p *plan) sources(refs map[*onnxpb.TensorProto]*graph.ExternalRef) (map[*update]streamSource, error) {
	sources := map[*update]streamSource{}
	for _, u := range p.updates {
		ref, err := p.fileRef(refs, u.src)
		if err != nil {
			return nil, err
		}
		if ref != nil {
			sources[u] = streamSource{ext: ref}
			continue
		}
		raw, err := p.m.RawData(u.src)
		if err != nil {
			return nil, err
		}
		sources[u] = streamSource{raw: raw}
	}
	return sources, nil
}

// openStream is how both streamed saves start: it settles the save
// options, refuses outputs that are inputs, captures where every tensor is
// read from and opens the writer (both before the graph changes), and finds
// each update's base values. The caller must Abort the writer.
func (p *plan) openStream(path string, opts graph.SaveOptions) (graph.SaveOptions, map[*onnxpb.TensorProto]*graph.ExternalRef, *graph.PairWriter, map[*update]streamSource, error) {
	opts, dataPath, err := opts.WithDefaults(path)
	if err != nil {
		return opts, nil, nil, nil, err
	}
	if err := p.m.CheckOutputs(path, dataPath); err != nil {
		return opts, nil, nil, nil, err
	}
	refs, err := p.inputRefs()
	if err != nil {
		return opts, nil, nil, nil, err
	}
	pw, err := p.m.NewPairWriter(path, opts.DataFile)
	if err != nil {
		return opts, nil, nil, nil, err
	}
	sources, err := p.sources(refs)
	if err != nil {
		pw.Abort()
		return opts, nil, nil, nil, err
	}
	return opts, refs, pw, sources, nil
}

// streamInline writes a model without external data: the serialized graph
// and the unchanged weights first (copied from the input file), then the
// merged weights computed chunk by chunk into their places in the output,
// so no weight is held whole in memory.
func (p *plan) streamInline(path string, opts graph.SaveOptions) (*MergeReport, error) {
	_, _, pw, sources, err := p.openStream(path, opts)
	if err != nil {
		return nil, err
	}
	defer pw.Abort()
	if err := p.commitGraph(); err != nil {
		return nil, err
	}
	pending := map[*onnxpb.TensorProto]int64{}
	for _, u := range p.updates {
		pending[u.dst] = int64(u.rows) * int64(u.cols) * int64(elemSize(u.dst))
	}
	layout, err := p.m.LayoutProto(pending)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if layout.Size > math.MaxInt32 {
		return nil, fmt.Errorf("%s: the merged model is %d bytes, more than a protobuf can hold; save with external data", path, layout.Size)
	}
	files := &fileSet{files: map[string]*os.File{}}
	defer files.close()
	err = pw.CommitWith(func(f *os.File) error {
		// The graph and the unchanged weights (every write at its own
		// offset) are one more job, beside the merges that fill the holes.
		merged := int64(0)
		for _, n := range pending {
			merged += n
		}
		jobs := []*streamJob{{size: layout.Size - merged, write: layout.WriteTo}}
		for _, u := range p.updates {
			jobs = append(jobs, &streamJob{t: u.dst, offset: layout.Offsets[u.dst], size: pending[u.dst], upd: u})
		}
		if err := p.runJobs(path, jobs, f, files, sources); err != nil {
			return err
		}
		return p.checkSafe()
	}, false)
	if err != nil {
		return nil, err
	}
	return p.finish(), nil
}

// runJobs runs the jobs on a worker per CPU, the biggest first so the
// workers finish together.
func (p *plan) runJobs(path string, jobs []*streamJob, out *os.File, files *fileSet, sources map[*update]streamSource) error {
	order := make([]int, len(jobs))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return jobs[order[a]].size > jobs[order[b]].size })
	return parallel(len(jobs), func(i int) error {
		j := jobs[order[i]]
		if err := p.runJob(j, out, files, sources); err != nil {
			if j.t == nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			return fmt.Errorf("%s: tensor %q: %w", path, j.t.GetName(), err)
		}
		if u := j.upd; u != nil && p.opts.Safe && u.stats.nonFinite > 0 {
			return fmt.Errorf("safe merge: merging would write %d NaN or infinite values in %s (%s); nothing was written", u.stats.nonFinite, u.rep.Weight, u.rep.Module)
		}
		return nil
	})
}

func hasExternal(m *graph.Model) bool {
	found := false
	m.Tensors(func(t *onnxpb.TensorProto) { found = found || graph.IsExternal(t) })
	return found
}

// streamJob is one tensor's bytes in the output data file.
type streamJob struct {
	t      *onnxpb.TensorProto
	offset int64
	size   int64
	ext    *graph.ExternalRef   // copy these bytes from an input data file
	raw    []byte               // or write these
	write  func(*os.File) error // or write the rest of the file (t is nil)
	upd    *update              // or compute the merge
}

// streamSource is where an update reads its base values from.
type streamSource struct {
	ext *graph.ExternalRef
	raw []byte
}

// stream is graph.Model.Save with external data, except that merged
// weights are computed chunk by chunk straight into the data file, and
// tensors that do not change are copied from the input's data files
// without being decoded. The layout is Save's: every tensor that was
// external or has at least Threshold bytes goes to one data file, each at
// an offset aligned to Align.
func (p *plan) stream(path string, opts graph.SaveOptions) (rep *MergeReport, err error) {
	opts, refs, pw, sources, err := p.openStream(path, opts)
	if err != nil {
		return nil, err
	}
	defer pw.Abort()
	var rerr error
	// Inline raw_data Load left in the model file is copied from there.
	inl := map[*onnxpb.TensorProto]*graph.ExternalRef{}
	var all []*onnxpb.TensorProto
	p.m.Tensors(func(t *onnxpb.TensorProto) { all = append(all, t) })
	for _, t := range all {
		if refs[t] != nil {
			continue
		}
		ref, err := p.fileRef(refs, t)
		if err != nil {
			return nil, err
		}
		if ref != nil {
			inl[t] = ref
		}
	}

	if err := p.commitGraph(); err != nil {
		return nil, err
	}
	byDst := map[*onnxpb.TensorProto]*update{}
	for _, u := range p.updates {
		byDst[u.dst] = u
	}

	// Lay the data file out in model order, as Save does.
	var jobs []*streamJob
	var small []*update // merged weights that stay inline
	var offset int64
	p.m.Tensors(func(t *onnxpb.TensorProto) {
		if rerr != nil {
			return
		}
		dt := graph.DataType(t.GetDataType())
		if dt.BitSize() == 0 || t.Segment != nil {
			return
		}
		size, err := graph.ByteSize(dt, t.Dims)
		if err != nil {
			rerr = fmt.Errorf("tensor %q: %w", t.GetName(), err)
			return
		}
		u := byDst[t]
		ext := refs[t]
		if u != nil {
			ext = refs[u.src]
		}
		if ext == nil && size < opts.Threshold {
			if u != nil {
				small = append(small, u)
			}
			return
		}
		offset = (offset + opts.Align - 1) / opts.Align * opts.Align
		j := &streamJob{t: t, offset: offset, size: size, upd: u}
		switch {
		case u != nil:
		case refs[t] != nil:
			j.ext = refs[t]
		case inl[t] != nil:
			j.ext = inl[t]
		default:
			if j.raw, err = p.m.RawData(t); err != nil {
				rerr = err
				return
			}
		}
		jobs = append(jobs, j)
		offset += size
	})
	if rerr != nil {
		return nil, rerr
	}

	files := &fileSet{files: map[string]*os.File{}}
	defer files.close()
	// Small merged weights are computed in memory.
	for _, u := range small {
		src := sources[u].raw
		if ext := sources[u].ext; src == nil {
			src = make([]byte, ext.Length)
			if err := files.readAt(ext, src, 0); err != nil {
				return nil, err
			}
		}
		if u.srcT {
			src = transposeRaw(src, graph.DataType(u.src.GetDataType()).BitSize()/8, u.cols, u.rows)
		}
		if err := u.factors(); err != nil {
			return nil, err
		}
		u.out = make([]byte, u.rows*u.cols*elemSize(u.dst))
		u.stats = mergeRows(u.out, src, u, 0, u.rows, make([]float64, 2*u.cols))
		u.release()
	}

	if err := p.runJobs(path, jobs, pw.Data, files, sources); err != nil {
		return nil, err
	}
	if err = p.checkSafe(); err != nil {
		return nil, err
	}
	for _, u := range small {
		if err = graph.SetRawData(u.dst, u.out); err != nil {
			return nil, err
		}
	}
	for _, j := range jobs {
		graph.SetExternal(j.t, pw.DataName, j.offset, j.size)
	}
	layout, err := p.m.LayoutProto(nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if layout.Size > math.MaxInt32 {
		return nil, fmt.Errorf("%s: the model's graph alone is %d bytes, more than a protobuf can hold", path, layout.Size)
	}
	if err = pw.CommitWith(layout.WriteTo, len(jobs) > 0); err != nil {
		return nil, err
	}
	return p.finish(), nil
}

// streamChunk is how many bytes of a weight a worker handles at a time:
// 1 MiB keeps a chunk's source and result in the L2 cache (4 MiB cost a
// third more system time in pread and pwrite, and 25 MiB more RSS).
const streamChunk = 1 << 20

// runJob writes one tensor's bytes into the data file.
func (p *plan) runJob(j *streamJob, out *os.File, files *fileSet, sources map[*update]streamSource) error {
	switch {
	case j.write != nil:
		return j.write(out)
	case j.raw != nil:
		_, err := out.WriteAt(j.raw, j.offset)
		return err
	case j.ext != nil:
		if err := files.copyRange(out, j.offset, j.ext); err != nil {
			return err
		}
		graph.StartWriteback(out, j.offset, j.size)
		return nil
	}
	u := j.upd
	if err := u.factors(); err != nil {
		return err
	}
	defer u.release()
	src := sources[u]
	sw := graph.DataType(u.src.GetDataType()).BitSize() / 8
	dw := elemSize(u.dst)
	srcRow, dstRow := int64(u.cols*sw), int64(u.cols*dw)
	whole := src.raw
	if u.srcT {
		// A copy in the node's orientation reads the source by columns:
		// rare (a shared Transpose), so it is simply read whole.
		if whole == nil {
			buf := make([]byte, src.ext.Length)
			if err := files.readAt(src.ext, buf, 0); err != nil {
				return err
			}
			whole = buf
		}
		whole = transposeRaw(whole, sw, u.cols, u.rows)
	}
	rows := int(streamChunk / max(srcRow, dstRow))
	if rows < 1 {
		rows = 1
	}
	scratch := make([]float64, 2*u.cols)
	dbuf := getBuf(int64(rows) * dstRow)
	defer putBuf(dbuf)
	var sbuf []byte
	if whole == nil {
		sbuf = getBuf(int64(rows) * srcRow)
		defer putBuf(sbuf)
	}
	for p0 := 0; p0 < u.rows; p0 += rows {
		n := min(rows, u.rows-p0)
		var s []byte
		if whole != nil {
			s = whole[int64(p0)*srcRow : int64(p0+n)*srcRow]
		} else {
			s = sbuf[:int64(n)*srcRow]
			if err := files.readAt(src.ext, s, int64(p0)*srcRow); err != nil {
				return err
			}
		}
		d := dbuf[:int64(n)*dstRow]
		u.stats.add(mergeRows(d, s, u, p0, n, scratch))
		if _, err := out.WriteAt(d, j.offset+int64(p0)*dstRow); err != nil {
			return err
		}
		// Writeback starts now, overlapping the next chunks, so the final
		// fsync has little left to wait for.
		graph.StartWriteback(out, j.offset+int64(p0)*dstRow, int64(len(d)))
		if p.opts.Safe && u.stats.nonFinite > 0 {
			return nil // reported by the caller
		}
	}
	return nil
}

// chunkBufs holds the chunk buffers of finished jobs for the next ones, so
// the merge allocates about one pair per worker instead of one per weight.
var chunkBufs sync.Pool

// getBuf returns a buffer of n bytes, of capacity streamChunk when it fits.
func getBuf(n int64) []byte {
	if n <= streamChunk {
		if b, ok := chunkBufs.Get().(*[]byte); ok {
			return (*b)[:n]
		}
		return make([]byte, n, streamChunk)
	}
	return make([]byte, n)
}

func putBuf(b []byte) {
	if cap(b) == streamChunk {
		chunkBufs.Put(&b)
	}
}

// fileSet keeps the input data files open for concurrent reads.
type fileSet struct {
	mu    sync.Mutex
	files map[string]*os.File
}

func (fs *fileSet) open(path string) (*os.File, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if f, ok := fs.files[path]; ok {
		return f, nil
	}
	f, err := graph.Open(path)
	if err != nil {
		return nil, err
	}
	fs.files[path] = f
	return f, nil
}

func (fs *fileSet) close() {
	for _, f := range fs.files {
		f.Close()
	}
}

// readAt fills buf from a tensor's external bytes, starting off bytes in.
func (fs *fileSet) readAt(ref *graph.ExternalRef, buf []byte, off int64) error {
	if off+int64(len(buf)) > ref.Length {
		return fmt.Errorf("reading past the end of the tensor's %d bytes in %s", ref.Length, ref.Location)
	}
	f, err := fs.open(ref.Path)
	if err != nil {
		return err
	}
	_, err = f.ReadAt(buf, ref.Offset+off)
	return err
}

// copyRange copies a tensor's external bytes to out at offset, file to file.
func (fs *fileSet) copyRange(out *os.File, offset int64, ref *graph.ExternalRef) error {
	f, err := fs.open(ref.Path)
	if err != nil {
		return err
	}
	return graph.CopyRange(out, offset, f, ref.Offset, ref.Length)
}
