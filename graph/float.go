package graph

import (
	"encoding/binary"
	"math"
)

// Conversions between float64 and the 16-bit float formats, the project's
// only implementation of them. Narrowing goes straight from float64 with one
// round-to-nearest-even, so a value computed in high precision is rounded
// exactly once (float64 -> float32 -> float16 would round twice and can be
// off by one ulp on ties). Each function is a small fast path for normal
// values, small enough to be inlined into a caller's loop (the merge kernel
// relies on that), with the rare cases in a separate function.

// The float64 bit patterns bounding the fast paths: the smallest normal of
// the narrow type and the first power of two past its largest finite value.
const (
	f16Lo  = 0x3f10000000000000 // 2^-14
	f16Hi  = 0x40f0000000000000 // 2^16
	bf16Lo = 0x3810000000000000 // 2^-126
	bf16Hi = 0x47f0000000000000 // 2^128
)

// Float16Bits returns the IEEE 754 binary16 encoding of f, rounded to nearest
// even. Values beyond the largest half overflow to infinity; NaN stays NaN.
func Float16Bits(f float64) uint16 {
	// |f| in [2^-14, 2^16): round the float64 bits to 10 mantissa bits,
	// nearest even; a carry out of the mantissa bumps the exponent, and
	// 2^16 comes out as infinity, as it should.
	b := math.Float64bits(f)
	if ax := b &^ (1 << 63); ax-f16Lo < f16Hi-f16Lo {
		ax += 1<<41 - 1 + (ax>>42)&1
		return uint16(b>>48)&0x8000 | uint16(ax>>42-(1023-15)<<10)
	}
	return narrowBitsSlow(b, 10, 15)
}

// BFloat16Bits returns the bfloat16 encoding of f (the top 16 bits of a
// float32), rounded to nearest even from the float64 value.
func BFloat16Bits(f float64) uint16 {
	// |f| in [2^-126, 2^128), as in Float16Bits.
	b := math.Float64bits(f)
	if ax := b &^ (1 << 63); ax-bf16Lo < bf16Hi-bf16Lo {
		ax += 1<<44 - 1 + (ax>>45)&1
		return uint16(b>>48)&0x8000 | uint16(ax>>45-(1023-127)<<7)
	}
	return narrowBitsSlow(b, 7, 127)
}

// narrowBitsSlow is the rest of Float16Bits and BFloat16Bits: zeros,
// subnormals, overflow, Inf and NaN (which becomes the quiet NaN with only
// the top mantissa bit set), for a format with mbits mantissa bits and
// exponent bias bias.
func narrowBitsSlow(b uint64, mbits uint, bias int) uint16 {
	sign := uint16(b>>48) & 0x8000
	exp := int(b>>52) & 0x7ff
	mant := b & (1<<52 - 1)
	inf := uint16(2*bias+1) << mbits
	switch {
	case exp == 0x7ff && mant != 0:
		return sign | inf | 1<<(mbits-1)
	case exp == 0x7ff:
		return sign | inf
	case exp == 0: // float64 subnormals are far below either format's range
		return sign
	}
	return sign | roundNarrow(exp-1023, mant|1<<52, mbits, bias)
}

// roundNarrow rounds the magnitude full·2^(e-52) (full has its leading bit
// at 2^52) to nearest even in a format with mbits mantissa bits and
// exponent bias bias, and returns the format's bits without the sign:
// normal, subnormal, zero or infinity.
func roundNarrow(e int, full uint64, mbits uint, bias int) uint16 {
	one := uint64(1) << mbits // the implicit bit
	inf := uint16(2*bias+1) << mbits
	var shift uint // how many low bits of full are rounded away
	if e >= 1-bias {
		shift = 52 - mbits // a normal, unless rounding overflows
	} else {
		// A subnormal: q·2^(1-bias-mbits) with q = full·2^(e-52+bias-1+mbits).
		s := 52 - mbits + uint(1-bias-e)
		if s > 60 {
			return 0 // below half the smallest subnormal
		}
		shift = s
	}
	q := full >> shift
	rem := full & (1<<shift - 1)
	half := uint64(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	if e < 1-bias {
		return uint16(q) // q = one is the smallest normal, encoded alike
	}
	if q == 2*one {
		q = one
		e++
	}
	if e > bias {
		return inf
	}
	return uint16(e+bias)<<mbits | uint16(q-one)
}

// Float16Value decodes an IEEE 754 binary16 value exactly. Every NaN decodes
// to math.NaN().
func Float16Value(h uint16) float64 {
	// A normal half widens to float32 by re-biasing the exponent.
	if e := h & 0x7c00; e != 0 && e != 0x7c00 {
		return float64(math.Float32frombits(uint32(h&0x8000)<<16 | (uint32(h&0x7fff)+(127-15)<<10)<<13))
	}
	return float16ValueSlow(h)
}

// float16ValueSlow decodes zeros, subnormals, infinities and NaN.
func float16ValueSlow(h uint16) float64 {
	mant := h & 0x3ff
	var v float64
	switch {
	case h&0x7c00 == 0:
		v = float64(mant) * 0x1p-24
	case mant != 0:
		return math.NaN()
	default:
		v = math.Inf(1)
	}
	if h&0x8000 != 0 {
		v = -v
	}
	return v
}

// BFloat16Value decodes a bfloat16 value exactly.
func BFloat16Value(b uint16) float64 {
	return float64(math.Float32frombits(uint32(b) << 16))
}

// DecodeFloatsInto decodes len(out) little-endian elements of the float type
// dt from raw into out; raw must hold at least that many. It does nothing
// for other types.
func DecodeFloatsInto(dt DataType, out []float64, raw []byte) {
	switch dt {
	case Float:
		raw = raw[:4*len(out)]
		for q := range out {
			out[q] = float64(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*q:])))
		}
	case Float16:
		raw = raw[:2*len(out)]
		for q := range out {
			out[q] = Float16Value(binary.LittleEndian.Uint16(raw[2*q:]))
		}
	case BFloat16:
		raw = raw[:2*len(out)]
		for q := range out {
			out[q] = BFloat16Value(binary.LittleEndian.Uint16(raw[2*q:]))
		}
	case Double:
		raw = raw[:8*len(out)]
		for q := range out {
			out[q] = math.Float64frombits(binary.LittleEndian.Uint64(raw[8*q:]))
		}
	}
}

// EncodeFloatsInto encodes vals as little-endian elements of the float type
// dt into raw, each rounded once to nearest even; raw must have room for
// them. It does nothing for other types.
func EncodeFloatsInto(dt DataType, raw []byte, vals []float64) {
	switch dt {
	case Float:
		raw = raw[:4*len(vals)]
		for q, v := range vals {
			binary.LittleEndian.PutUint32(raw[4*q:], math.Float32bits(float32(v)))
		}
	case Float16:
		raw = raw[:2*len(vals)]
		for q, v := range vals {
			binary.LittleEndian.PutUint16(raw[2*q:], Float16Bits(v))
		}
	case BFloat16:
		raw = raw[:2*len(vals)]
		for q, v := range vals {
			binary.LittleEndian.PutUint16(raw[2*q:], BFloat16Bits(v))
		}
	case Double:
		raw = raw[:8*len(vals)]
		for q, v := range vals {
			binary.LittleEndian.PutUint64(raw[8*q:], math.Float64bits(v))
		}
	}
}
