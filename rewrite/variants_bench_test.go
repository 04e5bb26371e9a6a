package rewrite

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// Costs behind inject --init pissa / pissa_niter_N / olora and resize, on
// a d×d weight: go test ./rewrite -run '^$' -bench 'SVD|QR' -benchtime 1x
func benchMatrix(n int) []float64 {
	rng := rand.New(rand.NewPCG(1, 2))
	w := make([]float64, n)
	for i := range w {
		w[i] = rng.NormFloat64()
	}
	return w
}

func BenchmarkFullSVD(b *testing.B) {
	for _, d := range []int{256, 1024} {
		w := benchMatrix(d * d)
		b.Run(fmt.Sprint(d), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if _, _, _, err := thinSVD(w, d, d); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkRandomizedSVD(b *testing.B) {
	for _, d := range []int{1024, 4096} {
		w := benchMatrix(d * d)
		b.Run(fmt.Sprintf("%d/r16/niter4", d), func(b *testing.B) {
			rng := rand.New(rand.NewPCG(3, 4))
			for i := 0; i < b.N; i++ {
				if _, _, _, err := randomizedSVD(w, d, d, 16, 4, rng); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkOLoRAQR(b *testing.B) {
	for _, d := range []int{1024, 4096} {
		w := benchMatrix(d * d)
		b.Run(fmt.Sprintf("%d/r16", d), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				thinQR(w, d, d, 16)
			}
		})
	}
}

func BenchmarkDeltaSVD(b *testing.B) {
	const d, r = 4096, 16
	a, bb := benchMatrix(d*r), benchMatrix(r*d)
	for i := 0; i < b.N; i++ {
		if _, err := newDeltaSVD(a, bb, d, d, r, 2); err != nil {
			b.Fatal(err)
		}
	}
}
