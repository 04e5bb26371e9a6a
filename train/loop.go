package train

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"
)

// Config holds a run's settings. Names and defaults follow transformers'
// TrainingArguments where it has them (see DefaultConfig).
type Config struct {
	// Steps is the number of optimizer steps; 0 derives it from Epochs.
	Steps int64
	// Epochs is used when Steps is 0 (see TotalSteps).
	Epochs    float64
	BatchSize int
	// GradAccum batches make one optimizer step; the gradient is the mean
	// of their mean-loss gradients.
	GradAccum int
	LR        float64
	// Optimizer is "adamw" or "sgd".
	Optimizer             string
	Beta1, Beta2, Eps     float64
	Momentum, WeightDecay float64
	// Scheduler is "constant", "linear" or "cosine"; Warmup its warmup
	// steps.
	Scheduler string
	Warmup    int64
	// MaxGradNorm clips the global gradient norm; 0 turns clipping off.
	MaxGradNorm float64
	// Shuffle draws each epoch's order from (Seed, epoch); false keeps file
	// order.
	Shuffle bool
	Seed    uint64
	// EvalEvery evaluates every N optimizer steps (and after the last);
	// 0 evaluates after the last only. Needs an eval Dataset.
	EvalEvery int64
	// SaveEvery calls Trainer.OnCheckpoint every N optimizer steps.
	SaveEvery int64
}

// DefaultConfig returns transformers' defaults: AdamW(0.9, 0.999, 1e-8),
// lr 2e-4 with a linear schedule, batch 8, clipping at 1.0, one epoch,
// shuffled.
func DefaultConfig() Config {
	return Config{Epochs: 1, BatchSize: 8, GradAccum: 1, LR: 2e-4, Optimizer: "adamw",
		Beta1: 0.9, Beta2: 0.999, Eps: 1e-8, Scheduler: "linear", MaxGradNorm: 1, Shuffle: true}
}

// Validate checks the settings.
func (c *Config) Validate() error {
	switch {
	case c.Steps < 0:
		return fmt.Errorf("steps %d: want >= 0", c.Steps)
	case c.Steps == 0 && !(c.Epochs > 0) || math.IsInf(c.Epochs, 0):
		return fmt.Errorf("epochs %v: want a positive number", c.Epochs)
	case c.BatchSize < 1:
		return fmt.Errorf("batch size %d: want >= 1", c.BatchSize)
	case c.GradAccum < 1:
		return fmt.Errorf("grad accum %d: want >= 1", c.GradAccum)
	case !(c.LR >= 0) || math.IsInf(c.LR, 0):
		return fmt.Errorf("lr %v: want a finite number >= 0", c.LR)
	case c.Warmup < 0:
		return fmt.Errorf("warmup steps %d: want >= 0", c.Warmup)
	case !(c.MaxGradNorm >= 0):
		return fmt.Errorf("max grad norm %v: want >= 0", c.MaxGradNorm)
	case !(c.WeightDecay >= 0):
		return fmt.Errorf("weight decay %v: want >= 0", c.WeightDecay)
	case c.EvalEvery < 0 || c.SaveEvery < 0:
		return errors.New("eval and save intervals must not be negative")
	}
	switch c.Optimizer {
	case "adamw":
		if !(c.Beta1 >= 0 && c.Beta1 < 1) || !(c.Beta2 >= 0 && c.Beta2 < 1) {
			return fmt.Errorf("adam betas (%v, %v): want each in [0, 1)", c.Beta1, c.Beta2)
		}
		if !(c.Eps >= 0) {
			return fmt.Errorf("adam epsilon %v: want >= 0", c.Eps)
		}
	case "sgd":
		if !(c.Momentum >= 0) {
			return fmt.Errorf("momentum %v: want >= 0", c.Momentum)
		}
	default:
		return fmt.Errorf("unknown optimizer %q: want adamw or sgd", c.Optimizer)
	}
	_, err := NewSchedule(c.Scheduler, 0, 1)
	return err
}

