package export

import (
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"

	"gonum.org/v1/gonum/mat"
)

func combineModule(rng *rand.Rand, name string, in, out, r int, scaling float64) PEFTModule {
	m := PEFTModule{Name: name, DType: DTypeF32, Rank: r, InFeatures: in, OutFeatures: out, Alpha: scaling * float64(r), Scaling: scaling,
		A: make([]float32, r*in), B: make([]float32, out*r)}
	for i := range m.A {
		m.A[i] = float32(rng.NormFloat64())
	}
	for i := range m.B {
		m.B[i] = float32(rng.NormFloat64())
	}
	return m
}

// deltaOf is scaling·B·A [out, in], by plain loops.
func deltaOf(m PEFTModule, scale float64) []float64 {
	d := make([]float64, m.OutFeatures*m.InFeatures)
	for o := 0; o < m.OutFeatures; o++ {
		for i := 0; i < m.InFeatures; i++ {
			var s float64
			for k := 0; k < m.Rank; k++ {
				s += float64(m.B[o*m.Rank+k]) * float64(m.A[k*m.InFeatures+i])
			}
			d[o*m.InFeatures+i] = scale * m.Scaling * s
		}
	}
	return d
}

func frob(x []float64) float64 {
	var s float64
	for _, v := range x {
		s += v * v
	}
	return math.Sqrt(s)
}

func sub(a, b []float64) []float64 {
	d := make([]float64, len(a))
	for i := range a {
		d[i] = a[i] - b[i]
	}
	return d
}

// TestCombineLinearByHand: PEFT's linear on 1×1 factors, numbers worked
// out by hand: A = √(0.7·0.5)·2 + √(0.3·2)·1, B = √(0.35)·3 − √(0.6).
func TestCombineLinearByHand(t *testing.T) {
	one := func(a, b, s float64) []PEFTModule {
		return []PEFTModule{{Name: "m", DType: DTypeF32, Rank: 1, InFeatures: 1, OutFeatures: 1, Scaling: s, A: []float32{float32(a)}, B: []float32{float32(b)}}}
	}
	got, err := CombineAdapters([][]PEFTModule{one(2, 3, 0.5), one(1, -1, 2)}, CombineOptions{Method: CombineLinear, Weights: []float64{0.7, 0.3}})
	if err != nil {
		t.Fatal(err)
	}
	m := got[0]
	if math.Abs(float64(m.A[0])-1.9578126258) > 1e-6 || math.Abs(float64(m.B[0])-1.0002272657) > 1e-6 || m.Rank != 1 || m.Scaling != 1 || m.Alpha != 1 {
		t.Errorf("linear: A %v B %v rank %d scaling %g alpha %g", m.A, m.B, m.Rank, m.Scaling, m.Alpha)
	}
}

// TestCombineCatIsTheWeightedSum: cat's B·A is Σ wᵢsᵢBᵢAᵢ, modules present
// in only one adapter included.
func TestCombineCatIsTheWeightedSum(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	a1 := []PEFTModule{combineModule(rng, "q", 6, 5, 2, 0.5), combineModule(rng, "v", 6, 4, 3, 2)}
	a2 := []PEFTModule{combineModule(rng, "q", 6, 5, 4, 1.5)}
	w := []float64{0.7, -0.4}
	got, err := CombineAdapters([][]PEFTModule{a1, a2}, CombineOptions{Method: CombineCat, Weights: w})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Name != "q" || got[0].Rank != 6 || got[1].Name != "v" || got[1].Rank != 3 {
		t.Fatalf("modules %+v", got)
	}
	wantQ := deltaOf(a1[0], w[0])
	for i, v := range deltaOf(a2[0], w[1]) {
		wantQ[i] += v
	}
	for _, c := range []struct {
		got  PEFTModule
		want []float64
	}{{got[0], wantQ}, {got[1], deltaOf(a1[1], w[0])}} {
		if rel := frob(sub(deltaOf(c.got, 1), c.want)) / frob(c.want); rel > 1e-6 {
			t.Errorf("%s: cat delta off by %.2g", c.got.Name, rel)
		}
	}
}

