package graph

import (
	"math"
	"math/rand"
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
