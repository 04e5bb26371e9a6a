package rewrite

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack/lapack64"
	"gonum.org/v1/gonum/mat"
)

// The linear algebra behind resize, spectra and the PiSSA/OLoRA
// initializations. Matrices are row-major []float64 with explicit sizes,
// the layout the rest of the package keeps weights and factors in.

// thinQR factors the m×n matrix a (not modified) as Q·R and returns the
// first k columns of Q (m×k, orthonormal) and the first k rows of R (k×n,
// upper trapezoidal), k <= min(m, n). It is LAPACK's geqrf + orgqr, the
// factorization torch.linalg.qr computes, with its sign convention (R's
// diagonal has the sign opposite to the pivot column's leading element).
// Only k Householder steps are taken: the first k reflectors come from the
// first k columns alone, and they fix the first k rows of R, so the cost is
// O(m·n·k), not O(m·n²).
func thinQR(a []float64, m, n, k int) (q, r []float64) {
	if k > min(m, n) || k < 0 {
		panic(fmt.Sprintf("thinQR: k=%d for a %dx%d matrix", k, m, n))
	}
	q = make([]float64, m*k)
	r = make([]float64, k*n)
	if k == 0 {
		return q, r
	}
	// The panel: the first k columns, factored in place.
	for i := 0; i < m; i++ {
		copy(q[i*k:(i+1)*k], a[i*n:i*n+k])
	}
	panel := blas64.General{Rows: m, Cols: k, Stride: k, Data: q}
	tau := make([]float64, k)
	opt := make([]float64, 1)
	lapack64.Geqrf(panel, tau, opt, -1)
	work := make([]float64, max(int(opt[0]), m, n, 1))
	lapack64.Geqrf(panel, tau, work, len(work))
	for i := 0; i < k; i++ {
		for j := i; j < k; j++ {
			r[i*n+j] = q[i*k+j]
		}
	}
	// The rest of R's first k rows: the first k rows of Qᵀ·a[:, k:].
	if rest := n - k; rest > 0 {
		c := make([]float64, m*rest)
		for i := 0; i < m; i++ {
			copy(c[i*rest:(i+1)*rest], a[i*n+k:(i+1)*n])
		}
		cg := blas64.General{Rows: m, Cols: rest, Stride: rest, Data: c}
		lapack64.Ormqr(blas.Left, blas.Trans, panel, tau, cg, opt, -1)
		if need := int(opt[0]); need > len(work) {
			work = make([]float64, need)
		}
		lapack64.Ormqr(blas.Left, blas.Trans, panel, tau, cg, work, len(work))
		for i := 0; i < k; i++ {
			copy(r[i*n+k:(i+1)*n], c[i*rest:(i+1)*rest])
		}
	}
	lapack64.Orgqr(panel, tau, opt, -1)
	if need := int(opt[0]); need > len(work) {
		work = make([]float64, need)
	}
	lapack64.Orgqr(panel, tau, work, len(work))
	return q, r
}

// thinSVD returns the thin SVD of the m×n matrix a: a = U·diag(S)·Vᵀ with U
// m×p, S descending (p = min(m, n)) and V n×p.
func thinSVD(a []float64, m, n int) (u, s, v []float64, err error) {
	var svd mat.SVD
	if !svd.Factorize(mat.NewDense(m, n, append([]float64(nil), a...)), mat.SVDThin) {
		return nil, nil, nil, errors.New("the SVD did not converge")
	}
	var ud, vd mat.Dense
	svd.UTo(&ud)
	svd.VTo(&vd)
	return denseData(&ud), svd.Values(nil), denseData(&vd), nil
}

// denseData returns a Dense's elements, row-major and contiguous.
func denseData(d *mat.Dense) []float64 {
	r, c := d.Dims()
	raw := d.RawMatrix()
	if raw.Stride == c {
		return append([]float64(nil), raw.Data[:r*c]...)
	}
	out := make([]float64, 0, r*c)
	for i := 0; i < r; i++ {
		out = append(out, raw.Data[i*raw.Stride:i*raw.Stride+c]...)
	}
	return out
}

// matMul returns the m×n product of a (m×k) and b (k×n), or of their
// transposes when ta/tb (a is then stored k×m, b n×k).
func matMul(a []float64, ta bool, b []float64, tb bool, m, k, n int) []float64 {
	var x, y mat.Matrix
	if ta {
		x = mat.NewDense(k, m, a).T()
	} else {
		x = mat.NewDense(m, k, a)
	}
	if tb {
		y = mat.NewDense(n, k, b).T()
	} else {
		y = mat.NewDense(k, n, b)
	}
	out := make([]float64, m*n)
	if m == 0 || n == 0 {
		return out
	}
	if k == 0 {
		return out
	}
	mat.NewDense(m, n, out).Mul(x, y)
	return out
}

