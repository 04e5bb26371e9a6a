package ortrun

import (
	"fmt"
	"math"
	"slices"
)

// Compare checks got against the reference want element-wise with
// numpy.allclose's rule |got-want| <= atol + rtol*|want|. It returns the
// largest absolute difference, the largest relative difference
// |got-want|/|want| (over elements with want != 0; zeros only show in
// maxAbs), and whether every element passed.
//
// NaN is explicit: a NaN matches only a NaN at the same index (like
// equal_nan=True), and a NaN facing a number fails and counts as +Inf in
// both maxAbs and maxRel. Equal infinities match; any other infinity fails. Slices of
// different lengths fail with +Inf differences.
func Compare(got, want []float64, rtol, atol float64) (maxAbs, maxRel float64, ok bool) {
	if len(got) != len(want) {
		return math.Inf(1), math.Inf(1), false
	}
	ok = true
	for i, g := range got {
		w := want[i]
		gNaN, wNaN := math.IsNaN(g), math.IsNaN(w)
		var diff float64
		switch {
		case gNaN && wNaN:
			continue
		case gNaN || wNaN:
			diff = math.Inf(1)
		case g == w: // also equal infinities, whose difference is NaN
			continue
		default:
			diff = math.Abs(g - w)
		}
		maxAbs = math.Max(maxAbs, diff)
		if math.IsInf(diff, 1) {
			maxRel = diff // keeps Inf/Inf from turning maxRel into NaN
		} else if w != 0 {
			maxRel = math.Max(maxRel, diff/math.Abs(w))
		}
		// !(<=) so that a NaN bound (infinite want) also fails.
		if !(diff <= atol+rtol*math.Abs(w)) || math.IsInf(diff, 1) {
			ok = false
		}
	}
	return maxAbs, maxRel, ok
}

// CompareTensors checks that got and want have the same shape, converts
// both with Float64s and applies Compare. The dtypes may differ, as when an
// fp16 output is checked against an fp32 reference.
func CompareTensors(got, want Tensor, rtol, atol float64) (maxAbs, maxRel float64, ok bool, err error) {
	if !slices.Equal(got.Shape, want.Shape) {
		return 0, 0, false, fmt.Errorf("tensor %q: shape %v, want %v", got.Name, got.Shape, want.Shape)
	}
	g, err := got.Float64s()
	if err != nil {
		return 0, 0, false, err
	}
	w, err := want.Float64s()
	if err != nil {
		return 0, 0, false, err
	}
	maxAbs, maxRel, ok = Compare(g, w, rtol, atol)
	return maxAbs, maxRel, ok, nil
}
