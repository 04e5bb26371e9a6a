package graph

import (
	"math"
	"math/rand"
	rand2 "math/rand/v2"
	"slices"
	"testing"

	"github.com/x448/float16"
)

func isHalfNaN(h uint16) bool { return h&0x7c00 == 0x7c00 && h&0x03ff != 0 }
func isBF16NaN(b uint16) bool { return b&0x7f80 == 0x7f80 && b&0x007f != 0 }

// bf16FromFloat32 is an independent reference: the top 16 bits of a float32
// rounded to nearest even, the way PyTorch and ONNX Runtime narrow to
// bfloat16.
func bf16FromFloat32(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 { // NaN
		return uint16(u>>16) | 0x40
	}
	return uint16((u + 0x7fff + (u>>16)&1) >> 16)
}

func TestFloat16AllValues(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		v := Float16Value(h)
		// x448/float16 decodes independently; float32 holds every half exactly.
		if want := float16.Frombits(h).Float32(); !(float32(v) == want || (math.IsNaN(v) && want != want)) {
			t.Fatalf("Float16Value(%#04x) = %v, x448 says %v", h, v, want)
		}
		if want := refFloat16Value(h); !(v == want || (math.IsNaN(v) && math.IsNaN(want))) {
			t.Fatalf("Float16Value(%#04x) = %v, the formula gives %v", h, v, want)
		}
		if math.Signbit(v) != (h&0x8000 != 0) && !math.IsNaN(v) {
			t.Fatalf("Float16Value(%#04x) = %v has the wrong sign", h, v)
		}
		got := Float16Bits(v)
		if isHalfNaN(h) {
			if !isHalfNaN(got) {
				t.Fatalf("Float16Bits(NaN from %#04x) = %#04x, not a NaN", h, got)
			}
			continue
		}
		if got != h {
			t.Fatalf("Float16Bits(Float16Value(%#04x) = %v) = %#04x", h, v, got)
		}
	}
}

func TestFloat16Ties(t *testing.T) {
	// Between consecutive finite halves of the same sign, the exact midpoint
	// (representable in float64: it needs 12 significant bits) rounds to the
	// one with an even mantissa, and anything off the midpoint rounds to the
	// nearer one.
	for h := uint16(0); h < 0x7bff; h++ {
		for _, sign := range []uint16{0, 0x8000} {
			lo, hi := h|sign, (h+1)|sign
			a, b := Float16Value(lo), Float16Value(hi)
			mid := (a + b) / 2
			if mid == a || mid == b {
				t.Fatalf("midpoint of %#04x and %#04x is not between them", lo, hi)
			}
			even := lo
			if lo&1 != 0 {
				even = hi
			}
			if got := Float16Bits(mid); got != even {
				t.Fatalf("tie %v between %#04x and %#04x rounded to %#04x, want %#04x", mid, lo, hi, got, even)
			}
			if got := Float16Bits(math.Nextafter(mid, a)); got != lo {
				t.Fatalf("just below the tie between %#04x and %#04x: got %#04x", lo, hi, got)
			}
			if got := Float16Bits(math.Nextafter(mid, b)); got != hi {
				t.Fatalf("just above the tie between %#04x and %#04x: got %#04x", lo, hi, got)
			}
		}
	}
}

