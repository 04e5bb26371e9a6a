package train

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/ortrun"
)

// linearStepper is y = x·w + b with mean squared error, its gradient
// written out by hand: a plain reference model for testing the loop
// without ONNX Runtime.
type linearStepper struct{}

func (linearStepper) forward(b *Batch, params []*Param) (x, y []float64, rows int, err error) {
	for _, t := range b.Inputs {
		v, err := t.Float64s()
		if err != nil {
			return nil, nil, 0, err
		}
		switch t.Name {
		case "x":
			x = v
		case "labels":
			y = v
		}
	}
	return x, y, b.Rows, nil
}

func (s linearStepper) Step(b *Batch, params []*Param) (float64, [][]float64, error) {
	x, y, n, err := s.forward(b, params)
	if err != nil {
		return 0, nil, err
	}
	w, c := params[0].Value, params[1].Value[0]
	gw, gb := make([]float64, len(w)), []float64{0}
	var loss float64
	for i := 0; i < n; i++ {
		r := c - y[i]
		for j := range w {
			r += x[i*len(w)+j] * w[j]
		}
		loss += r * r / float64(n)
		for j := range w {
			gw[j] += 2 * r * x[i*len(w)+j] / float64(n)
		}
		gb[0] += 2 * r / float64(n)
	}
	return loss, [][]float64{gw, gb}, nil
}

func (s linearStepper) Loss(b *Batch, params []*Param) (float64, error) {
	l, _, err := s.Step(b, params)
	return l, err
}

type loopRef struct {
	Name        string             `json:"name"`
	Optimizer   string             `json:"optimizer"`
	Scheduler   string             `json:"scheduler"`
	BatchSize   int                `json:"batch_size"`
	GradAccum   int                `json:"grad_accum"`
	Steps       int64              `json:"steps"`
	Warmup      int64              `json:"warmup"`
	MaxGradNorm float64            `json:"max_grad_norm"`
	Hyper       map[string]float64 `json:"hyper"`
	X           [][]float64        `json:"x"`
	Y           [][]float64        `json:"y"`
	W0, B0      []float64
	Records     []Record  `json:"records"`
	W           []float64 `json:"w"`
	B           []float64 `json:"b"`
}

func loadLoops(t *testing.T) []loopRef {
	t.Helper()
	data, err := os.ReadFile("testdata/optim_ref.json")
	if err != nil {
		t.Fatal(err)
	}
	var ref struct {
		Loops []json.RawMessage `json:"loops"`
	}
	if err := json.Unmarshal(data, &ref); err != nil {
		t.Fatal(err)
	}
	var out []loopRef
	for _, raw := range ref.Loops {
		var l loopRef
		if err := json.Unmarshal(raw, &l); err != nil {
			t.Fatal(err)
		}
		var wb struct {
			W0 []float64 `json:"w0"`
			B0 []float64 `json:"b0"`
		}
		json.Unmarshal(raw, &wb)
		l.W0, l.B0 = wb.W0, wb.B0
		out = append(out, l)
	}
	if len(out) == 0 {
		t.Fatal("no loop cases")
	}
	return out
}

func (l *loopRef) setup(t *testing.T) *Trainer {
	t.Helper()
	var sb strings.Builder
	for i := range l.X {
		x, _ := json.Marshal(l.X[i])
		y, _ := json.Marshal(l.Y[i])
		fmt.Fprintf(&sb, "{\"x\": %s, \"labels\": %s}\n", x, y)
	}
	d, err := ReadJSONL(strings.NewReader(sb.String()), "loop.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	spec := &BatchSpec{
		Inputs: []InputSpec{{Name: "x", DType: ortrun.Float64, Dims: []int64{-1, 3}}},
		Labels: InputSpec{Name: "labels", DType: ortrun.Float64, Dims: []int64{-1, 1}},
		Loss:   "mse",
	}
	if err := d.Validate(spec); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Steps, cfg.BatchSize, cfg.GradAccum = l.Steps, l.BatchSize, l.GradAccum
	cfg.LR, cfg.Optimizer, cfg.Scheduler, cfg.Warmup = l.Hyper["lr"], l.Optimizer, l.Scheduler, l.Warmup
	cfg.Beta1, cfg.Beta2, cfg.Eps = l.Hyper["beta1"], l.Hyper["beta2"], l.Hyper["eps"]
	cfg.Momentum, cfg.WeightDecay = l.Hyper["momentum"], l.Hyper["weight_decay"]
	cfg.MaxGradNorm, cfg.Shuffle = l.MaxGradNorm, false
	return &Trainer{
		Config:  cfg,
		Stepper: linearStepper{},
		Params: []*Param{
			{Name: "w", DType: ortrun.Float64, Dims: []int64{3, 1}, Value: append([]float64{}, l.W0...)},
			{Name: "b", DType: ortrun.Float64, Dims: []int64{1}, Value: append([]float64{}, l.B0...)},
		},
		Data: d, Spec: spec,
	}
}

