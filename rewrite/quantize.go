package rewrite

import (
	"math"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// quantizeNBits quantizes w [in=K, out=N] in MatMulNBits' layout: blocks of
// block along K per output row, min/max with zero points, else symmetric
// around 2^(bits-1). deq receives the dequantized values, [K, N].
func quantizeNBits(w []float64, k, n, bits, block int, withZP bool, deq []float64) (codes []byte, scales []float64, zps []byte) {
	kb := (k + block - 1) / block
	blob := block * bits / 8
	zbytes := (kb*bits + 7) / 8
	codes = make([]byte, n*kb*blob)
	scales = make([]float64, n*kb)
	if withZP {
		zps = make([]byte, n*zbytes)
	}
	qmax := float64(int(1)<<bits - 1)
	half := 1 << (bits - 1)
	for r := 0; r < n; r++ {
		for b := 0; b < kb; b++ {
			lo, hi, amax := 0.0, 0.0, 0.0
			for c := b * block; c < min(k, (b+1)*block); c++ {
				v := w[c*n+r]
				lo, hi, amax = math.Min(lo, v), math.Max(hi, v), math.Max(amax, math.Abs(v))
			}
			var s float64
			zp := half
			if withZP {
				s = float64(float32((hi - lo) / qmax))
				if s > 0 {
					zp = int(math.Max(0, math.Min(qmax, math.Round(-lo/s))))
				} else {
					zp = 0
				}
				putCode(zps[r*zbytes:], b, bits, zp)
			} else {
				s = float64(float32(amax / float64(half-1)))
			}
			scales[r*kb+b] = s
			for c := b * block; c < (b+1)*block; c++ {
				code := zp
				if c < k && s > 0 {
					code = int(math.Max(0, math.Min(qmax, math.Round(w[c*n+r]/s)+float64(zp))))
				}
				putCode(codes[(r*kb+b)*blob:], c-b*block, bits, code)
				if c < k {
					deq[c*n+r] = float64(code-zp) * s
				}
			}
		}
	}
	return codes, scales, zps
}

func putCode(b []byte, i, bits, code int) {
	per := 8 / bits
	b[i/per] |= byte(code << ((i % per) * bits))
}

// quantizeQDQ quantizes w [in, out] into a DequantizeLinear weight stored
// [in, out] (or [out, in] when transB), per tensor (axis -1) or per axis
// of the stored layout, int8 symmetric or min/max with a zero point.
func quantizeQDQ(w []float64, in, out int, transB bool, axis int, signed, symmetric, noZP bool, deq []float64) (codes []byte, scales []float64, zps []byte) {
	rows, cols := in, out
	if transB {
		rows, cols = out, in
	}
	at := func(i, j int) int { // stored (i, j) -> index in w
		if transB {
			return j*out + i
		}
		return i*out + j
	}
	groups, groupOf := 1, func(i, j int) int { return 0 }
	switch axis {
	case 0:
		groups, groupOf = rows, func(i, j int) int { return i }
	case 1:
		groups, groupOf = cols, func(i, j int) int { return j }
	}
	lo, hi, amax := make([]float64, groups), make([]float64, groups), make([]float64, groups)
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			gi, v := groupOf(i, j), w[at(i, j)]
			lo[gi], hi[gi], amax[gi] = math.Min(lo[gi], v), math.Max(hi[gi], v), math.Max(amax[gi], math.Abs(v))
		}
	}
	qmin, qmax := 0.0, 255.0
	if signed {
		qmin, qmax = -128, 127
	}
	scales = make([]float64, groups)
	zp := make([]int, groups)
	zps = make([]byte, groups)
	for gi := range scales {
		switch {
		case symmetric:
			scales[gi] = float64(float32(amax[gi] / 127))
		case noZP:
			scales[gi] = float64(float32(hi[gi] / qmax))
		default:
			scales[gi] = float64(float32((hi[gi] - lo[gi]) / (qmax - qmin)))
			if scales[gi] > 0 {
				zp[gi] = int(math.Max(qmin, math.Min(qmax, math.Round(qmin-lo[gi]/scales[gi]))))
			}
		}
		zps[gi] = byte(int8(zp[gi]))
		if !signed {
			zps[gi] = byte(zp[gi])
		}
	}
	codes = make([]byte, rows*cols)
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			gi, idx := groupOf(i, j), at(i, j)
			c := zp[gi]
			if scales[gi] > 0 {
				c = int(math.Max(qmin, math.Min(qmax, math.Round(w[idx]/scales[gi])+float64(zp[gi]))))
			}
			if signed {
				codes[i*cols+j] = byte(int8(c))
			} else {
				codes[i*cols+j] = byte(c)
			}
			deq[idx] = float64(c-zp[gi]) * scales[gi]
		}
	}
	return codes, scales, zps
}

func allZero(m *graph.Model, t *onnxpb.TensorProto) bool {
	raw, err := m.RawData(t)
	if err != nil {
		return false
	}
	for _, b := range raw {
		if b != 0 {
			return false
		}
	}
	return true
}
