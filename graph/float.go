package graph

import "math"

// Conversions between float64 and the 16-bit float formats. Narrowing goes
// straight from float64 with one round-to-nearest-even, so a value computed in
// high precision is rounded exactly once (float64 -> float32 -> float16 would
// round twice and can be off by one ulp on ties).

// Float16Bits returns the IEEE 754 binary16 encoding of f, rounded to nearest
// even. Values beyond the largest half overflow to infinity; NaN stays NaN.
func Float16Bits(f float64) uint16 {
	sign := uint16(math.Float64bits(f)>>48) & 0x8000
	a := math.Abs(f)
	switch {
	case math.IsNaN(f):
		return sign | 0x7e00
	case a >= 65520: // halfway between 65504 (max) and 2^16 rounds to even, i.e. up
		return sign | 0x7c00
	case a < 0x1p-14: // subnormal: value = m * 2^-24
		return sign | uint16(math.RoundToEven(a*0x1p24))
	}
	frac, exp := math.Frexp(a) // a = frac * 2^exp, frac in [0.5, 1)
	e := exp - 1
	m := math.RoundToEven(frac * 0x1p11) // 11 significant bits, in [1024, 2048]
	if m == 2048 {
		m = 1024
		e++
	}
	if e > 15 {
		return sign | 0x7c00
	}
	return sign | uint16(e+15)<<10 | uint16(m-1024)
}

// Float16Value decodes an IEEE 754 binary16 value exactly.
func Float16Value(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	exp := int(h>>10) & 0x1f
	mant := float64(h & 0x3ff)
	switch exp {
	case 0:
		return sign * math.Ldexp(mant, -24)
	case 0x1f:
		if mant != 0 {
			return math.NaN()
		}
		return math.Inf(int(sign))
	}
	return sign * math.Ldexp(1024+mant, exp-25)
}

// BFloat16Bits returns the bfloat16 encoding of f (the top 16 bits of a
// float32), rounded to nearest even from the float64 value.
func BFloat16Bits(f float64) uint16 {
	sign := uint16(math.Float64bits(f)>>48) & 0x8000
	a := math.Abs(f)
	switch {
	case math.IsNaN(f):
		return sign | 0x7fc0
	case math.IsInf(f, 0):
		return sign | 0x7f80
	case a < 0x1p-126: // subnormal: value = m * 2^-133
		return sign | uint16(math.RoundToEven(a*0x1p133))
	}
	frac, exp := math.Frexp(a)
	e := exp - 1
	m := math.RoundToEven(frac * 0x1p8) // 8 significant bits, in [128, 256]
	if m == 256 {
		m = 128
		e++
	}
	if e > 127 {
		return sign | 0x7f80
	}
	return sign | uint16(e+127)<<7 | uint16(m-128)
}

// BFloat16Value decodes a bfloat16 value exactly.
func BFloat16Value(b uint16) float64 {
	return float64(math.Float32frombits(uint32(b) << 16))
}
