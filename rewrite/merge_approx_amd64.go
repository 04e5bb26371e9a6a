//go:build amd64 && !purego

package rewrite

import (
	"encoding/binary"
	"math"
	"math/bits"

	"github.com/onnxlora/onnxlora/graph"
)

// The certified kernel for float16 and bfloat16 weights. The result of an
// element is round(w + fl(coef·acc)), acc the float64 rank product summed
// in k order (rankProduct). The kernel computes â, the same product in
// float32 with FMAs (four times the work per instruction), and a bound E
// on |â - acc| (Higham's dot product bound, from Σk |u_k|·|v_kq| <=
// ‖u_p‖·‖v_q‖, with the conversions to float32 counted and a margin).
// Everything after acc is monotone in acc, so if the two ends of the
// interval S ± W that holds the float64 sum (S and W in float32, W with
// every rounding of the float32 steps counted) round to the same value,
// that value is the float64 path's result, bit for bit. Lanes whose ends
// differ, round to zero, to infinity or NaN, or might raise the maximum
// |delta| reported, are computed exactly (rankProduct's sum and
// fusedRow) — about one in a thousand on trained-like weights.

// hasFMA says whether the CPU has FMA3 (with useSIMD's AVX2 and F16C).
var hasFMA = detectFMA()

func detectFMA() bool {
	_, _, ecx1, _ := cpuid(1, 0)
	return ecx1&(1<<12) != 0
}

//go:noescape
func rankApproxAVX2(acc, urow, v []float32, stride int)

// approxRow is the per-row constants of the certify kernels; the layout
// is the assembly's.
type approxRow struct {
	coef, k1, cu, m, c3, c4 float32
}

// certStats is what the certify kernels count: lanes that passed and, of
// those, lanes whose value did not change.
type certStats struct {
	pass, equal int64
}

//go:noescape
func certF16AVX2(drow, srow []byte, acc, ca []float32, prm *approxRow, masks []byte, st *certStats)

//go:noescape
func certBF16AVX2(drow, srow []byte, acc, ca []float32, prm *approxRow, masks []byte, st *certStats)

// approxState is an update's factors in float32 for the certified kernel,
// made on first use by a job (one goroutine per update).
type approxState struct {
	ok       bool
	u32, v32 []float32 // U [rows, r] and V [r, cols]
	ca       []float32 // per column: ‖v_q‖, rounded up, at least 2^-40
	mu       []float32 // per row: c·‖u_p‖, rounded up
	vt       []float64 // V transposed, for the lanes computed exactly
	r        int       // the rank: vt's column length
	k1       float32   // |coef|, rounded up
	max      float64   // the exact maximum |delta| of the elements merged so far
	acc      []float32
	masks    []byte
	// The failed lanes of a call, gathered: columns, exact sums, and the
	// stored and merged values, so that fusedRow runs once per call.
	fail       []int
	sums       []float64
	gsrc, gdst []byte
}

// The float32 kernel needs every factor in a range where its products
// neither underflow nor overflow; r bounds the error constant.
const (
	approxLo   = 0x1p-40
	approxHi   = 0x1p40
	approxMaxR = 1024
	approxUp   = 1 + 0x1p-20 // covers a few float32 roundings of a bound
)

// approx returns u's certified-kernel state, or nil when u's types, scale,
// coefficient or factor values do not suit it.
func (u *update) approx() *approxState {
	if !useSIMD || !hasFMA || u.scale != nil || u.src.GetDataType() != u.dst.GetDataType() {
		return nil
	}
	if dt := graph.DataType(u.src.GetDataType()); dt != graph.Float16 && dt != graph.BFloat16 {
		return nil
	}
	if u.ax != nil {
		if !u.ax.ok {
			return nil
		}
		return u.ax
	}
	ax := &approxState{}
	u.ax = ax
	ac := math.Abs(u.coef)
	if u.r < 1 || u.r > approxMaxR || u.cols < 8 || !(ac >= 0x1p-60 && ac <= 0x1p60) {
		return nil
	}
	inRange := func(s []float64) bool {
		for _, x := range s {
			if a := math.Abs(x); a != 0 && !(a >= approxLo && a <= approxHi) {
				return false
			}
		}
		return true
	}
	if !inRange(u.u) || !inRange(u.v) {
		return nil
	}
	r, cols := u.r, u.cols
	ax.u32, ax.v32 = make([]float32, len(u.u)), make([]float32, len(u.v))
	for i, x := range u.u {
		ax.u32[i] = float32(x)
	}
	for i, x := range u.v {
		ax.v32[i] = float32(x)
	}
	// Σk |u_k|·|v_kq| <= ‖u‖·‖v_q‖ (Cauchy-Schwarz); a column's norm is
	// at least 2^-40 so that E also covers float32 underflow.
	ax.ca, ax.r = make([]float32, cols), r
	ax.vt = make([]float64, len(u.v))
	for q := range ax.ca {
		s := 0.0
		for k := 0; k < r; k++ {
			x := u.v[k*cols+q]
			s += x * x
			ax.vt[q*r+k] = x
		}
		ax.ca[q] = float32(max(math.Sqrt(s)*approxUp, approxLo))
	}
	// |â - acc| <= (r+3)·2^-24·1.001·Σ|u||v|; (r+4)·2^-24 covers it.
	c := float64(r+4) * 0x1p-24
	ax.mu = make([]float32, u.rows)
	for p := range ax.mu {
		s := 0.0
		for _, x := range u.u[p*r : (p+1)*r] {
			s += x * x
		}
		ax.mu[p] = float32(c * math.Sqrt(s) * approxUp)
	}
	ax.k1 = float32(ac * (1 + 0x1p-16))
	ax.acc, ax.masks = make([]float32, mergeTile), make([]byte, mergeTile/8)
	ax.fail, ax.sums = make([]int, 0, mergeTile), make([]float64, mergeTile)
	ax.gsrc, ax.gdst = make([]byte, 2*mergeTile), make([]byte, 2*mergeTile)
	ax.ok = true
	return ax
}