func TestFloat16Special(t *testing.T) {
	tests := []struct {
		in   float64
		want uint16
	}{
		{0, 0x0000},
		{math.Copysign(0, -1), 0x8000},
		{1, 0x3c00},
		{-2, 0xc000},
		{65504, 0x7bff}, // largest half
		{math.Nextafter(65520, 0), 0x7bff},
		{65520, 0x7c00}, // tie between 65504 and 2^16 rounds to even: infinity
		{-65520, 0xfc00},
		{70000, 0x7c00},
		{1e300, 0x7c00},
		{math.Inf(1), 0x7c00},
		{math.Inf(-1), 0xfc00},
		{0x1p-14, 0x0400},   // smallest normal
		{0x3ffp-24, 0x03ff}, // largest subnormal
		{0x1p-24, 0x0001},   // smallest subnormal
		{0x1p-25, 0x0000},   // tie between 0 and 2^-24: even is 0
		{-0x1p-25, 0x8000},  // and keeps its sign
		{math.Nextafter(0x1p-25, 1), 0x0001},
		{0x3p-25, 0x0002},   // tie between 1 and 2 ulps: 2
		{0x5p-25, 0x0002},   // tie between 2 and 3 ulps: 2
		{0x7ffp-25, 0x0400}, // tie between largest subnormal and smallest normal
		{1e-30, 0x0000},
		{math.SmallestNonzeroFloat64, 0x0000},
		// One rounding from float64: 1 + 2^-11 + 2^-40 is above the tie
		// between 1 and 1+2^-10, so it rounds up, where going through
		// float32 (which makes it exactly the tie) would give 1.
		{1 + 0x1p-11 + 0x1p-40, 0x3c01},
		{1 + 0x1p-11, 0x3c00},
		{1 + 0x3p-11, 0x3c02},
	}
	for _, tc := range tests {
		if got := Float16Bits(tc.in); got != tc.want {
			t.Errorf("Float16Bits(%v) = %#04x, want %#04x", tc.in, got, tc.want)
		}
	}
	for _, nan := range []float64{math.NaN(), -math.NaN(), math.Float64frombits(0x7ff0000000000001)} {
		if got := Float16Bits(nan); !isHalfNaN(got) {
			t.Errorf("Float16Bits(NaN %#x) = %#04x, not a NaN", math.Float64bits(nan), got)
		}
	}
	if v := Float16Value(0x7c00); !math.IsInf(v, 1) {
		t.Errorf("Float16Value(0x7c00) = %v", v)
	}
	if v := Float16Value(0xfc00); !math.IsInf(v, -1) {
		t.Errorf("Float16Value(0xfc00) = %v", v)
	}
	if v := Float16Value(0x7e00); !math.IsNaN(v) {
		t.Errorf("Float16Value(0x7e00) = %v", v)
	}
	if v := Float16Value(0x0001); v != 0x1p-24 {
		t.Errorf("Float16Value(1) = %v", v)
	}
}

// float32Samples calls fn with n random float32 values: half are uniform
// over all bit patterns, half have exponents near the 16-bit formats' range
// (where rounding happens), plus the values around every half midpoint.
func float32Samples(n int, fn func(float32)) {
	r := rand.New(rand.NewSource(42))
	for i := 0; i < n; i++ {
		u := r.Uint32()
		if i%2 == 1 {
			// exponent in [127-30, 127+17]: subnormal halves to overflow
			exp := uint32(97 + r.Intn(48))
			u = u&0x807fffff | exp<<23
		}
		fn(math.Float32frombits(u))
	}
}

func TestFloat16MatchesX448(t *testing.T) {
	n := 4_000_000
	if testing.Short() {
		n = 200_000
	}
	check := func(f float32) {
		want := float16.Fromfloat32(f).Bits()
		got := Float16Bits(float64(f))
		if got != want && !(isHalfNaN(got) && isHalfNaN(want)) {
			t.Fatalf("Float16Bits(%v [%#08x]) = %#04x, x448 Fromfloat32 = %#04x", f, math.Float32bits(f), got, want)
		}
	}
	float32Samples(n, check)
	// Every float32 within 4 ulps of every midpoint between halves.
	for h := uint16(0); h < 0x7c00; h++ {
		for _, sign := range []uint16{0, 0x8000} {
			mid := float32((Float16Value(h|sign) + Float16Value((h+1)|sign)) / 2)
			lo, hi := mid, mid
			for k := 0; k < 4; k++ {
				lo = math.Nextafter32(lo, float32(math.Inf(-1)))
				hi = math.Nextafter32(hi, float32(math.Inf(1)))
				check(lo)
				check(hi)
			}
			check(mid)
		}
	}
}

