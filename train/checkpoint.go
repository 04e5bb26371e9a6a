package train

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
)

// checkpointMagic starts every checkpoint file; the digit is the format
// version.
const checkpointMagic = "ONNXLORA-CKPT1\n"

// maxHeader bounds a checkpoint's JSON header.
const maxHeader = 64 << 20

// Checkpoint is everything a run needs to go on where it stopped: the
// trainable values, the optimizer's state, the step count and the position
// in the data. Config records the settings the run was started with, so a
// resume can refuse to go on with different ones.
type Checkpoint struct {
	// Step is the number of optimizer steps done.
	Step int64 `json:"step"`
	// Epoch and Batch are the position of the next batch: batch index
	// Batch of epoch Epoch (both from 0).
	Epoch int64 `json:"epoch"`
	Batch int64 `json:"batch"`
	// Config is the run's settings as the caller describes them.
	Config    map[string]any `json:"config,omitempty"`
	Optimizer OptimizerState `json:"optimizer"`
	Params    []*Param       `json:"-"`
	// History is the loss curve so far, for plots.
	History []Record `json:"history,omitempty"`
}

type ckptTensor struct {
	Name  string  `json:"name"`
	DType string  `json:"dtype,omitempty"`
	Dims  []int64 `json:"dims,omitempty"`
	Len   int64   `json:"len"`
}

type ckptHeader struct {
	Checkpoint
	Params  []ckptTensor `json:"params"`
	Buffers []ckptTensor `json:"buffers"`
}

// SaveCheckpoint writes c to path atomically: a crash leaves the previous
// checkpoint or the new one, never a mix. Values are stored as float64
// little-endian after a JSON header, so a resume is exact.
func SaveCheckpoint(path string, c *Checkpoint) error {
	h := ckptHeader{Checkpoint: *c}
	var blobs [][]float64
	for _, p := range c.Params {
		h.Params = append(h.Params, ckptTensor{Name: p.Name, DType: p.DType.String(), Dims: p.Dims, Len: int64(len(p.Value))})
		blobs = append(blobs, p.Value)
	}
	keys := make([]string, 0, len(c.Optimizer.Buffers))
	for k := range c.Optimizer.Buffers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		b := c.Optimizer.Buffers[k]
		h.Buffers = append(h.Buffers, ckptTensor{Name: k, Len: int64(len(b))})
		blobs = append(blobs, b)
	}
	head, err := json.Marshal(h)
	if err != nil {
		return err
	}
	return graph.WriteFileAtomic(path, func(w io.Writer) error {
		bw := bufio.NewWriter(w)
		bw.WriteString(checkpointMagic)
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(head)))
		bw.Write(n[:])
		bw.Write(head)
		for _, b := range blobs {
			for _, v := range b {
				binary.LittleEndian.PutUint64(n[:], math.Float64bits(v))
				bw.Write(n[:])
			}
		}
		return bw.Flush()
	})
}

// LoadCheckpoint reads a checkpoint written by SaveCheckpoint.
func LoadCheckpoint(path string) (*Checkpoint, error) {
	f, err := graph.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	c, err := readCheckpoint(bufio.NewReader(f), st.Size())
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s: %w", path, err)
	}
	return c, nil
}

func readCheckpoint(r io.Reader, size int64) (*Checkpoint, error) {
	magic := make([]byte, len(checkpointMagic))
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != checkpointMagic {
		return nil, errors.New("not an onnxlora checkpoint")
	}
	var n [8]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return nil, errors.New("truncated header")
	}
	hl := binary.LittleEndian.Uint64(n[:])
	if hl > maxHeader || int64(hl) > size {
		return nil, fmt.Errorf("header length %d is not plausible", hl)
	}
	head := make([]byte, hl)
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, errors.New("truncated header")
	}
	var h ckptHeader
	if err := json.Unmarshal(head, &h); err != nil {
		return nil, fmt.Errorf("bad header: %v", err)
	}
	left := (size - int64(len(checkpointMagic)) - 8 - int64(hl)) / 8
	read := func(t ckptTensor) ([]float64, error) {
		if t.Len < 0 || t.Len > left {
			return nil, fmt.Errorf("tensor %q: %d values, more than the file holds", t.Name, t.Len)
		}
		left -= t.Len
		out := make([]float64, t.Len)
		for i := range out {
			if _, err := io.ReadFull(r, n[:]); err != nil {
				return nil, fmt.Errorf("tensor %q: truncated", t.Name)
			}
			out[i] = math.Float64frombits(binary.LittleEndian.Uint64(n[:]))
		}
		return out, nil
	}
	c := h.Checkpoint
	for _, t := range h.Params {
		v, err := read(t)
		if err != nil {
			return nil, err
		}
		c.Params = append(c.Params, &Param{Name: t.Name, DType: parseDType(t.DType), Dims: t.Dims, Value: v})
	}
	c.Optimizer.Buffers = map[string][]float64{}
	for _, t := range h.Buffers {
		v, err := read(t)
		if err != nil {
			return nil, err
		}
		c.Optimizer.Buffers[t.Name] = v
	}
	if left != 0 {
		return nil, fmt.Errorf("%d bytes of trailing data", left*8)
	}
	return &c, nil
}

func parseDType(s string) ortrun.DType {
	for _, d := range []ortrun.DType{ortrun.Float32, ortrun.Float16, ortrun.BFloat16, ortrun.Float64} {
		if d.String() == s {
			return d
		}
	}
	return ortrun.Undefined
}
