//go:build amd64 && !purego

package rewrite

import (
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
)

// approxCase makes a [rows, cols] weight of type dt with trained-like
// values (and, with specials, some of the values the kernel must hand
// back) and an update of rank r on it.
func approxCase(rng *rand.Rand, dt graph.DataType, rows, cols, r int, specials bool) *update {
	special := []float64{0, math.Copysign(0, -1), 1e-6, -3e-8, 6e-5, 65504, -65519, 65520, 3.3e38, math.Inf(1), math.Inf(-1), math.NaN(), 1e-40}
	w := make([]float64, rows*cols)
	for i := range w {
		w[i] = rng.NormFloat64() * 0.02
		if specials && rng.IntN(20) == 0 {
			w[i] = special[rng.IntN(len(special))]
		}
	}
	src, err := graph.NewFloatTensor("w", dt, []int64{int64(rows), int64(cols)}, w)
	if err != nil {
		panic(err)
	}
	u := &update{src: src, dst: src, rows: rows, cols: cols, r: r, coef: rng.NormFloat64() * 2,
		u: make([]float64, rows*r), v: make([]float64, r*cols)}
	scale := math.Pow(10, float64(rng.IntN(5)-3))
	for i := range u.u {
		u.u[i] = rng.NormFloat64() * scale
	}
	for i := range u.v {
		u.v[i] = rng.NormFloat64() * 0.1
		if specials && rng.IntN(40) == 0 {
			u.v[i] = []float64{0, 1e-9, -2.5e3}[rng.IntN(3)]
		}
	}
	return u
}

// TestApproxKernelMatchesGo checks the certified kernel against the pure
// Go path, bytes and statistics, on ragged shapes, special values, ranks
// up to 40 and many scales of delta against weight.
func TestApproxKernelMatchesGo(t *testing.T) {
	if !useSIMD || !hasFMA {
		t.Skip("no FMA kernels on this CPU")
	}
	rng := rand.New(rand.NewPCG(31, 32))
	used := 0
	for iter := 0; iter < 600; iter++ {
		dt := []graph.DataType{graph.Float16, graph.BFloat16}[iter%2]
		rows, cols, r := 1+rng.IntN(6), 1+rng.IntN(1500), 1+rng.IntN(40)
		if iter%4 == 0 {
			cols = 64 * (1 + rng.IntN(20))
		}
		u := approxCase(rng, dt, rows, cols, r, iter%3 == 0)
		got := make([]byte, len(u.src.RawData))
		want := make([]byte, len(u.src.RawData))
		stGot := mergeRows(got, u.src.RawData, u, 0, rows, make([]float64, 2*cols))
		if u.ax != nil && u.ax.ok {
			used++
		}
		useSIMD = false
		stWant := mergeRows(want, u.src.RawData, u, 0, rows, make([]float64, 2*cols))
		useSIMD = true
		if !slices.Equal(got, want) {
			for i := 0; i < len(got); i += 2 {
				if got[i] != want[i] || got[i+1] != want[i+1] {
					t.Fatalf("%v [%d, %d] r=%d: element %d differs (kernel %x, Go %x)", dt, rows, cols, r, i/2, got[i:i+2], want[i:i+2])
				}
			}
		}
		if stGot != stWant {
			t.Fatalf("%v [%d, %d] r=%d: stats %+v, Go %+v", dt, rows, cols, r, stGot, stWant)
		}
	}
	if used < 300 {
		t.Errorf("the certified kernel ran on only %d of 600 cases", used)
	}
}

// TestApproxKernelChunks merges a weight in chunks of rows, as the
// streamed save does: the maximum carried between chunks must still give
// the same total statistics.
func TestApproxKernelChunks(t *testing.T) {
	if !useSIMD || !hasFMA {
		t.Skip("no FMA kernels on this CPU")
	}
	rng := rand.New(rand.NewPCG(33, 34))
	u := approxCase(rng, graph.Float16, 37, 520, 16, true)
	got := make([]byte, len(u.src.RawData))
	var st mergeStats
	for p0 := 0; p0 < u.rows; p0 += 5 {
		n := min(5, u.rows-p0)
		st.add(mergeRows(got[p0*u.cols*2:], u.src.RawData[p0*u.cols*2:], u, p0, n, make([]float64, 2*u.cols)))
	}
	useSIMD = false
	want := make([]byte, len(got))
	stWant := mergeRows(want, u.src.RawData, u, 0, u.rows, make([]float64, 2*u.cols))
	useSIMD = true
	if !slices.Equal(got, want) || st != stWant {
		t.Fatalf("chunked merge differs: stats %+v, Go %+v", st, stWant)
	}
}

// TestApproxKernelFallsBackRarely checks that on trained-like values few
// lanes need the exact path: otherwise the kernel would be slow, not wrong.
func TestApproxKernelFallsBackRarely(t *testing.T) {
	if !useSIMD || !hasFMA {
		t.Skip("no FMA kernels on this CPU")
	}
	rng := rand.New(rand.NewPCG(35, 36))
	for _, dt := range []graph.DataType{graph.Float16, graph.BFloat16} {
		u := approxCase(rng, dt, 64, 1024, 16, false)
		ax := u.approx()
		if ax == nil {
			t.Fatalf("%v: no certified kernel for plain values", dt)
		}
		out := make([]byte, len(u.src.RawData))
		var st mergeStats
		fails := 0
		for p := 0; p < u.rows; p++ {
			for c0 := 0; c0 < u.cols; c0 += mergeTile {
				n := ax.row(u, out[(p*u.cols+c0)*2:], u.src.RawData[(p*u.cols+c0)*2:], p, c0, min(mergeTile, u.cols-c0), &st)
				for _, m := range ax.masks[:n/8] {
					fails += bits.OnesCount8(m)
				}
			}
		}
		rate := float64(fails) / float64(u.rows*u.cols)
		t.Logf("%v: %d of %d lanes (%.3f%%) computed exactly", dt, fails, u.rows*u.cols, 100*rate)
		if rate > 0.05 {
			t.Errorf("%v: %.1f%% of lanes fell back", dt, 100*rate)
		}
	}
}