func TestBFloat16AllValues(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		b := uint16(i)
		v := BFloat16Value(b)
		if want := math.Float32frombits(uint32(b) << 16); !(float32(v) == want || (math.IsNaN(v) && want != want)) {
			t.Fatalf("BFloat16Value(%#04x) = %v, want %v", b, v, want)
		}
		if want := refBFloat16Value(b); !(v == want || (math.IsNaN(v) && math.IsNaN(want))) {
			t.Fatalf("BFloat16Value(%#04x) = %v, the formula gives %v", b, v, want)
		}
		got := BFloat16Bits(v)
		if isBF16NaN(b) {
			if !isBF16NaN(got) {
				t.Fatalf("BFloat16Bits(NaN from %#04x) = %#04x, not a NaN", b, got)
			}
			continue
		}
		if got != b {
			t.Fatalf("BFloat16Bits(BFloat16Value(%#04x) = %v) = %#04x", b, v, got)
		}
	}
}

func TestBFloat16Ties(t *testing.T) {
	for b := uint16(0); b < 0x7f7f; b++ {
		for _, sign := range []uint16{0, 0x8000} {
			lo, hi := b|sign, (b+1)|sign
			x, y := BFloat16Value(lo), BFloat16Value(hi)
			mid := (x + y) / 2
			even := lo
			if lo&1 != 0 {
				even = hi
			}
			if got := BFloat16Bits(mid); got != even {
				t.Fatalf("tie %v between %#04x and %#04x rounded to %#04x, want %#04x", mid, lo, hi, got, even)
			}
			if got := BFloat16Bits(math.Nextafter(mid, x)); got != lo {
				t.Fatalf("just below the tie between %#04x and %#04x: got %#04x", lo, hi, got)
			}
			if got := BFloat16Bits(math.Nextafter(mid, y)); got != hi {
				t.Fatalf("just above the tie between %#04x and %#04x: got %#04x", lo, hi, got)
			}
		}
	}
}

func TestBFloat16Special(t *testing.T) {
	maxBF := BFloat16Value(0x7f7f) // (2 - 2^-7) * 2^127
	tests := []struct {
		in   float64
		want uint16
	}{
		{0, 0x0000},
		{math.Copysign(0, -1), 0x8000},
		{1, 0x3f80},
		{-1, 0xbf80},
		{maxBF, 0x7f7f},
		{maxBF + 0x1p119, 0x7f80}, // tie above the largest: even is infinity
		{math.Nextafter(maxBF+0x1p119, 0), 0x7f7f},
		{math.MaxFloat32, 0x7f80},
		{1e300, 0x7f80},
		{-1e300, 0xff80},
		{math.Inf(1), 0x7f80},
		{math.Inf(-1), 0xff80},
		{0x1p-126, 0x0080},  // smallest normal
		{0x1p-133, 0x0001},  // smallest subnormal
		{0x1p-134, 0x0000},  // tie: even is 0
		{0x3p-134, 0x0002},  // tie between 1 and 2: 2
		{0xffp-134, 0x0080}, // tie between largest subnormal and smallest normal
		{-0x1p-140, 0x8000},
		// One rounding from float64 (see TestFloat16Special).
		{1 + 0x1p-8 + 0x1p-40, 0x3f81},
		{1 + 0x1p-8, 0x3f80},
	}
	for _, tc := range tests {
		if got := BFloat16Bits(tc.in); got != tc.want {
			t.Errorf("BFloat16Bits(%v) = %#04x, want %#04x", tc.in, got, tc.want)
		}
	}
	if got := BFloat16Bits(math.NaN()); !isBF16NaN(got) {
		t.Errorf("BFloat16Bits(NaN) = %#04x", got)
	}
}

