package ortrun

import (
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func TestF16Known(t *testing.T) {
	for _, c := range []struct {
		x    float64
		bits F16
	}{
		{0, 0x0000},
		{math.Copysign(0, -1), 0x8000},
		{1, 0x3c00},
		{-2, 0xc000},
		{0.1, 0x2e66},
		{65504, 0x7bff},
		{65519.99, 0x7bff},
		{65520, 0x7c00}, // halfway to 2^16 rounds to even, which overflows
		{1e9, 0x7c00},
		{math.Inf(-1), 0xfc00},
		{math.Ldexp(1, -14), 0x0400},      // smallest normal
		{math.Ldexp(1, -24), 0x0001},      // smallest subnormal
		{math.Ldexp(1, -25), 0x0000},      // tie to even: 0
		{math.Ldexp(1.5, -25), 0x0001},    // above the tie
		{math.Ldexp(1023.5, -24), 0x0400}, // largest subnormal carries into the normals
		{1 + math.Ldexp(1, -11), 0x3c00},  // tie to even: 1
		{1 + math.Ldexp(3, -11), 0x3c02},  // tie to even: up
	} {
		if got := F16FromFloat64(c.x); got != c.bits {
			t.Errorf("F16FromFloat64(%g) = %#04x, want %#04x", c.x, got, c.bits)
		}
	}
	if n := F16FromFloat64(math.NaN()); n&0x7c00 != 0x7c00 || n&0x3ff == 0 || !math.IsNaN(n.Float64()) {
		t.Errorf("NaN encodes as %#04x", n)
	}
}

func TestBF16Known(t *testing.T) {
	for _, c := range []struct {
		x    float64
		bits BF16
	}{
		{1, 0x3f80},
		{-2, 0xc000},
		{3.140625, 0x4049},
		{math.Inf(1), 0x7f80},
		{math.MaxFloat32, 0x7f80},     // rounds up past the largest bf16
		{math.Ldexp(1, -133), 0x0001}, // smallest subnormal
	} {
		if got := BF16FromFloat64(c.x); got != c.bits {
			t.Errorf("BF16FromFloat64(%g) = %#04x, want %#04x", c.x, got, c.bits)
		}
	}
}

// Every 16-bit pattern decodes and re-encodes to itself (NaNs stay NaN),
// and each midpoint between neighbours rounds to the even one.
func TestSmallFloatExhaustive(t *testing.T) {
	for _, f := range []struct {
		name     string
		enc      func(float64) uint16
		dec      func(uint16) float64
		expShift uint
	}{
		{"f16", func(x float64) uint16 { return uint16(F16FromFloat64(x)) }, func(b uint16) float64 { return F16(b).Float64() }, 10},
		{"bf16", func(x float64) uint16 { return uint16(BF16FromFloat64(x)) }, func(b uint16) float64 { return BF16(b).Float64() }, 7},
	} {
		for b := range 1 << 16 {
			h := uint16(b)
			v := f.dec(h)
			if math.IsNaN(v) {
				if !math.IsNaN(f.dec(f.enc(v))) {
					t.Fatalf("%s %#04x: NaN lost", f.name, h)
				}
				continue
			}
			if got := f.enc(v); got != h {
				t.Fatalf("%s %#04x -> %g -> %#04x", f.name, h, v, got)
			}
			// Midpoint to the next pattern of larger magnitude.
			next := f.dec(h + 1)
			if h&0x7fff == 0x7fff || math.IsNaN(next) || math.IsInf(v, 0) {
				continue
			}
			if math.IsInf(next, 0) {
				continue // midpoint to infinity is covered by the known cases
			}
			mid := (v + next) / 2
			want := h
			if h&1 == 1 {
				want = h + 1
			}
			if got := f.enc(mid); got != want {
				t.Fatalf("%s: midpoint %g of %#04x and %#04x -> %#04x, want %#04x", f.name, mid, h, h+1, got, want)
			}
		}
	}
}

// For float32 inputs, bf16 rounding equals the usual bit trick.
func TestBF16MatchesBitTrick(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 100000 {
		f := math.Float32frombits(r.Uint32())
		if f != f {
			continue
		}
		b := math.Float32bits(f)
		want := BF16((b + 0x7fff + (b>>16)&1) >> 16)
		if got := BF16FromFloat64(float64(f)); got != want {
			t.Fatalf("%g (%#08x): got %#04x, want %#04x", f, b, got, want)
		}
	}
}

func TestDTypeNames(t *testing.T) {
	for d, want := range map[DType]string{Float16: "float16", BFloat16: "bfloat16", Int64: "int64", 17: "float8e4m3fn", 999: "dtype(999)"} {
		if got := d.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", int(d), got, want)
		}
	}
	if Float16.Bits() != 16 || Bool.Bits() != 8 || String.Bits() != 0 || DType(22).Bits() != 4 {
		t.Error("Bits() wrong")
	}
	if !Float16.IsFloat() || Int32.IsFloat() {
		t.Error("IsFloat() wrong")
	}
}

