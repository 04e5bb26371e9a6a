package train

import "math"

// GlobalNorm returns the L2 norm of all the params' gradients taken as one
// vector, as torch.nn.utils.clip_grad_norm_ computes it (norm_type 2).
func GlobalNorm(params []*Param) float64 {
	var sum float64
	for _, p := range params {
		var s float64
		for _, g := range p.Grad {
			s += g * g
		}
		sum += s
	}
	return math.Sqrt(sum)
}

// ClipGradNorm scales the gradients so their global norm is at most
// maxNorm, as torch.nn.utils.clip_grad_norm_: coef = maxNorm/(norm+1e-6),
// applied only when coef < 1. It returns the norm before clipping. A
// maxNorm <= 0 only measures.
func ClipGradNorm(params []*Param, maxNorm float64) float64 {
	norm := GlobalNorm(params)
	if maxNorm <= 0 {
		return norm
	}
	coef := maxNorm / (norm + 1e-6)
	if coef < 1 {
		for _, p := range params {
			for i := range p.Grad {
				p.Grad[i] *= coef
			}
		}
	}
	return norm
}