func TestLoopMatchesTorch(t *testing.T) {
	for _, l := range loadLoops(t) {
		t.Run(l.Name, func(t *testing.T) {
			tr := l.setup(t)
			var got []Record
			tr.OnRecord = func(r Record) { got = append(got, r) }
			res, err := tr.Run(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if res.Steps != l.Steps || len(got) != len(l.Records) {
				t.Fatalf("%d steps, %d records; want %d", res.Steps, len(got), len(l.Records))
			}
			for i, w := range l.Records {
				g := got[i]
				if g.Step != w.Step || !closeRel(g.Loss, w.Loss, 1e-12) || !closeRel(g.LR, w.LR, 1e-14) || !closeRel(g.GradNorm, w.GradNorm, 1e-12) {
					t.Errorf("step %d: got %+v, torch %+v", i+1, g, w)
				}
			}
			for j, w := range l.W {
				if !closeRel(tr.Params[0].Value[j], w, 1e-12) {
					t.Errorf("w[%d] = %v, torch %v", j, tr.Params[0].Value[j], w)
				}
			}
			if !closeRel(tr.Params[1].Value[0], l.B[0], 1e-12) {
				t.Errorf("b = %v, torch %v", tr.Params[1].Value[0], l.B[0])
			}
		})
	}
}

// TestLoopResume stops a run with a checkpoint part way, resumes a new
// trainer from the saved file and checks it ends exactly where an
// uninterrupted run does.
func TestLoopResume(t *testing.T) {
	for _, l := range loadLoops(t) {
		t.Run(l.Name, func(t *testing.T) {
			full := l.setup(t)
			if _, err := full.Run(context.Background()); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			first := l.setup(t)
			n := 0
			first.OnRecord = func(r Record) {
				if n++; n == 2 {
					cancel() // Ctrl-C during step 2: it completes, then stops
				}
			}
			res, err := first.Run(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Stopped || res.Steps != 2 {
				t.Fatalf("stopped %v after %d steps, want stopped after 2", res.Stopped, res.Steps)
			}
			path := filepath.Join(t.TempDir(), "run.ckpt")
			if err := SaveCheckpoint(path, first.Checkpoint()); err != nil {
				t.Fatal(err)
			}
			c, err := LoadCheckpoint(path)
			if err != nil {
				t.Fatal(err)
			}
			second := l.setup(t)
			if err := second.Resume(c); err != nil {
				t.Fatal(err)
			}
			res, err = second.Run(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if res.Steps != l.Steps || len(res.History) != int(l.Steps) {
				t.Fatalf("resumed run: %d steps, %d records", res.Steps, len(res.History))
			}
			for i := range full.Params {
				for j, v := range full.Params[i].Value {
					if second.Params[i].Value[j] != v {
						t.Fatalf("%s[%d]: resumed %v, uninterrupted %v", full.Params[i].Name, j, second.Params[i].Value[j], v)
					}
				}
			}
		})
	}
}

func TestEvaluateWeightsByCount(t *testing.T) {
	l := loadLoops(t)[0]
	tr := l.setup(t)
	tr.Eval = tr.Data
	tr.Config.BatchSize = 4 // batches of 4, 4 and 2 rows
	r, err := tr.Evaluate()
	if err != nil {
		t.Fatal(err)
	}
	// Plain mean squared error over all ten rows at the initial values.
	var want float64
	for i, x := range l.X {
		p := l.B0[0]
		for j := range x {
			p += x[j] * l.W0[j]
		}
		want += (p - l.Y[i][0]) * (p - l.Y[i][0]) / float64(len(l.X))
	}
	if !r.Eval || !closeRel(r.EvalLoss, want, 1e-12) || r.EvalPerplexity != 0 {
		t.Fatalf("eval %+v, want loss %v", r, want)
	}
	b, _ := json.Marshal(r)
	if string(b) != fmt.Sprintf(`{"step":0,"eval_loss":%s}`, mustJSON(r.EvalLoss)) {
		t.Fatalf("eval record JSON %s", b)
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestRecordJSON(t *testing.T) {
	r := Record{Step: 3, Loss: 1.5, LR: 1e-3, GradNorm: 0.25, TokensPerS: 100}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != `{"step":3,"loss":1.5,"lr":0.001,"grad_norm":0.25,"tokens_per_s":100}` {
		t.Fatalf("step record %s", b)
	}
	e := Record{Step: 3, Eval: true, EvalLoss: 2, EvalPerplexity: math.Exp(2)}
	b, _ = json.Marshal(e)
	var back Record
	if err := json.Unmarshal(b, &back); err != nil || back != e {
		t.Fatalf("eval record %s round-trips to %+v (%v)", b, back, err)
	}
}

func TestCheckpointRejectsDamage(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.ckpt")
	c := &Checkpoint{Step: 4, Epoch: 1, Batch: 2, Optimizer: NewSGD(0.9, 0).State(),
		Params: []*Param{{Name: "a", DType: ortrun.Float32, Dims: []int64{2}, Value: []float64{1, 2}}}}
	c.Optimizer.Buffers["a/momentum_buffer"] = []float64{0.5, -1}
	if err := SaveCheckpoint(p, c); err != nil {
		t.Fatal(err)
	}
	got, err := LoadCheckpoint(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.Step != 4 || got.Epoch != 1 || got.Batch != 2 || got.Params[0].DType != ortrun.Float32 ||
		got.Params[0].Value[1] != 2 || got.Optimizer.Buffers["a/momentum_buffer"][1] != -1 || got.Optimizer.Kind != "sgd" {
		t.Fatalf("round trip: %+v", got)
	}
	data, _ := os.ReadFile(p)
	for name, bad := range map[string][]byte{
		"truncated": data[:len(data)-3],
		"trailing":  append(append([]byte{}, data...), 0, 0, 0, 0, 0, 0, 0, 0),
		"not ckpt":  []byte("hello"),
		"empty":     {},
	} {
		q := filepath.Join(dir, name)
		os.WriteFile(q, bad, 0o644)
		if _, err := LoadCheckpoint(q); err == nil {
			t.Errorf("%s checkpoint accepted", name)
		}
	}
}

func TestSaveEveryAndConfigErrors(t *testing.T) {
	l := loadLoops(t)[0]
	tr := l.setup(t)
	tr.Config.Steps, tr.Config.SaveEvery = 5, 2
	var at []int64
	tr.OnCheckpoint = func(c *Checkpoint) error {
		if len(c.Params) != 2 || c.Optimizer.Kind != "adamw" {
			t.Errorf("checkpoint at step %d: %d params, optimizer %q", c.Step, len(c.Params), c.Optimizer.Kind)
		}
		at = append(at, c.Step)
		return nil
	}
	if _, err := tr.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(at) != "[2 4]" {
		t.Errorf("checkpoints at steps %v, want [2 4] (the caller saves after the last)", at)
	}
	for _, bad := range []func(*Config){
		func(c *Config) { c.BatchSize = 0 },
		func(c *Config) { c.GradAccum = 0 },
		func(c *Config) { c.LR = math.NaN() },
		func(c *Config) { c.Optimizer = "adam" },
		func(c *Config) { c.Scheduler = "step" },
		func(c *Config) { c.Beta2 = 1 },
		func(c *Config) { c.Steps, c.Epochs = 0, 0 },
		func(c *Config) { c.MaxGradNorm = -1 },
	} {
		c := DefaultConfig()
		bad(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	// Trainer: ceil(epochs * max(1, batches // accum)).
	for _, tc := range []struct {
		epochs     float64
		rows, b, k int
		want       int64
	}{{2.5, 10, 4, 2, 3}, {3, 10, 4, 2, 3}, {1, 10, 4, 1, 3}, {0.5, 10, 4, 1, 2}, {1, 3, 8, 4, 1}, {2, 64, 8, 2, 8}} {
		c := DefaultConfig()
		c.Epochs, c.BatchSize, c.GradAccum = tc.epochs, tc.b, tc.k
		if n := c.TotalSteps(tc.rows); n != tc.want {
			t.Errorf("%v epochs of %d rows, batch %d, accum %d: %d steps, want %d", tc.epochs, tc.rows, tc.b, tc.k, n, tc.want)
		}
	}
}
