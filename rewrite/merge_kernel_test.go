package rewrite

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

func TestMergeRowsMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, dt := range []graph.DataType{graph.Float, graph.Float16, graph.BFloat16, graph.Double} {
		for _, r := range []int{1, 3, 4, 7, 16} {
			rows, cols := 5, 9
			w := make([]float64, rows*cols)
			a := make([]float64, rows*r)
			b := make([]float64, r*cols)
			for _, s := range [][]float64{w, a, b} {
				for i := range s {
					s[i] = rng.NormFloat64()
				}
			}
			src, _ := graph.NewFloatTensor("w", dt, []int64{int64(rows), int64(cols)}, w)
			w = graph.DecodeFloats(dt, src.RawData)
			u := &update{src: src, dst: src, rows: rows, cols: cols, r: r, u: a, v: b, coef: 0.37}
			out := make([]byte, len(src.RawData))
			mergeRows(out, src.RawData, u, 0, rows, make([]float64, 2*cols))
			want, _ := graph.EncodeFloats(dt, mgRefMerged(w, a, b, rows, cols, r, 0.37, false))
			if !slices.Equal(out, want) {
				t.Errorf("%v r=%d: kernel differs from the reference", dt, r)
			}
		}
	}
}

// TestSIMDKernelsMatchGo checks that the vector kernels (where the build
// and CPU have them) give bitwise the pure Go results and the same
// statistics, on shapes with ragged tails and on values the vector code
// must hand back: zeros, subnormals, overflow, infinities, NaN.
func TestSIMDKernelsMatchGo(t *testing.T) {
	if !useSIMD {
		t.Skip("no vector kernels in this build or on this CPU")
	}
	rng := rand.New(rand.NewPCG(9, 10))
	special := []float64{0, math.Copysign(0, -1), 1e-6, -3e-8, 6e-5, 65504, -65519, 65520, 3.3e38, math.Inf(1), math.Inf(-1), math.NaN(), 1e-40, 1.5e-45}
	value := func() float64 {
		switch rng.IntN(10) {
		case 0:
			return special[rng.IntN(len(special))]
		case 1:
			return rng.NormFloat64() * 3e4
		default:
			return rng.NormFloat64() * 0.05
		}
	}
	for iter := 0; iter < 400; iter++ {
		dt := []graph.DataType{graph.Float16, graph.BFloat16, graph.Float}[iter%3]
		rows, cols, r := 1+rng.IntN(4), 1+rng.IntN(1200), 1+rng.IntN(20)
		if iter%5 == 0 {
			cols = 32 * (1 + rng.IntN(40))
		}
		w := make([]float64, rows*cols)
		for i := range w {
			w[i] = value()
		}
		src, err := graph.NewFloatTensor("w", dt, []int64{int64(rows), int64(cols)}, w)
		if err != nil {
			t.Fatal(err)
		}
		u := &update{src: src, dst: src, rows: rows, cols: cols, r: r, coef: rng.NormFloat64(),
			u: make([]float64, rows*r), v: make([]float64, r*cols)}
		scale := math.Pow(10, float64(rng.IntN(7)-4))
		for i := range u.u {
			u.u[i] = rng.NormFloat64() * scale
		}
		for i := range u.v {
			u.v[i] = rng.NormFloat64()
			if rng.IntN(50) == 0 {
				u.v[i] = special[rng.IntN(len(special))]
			}
		}
		got := make([]byte, len(src.RawData))
		want := make([]byte, len(src.RawData))
		stGot := mergeRows(got, src.RawData, u, 0, rows, make([]float64, 2*cols))
		useSIMD = false
		stWant := mergeRows(want, src.RawData, u, 0, rows, make([]float64, 2*cols))
		useSIMD = true
		if !slices.Equal(got, want) {
			for i := 0; i < len(got); i += dt.BitSize() / 8 {
				if got[i] != want[i] || got[i+1] != want[i+1] {
					t.Fatalf("%v [%d, %d] r=%d: element %d differs (SIMD %x, Go %x)", dt, rows, cols, r, i/(dt.BitSize()/8), got[i:i+dt.BitSize()/8], want[i:i+dt.BitSize()/8])
				}
			}
			t.Fatalf("%v [%d, %d] r=%d: results differ", dt, rows, cols, r)
		}
		if stGot != stWant {
			t.Fatalf("%v [%d, %d] r=%d: stats %+v, Go %+v", dt, rows, cols, r, stGot, stWant)
		}
	}
}