// TotalSteps is the run's number of optimizer steps for a dataset of rows
// examples: Steps, or as transformers' Trainer derives max_steps from
// epochs, ceil(Epochs·max(1, floor(batches/GradAccum))) with
// batches = ceil(rows/BatchSize).
func (c *Config) TotalSteps(rows int) int64 {
	if c.Steps > 0 {
		return c.Steps
	}
	nb := int64((rows + c.BatchSize - 1) / c.BatchSize)
	perEpoch := max(1, nb/int64(c.GradAccum))
	return max(1, int64(math.Ceil(c.Epochs*float64(perEpoch))))
}

func (c *Config) newOptimizer() Optimizer {
	if c.Optimizer == "sgd" {
		return NewSGD(c.Momentum, c.WeightDecay)
	}
	return NewAdamW(c.Beta1, c.Beta2, c.Eps, c.WeightDecay)
}

// Stepper evaluates the step graph for a batch at the params' values.
type Stepper interface {
	// Step returns the batch's mean loss and the gradient of it with
	// respect to each param, in params order.
	Step(b *Batch, params []*Param) (loss float64, grads [][]float64, err error)
	// Loss returns the batch's mean loss only.
	Loss(b *Batch, params []*Param) (float64, error)
}

// Record is one line of a run's log: a training step, or an evaluation
// (Eval true). It marshals as {"step","loss","lr","grad_norm",
// "tokens_per_s"} or {"step","eval_loss"[,"eval_perplexity"]}.
type Record struct {
	Step       int64
	Loss       float64
	LR         float64
	GradNorm   float64
	TokensPerS float64

	Eval           bool
	EvalLoss       float64
	EvalPerplexity float64 // set for causal-lm, else 0
}

// MarshalJSON writes the record's fields in the names.
func (r Record) MarshalJSON() ([]byte, error) {
	if r.Eval {
		v := struct {
			Step int64    `json:"step"`
			Loss float64  `json:"eval_loss"`
			PPL  *float64 `json:"eval_perplexity,omitempty"`
		}{r.Step, r.EvalLoss, nil}
		if r.EvalPerplexity != 0 && !math.IsInf(r.EvalPerplexity, 0) {
			v.PPL = &r.EvalPerplexity
		}
		return json.Marshal(v)
	}
	return json.Marshal(struct {
		Step       int64   `json:"step"`
		Loss       float64 `json:"loss"`
		LR         float64 `json:"lr"`
		GradNorm   float64 `json:"grad_norm"`
		TokensPerS float64 `json:"tokens_per_s"`
	}{r.Step, r.Loss, r.LR, r.GradNorm, r.TokensPerS})
}

