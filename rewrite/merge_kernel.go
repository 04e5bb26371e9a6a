package rewrite

import (
	"fmt"
	"math"
	"runtime"
	"sync"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// The merge kernel: dst = src + coef·U·V row by row, in float64, rounded
// once to the weight's type; merge_amd64.s has vector versions of the
// inner loops.

// mergeRows computes rows [p0, p0+n) of u's result: dst = src + coef·U·V,
// in float64 and rounded once to dst's type. src and dst hold just those
// rows (src in u.src's type, already in dst's layout). scratch needs room
// for 2·cols values.
//
// With the certified kernel (merge_approx_amd64.go) the returned maxAbs
// leaves out elements no larger than the maximum of earlier calls for u:
// callers combine chunks with mergeStats.add, which gives the true total.
//
// Columns are done in tiles so that the tile of V (r·tile values) stays in
// the CPU cache while every row of the chunk goes past it; the arithmetic
// is the same as row by row.
func mergeRows(dst, src []byte, u *update, p0, n int, scratch []float64) mergeStats {
	cols, r := u.cols, u.r
	sdt, ddt := graph.DataType(u.src.GetDataType()), graph.DataType(u.dst.GetDataType())
	sw, dw := sdt.BitSize()/8, ddt.BitSize()/8
	var st mergeStats
	ax := u.approx()
	// tile merges row i's columns [t0, t0+mergeTile).
	tile := func(i, t0 int) {
		t1 := min(t0+mergeTile, cols)
		p := p0 + i
		c0, c1 := t0, t1
		if ax != nil {
			c0 += ax.row(u, dst[(i*cols+c0)*dw:], src[(i*cols+c0)*sw:], p, c0, c1-c0, &st)
			if c0 == c1 {
				return
			}
		}
		acc, w := scratch[:c1-c0], scratch[cols:cols+c1-c0]
		urow := u.u[p*r : (p+1)*r]
		if !useSIMD || !rankProductSIMD(acc, urow, u.v, cols, c0) {
			rankProduct(acc, urow, u.v, cols, c0)
		}
		srow := src[(i*cols+c0)*sw : (i*cols+c1)*sw]
		drow := dst[(i*cols+c0)*dw : (i*cols+c1)*dw]
		if u.scale != nil {
			scaledRow(drow, srow, acc, w, u, p, c0, &st)
			return
		}
		if sdt == ddt && useSIMD && fusedRowSIMD(sdt, drow, srow, acc, u.coef, &st) {
			return
		}
		if sdt == ddt && fusedRow(sdt, drow, srow, acc, u.coef, &st) {
			return
		}
		graph.DecodeFloatsInto(sdt, w, srow)
		coef := u.coef
		for q, a := range acc {
			// The conversion keeps the compiler from fusing the multiply
			// into the add, so every platform rounds the same way.
			d := float64(coef * a)
			if ad := math.Abs(d); ad > st.maxAbs {
				st.maxAbs = ad
			}
			if d != 0 {
				st.changed++ // types differ: count what the delta touches
			}
			w[q] += d
		}
		graph.EncodeFloatsInto(ddt, drow, w)
		st.nonFinite += countNonFinite(ddt, drow)
	}
	if ax != nil && r*cols*4 <= 512<<10 {
		// The certified kernel's V (float32) stays in the cache whole, so
		// rows go by in order and src and dst stream.
		for i := 0; i < n; i++ {
			for t0 := 0; t0 < cols; t0 += mergeTile {
				tile(i, t0)
			}
		}
	} else {
		for t0 := 0; t0 < cols; t0 += mergeTile {
			for i := 0; i < n; i++ {
				tile(i, t0)
			}
		}
	}
	if ax != nil {
		ax.max = max(ax.max, st.maxAbs)
	}
	return st
}

// tensorFactors returns a loader of the adapter's tensors ta [in, r] and
// tb [r, out], for lazyFrom.
func tensorFactors(m *graph.Model, ta, tb *onnxpb.TensorProto) func() ([]float64, []float64, error) {
	return func() ([]float64, []float64, error) {
		a, err := m.Float64s(ta)
		if err != nil {
			return nil, nil, err
		}
		b, err := m.Float64s(tb)
		if err != nil {
			return nil, nil, err
		}
		return a, b, nil
	}
}

// lazyFrom drops u's decoded factors and has factors get them from load,
// which returns A [in, r] and B [r, out], and turn them to u's orientation.
func (u *update) lazyFrom(load func() (a, b []float64, err error)) {
	transposed, r, rows, cols := u.rep.Transposed, u.r, u.rows, u.cols
	u.u, u.v, u.ax = nil, nil, nil
	u.load = func() ([]float64, []float64, error) {
		a, b, err := load()
		if err != nil {
			return nil, nil, err
		}
		if len(a)+len(b) != r*(rows+cols) {
			return nil, nil, fmt.Errorf("adapter factors changed size since the merge was planned")
		}
		if transposed {
			return transposeF64(b, r, rows), transposeF64(a, cols, r), nil
		}
		return a, b, nil
	}
}

// factors makes sure u's factors are decoded.
func (u *update) factors() error {
	if u.u != nil || u.load == nil {
		return nil
	}
	a, b, err := u.load()
	if err != nil {
		return err
	}
	u.u, u.v = a, b
	return nil
}

// release drops factors that factors can decode again.
func (u *update) release() {
	if u.load != nil {
		u.u, u.v, u.ax = nil, nil, nil
	}
}

// mergeTile is the column tile of mergeRows: r·512 float64 of V (64 KiB at
// r=16) fit in any L2 cache.
const mergeTile = 512

// rankProduct sets acc[q] = Σk urow[k]·v[k·stride+off+q], summing over k in
// order (unrolled by eight, then one: the same additions in the same order).
func rankProduct(acc, urow, v []float64, stride, off int) {
	n := len(acc)
	clear(acc)
	r := len(urow)
	k := 0
	for ; k+8 <= r; k += 8 {
		u0, u1, u2, u3 := urow[k], urow[k+1], urow[k+2], urow[k+3]
		u4, u5, u6, u7 := urow[k+4], urow[k+5], urow[k+6], urow[k+7]
		b := k*stride + off
		v0 := v[b : b+n]
		v1 := v[b+stride : b+stride+n]
		v2 := v[b+2*stride : b+2*stride+n]
		v3 := v[b+3*stride : b+3*stride+n]
		v4 := v[b+4*stride : b+4*stride+n]
		v5 := v[b+5*stride : b+5*stride+n]
		v6 := v[b+6*stride : b+6*stride+n]
		v7 := v[b+7*stride : b+7*stride+n]
		for q := range acc {
			a := acc[q]
			a += float64(u0 * v0[q])
			a += float64(u1 * v1[q])
			a += float64(u2 * v2[q])
			a += float64(u3 * v3[q])
			a += float64(u4 * v4[q])
			a += float64(u5 * v5[q])
			a += float64(u6 * v6[q])
			a += float64(u7 * v7[q])
			acc[q] = a
		}
	}
	for ; k < r; k++ {
		uk := urow[k]
		b := k*stride + off
		vk := v[b : b+n]
		for q := range acc {
			acc[q] += float64(uk * vk[q])
		}
	}
}

// fusedRow is mergeRows' inner loop for a weight kept in its own type:
// decode, add coef·acc, round, encode and count in one pass. It returns
// false for types it does not handle.
func fusedRow(dt graph.DataType, drow, srow []byte, acc []float64, coef float64, st *mergeStats) bool {
	maxAbs, changed, nonFinite := st.maxAbs, st.changed, st.nonFinite
	switch dt {
	case graph.Float16:
		srow, drow = srow[:2*len(acc)], drow[:2*len(acc)]
		for q, a := range acc {
			old := leU16(srow[2*q:])
			// The conversion keeps the compiler from fusing the multiply
			// into the add, so every platform rounds the same way.
			d := float64(coef * a)
			// graph.Float16Value and graph.Float16Bits with their fast
			// paths written out (the calls are too big to inline); the
			// other cases call them. Tests check the loop against them.
			var wv float64
			if e := old & 0x7c00; e != 0 && e != 0x7c00 {
				wv = float64(math.Float32frombits(uint32(old&0x8000)<<16 | (uint32(old&0x7fff)+(127-15)<<10)<<13))
			} else {
				wv = graph.Float16Value(old)
			}
			sum := wv + d
			nb := math.Float64bits(sum)
			var h uint16
			if ax := nb &^ (1 << 63); ax-f16Lo < f16Hi-f16Lo {
				ax += 1<<41 - 1 + (ax>>42)&1
				h = uint16(nb>>48)&0x8000 | uint16(ax>>42-(1023-15)<<10)
			} else {
				h = graph.Float16Bits(sum)
			}
			putU16(drow[2*q:], h)
			if ad := math.Abs(d); ad > maxAbs {
				maxAbs = ad
			}
			changed += int64(changed16(h, old))
			if h&0x7c00 == 0x7c00 {
				nonFinite++
			}
		}
	case graph.BFloat16:
		srow, drow = srow[:2*len(acc)], drow[:2*len(acc)]
		for q, a := range acc {
			old := leU16(srow[2*q:])
			d := float64(coef * a)
			sum := graph.BFloat16Value(old) + d
			nb := math.Float64bits(sum)
			var h uint16
			if ax := nb &^ (1 << 63); ax-bf16Lo < bf16Hi-bf16Lo { // graph.BFloat16Bits's fast path
				ax += 1<<44 - 1 + (ax>>45)&1
				h = uint16(nb>>48)&0x8000 | uint16(ax>>45-(1023-127)<<7)
			} else {
				h = graph.BFloat16Bits(sum)
			}
			putU16(drow[2*q:], h)
			if ad := math.Abs(d); ad > maxAbs {
				maxAbs = ad
			}
			changed += int64(changed16(h, old))
			if h&0x7f80 == 0x7f80 {
				nonFinite++
			}
		}
	case graph.Float:
		srow, drow = srow[:4*len(acc)], drow[:4*len(acc)]
		for q, a := range acc {
			old := leU32(srow[4*q:])
			d := float64(coef * a)
			h := math.Float32bits(float32(float64(math.Float32frombits(old)) + d))
			putU32(drow[4*q:], h)
			if ad := math.Abs(d); ad > maxAbs {
				maxAbs = ad
			}
			changed += int64(changed32(h, old))
			if h&0x7f800000 == 0x7f800000 {
				nonFinite++
			}
		}
	default:
		return false
	}
	st.maxAbs, st.changed, st.nonFinite = maxAbs, changed, nonFinite
	return true
}

// countNonFinite counts NaN and infinite elements of raw.
func countNonFinite(dt graph.DataType, raw []byte) int64 {
	var n int64
	switch dt {
	case graph.Float:
		for i := 0; i+4 <= len(raw); i += 4 {
			if leU32(raw[i:])&0x7f800000 == 0x7f800000 {
				n++
			}
		}
	case graph.Float16:
		for i := 0; i+2 <= len(raw); i += 2 {
			if leU16(raw[i:])&0x7c00 == 0x7c00 {
				n++
			}
		}
	case graph.BFloat16:
		for i := 0; i+2 <= len(raw); i += 2 {
			if leU16(raw[i:])&0x7f80 == 0x7f80 {
				n++
			}
		}
	case graph.Double:
		for i := 0; i+8 <= len(raw); i += 8 {
			if leU64(raw[i:])&0x7ff0000000000000 == 0x7ff0000000000000 {
				n++
			}
		}
	}
	return n
}

// The float64 bit patterns bounding the fast paths of graph.Float16Bits and
// graph.BFloat16Bits, written out in fusedRow: the smallest normal and the
// first power of two past the largest finite value.
const (
	f16Lo  = 0x3f10000000000000 // 2^-14
	f16Hi  = 0x40f0000000000000 // 2^16
	bf16Lo = 0x3810000000000000 // 2^-126
	bf16Hi = 0x47f0000000000000 // 2^128
)

// changed16 is 1 when the 16-bit float h differs from old, else 0, without
// a branch. Zeros of either sign are equal: an untrained adapter turns -0
// into +0 (as W + 0 does in torch), and that is not a change.
func changed16(h, old uint16) uint32 {
	return (uint32(h^old) + 0xffff) >> 16 & ((uint32((h|old)&0x7fff) + 0xffff) >> 16)
}

// changed32 is changed16 for float32 bits.
func changed32(h, old uint32) uint64 {
	return (uint64(h^old) + 0xffffffff) >> 32 & ((uint64((h|old)&0x7fffffff) + 0xffffffff) >> 32)
}

func leU16(b []byte) uint16 { return uint16(b[0]) | uint16(b[1])<<8 }
func leU32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
func leU64(b []byte) uint64 { return uint64(leU32(b)) | uint64(leU32(b[4:]))<<32 }
func putU16(b []byte, v uint16) {
	b[0], b[1] = byte(v), byte(v>>8)
}
func putU32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
func putU64(b []byte, v uint64) {
	putU32(b, uint32(v))
	putU32(b[4:], uint32(v>>32))
}

// workers is how many weights are merged at once: one per CPU.
func workers(jobs int) int {
	n := runtime.GOMAXPROCS(0)
	if n > jobs {
		n = jobs
	}
	if n < 1 {
		n = 1
	}
	return n
}

// parallel runs fn(i) for i in [0, n) on a bounded set of goroutines and
// returns the first error.
func parallel(n int, fn func(i int) error) error {
	var (
		mu    sync.Mutex
		first error
		wg    sync.WaitGroup
		next  = make(chan int)
	)
	for w := workers(n); w > 0; w-- {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		mu.Lock()
		stop := first != nil
		mu.Unlock()
		if stop {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}

func elemSize(t *onnxpb.TensorProto) int {
	return graph.DataType(t.GetDataType()).BitSize() / 8
}

// transposeRaw transposes a [rows, cols] matrix of w-byte elements.
func transposeRaw(raw []byte, w, rows, cols int) []byte {
	out := make([]byte, len(raw))
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			copy(out[(j*rows+i)*w:(j*rows+i+1)*w], raw[(i*cols+j)*w:])
		}
	}
	return out
}