func TestBFloat16MatchesFloat32RNE(t *testing.T) {
	n := 4_000_000
	if testing.Short() {
		n = 200_000
	}
	float32Samples(n, func(f float32) {
		want := bf16FromFloat32(f)
		got := BFloat16Bits(float64(f))
		if got != want && !(isBF16NaN(got) && isBF16NaN(want)) {
			t.Fatalf("BFloat16Bits(%v [%#08x]) = %#04x, float32 RNE gives %#04x", f, math.Float32bits(f), got, want)
		}
	})
	// Every float32 subnormal and the float32s around bfloat16's subnormal
	// range go through the separate subnormal path.
	for u := uint32(0); u < 0x00800000; u += 97 {
		f := math.Float32frombits(u)
		if got, want := BFloat16Bits(float64(f)), bf16FromFloat32(f); got != want {
			t.Fatalf("BFloat16Bits(%v [%#08x]) = %#04x, want %#04x", f, u, got, want)
		}
	}
}

// The references below are written from the formats' definitions with
// math.Frexp and math.Ldexp (sign · significand · 2^exponent, rounding the
// significand with math.RoundToEven), independently of the bit manipulation
// in float.go.

func refFloat16Value(h uint16) float64 {
	return refNarrowValue(uint64(h), 10, 15)
}

func refBFloat16Value(b uint16) float64 {
	return refNarrowValue(uint64(b), 7, 127)
}

func refNarrowValue(x uint64, mbits, bias int) float64 {
	sign := 1.0
	if x>>(15) != 0 {
		sign = -1
	}
	exp := int(x>>mbits) & (1<<(15-mbits) - 1)
	mant := float64(x & (1<<mbits - 1))
	switch exp {
	case 0:
		return sign * math.Ldexp(mant, 1-bias-mbits)
	case 1<<(15-mbits) - 1:
		if mant != 0 {
			return math.NaN()
		}
		return math.Inf(int(sign))
	}
	return sign * math.Ldexp(float64(uint64(1)<<mbits)+mant, exp-bias-mbits)
}

func refFloat16Bits(f float64) uint16 { return refNarrowBits(f, 10, 15, 0x7e00) }

func refBFloat16Bits(f float64) uint16 { return refNarrowBits(f, 7, 127, 0x7fc0) }

func refNarrowBits(f float64, mbits, bias int, nan uint16) uint16 {
	sign := uint16(math.Float64bits(f)>>48) & 0x8000
	inf := uint16(2*bias+1) << mbits
	a := math.Abs(f)
	one := math.Ldexp(1, mbits)
	switch {
	case math.IsNaN(f):
		return sign | nan
	case math.IsInf(f, 0):
		return sign | inf
	case a < math.Ldexp(1, 1-bias): // subnormal: m · 2^(1-bias-mbits)
		return sign | uint16(math.RoundToEven(math.Ldexp(a, bias-1+mbits)))
	}
	frac, exp := math.Frexp(a) // a = frac · 2^exp, frac in [0.5, 1)
	e := exp - 1
	m := math.RoundToEven(frac * 2 * one) // mbits+1 significant bits
	if m == 2*one {
		m = one
		e++
	}
	if e > bias {
		return sign | inf
	}
	return sign | uint16(e+bias)<<mbits | uint16(m-one)
}