// randomizedSVD approximates the top q singular triplets of the m×n matrix
// a as torch.svd_lowrank(a, q, niter) does (Halko, Martinsson and Tropp
// 2009, algorithms 4.4 and 5.1): a Gaussian sketch, niter subspace
// iterations each re-orthonormalized by QR, then the exact SVD of the
// projection. q <= min(m, n).
func randomizedSVD(a []float64, m, n, q, niter int, rng *rand.Rand) (u, s, v []float64, err error) {
	omega := make([]float64, n*q)
	for i := range omega {
		omega[i] = rng.NormFloat64()
	}
	basis, _ := thinQR(matMul(a, false, omega, false, m, n, q), m, q, q)
	for it := 0; it < niter; it++ {
		z, _ := thinQR(matMul(a, true, basis, false, n, m, q), n, q, q)
		basis, _ = thinQR(matMul(a, false, z, false, m, n, q), m, q, q)
	}
	// The q×n projection basisᵀ·a has the same top singular values.
	proj := matMul(basis, true, a, false, q, m, n)
	ub, s, v, err := thinSVD(proj, q, n)
	if err != nil {
		return nil, nil, nil, err
	}
	return matMul(basis, false, ub, false, m, q, q), s, v, nil
}

// deltaSVD is the SVD of an adapter's update ΔW = scaling·A·B, A in×r and
// B r×out, computed without forming the in×out matrix: with A = Qa·Ra and
// Bᵀ = Qb·Rb, ΔW = Qa·(scaling·Ra·Rbᵀ)·Qbᵀ, so the SVD of the small middle
// matrix gives ΔW's. The cost is O((in+out)·r²).
type deltaSVD struct {
	in, out, k int
	U          []float64 // in×k, orthonormal columns
	S          []float64 // k singular values, descending
	V          []float64 // out×k, orthonormal columns
}

func newDeltaSVD(a, b []float64, in, out, r int, scaling float64) (*deltaSVD, error) {
	if len(a) != in*r || len(b) != r*out {
		return nil, fmt.Errorf("factors of %d and %d values do not fit a [%d, %d] layer at rank %d", len(a), len(b), in, out, r)
	}
	for _, x := range [][]float64{a, b} {
		for _, v := range x {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return nil, errors.New("the adapter holds NaN or infinite values")
			}
		}
	}
	if math.IsNaN(scaling) || math.IsInf(scaling, 0) {
		return nil, fmt.Errorf("scaling is %v", scaling)
	}
	if r == 0 || in == 0 || out == 0 {
		// An empty adapter (an adapter-input model's rank-0 default).
		return &deltaSVD{in: in, out: out}, nil
	}
	k1, k2 := min(in, r), min(out, r)
	qa, ra := thinQR(a, in, r, k1)
	bt := transposeF64(b, r, out) // out×r
	qb, rb := thinQR(bt, out, r, k2)
	mid := matMul(ra, false, rb, true, k1, r, k2)
	for i := range mid {
		mid[i] *= scaling
	}
	um, s, vm, err := thinSVD(mid, k1, k2)
	if err != nil {
		return nil, err
	}
	k := len(s)
	return &deltaSVD{
		in: in, out: out, k: k, S: s,
		U: matMul(qa, false, um, false, in, k1, k),
		V: matMul(qb, false, vm, false, out, k2, k),
	}, nil
}

// factors returns the rank-R factors of the truncated update with the
// given scaling: A' = U_R·diag(sqrt(S_R/scaling)) (in×R) and
// B' = diag(sqrt(S_R/scaling))·V_Rᵀ (R×out), so scaling·A'·B' is the best
// rank-R approximation of ΔW. A negative scaling flips B's sign.
func (d *deltaSVD) factors(rank int, scaling float64) (a, b []float64) {
	a = make([]float64, d.in*rank)
	b = make([]float64, rank*d.out)
	sign := 1.0
	if scaling < 0 {
		sign = -1
	}
	for j := 0; j < rank && j < d.k; j++ {
		w := math.Sqrt(d.S[j] / math.Abs(scaling))
		for i := 0; i < d.in; i++ {
			a[i*rank+j] = d.U[i*d.k+j] * w
		}
		for i := 0; i < d.out; i++ {
			b[j*d.out+i] = sign * d.V[i*d.k+j] * w
		}
	}
	return a, b
}

// tailNorm returns sqrt(Σ_{j>=rank} S_j²): the Frobenius norm of what a
// rank-R truncation discards (Eckart–Young).
func tailNorm(s []float64, rank int) float64 {
	var sum float64
	for j := rank; j < len(s); j++ {
		sum += s[j] * s[j]
	}
	return math.Sqrt(sum)
}

// rankForEnergy returns the smallest rank whose singular values hold at
// least the fraction energy of Σ S_j² (at least 1).
func rankForEnergy(s []float64, energy float64) int {
	var total float64
	for _, x := range s {
		total += x * x
	}
	if total == 0 {
		return 1
	}
	var acc float64
	for j, x := range s {
		acc += x * x
		if acc >= energy*total*(1-1e-12) {
			return j + 1
		}
	}
	return max(len(s), 1)
}
