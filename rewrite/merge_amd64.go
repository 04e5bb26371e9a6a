//go:build amd64 && !purego

package rewrite

import (
	"math"

	"github.com/onnxlora/onnxlora/graph"
)

// The merge kernels in merge_amd64.s use AVX2 (and F16C for float16). They
// compute exactly what rankProduct and fusedRow compute: separate vector
// multiplies and adds (never FMA) in the same order, and the same
// round-to-nearest-even bit manipulation, so results are bitwise equal to
// the pure Go path; tests compare the two. Lanes the vector code does not
// handle (zeros, subnormals, overflow, NaN: anything outside the normal
// range of the target type) are left to fusedRow, four values at a time.

// useSIMD says whether the CPU (and OS) support AVX2, F16C and POPCNT.
// Tests turn it off to compare with the pure Go kernels.
var useSIMD = detectSIMD()

func detectSIMD() bool {
	maxLeaf, _, _, _ := cpuid(0, 0)
	if maxLeaf < 7 {
		return false
	}
	_, _, ecx1, _ := cpuid(1, 0)
	const osxsave, avx, f16c, popcnt = 1 << 27, 1 << 28, 1 << 29, 1 << 23
	if ecx1&(osxsave|avx|f16c|popcnt) != osxsave|avx|f16c|popcnt {
		return false
	}
	if xcr0, _ := xgetbv(); xcr0&6 != 6 { // the OS saves XMM and YMM state
		return false
	}
	_, ebx7, _, _ := cpuid(7, 0)
	return ebx7&(1<<5) != 0 // AVX2
}

func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)
func xgetbv() (eax, edx uint32)

// rankProductAVX2 sets acc[q] = Σk urow[k]·v[k·stride+q] for q < len(acc),
// a multiple of 32. v must hold (len(urow)-1)·stride + len(acc) values.
//
//go:noescape
func rankProductAVX2(acc, urow, v []float64, stride int)

// simdStats accumulates the statistics of the fused kernels: per-lane
// maxima of |delta| (reduced in Go), equal (unchanged) values and
// non-finite results.
type simdStats struct {
	max       [4]float64
	equal     int64
	nonFinite int64
}

// The fused kernels process groups of four values from the start of acc
// and return how many they did: all of len(acc) rounded down to four, or
// fewer when a group has a value they leave to fusedRow.
//
//go:noescape
func fusedF16AVX2(drow, srow []byte, acc []float64, coef float64, st *simdStats) int

//go:noescape
func fusedBF16AVX2(drow, srow []byte, acc []float64, coef float64, st *simdStats) int

//go:noescape
func fusedF32AVX2(drow, srow []byte, acc []float64, coef float64, st *simdStats) int

func rankProductSIMD(acc, urow, v []float64, stride, off int) bool {
	n := len(acc) &^ 31
	r := len(urow)
	if n == 0 || r == 0 {
		return false
	}
	vv := v[off:]
	if len(vv) < (r-1)*stride+n {
		panic("rankProductSIMD: v too short")
	}
	rankProductAVX2(acc[:n], urow, vv, stride)
	if n < len(acc) {
		rankProduct(acc[n:], urow, v, stride, off+n)
	}
	return true
}

func fusedRowSIMD(dt graph.DataType, drow, srow []byte, acc []float64, coef float64, st *mergeStats) bool {
	var kernel func(drow, srow []byte, acc []float64, coef float64, st *simdStats) int
	w := 2
	switch dt {
	case graph.Float16:
		kernel = fusedF16AVX2
	case graph.BFloat16:
		kernel = fusedBF16AVX2
	case graph.Float:
		kernel, w = fusedF32AVX2, 4
	default:
		return false
	}
	n := len(acc)
	drow, srow = drow[:w*n], srow[:w*n]
	var vs simdStats
	done := 0
	for i := 0; i < n; {
		if n-i >= 4 {
			k := kernel(drow[w*i:], srow[w*i:], acc[i:n], coef, &vs)
			done += k
			i += k
		}
		if i < n { // a group (or the tail) the vector code left over
			j := min(i+4, n)
			fusedRow(dt, drow[w*i:w*j], srow[w*i:w*j], acc[i:j], coef, st)
			i = j
		}
	}
	for _, m := range vs.max {
		st.maxAbs = math.Max(st.maxAbs, m)
	}
	st.changed += int64(done) - vs.equal
	st.nonFinite += vs.nonFinite
	return true
}