// TestNarrowingMatchesReference checks Float16Bits and BFloat16Bits against
// the references on every 16-bit value, the ties halfway between
// neighbours and the doubles just beside them, hand-picked edge cases and
// millions of random doubles over the whole float64 range.
func TestNarrowingMatchesReference(t *testing.T) {
	check := func(f float64) {
		if got, want := Float16Bits(f), refFloat16Bits(f); got != want {
			t.Fatalf("Float16Bits(%v = %#x) = %#04x, the reference gives %#04x", f, math.Float64bits(f), got, want)
		}
		if got, want := BFloat16Bits(f), refBFloat16Bits(f); got != want {
			t.Fatalf("BFloat16Bits(%v = %#x) = %#04x, the reference gives %#04x", f, math.Float64bits(f), got, want)
		}
	}
	for _, f := range []float64{0, 1, 65504, 65519.99, 65520, 65536, 1e300, math.Inf(1), math.NaN(),
		0x1p-14, 0x1p-24, 0x1p-25, 0x1.8p-25, 0x1p-26, 5e-324, 0x1p-126, 0x1p-133, 0x1p-134, 0x1.8p-134,
		0x1p-1022, math.MaxFloat64, math.MaxFloat32, 3.40282357e38, 3.4028236e38} {
		check(f)
		check(-f)
	}
	for h := 0; h < 1<<16; h++ {
		for _, dec := range []func(uint16) float64{refFloat16Value, refBFloat16Value} {
			v := dec(uint16(h))
			if math.IsNaN(v) || math.IsInf(v, 0) {
				continue
			}
			check(v)
			if next := dec(uint16(h + 1)); !math.IsNaN(next) && h&0x7fff != 0x7fff {
				mid := (v + next) / 2
				check(mid)
				check(math.Nextafter(mid, math.Inf(1)))
				check(math.Nextafter(mid, math.Inf(-1)))
			}
		}
	}
	n := 2_000_000
	if testing.Short() {
		n = 200_000
	}
	rng := rand2.New(rand2.NewPCG(1, 2))
	for i := 0; i < n; i++ {
		f := math.Ldexp(rng.Float64()+0.5, rng.IntN(320)-170)
		if rng.IntN(2) == 0 {
			f = -f
		}
		check(f)
		check(math.Float64frombits(rng.Uint64()))
	}
}

func TestFloatsIntoMatchesElementwise(t *testing.T) {
	rng := rand2.New(rand2.NewPCG(5, 6))
	vals := make([]float64, 1000)
	for i := range vals {
		vals[i] = math.Ldexp(rng.NormFloat64(), rng.IntN(60)-30)
	}
	vals = append(vals, 0, math.Copysign(0, -1), math.Inf(1), math.Inf(-1), 1e-30, 1e30)
	for _, dt := range []DataType{Float, Float16, BFloat16, Double} {
		w := dt.BitSize() / 8
		raw := make([]byte, w*len(vals))
		EncodeFloatsInto(dt, raw, vals)
		back := make([]float64, len(vals))
		DecodeFloatsInto(dt, back, raw)
		for i, v := range vals {
			var want float64
			switch dt {
			case Float:
				want = float64(float32(v))
			case Float16:
				want = refFloat16Value(refFloat16Bits(v))
			case BFloat16:
				want = refBFloat16Value(refBFloat16Bits(v))
			case Double:
				want = v
			}
			if back[i] != want || math.Signbit(back[i]) != math.Signbit(want) {
				t.Fatalf("%v: element %d: %v encodes and decodes to %v, want %v", dt, i, v, back[i], want)
			}
		}
		if enc, _ := EncodeFloats(dt, vals); !slices.Equal(enc, raw) {
			t.Fatalf("%v: EncodeFloats differs from EncodeFloatsInto", dt)
		}
	}
}

// The benchmarks compare this package's conversions with x448/float16's
// (which converts from and to float32 only), on the same float32 inputs.

var benchSink uint16
var benchSinkF float32

func benchInputs() []float32 {
	in := make([]float32, 4096)
	r := rand.New(rand.NewSource(1))
	for i := range in {
		in[i] = float32(r.NormFloat64() * 0.02)
	}
	return in
}

func BenchmarkFloat16Bits(b *testing.B) {
	in := benchInputs()
	b.Run("graph", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			benchSink += Float16Bits(float64(in[i&4095]))
		}
	})
	b.Run("x448", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			benchSink += float16.Fromfloat32(in[i&4095]).Bits()
		}
	})
}

func BenchmarkFloat16Value(b *testing.B) {
	hs := make([]uint16, 4096)
	for i, f := range benchInputs() {
		hs[i] = Float16Bits(float64(f))
	}
	b.Run("graph", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			benchSinkF += float32(Float16Value(hs[i&4095]))
		}
	})
	b.Run("x448", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			benchSinkF += float16.Frombits(hs[i&4095]).Float32()
		}
	})
}
