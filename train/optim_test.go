package train

import (
	"encoding/json"
	"math"
	"os"
	"testing"
)

// optimRef is testdata/optim_ref.json, written by gen_optim_ref.py from
// torch.optim and torch.nn.utils.clip_grad_norm_.
type optimRef struct {
	Shapes [][]int64     `json:"shapes"`
	Params [][]float64   `json:"params"`
	Grads  [][][]float64 `json:"grads"`
	LRs    []float64     `json:"lrs"`
	Cases  []struct {
		Name       string         `json:"name"`
		Hyper      map[string]any `json:"hyper"`
		Clip       *float64       `json:"clip"`
		Trajectory [][][]float64  `json:"trajectory"`
		Norms      []float64      `json:"norms"`
	} `json:"cases"`
	Schedules []struct {
		Warmup   int64     `json:"warmup"`
		Total    int64     `json:"total"`
		Constant []float64 `json:"constant"`
		Linear   []float64 `json:"linear"`
		Cosine   []float64 `json:"cosine"`
	} `json:"schedules"`
}

func loadOptimRef(t *testing.T) *optimRef {
	t.Helper()
	data, err := os.ReadFile("testdata/optim_ref.json")
	if err != nil {
		t.Fatal(err)
	}
	var ref optimRef
	if err := json.Unmarshal(data, &ref); err != nil {
		t.Fatal(err)
	}
	if len(ref.Cases) == 0 || len(ref.Schedules) == 0 {
		t.Fatal("reference file has no cases")
	}
	return &ref
}

func closeRel(got, want, rel float64) bool {
	return math.Abs(got-want) <= rel*math.Max(1, math.Abs(want))
}

func TestOptimizersMatchTorch(t *testing.T) {
	ref := loadOptimRef(t)
	for _, c := range ref.Cases {
		t.Run(c.Name, func(t *testing.T) {
			h := func(k string) float64 { return c.Hyper[k].(float64) }
			var opt Optimizer
			switch c.Hyper["optimizer"] {
			case "adamw":
				opt = NewAdamW(h("beta1"), h("beta2"), h("eps"), h("weight_decay"))
			case "sgd":
				opt = NewSGD(h("momentum"), h("weight_decay"))
			default:
				t.Fatalf("unknown optimizer %v", c.Hyper["optimizer"])
			}
			params := make([]*Param, len(ref.Shapes))
			for i, s := range ref.Shapes {
				params[i] = &Param{Name: string(rune('a' + i)), Dims: s, Value: append([]float64{}, ref.Params[i]...)}
			}
			for k := range c.Trajectory {
				for i, p := range params {
					p.Grad = append([]float64{}, ref.Grads[k][i]...)
				}
				if c.Clip != nil {
					norm := ClipGradNorm(params, *c.Clip)
					if !closeRel(norm, c.Norms[k], 1e-12) {
						t.Fatalf("step %d: grad norm %v, torch %v", k, norm, c.Norms[k])
					}
				}
				opt.Step(params, ref.LRs[k])
				for i, p := range params {
					for j, v := range p.Value {
						if !closeRel(v, c.Trajectory[k][i][j], 1e-12) {
							t.Fatalf("step %d param %d[%d] = %v, torch %v", k, i, j, v, c.Trajectory[k][i][j])
						}
					}
				}
			}
		})
	}
}

// TestOptimizerStateResumes checks that State/SetState carry a run over: an
// optimizer restored after 3 steps finishes like one that never stopped.
func TestOptimizerStateResumes(t *testing.T) {
	ref := loadOptimRef(t)
	for _, kind := range []string{"adamw", "sgd"} {
		mk := func() Optimizer {
			if kind == "adamw" {
				return NewAdamW(0.9, 0.999, 1e-8, 0.01)
			}
			return NewSGD(0.9, 0.05)
		}
		newParams := func() []*Param {
			ps := make([]*Param, len(ref.Shapes))
			for i, s := range ref.Shapes {
				ps[i] = &Param{Name: string(rune('a' + i)), Dims: s, Value: append([]float64{}, ref.Params[i]...)}
			}
			return ps
		}
		step := func(o Optimizer, ps []*Param, k int) {
			for i, p := range ps {
				p.Grad = append([]float64{}, ref.Grads[k][i]...)
			}
			o.Step(ps, ref.LRs[k])
		}
		a, pa := mk(), newParams()
		b, pb := mk(), newParams()
		for k := 0; k < 3; k++ {
			step(a, pa, k)
			step(b, pb, k)
		}
		st := b.State()
		c := mk()
		if err := c.SetState(st); err != nil {
			t.Fatal(err)
		}
		for k := 3; k < len(ref.Grads); k++ {
			step(a, pa, k)
			step(c, pb, k)
		}
		for i := range pa {
			for j := range pa[i].Value {
				if pa[i].Value[j] != pb[i].Value[j] {
					t.Fatalf("%s: resumed run differs at param %d[%d]: %v vs %v", kind, i, j, pb[i].Value[j], pa[i].Value[j])
				}
			}
		}
		other := NewSGD(0, 0)
		if kind == "sgd" {
			if err := NewAdamW(0.9, 0.999, 1e-8, 0).SetState(st); err == nil {
				t.Error("adamw accepted sgd state")
			}
		} else if err := other.SetState(st); err == nil {
			t.Error("sgd accepted adamw state")
		}
	}
}

func TestSchedulesMatchTransformers(t *testing.T) {
	ref := loadOptimRef(t)
	for _, s := range ref.Schedules {
		for kind, want := range map[string][]float64{"constant": s.Constant, "linear": s.Linear, "cosine": s.Cosine} {
			f, err := NewSchedule(kind, s.Warmup, s.Total)
			if err != nil {
				t.Fatal(err)
			}
			for k, w := range want {
				if got := f(int64(k)); !closeRel(got, w, 1e-14) {
					t.Errorf("%s warmup %d total %d: λ(%d) = %v, want %v", kind, s.Warmup, s.Total, k, got, w)
				}
			}
		}
	}
	if _, err := NewSchedule("step", 0, 1); err == nil {
		t.Error("unknown scheduler accepted")
	}
}

func TestClipOffAndBelowThreshold(t *testing.T) {
	ps := []*Param{{Grad: []float64{3, 4}}}
	if n := ClipGradNorm(ps, 0); n != 5 || ps[0].Grad[0] != 3 {
		t.Fatalf("clipping off changed grads or norm: %v %v", n, ps[0].Grad)
	}
	if n := ClipGradNorm(ps, 10); n != 5 || ps[0].Grad[1] != 4 {
		t.Fatalf("norm below max changed grads: %v %v", n, ps[0].Grad)
	}
	ClipGradNorm(ps, 1)
	if got := math.Hypot(ps[0].Grad[0], ps[0].Grad[1]); math.Abs(got-5/(5+1e-6)) > 1e-12 {
		t.Fatalf("clipped norm %v, want %v", got, 5/(5+1e-6))
	}
}
