package train

import (
	"fmt"
	"math"
)

// Schedule is a learning-rate multiplier λ(k) for optimizer step k, counted
// from 0: the update of step k uses lr·λ(k).
type Schedule func(k int64) float64

// NewSchedule returns transformers' get_constant_schedule_with_warmup,
// get_linear_schedule_with_warmup or get_cosine_schedule_with_warmup
// (num_cycles 0.5) λ for the given warmup and total optimizer steps.
func NewSchedule(kind string, warmup, total int64) (Schedule, error) {
	if warmup < 0 || total < 0 {
		return nil, fmt.Errorf("warmup (%d) and total steps (%d) must not be negative", warmup, total)
	}
	w := float64(warmup)
	n := float64(total)
	ramp := func(k float64) float64 { return k / math.Max(1, w) }
	switch kind {
	case "constant":
		return func(k int64) float64 {
			if k < warmup {
				return ramp(float64(k))
			}
			return 1
		}, nil
	case "linear":
		return func(k int64) float64 {
			if k < warmup {
				return ramp(float64(k))
			}
			return math.Max(0, (n-float64(k))/math.Max(1, n-w))
		}, nil
	case "cosine":
		return func(k int64) float64 {
			if k < warmup {
				return ramp(float64(k))
			}
			progress := (float64(k) - w) / math.Max(1, n-w)
			return math.Max(0, 0.5*(1+math.Cos(math.Pi*0.5*2*progress)))
		}, nil
	}
	return nil, fmt.Errorf("unknown learning-rate scheduler %q: want constant, linear or cosine", kind)
}