func TestTensorConversions(t *testing.T) {
	vals := []float64{-3, 0, 1, 2, 120}
	for _, d := range []DType{Float32, Float64, Float16, BFloat16, Int8, Uint8, Int16, Uint16, Int32, Uint32, Int64, Uint64} {
		in := vals
		if strings.HasPrefix(d.String(), "uint") {
			in = vals[1:]
		}
		x, err := FromFloat64("x", d, []int64{int64(len(in))}, in)
		if err != nil {
			t.Fatalf("%v: %v", d, err)
		}
		if err := x.Validate(); err != nil || len(x.Data) != len(in)*d.Bits()/8 {
			t.Fatalf("%v: Validate() = %v, %d bytes", d, err, len(x.Data))
		}
		back, err := x.Float64s()
		if err != nil || !slices.Equal(back, in) {
			t.Fatalf("%v: Float64s() = %v, %v", d, back, err)
		}
	}
	b, _ := FromFloat64("b", Bool, []int64{3}, []float64{0, 2, -1})
	if v, _ := Values[bool](b); !slices.Equal(v, []bool{false, true, true}) {
		t.Errorf("bool = %v", v)
	}
	b.Data[1] = 7 // any non-zero byte is true
	if v, _ := b.Float64s(); !slices.Equal(v, []float64{0, 1, 1}) {
		t.Errorf("bool Float64s = %v", v)
	}

	for _, c := range []struct {
		d DType
		v float64
	}{{Int8, 128}, {Uint8, -1}, {Int32, 1.5}, {Int64, math.Ldexp(1, 63)}, {Uint64, math.NaN()}} {
		if _, err := FromFloat64("x", c.d, []int64{1}, []float64{c.v}); err == nil {
			t.Errorf("FromFloat64(%v, %g) succeeded", c.d, c.v)
		}
	}
	if _, err := FromFloat64("x", Float32, []int64{2}, []float64{1}); err == nil {
		t.Error("FromFloat64 with a wrong count succeeded")
	}
	if _, err := FromFloat64("x", String, []int64{1}, []float64{1}); err == nil {
		t.Error("FromFloat64 to string succeeded")
	}

	s, err := NewTensor("s", nil, []F16{F16FromFloat64(2.5)})
	if err != nil || s.DType != Float16 || len(s.Shape) != 0 || len(s.Data) != 2 {
		t.Fatalf("scalar = %+v, %v", s, err)
	}
	if _, err := Values[BF16](s); err == nil {
		t.Error("Values with the wrong type succeeded")
	}
	if _, err := NewTensor("x", []int64{-1}, []int32{}); err == nil {
		t.Error("negative dim accepted")
	}
	z, err := Zeros("q", DType(22), []int64{3}) // int4 packs two per byte
	if err != nil || len(z.Data) != 2 {
		t.Fatalf("int4 zeros = %+v, %v", z, err)
	}
	if _, err := z.Float64s(); err == nil {
		t.Error("int4 Float64s succeeded")
	}
	bad := Tensor{Name: "bad", DType: Float32, Shape: []int64{2}, Data: make([]byte, 7)}
	if err := bad.Validate(); err == nil {
		t.Error("Validate accepted 7 bytes for float32[2]")
	}
}

func TestCompare(t *testing.T) {
	inf, nan := math.Inf(1), math.NaN()
	for _, c := range []struct {
		name           string
		got, want      []float64
		rtol, atol     float64
		maxAbs, maxRel float64
		ok             bool
	}{
		{"equal", []float64{1, 2}, []float64{1, 2}, 0, 0, 0, 0, true},
		{"empty", nil, nil, 0, 0, 0, 0, true},
		{"within rtol", []float64{1.001, 2}, []float64{1, 2}, 1e-2, 0, 0.001, 0.001, true},
		{"beyond", []float64{1.1, 2}, []float64{1, 2}, 1e-2, 1e-2, 0.1, 0.1, false},
		{"atol at zero", []float64{1e-7}, []float64{0}, 0, 1e-6, 1e-7, 0, true},
		{"rtol uses want", []float64{0}, []float64{1}, 1, 0, 1, 1, true},
		{"nan both", []float64{nan, 1}, []float64{nan, 1}, 0, 0, 0, 0, true},
		{"nan got", []float64{nan}, []float64{1}, 1, 1, inf, inf, false},
		{"nan want", []float64{1}, []float64{nan}, 1, 1, inf, inf, false},
		{"inf equal", []float64{inf, -inf}, []float64{inf, -inf}, 0, 0, 0, 0, true},
		{"inf sign", []float64{inf}, []float64{-inf}, 1, 1, inf, inf, false},
		{"inf vs finite", []float64{inf}, []float64{1}, 1, 1, inf, inf, false},
		{"finite vs inf", []float64{1}, []float64{inf}, 1, 1, inf, inf, false},
		{"length", []float64{1}, []float64{1, 2}, 1, 1, inf, inf, false},
	} {
		maxAbs, maxRel, ok := Compare(c.got, c.want, c.rtol, c.atol)
		near := func(a, b float64) bool { return a == b || math.Abs(a-b) < 1e-12 }
		if ok != c.ok || !near(maxAbs, c.maxAbs) || !near(maxRel, c.maxRel) {
			t.Errorf("%s: Compare = %g, %g, %v; want %g, %g, %v", c.name, maxAbs, maxRel, ok, c.maxAbs, c.maxRel, c.ok)
		}
	}

	a, _ := FromFloat64("y", Float16, []int64{2}, []float64{1, 2})
	b, _ := FromFloat64("y", Float32, []int64{2}, []float64{1, 2.001})
	if _, _, ok, err := CompareTensors(a, b, 1e-3, 0); err != nil || !ok {
		t.Errorf("CompareTensors = %v, %v", ok, err)
	}
	b.Shape = []int64{1, 2}
	if _, _, _, err := CompareTensors(a, b, 1, 1); err == nil {
		t.Error("CompareTensors ignored a shape mismatch")
	}
}