// TestCombineSVD: with enough rank the delta is the weighted sum exactly;
// with less, the error is the Eckart–Young minimum, computed from the
// eigenvalues of ΔᵀΔ (a different algorithm from the SVD used).
func TestCombineSVD(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	a1 := []PEFTModule{combineModule(rng, "q", 9, 7, 3, 0.5)}
	a2 := []PEFTModule{combineModule(rng, "q", 9, 7, 2, 2)}
	w := []float64{0.6, 0.4}
	want := deltaOf(a1[0], w[0])
	for i, v := range deltaOf(a2[0], w[1]) {
		want[i] += v
	}
	full, err := CombineAdapters([][]PEFTModule{a1, a2}, CombineOptions{Method: CombineSVD, Weights: w, Rank: 5})
	if err != nil {
		t.Fatal(err)
	}
	if rel := frob(sub(deltaOf(full[0], 1), want)) / frob(want); rel > 1e-6 {
		t.Errorf("rank 5 of a rank-5 sum: off by %.2g", rel)
	}
	def, err := CombineAdapters([][]PEFTModule{a1, a2}, CombineOptions{Method: CombineSVD, Weights: w})
	if err != nil {
		t.Fatal(err)
	}
	if def[0].Rank != 3 {
		t.Errorf("default rank %d, want the largest, 3", def[0].Rank)
	}
	var ata mat.SymDense
	d := mat.NewDense(7, 9, want)
	ata.SymOuterK(1, d.T())
	var eig mat.EigenSym
	if !eig.Factorize(&ata, false) {
		t.Fatal("eigen")
	}
	ev := eig.Values(nil)
	sort.Float64s(ev) // ascending: the 9-3 smallest are what rank 3 drops
	var tail float64
	for _, v := range ev[:len(ev)-3] {
		tail += math.Max(v, 0)
	}
	got := frob(sub(deltaOf(def[0], 1), want))
	if math.Abs(got-math.Sqrt(tail)) > 1e-5*frob(want) {
		t.Errorf("rank-3 error %.6g, Eckart–Young minimum %.6g", got, math.Sqrt(tail))
	}
}

func TestCombineErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	q2 := []PEFTModule{combineModule(rng, "q", 4, 4, 2, 1)}
	q3 := []PEFTModule{combineModule(rng, "q", 4, 4, 3, 1)}
	other := []PEFTModule{combineModule(rng, "q", 4, 5, 2, 1)}
	for name, c := range map[string]struct {
		ads  [][]PEFTModule
		opts CombineOptions
		want string
	}{
		"linear ranks": {[][]PEFTModule{q2, q3}, CombineOptions{Method: CombineLinear, Weights: []float64{1, 1}}, "one rank"},
		"negative":     {[][]PEFTModule{q2, q2}, CombineOptions{Method: CombineLinear, Weights: []float64{1, -1}}, ">= 0"},
		"weights":      {[][]PEFTModule{q2, q3}, CombineOptions{Method: CombineCat, Weights: []float64{1}}, "1 weights for 2"},
		"other base":   {[][]PEFTModule{q2, other}, CombineOptions{Method: CombineCat, Weights: []float64{1, 1}}, "same base"},
		"rank":         {[][]PEFTModule{q2, q3}, CombineOptions{Method: CombineSVD, Weights: []float64{1, 1}, Rank: 5}, "min(in, out)"},
		"rank linear":  {[][]PEFTModule{q2, q2}, CombineOptions{Method: CombineLinear, Weights: []float64{1, 1}, Rank: 2}, "svd"},
		"method":       {[][]PEFTModule{q2, q2}, CombineOptions{Method: "ties", Weights: []float64{1, 1}}, "unknown"},
		"nan":          {[][]PEFTModule{q2, q2}, CombineOptions{Method: CombineCat, Weights: []float64{math.NaN(), 1}}, "finite"},
	} {
		if _, err := CombineAdapters(c.ads, c.opts); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", name, err, c.want)
		}
	}
}