// down32 is x rounded down to a float32.
func down32(x float64) float32 {
	f := float32(min(x, math.MaxFloat32))
	if float64(f) > x {
		f = math.Nextafter32(f, 0)
	}
	return f
}

// row merges row p of the columns [c0, c0+n) with the certified kernel,
// as far as it goes (a multiple of eight columns), and returns how many
// columns it did. drow and srow start at column c0.
func (ax *approxState) row(u *update, drow, srow []byte, p, c0, n int, st *mergeStats) int {
	n8 := n &^ 7
	if n8 == 0 {
		return 0
	}
	r, cols := u.r, u.cols
	acc, masks := ax.acc[:n8], ax.masks[:n8/8]
	v := ax.v32[c0:]
	if len(v) < (r-1)*cols+n8 {
		panic("approxState.row: v too short")
	}
	rankApproxAVX2(acc, ax.u32[p*r:(p+1)*r], v, cols)
	prm := approxRow{coef: float32(u.coef), k1: ax.k1, cu: ax.mu[p], m: down32(max(ax.max, st.maxAbs)),
		c3: 4 * 0x1p-24, c4: 3 * 0x1p-24}
	var cs certStats
	dt := graph.DataType(u.src.GetDataType())
	drow, srow = drow[:2*n8], srow[:2*n8]
	if dt == graph.Float16 {
		certF16AVX2(drow, srow, acc, ax.ca[c0:c0+n8], &prm, masks, &cs)
	} else {
		certBF16AVX2(drow, srow, acc, ax.ca[c0:c0+n8], &prm, masks, &cs)
	}
	st.changed += cs.pass - cs.equal
	// The failed lanes' columns, eight mask bytes at a time.
	fail := ax.fail[:0]
	for g := 0; g < len(masks); g += 8 {
		var w uint64
		if g+8 <= len(masks) {
			w = binary.LittleEndian.Uint64(masks[g:])
		} else {
			for i, m := range masks[g:] {
				w |= uint64(m) << (8 * i)
			}
		}
		for w != 0 {
			fail = append(fail, g*8+bits.TrailingZeros64(w))
			w &= w - 1
		}
	}
	if len(fail) == 0 {
		return n8
	}
	// The failed lanes' exact sums, each in rankProduct's order, four at a
	// time (independent sums keep the CPU busy), then one fusedRow over
	// them all.
	urow := u.u[p*r : (p+1)*r]
	sums := ax.sums[:len(fail)]
	last := len(fail) - 1
	for i := 0; i <= last; i += 4 {
		// A short last group repeats its last lane.
		i1, i2, i3 := min(i+1, last), min(i+2, last), min(i+3, last)
		v0, v1, v2, v3 := ax.col(c0+fail[i]), ax.col(c0+fail[i1]), ax.col(c0+fail[i2]), ax.col(c0+fail[i3])
		v0, v1, v2, v3 = v0[:len(urow)], v1[:len(urow)], v2[:len(urow)], v3[:len(urow)] // no bounds checks below
		var a0, a1, a2, a3 float64
		for k, uk := range urow {
			a0 += float64(uk * v0[k])
			a1 += float64(uk * v1[k])
			a2 += float64(uk * v2[k])
			a3 += float64(uk * v3[k])
		}
		sums[i], sums[i1], sums[i2], sums[i3] = a0, a1, a2, a3
	}
	gs, gd := ax.gsrc[:2*len(fail)], ax.gdst[:2*len(fail)]
	for i, q := range fail {
		gs[2*i], gs[2*i+1] = srow[2*q], srow[2*q+1]
	}
	fusedRow(dt, gd, gs, sums, u.coef, st)
	for i, q := range fail {
		drow[2*q], drow[2*q+1] = gd[2*i], gd[2*i+1]
	}
	return n8
}

// col is column q of V, contiguous.
func (ax *approxState) col(q int) []float64 {
	r := ax.r
	return ax.vt[q*r : (q+1)*r : (q+1)*r]
}
