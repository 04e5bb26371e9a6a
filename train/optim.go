package train

import (
	"fmt"
	"math"

	"github.com/onnxlora/onnxlora/ortrun"
)

// Param is one trainable tensor held in Go. Values are float64 whatever the
// model's type: the optimizer's arithmetic and state stay in double
// precision (as in a float64 torch loop), and the values are rounded to
// DType only when fed to the session or written to the model.
type Param struct {
	Name  string
	DType ortrun.DType
	Dims  []int64
	Value []float64
	// Grad holds the gradient of the current step, same length as Value.
	Grad []float64
}

// Optimizer updates parameters from their gradients.
type Optimizer interface {
	// Step applies one update with learning rate lr to every param, using
	// its Grad.
	Step(params []*Param, lr float64)
	// State returns the optimizer's state for a checkpoint: a step count
	// and named float64 buffers ("<param>/exp_avg", ...).
	State() OptimizerState
	// SetState restores a State returned by the same kind of optimizer.
	SetState(OptimizerState) error
}

// OptimizerState is an optimizer's resumable state.
type OptimizerState struct {
	Kind    string               `json:"kind"`
	Step    int64                `json:"step"`
	Buffers map[string][]float64 `json:"-"`
}

// AdamW is torch.optim.AdamW (amsgrad off): decoupled weight decay
// p -= lr·wd·p, then bias-corrected first and second moments, with eps added
// after the square root of the corrected second moment.
type AdamW struct {
	Beta1, Beta2, Eps, WeightDecay float64

	step int64
	m, v map[string][]float64
}

// NewAdamW returns an AdamW optimizer with torch's hyperparameter names.
func NewAdamW(beta1, beta2, eps, weightDecay float64) *AdamW {
	return &AdamW{Beta1: beta1, Beta2: beta2, Eps: eps, WeightDecay: weightDecay,
		m: map[string][]float64{}, v: map[string][]float64{}}
}

// Step implements Optimizer.
func (o *AdamW) Step(params []*Param, lr float64) {
	o.step++
	bc1 := 1 - math.Pow(o.Beta1, float64(o.step))
	bc2sqrt := math.Sqrt(1 - math.Pow(o.Beta2, float64(o.step)))
	stepSize := lr / bc1
	decay := 1 - lr*o.WeightDecay
	for _, p := range params {
		m, v := o.m[p.Name], o.v[p.Name]
		if m == nil {
			m, v = make([]float64, len(p.Value)), make([]float64, len(p.Value))
			o.m[p.Name], o.v[p.Name] = m, v
		}
		for i, g := range p.Grad {
			p.Value[i] *= decay
			m[i] = m[i]*o.Beta1 + g*(1-o.Beta1)
			v[i] = v[i]*o.Beta2 + g*g*(1-o.Beta2)
			denom := math.Sqrt(v[i])/bc2sqrt + o.Eps
			p.Value[i] -= stepSize * m[i] / denom
		}
	}
}

// State implements Optimizer.
func (o *AdamW) State() OptimizerState {
	b := map[string][]float64{}
	for k, m := range o.m {
		b[k+"/exp_avg"] = m
		b[k+"/exp_avg_sq"] = o.v[k]
	}
	return OptimizerState{Kind: "adamw", Step: o.step, Buffers: b}
}

// SetState implements Optimizer.
func (o *AdamW) SetState(s OptimizerState) error {
	if s.Kind != "adamw" {
		return fmt.Errorf("checkpoint holds %s optimizer state, not adamw", s.Kind)
	}
	o.step = s.Step
	o.m, o.v = map[string][]float64{}, map[string][]float64{}
	for k, b := range s.Buffers {
		switch {
		case cutSuffix(&k, "/exp_avg_sq"):
			o.v[k] = b
		case cutSuffix(&k, "/exp_avg"):
			o.m[k] = b
		default:
			return fmt.Errorf("adamw state has unknown buffer %q", k)
		}
	}
	for k := range o.m {
		if len(o.v[k]) != len(o.m[k]) {
			return fmt.Errorf("adamw state of %q is incomplete", k)
		}
	}
	if len(o.m) != len(o.v) {
		return fmt.Errorf("adamw state is incomplete")
	}
	return nil
}

// SGD is torch.optim.SGD with dampening 0 and no Nesterov: weight decay is
// added to the gradient, and with momentum the first step's buffer is the
// gradient itself.
type SGD struct {
	Momentum, WeightDecay float64

	step int64
	buf  map[string][]float64
}

// NewSGD returns an SGD optimizer.
func NewSGD(momentum, weightDecay float64) *SGD {
	return &SGD{Momentum: momentum, WeightDecay: weightDecay, buf: map[string][]float64{}}
}

// Step implements Optimizer.
func (o *SGD) Step(params []*Param, lr float64) {
	o.step++
	for _, p := range params {
		var buf []float64
		first := false
		if o.Momentum != 0 {
			buf = o.buf[p.Name]
			if buf == nil {
				buf = make([]float64, len(p.Value))
				o.buf[p.Name] = buf
				first = true
			}
		}
		for i, g := range p.Grad {
			d := g + o.WeightDecay*p.Value[i]
			if buf != nil {
				if first {
					buf[i] = d
				} else {
					buf[i] = buf[i]*o.Momentum + d
				}
				d = buf[i]
			}
			p.Value[i] -= lr * d
		}
	}
}

// State implements Optimizer.
func (o *SGD) State() OptimizerState {
	b := map[string][]float64{}
	for k, m := range o.buf {
		b[k+"/momentum_buffer"] = m
	}
	return OptimizerState{Kind: "sgd", Step: o.step, Buffers: b}
}

// SetState implements Optimizer.
func (o *SGD) SetState(s OptimizerState) error {
	if s.Kind != "sgd" {
		return fmt.Errorf("checkpoint holds %s optimizer state, not sgd", s.Kind)
	}
	o.step = s.Step
	o.buf = map[string][]float64{}
	for k, b := range s.Buffers {
		if !cutSuffix(&k, "/momentum_buffer") {
			return fmt.Errorf("sgd state has unknown buffer %q", k)
		}
		o.buf[k] = b
	}
	return nil
}

func cutSuffix(s *string, suffix string) bool {
	if len(*s) > len(suffix) && (*s)[len(*s)-len(suffix):] == suffix {
		*s = (*s)[:len(*s)-len(suffix)]
		return true
	}
	return false
}