// UnmarshalJSON reads what MarshalJSON writes.
func (r *Record) UnmarshalJSON(b []byte) error {
	var v struct {
		Step       int64    `json:"step"`
		Loss       float64  `json:"loss"`
		LR         float64  `json:"lr"`
		GradNorm   float64  `json:"grad_norm"`
		TokensPerS float64  `json:"tokens_per_s"`
		EvalLoss   *float64 `json:"eval_loss"`
		PPL        float64  `json:"eval_perplexity"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*r = Record{Step: v.Step, Loss: v.Loss, LR: v.LR, GradNorm: v.GradNorm, TokensPerS: v.TokensPerS, EvalPerplexity: v.PPL}
	if v.EvalLoss != nil {
		r.Eval, r.EvalLoss = true, *v.EvalLoss
	}
	return nil
}

// Trainer runs the training loop: batches in order, gradient accumulation,
// clipping, the schedule and the optimizer, evaluation and checkpoints.
type Trainer struct {
	Config  Config
	Stepper Stepper
	// Params are trained in place.
	Params []*Param
	Data   *Dataset
	// Eval, if set, is evaluated before the first step, every
	// Config.EvalEvery steps and after the last.
	Eval *Dataset
	Spec *BatchSpec
	// OnRecord, if set, gets every step and eval record as it happens.
	OnRecord func(Record)
	// OnCheckpoint, if set, is called every Config.SaveEvery steps.
	OnCheckpoint func(*Checkpoint) error

	opt          Optimizer
	step         int64
	epoch, batch int64
	order        []int
	orderEpoch   int64
	history      []Record
}

// Result says how a run ended.
type Result struct {
	// Steps is the number of optimizer steps done, Total the planned.
	Steps, Total int64
	// Stopped is true when the context ended the run early (after a
	// complete step).
	Stopped bool
	// Last is the last step's record; EvalLoss the last evaluation's
	// loss (NaN if none ran).
	Last     Record
	EvalLoss float64
	History  []Record
}

func (t *Trainer) init() error {
	if err := t.Config.Validate(); err != nil {
		return err
	}
	if t.Stepper == nil || t.Data == nil || t.Spec == nil || len(t.Params) == 0 {
		return errors.New("trainer needs a Stepper, Params, Data and a Spec")
	}
	if t.opt == nil {
		t.opt = t.Config.newOptimizer()
	}
	return nil
}

// Resume restores the state saved in c: param values, optimizer state,
// step and data position. Params are matched by name and shape.
func (t *Trainer) Resume(c *Checkpoint) error {
	if err := t.init(); err != nil {
		return err
	}
	if len(c.Params) != len(t.Params) {
		return fmt.Errorf("checkpoint has %d trainable tensors, the model %d", len(c.Params), len(t.Params))
	}
	byName := map[string]*Param{}
	for _, p := range c.Params {
		byName[p.Name] = p
	}
	for _, p := range t.Params {
		q := byName[p.Name]
		if q == nil || !slices.Equal(q.Dims, p.Dims) || len(q.Value) != len(p.Value) {
			return fmt.Errorf("checkpoint does not hold %s with shape %s", p.Name, dimsString(p.Dims))
		}
	}
	if err := t.opt.SetState(c.Optimizer); err != nil {
		return err
	}
	for _, p := range t.Params {
		copy(p.Value, byName[p.Name].Value)
	}
	t.step, t.epoch, t.batch = c.Step, c.Epoch, c.Batch
	t.history = append([]Record{}, c.History...)
	t.order = nil
	return nil
}

// Checkpoint returns the run's current state.
func (t *Trainer) Checkpoint() *Checkpoint {
	ps := make([]*Param, len(t.Params))
	for i, p := range t.Params {
		ps[i] = &Param{Name: p.Name, DType: p.DType, Dims: p.Dims, Value: append([]float64{}, p.Value...)}
	}
	st := OptimizerState{}
	if t.opt != nil {
		st = t.opt.State()
	}
	return &Checkpoint{Step: t.step, Epoch: t.epoch, Batch: t.batch, Optimizer: st, Params: ps,
		History: append([]Record{}, t.history...)}
}

// nextBatch returns the next batch of the data stream: batch j of an epoch
// is rows j·B .. j·B+B-1 of the epoch's order, and after the last batch the
// next epoch starts at its first row.
func (t *Trainer) nextBatch() (*Batch, error) {
	if t.order == nil || t.orderEpoch != t.epoch {
		t.order = t.Data.Order(t.epoch, t.Config.Shuffle, t.Config.Seed)
		t.orderEpoch = t.epoch
	}
	B := int64(t.Config.BatchSize)
	lo := t.batch * B
	hi := min(lo+B, int64(len(t.order)))
	b, err := t.Data.MakeBatch(t.order[lo:hi], t.Spec)
	if err != nil {
		return nil, err
	}
	t.batch++
	if t.batch*B >= int64(len(t.order)) {
		t.batch, t.epoch = 0, t.epoch+1
	}
	return b, nil
}

// Run trains until the planned steps are done or ctx ends; a cancelled
// context stops the run after the step in progress, with Result.Stopped
// set and no error. Params hold the trained values on return.
func (t *Trainer) Run(ctx context.Context) (*Result, error) {
	if err := t.init(); err != nil {
		return nil, err
	}
	total := t.Config.TotalSteps(len(t.Data.Rows))
	sched, err := NewSchedule(t.Config.Scheduler, t.Config.Warmup, total)
	if err != nil {
		return nil, err
	}
	res := &Result{Total: total, EvalLoss: math.NaN()}
	K := t.Config.GradAccum
	sums := make([][]float64, len(t.Params))
	for i, p := range t.Params {
		sums[i] = make([]float64, len(p.Value))
	}
	if t.Eval != nil && t.step == 0 && total > 0 {
		// The starting point, so a log shows what training changed.
		ev, err := t.Evaluate()
		if err != nil {
			return nil, fmt.Errorf("eval before training: %w", err)
		}
		t.emit(ev)
	}
	for t.step < total {
		if ctx.Err() != nil {
			res.Stopped = true
			break
		}
		start := time.Now()
		for _, s := range sums {
			clear(s)
		}
		var lossSum float64
		var tokens int64
		for k := 0; k < K; k++ {
			b, err := t.nextBatch()
			if err != nil {
				return nil, fmt.Errorf("step %d: %w", t.step+1, err)
			}
			loss, grads, err := t.Stepper.Step(b, t.Params)
			if err != nil {
				return nil, fmt.Errorf("step %d: %w", t.step+1, err)
			}
			if math.IsNaN(loss) || math.IsInf(loss, 0) {
				return nil, fmt.Errorf("step %d: the loss is %v; lower --lr or check the data", t.step+1, loss)
			}
			lossSum += loss
			tokens += b.Tokens
			for i, g := range grads {
				if len(g) != len(sums[i]) {
					return nil, fmt.Errorf("step %d: gradient of %s has %d values, want %d", t.step+1, t.Params[i].Name, len(g), len(sums[i]))
				}
				for j, x := range g {
					sums[i][j] += x
				}
			}
		}
		for i, p := range t.Params {
			if len(p.Grad) != len(p.Value) {
				p.Grad = make([]float64, len(p.Value))
			}
			for j, x := range sums[i] {
				p.Grad[j] = x / float64(K)
			}
		}
		norm := ClipGradNorm(t.Params, t.Config.MaxGradNorm)
		if math.IsNaN(norm) || math.IsInf(norm, 0) {
			return nil, fmt.Errorf("step %d: the gradient norm is %v; lower --lr or check the data", t.step+1, norm)
		}
		lr := t.Config.LR * sched(t.step)
		t.opt.Step(t.Params, lr)
		t.step++
		el := time.Since(start).Seconds()
		rec := Record{Step: t.step, Loss: lossSum / float64(K), LR: lr, GradNorm: norm}
		if el > 0 {
			rec.TokensPerS = float64(tokens) / el
		}
		res.Last = rec
		t.emit(rec)
		last := t.step == total
		if t.Eval != nil && (last || t.Config.EvalEvery > 0 && t.step%t.Config.EvalEvery == 0) {
			ev, err := t.Evaluate()
			if err != nil {
				return nil, fmt.Errorf("eval after step %d: %w", t.step, err)
			}
			res.EvalLoss = ev.EvalLoss
			t.emit(ev)
		}
		if t.OnCheckpoint != nil && t.Config.SaveEvery > 0 && t.step%t.Config.SaveEvery == 0 && !last {
			if err := t.OnCheckpoint(t.Checkpoint()); err != nil {
				return nil, err
			}
		}
	}
	res.Steps = t.step
	res.History = append([]Record{}, t.history...)
	return res, nil
}

func (t *Trainer) emit(r Record) {
	t.history = append(t.history, r)
	if t.OnRecord != nil {
		t.OnRecord(r)
	}
}

// Evaluate returns the mean loss over the eval set at the current values,
// in batches of Config.BatchSize in file order: each batch's mean loss
// weighted by its counted label positions, so the result is the mean over
// every counted position of the set (for causal-lm, perplexity is its
// exp).
func (t *Trainer) Evaluate() (Record, error) {
	if t.Eval == nil {
		return Record{}, errors.New("no eval data")
	}
	var sum, n float64
	B := t.Config.BatchSize
	order := t.Eval.Order(0, false, 0)
	for lo := 0; lo < len(order); lo += B {
		b, err := t.Eval.MakeBatch(order[lo:min(lo+B, len(order))], t.Spec)
		if err != nil {
			return Record{}, err
		}
		if b.Counted == 0 {
			continue
		}
		loss, err := t.Stepper.Loss(b, t.Params)
		if err != nil {
			return Record{}, err
		}
		sum += loss * float64(b.Counted)
		n += float64(b.Counted)
	}
	if n == 0 {
		return Record{}, errors.New("the eval data has no labelled positions")
	}
	r := Record{Step: t.step, Eval: true, EvalLoss: sum / n}
	if t.Spec.Loss == "causal-lm" {
		r.EvalPerplexity = math.Exp(r.EvalLoss)
	}
	return r, nil
}
