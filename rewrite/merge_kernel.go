package rewrite

import (
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
// Columns are done in tiles so that the tile of V (r·tile values) stays in
// the CPU cache while every row of the chunk goes past it; the arithmetic
// is the same as row by row.
func mergeRows(dst, src []byte, u *update, p0, n int, scratch []float64) mergeStats {
	cols, r := u.cols, u.r
	sdt, ddt := graph.DataType(u.src.GetDataType()), graph.DataType(u.dst.GetDataType())
	sw, dw := sdt.BitSize()/8, ddt.BitSize()/8
	var st mergeStats
	for c0 := 0; c0 < cols; c0 += mergeTile {
		c1 := min(c0+mergeTile, cols)
		acc, w := scratch[:c1-c0], scratch[cols:cols+c1-c0]
		for i := 0; i < n; i++ {
			p := p0 + i
			urow := u.u[p*r : (p+1)*r]
			if !useSIMD || !rankProductSIMD(acc, urow, u.v, cols, c0) {
				rankProduct(acc, urow, u.v, cols, c0)
			}
			srow := src[(i*cols+c0)*sw : (i*cols+c1)*sw]
			drow := dst[(i*cols+c0)*dw : (i*cols+c1)*dw]
			if sdt == ddt && useSIMD && fusedRowSIMD(sdt, drow, srow, acc, u.coef, &st) {
				continue
			}
			if sdt == ddt && fusedRow(sdt, drow, srow, acc, u.coef, &st) {
				continue
			}
			decodeRow(sdt, w, srow)
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
			encodeRow(ddt, drow, w)
			st.nonFinite += countNonFinite(ddt, drow)
		}
	}
	return st
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
		tab := float16Table()
		srow, drow = srow[:2*len(acc)], drow[:2*len(acc)]
		for q, a := range acc {
			old := leU16(srow[2*q:])
			// The conversion keeps the compiler from fusing the multiply
			// into the add, so every platform rounds the same way.
			d := float64(coef * a)
			// A normal half widens to float32 by re-biasing the exponent; the
			// table (too big for the cache to keep) is for the rest.
			var wv float64
			if e := old & 0x7c00; e != 0 && e != 0x7c00 {
				wv = float64(math.Float32frombits(uint32(old&0x8000)<<16 | (uint32(old&0x7fff)+(127-15)<<10)<<13))
			} else {
				wv = tab[old]
			}
			// float16Bits, its fast path written out (too big to inline).
			nb := math.Float64bits(wv + d)
			var h uint16
			if ax := nb &^ (1 << 63); ax-f16Lo < f16Hi-f16Lo {
				ax += 1<<41 - 1 + (ax>>42)&1
				h = uint16(nb>>48)&0x8000 | uint16(ax>>42-(1023-15)<<10)
			} else {
				h = float16BitsSlow(math.Float64frombits(nb))
			}
			putU16(drow[2*q:], h)
			if ad := math.Abs(d); ad > maxAbs {
				maxAbs = ad
			}
			changed += int64(neq16(h, old))
			if h&0x7c00 == 0x7c00 {
				nonFinite++
			}
		}
	case graph.BFloat16:
		srow, drow = srow[:2*len(acc)], drow[:2*len(acc)]
		for q, a := range acc {
			old := leU16(srow[2*q:])
			d := float64(coef * a)
			nb := math.Float64bits(float64(math.Float32frombits(uint32(old)<<16)) + d)
			var h uint16
			if ax := nb &^ (1 << 63); ax-bf16Lo < bf16Hi-bf16Lo {
				ax += 1<<44 - 1 + (ax>>45)&1
				h = uint16(nb>>48)&0x8000 | uint16(ax>>45-(1023-127)<<7)
			} else {
				h = bfloat16BitsSlow(math.Float64frombits(nb))
			}
			putU16(drow[2*q:], h)
			if ad := math.Abs(d); ad > maxAbs {
				maxAbs = ad
			}
			changed += int64(neq16(h, old))
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
			changed += int64((uint64(h^old) + 0xffffffff) >> 32)
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

// f16Table decodes every float16 bit pattern (built on first use).
var (
	f16Once  sync.Once
	f16Table *[1 << 16]float64
)

func float16Table() *[1 << 16]float64 {
	f16Once.Do(func() {
		f16Table = new([1 << 16]float64)
		for i := range f16Table {
			f16Table[i] = graph.Float16Value(uint16(i))
		}
	})
	return f16Table
}

// decodeRow decodes little-endian raw elements of dt into out.
func decodeRow(dt graph.DataType, out []float64, raw []byte) {
	switch dt {
	case graph.Float:
		raw = raw[:4*len(out)]
		for q := range out {
			out[q] = float64(math.Float32frombits(leU32(raw[4*q:])))
		}
	case graph.Float16:
		tab := float16Table()
		raw = raw[:2*len(out)]
		for q := range out {
			out[q] = tab[leU16(raw[2*q:])]
		}
	case graph.BFloat16:
		raw = raw[:2*len(out)]
		for q := range out {
			out[q] = float64(math.Float32frombits(uint32(leU16(raw[2*q:])) << 16))
		}
	case graph.Double:
		raw = raw[:8*len(out)]
		for q := range out {
			out[q] = math.Float64frombits(leU64(raw[8*q:]))
		}
	}
}

// encodeRow encodes vals as little-endian elements of dt, each rounded once
// to nearest even (the same results as graph.EncodeFloats, faster).
func encodeRow(dt graph.DataType, raw []byte, vals []float64) {
	switch dt {
	case graph.Float:
		raw = raw[:4*len(vals)]
		for q, v := range vals {
			putU32(raw[4*q:], math.Float32bits(float32(v)))
		}
	case graph.Float16:
		raw = raw[:2*len(vals)]
		for q, v := range vals {
			putU16(raw[2*q:], float16Bits(v))
		}
	case graph.BFloat16:
		raw = raw[:2*len(vals)]
		for q, v := range vals {
			putU16(raw[2*q:], bfloat16Bits(v))
		}
	case graph.Double:
		raw = raw[:8*len(vals)]
		for q, v := range vals {
			putU64(raw[8*q:], math.Float64bits(v))
		}
	}
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

// The float64 bit patterns bounding the fast paths of float16Bits and
// bfloat16Bits: the smallest normal and the first power of two past the
// largest finite value.
const (
	f16Lo  = 0x3f10000000000000 // 2^-14
	f16Hi  = 0x40f0000000000000 // 2^16
	bf16Lo = 0x3810000000000000 // 2^-126
	bf16Hi = 0x47f0000000000000 // 2^128
)

// float16Bits rounds f to IEEE binary16 (nearest even) straight from
// float64, bit for bit like graph.Float16Bits but without math.Frexp.
func float16Bits(f float64) uint16 {
	// Fast path, |f| in [2^-14, 2^16): round the float64 bits to 10
	// mantissa bits, nearest even; a carry out of the mantissa bumps the
	// exponent, and 2^16 comes out as infinity, as it should. Small enough
	// to be inlined into the merge loop.
	b := math.Float64bits(f)
	if ax := b &^ (1 << 63); ax-f16Lo < f16Hi-f16Lo {
		ax += 1<<41 - 1 + (ax>>42)&1
		return uint16(b>>48)&0x8000 | uint16(ax>>42-(1023-15)<<10)
	}
	return float16BitsSlow(f)
}

// float16BitsSlow handles zeros, subnormals, overflow, Inf and NaN.
func float16BitsSlow(f float64) uint16 {
	b := math.Float64bits(f)
	sign := uint16(b>>48) & 0x8000
	exp := int(b>>52) & 0x7ff
	mant := b & (1<<52 - 1)
	if exp == 0x7ff {
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	}
	if exp == 0 { // float64 subnormals are far below half's range
		return sign
	}
	e := exp - 1023
	full := mant | 1<<52
	if e >= -14 { // a normal half, unless rounding overflows
		q := full >> 42
		rem := full & (1<<42 - 1)
		if rem > 1<<41 || (rem == 1<<41 && q&1 == 1) {
			q++
		}
		if q == 2048 {
			q = 1024
			e++
		}
		if e > 15 {
			return sign | 0x7c00
		}
		return sign | uint16(e+15)<<10 | uint16(q-1024)
	}
	// A half subnormal: value = q·2^-24, q = full·2^(e-52+24).
	shift := uint(28 - e)
	if shift > 60 {
		return sign
	}
	q := full >> shift
	rem := full & (1<<shift - 1)
	half := uint64(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return sign | uint16(q) // q = 1024 is the smallest normal, encoded alike
}

// bfloat16Bits rounds f to bfloat16 (nearest even) straight from float64,
// bit for bit like graph.BFloat16Bits.
func bfloat16Bits(f float64) uint16 {
	// Fast path, |f| in [2^-126, 2^128), as in float16Bits.
	b := math.Float64bits(f)
	if ax := b &^ (1 << 63); ax-bf16Lo < bf16Hi-bf16Lo {
		ax += 1<<44 - 1 + (ax>>45)&1
		return uint16(b>>48)&0x8000 | uint16(ax>>45-(1023-127)<<7)
	}
	return bfloat16BitsSlow(f)
}

// bfloat16BitsSlow handles zeros, subnormals, overflow, Inf and NaN.
func bfloat16BitsSlow(f float64) uint16 {
	b := math.Float64bits(f)
	sign := uint16(b>>48) & 0x8000
	exp := int(b>>52) & 0x7ff
	mant := b & (1<<52 - 1)
	if exp == 0x7ff {
		if mant != 0 {
			return sign | 0x7fc0
		}
		return sign | 0x7f80
	}
	if exp == 0 {
		return sign
	}
	e := exp - 1023
	full := mant | 1<<52
	if e >= -126 {
		q := full >> 45
		rem := full & (1<<45 - 1)
		if rem > 1<<44 || (rem == 1<<44 && q&1 == 1) {
			q++
		}
		if q == 256 {
			q = 128
			e++
		}
		if e > 127 {
			return sign | 0x7f80
		}
		return sign | uint16(e+127)<<7 | uint16(q-128)
	}
	// A bfloat16 subnormal: value = q·2^-133, q = full·2^(e-52+133).
	shift := uint(-81 - e)
	if shift > 60 {
		return sign
	}
	q := full >> shift
	rem := full & (1<<shift - 1)
	half := uint64(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return sign | uint16(q)
}

// neq16 is 1 when a != b, else 0, without a branch.
func neq16(a, b uint16) uint32 { return (uint32(a^b) + 0xffff) >> 16 }

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