// TestUntrainedMergeChangesNothing merges an adapter whose B is zero (as
// after inject, before training) into weights with zeros of both signs:
// the result is W + 0 as torch computes it (-0 becomes +0) and no element
// counts as changed, in the Go and the vector kernels alike.
func TestUntrainedMergeChangesNothing(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	for _, dt := range []graph.DataType{graph.Float, graph.Float16, graph.BFloat16} {
		rows, cols, r := 3, 133, 4
		w := make([]float64, rows*cols)
		for i := range w {
			switch i % 3 {
			case 0:
				w[i] = math.Copysign(0, -1)
			case 1:
				w[i] = 0
			default:
				w[i] = rng.NormFloat64()
			}
		}
		src, err := graph.NewFloatTensor("w", dt, []int64{int64(rows), int64(cols)}, w)
		if err != nil {
			t.Fatal(err)
		}
		a := make([]float64, rows*r)
		for i := range a {
			a[i] = rng.NormFloat64()
		}
		u := &update{src: src, dst: src, rows: rows, cols: cols, r: r, coef: 2, u: a, v: make([]float64, r*cols)}
		want, _ := graph.EncodeFloats(dt, mgRefMerged(graph.DecodeFloats(dt, src.RawData), a, u.v, rows, cols, r, 2, false))
		for _, simd := range []bool{false, true} {
			if simd && !useSIMD {
				continue
			}
			saved := useSIMD
			useSIMD = simd
			got := make([]byte, len(src.RawData))
			st := mergeRows(got, src.RawData, u, 0, rows, make([]float64, 2*cols))
			useSIMD = saved
			if !slices.Equal(got, want) {
				t.Errorf("%v (simd %v): result differs from W + 0", dt, simd)
			}
			if st.changed != 0 {
				t.Errorf("%v (simd %v): %d elements counted as changed by a zero adapter", dt, simd, st.changed)
			}
		}
	}
}

// TestKernelRoundsTiesToEven builds deltas of exactly half a unit in the
// last place of each weight (and a hair more or less), where rounding to
// nearest even is decided, and checks both kernels against
// graph.EncodeFloats.
func TestKernelRoundsTiesToEven(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for _, dt := range []graph.DataType{graph.Float16, graph.BFloat16, graph.Float} {
		cols := 4096
		w := make([]float64, cols)
		for i := range w {
			w[i] = rng.NormFloat64() * math.Pow(2, float64(rng.IntN(20)-10))
		}
		src, _ := graph.NewFloatTensor("w", dt, []int64{1, int64(cols)}, w)
		w = graph.DecodeFloats(dt, src.RawData)
		d := make([]float64, cols)
		for q, x := range w {
			bits := src.RawData[q*dt.BitSize()/8:]
			var next float64
			switch dt {
			case graph.Float:
				next = float64(math.Nextafter32(float32(x), float32(math.Inf(1))))
			default:
				raw := []byte{bits[0], bits[1]}
				v := uint16(raw[0]) | uint16(raw[1])<<8
				if x >= 0 {
					v++
				} else {
					v--
				}
				raw[0], raw[1] = byte(v), byte(v>>8)
				next = graph.DecodeFloats(dt, raw)[0]
			}
			half := (next - x) / 2
			switch q % 4 {
			case 0:
				d[q] = half
			case 1:
				d[q] = -half
			case 2:
				d[q] = half * (1 + 0x1p-20)
			case 3:
				d[q] = half * (1 - 0x1p-20)
			}
		}
		u := &update{src: src, dst: src, rows: 1, cols: cols, r: 1, coef: 1, u: []float64{1}, v: d}
		sum := make([]float64, cols)
		for q := range sum {
			sum[q] = w[q] + d[q]
		}
		want := mgMustEncode(t, dt, sum)
		for _, simd := range []bool{false, true} {
			if simd && !useSIMD {
				continue
			}
			saved := useSIMD
			useSIMD = simd
			got := make([]byte, len(want))
			mergeRows(got, src.RawData, u, 0, 1, make([]float64, 2*cols))
			useSIMD = saved
			if !slices.Equal(got, want) {
				t.Errorf("%v (simd %v): ties are not rounded to even", dt, simd)
			}
		}
	}
}

