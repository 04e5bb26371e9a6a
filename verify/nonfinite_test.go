package verify

import (
	"math"
	"testing"

	"github.com/onnxlora/onnxlora/ortrun"
)

// TestNonFiniteMismatchNamed: an output NaN or infinite on one side only
// is reported as such, not as "max abs inf".
func TestNonFiniteMismatchNamed(t *testing.T) {
	mk := func(v ...float64) ortrun.Tensor {
		x, err := ortrun.FromFloat64("y", ortrun.Float32, []int64{int64(len(v))}, v)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	nan, inf := math.NaN(), math.Inf(1)
	o := &OutputReport{Name: "y", RTol: 1e-3, ATol: 1e-4, Pass: true}
	compareOutput(o, mk(1, 2, 3, 4), mk(nan, 2, inf, nan), 0, func(string, ...any) {})
	want := "NaN in B where A is finite (2 values), +Inf in B where A is finite (1 value)"
	if o.Pass || o.Problem != want {
		t.Errorf("problem %q (pass %v), want %q", o.Problem, o.Pass, want)
	}
	o = &OutputReport{Name: "y", RTol: 1e-3, ATol: 1e-4, Pass: true}
	compareOutput(o, mk(nan, 1), mk(0, 1), 0, func(string, ...any) {})
	if o.Problem != "finite in B where A is NaN (1 value)" {
		t.Errorf("problem %q", o.Problem)
	}
	// A plain difference keeps its numbers and no problem.
	o = &OutputReport{Name: "y", RTol: 1e-3, ATol: 1e-4, Pass: true}
	compareOutput(o, mk(1, 2), mk(1, 3), 0, func(string, ...any) {})
	if o.Problem != "" || o.MaxAbs != 1 {
		t.Errorf("finite difference: problem %q, max abs %v", o.Problem, o.MaxAbs)
	}
}