// TestKernelMatchesGraphOnEveryValue runs the kernel (vector and Go) on a
// row holding every 16-bit value, with deltas that land on, just beside and
// far from the rounding points, and checks each result against
// graph.Float16Bits/BFloat16Bits of the exact sum: the fast paths written
// out in fusedRow must agree with the one implementation bit for bit.
func TestKernelMatchesGraphOnEveryValue(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	for _, dt := range []graph.DataType{graph.Float16, graph.BFloat16} {
		decode, encode := graph.Float16Value, graph.Float16Bits
		if dt == graph.BFloat16 {
			decode, encode = graph.BFloat16Value, graph.BFloat16Bits
		}
		const cols = 1 << 16
		src := &onnxpb.TensorProto{Name: proto.String("w"), DataType: proto.Int32(int32(dt)), Dims: []int64{1, cols}, RawData: make([]byte, 2*cols)}
		w := make([]float64, cols)
		for h := range cols {
			src.RawData[2*h], src.RawData[2*h+1] = byte(h), byte(h>>8)
			w[h] = decode(uint16(h))
		}
		families := map[string]func(h int) float64{
			"zero":      func(int) float64 { return 0 },
			"tie up":    func(h int) float64 { return halfStep(decode, h) },
			"tie down":  func(h int) float64 { return -halfStep(decode, h) },
			"above tie": func(h int) float64 { return halfStep(decode, h) * (1 + 0x1p-20) },
			"below tie": func(h int) float64 { return halfStep(decode, h) * (1 - 0x1p-20) },
			"random":    func(h int) float64 { return rng.NormFloat64() * math.Abs(w[h]) * 0x1p-6 },
			"overflow":  func(int) float64 { return rng.NormFloat64() * 7e4 },
			"tiny":      func(int) float64 { return rng.NormFloat64() * 0x1p-20 },
			"huge":      func(int) float64 { return rng.NormFloat64() * 1e38 },
		}
		for name, delta := range families {
			d := make([]float64, cols)
			want := make([]byte, 2*cols)
			var changed, nonFinite int64
			for h := range cols {
				if !math.IsNaN(w[h]) && !math.IsInf(w[h], 0) {
					d[h] = delta(h)
				}
				// The kernel's delta is a sum starting from +0, so a -0
				// delta arrives as +0.
				b := encode(w[h] + (0 + d[h]))
				want[2*h], want[2*h+1] = byte(b), byte(b>>8)
				if b != uint16(h) && (b|uint16(h))&0x7fff != 0 { // ±0 are equal
					changed++
				}
				if b&0x7fff >= 0x7c00 && dt == graph.Float16 || b&0x7fff >= 0x7f80 && dt == graph.BFloat16 {
					nonFinite++
				}
			}
			u := &update{src: src, dst: src, rows: 1, cols: cols, r: 1, coef: 1, u: []float64{1}, v: d}
			for _, simd := range []bool{false, true} {
				if simd && !useSIMD {
					continue
				}
				saved := useSIMD
				useSIMD = simd
				got := make([]byte, 2*cols)
				st := mergeRows(got, src.RawData, u, 0, 1, make([]float64, 2*cols))
				useSIMD = saved
				for h := 0; h < cols; h++ {
					if got[2*h] != want[2*h] || got[2*h+1] != want[2*h+1] {
						t.Fatalf("%v %s (simd %v): %#04x + %v gives %#02x%02x, graph gives %#02x%02x", dt, name, simd, h, d[h], got[2*h+1], got[2*h], want[2*h+1], want[2*h])
					}
				}
				if st.changed != changed || st.nonFinite != nonFinite {
					t.Errorf("%v %s (simd %v): %d changed, %d non-finite; want %d, %d", dt, name, simd, st.changed, st.nonFinite, changed, nonFinite)
				}
			}
		}
	}
}

// halfStep is half the distance from the value of h to the next one away
// from zero (its neighbour towards zero at the top of the range).
func halfStep(decode func(uint16) float64, h int) float64 {
	v, next := decode(uint16(h)), decode(uint16(h+1))
	if h&0x7fff == 0x7fff || math.IsInf(next, 0) || math.IsNaN(next) {
		next = decode(uint16(h - 1))
	}
	return (next - v) / 2
}
