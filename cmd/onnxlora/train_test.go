package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
	"github.com/onnxlora/onnxlora/train"
)

const trainRefDir = "../../testdata/train"

func TestTrainOptions(t *testing.T) {
	var got *TrainOptions
	ios, _, _, _ := TestIO()
	cmd := NewCmdTrain(NewFactory(ios), func(o *TrainOptions) error { got = o; return nil })
	cmd.SetArgs([]string{"m.onnx", "--data", "d.jsonl", "-o", "out.onnx", "--steps", "7", "--batch-size", "3",
		"--grad-accum", "2", "--lr", "0.5", "--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "0.1",
		"--lr-scheduler", "cosine", "--warmup-steps", "2", "--max-grad-norm", "0", "--loss", "mse",
		"--model-output", "y", "--shuffle=false", "--seed", "3", "--pad-id", "5", "--json", "--eval-data", "e.jsonl",
		"--eval-every", "2", "--save-every", "3", "--plot", "l.svg"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	c := got.Config
	if got.Model != "m.onnx" || got.Data != "d.jsonl" || got.Output != "out.onnx" || c.Steps != 7 || c.BatchSize != 3 ||
		c.GradAccum != 2 || c.LR != 0.5 || c.Optimizer != "sgd" || c.Momentum != 0.9 || c.WeightDecay != 0.1 ||
		c.Scheduler != "cosine" || c.Warmup != 2 || c.MaxGradNorm != 0 || got.Loss != "mse" || got.ModelOutput != "y" ||
		c.Shuffle || c.Seed != 3 || got.PadID != 5 || !got.JSON || got.EvalData != "e.jsonl" || c.EvalEvery != 2 ||
		c.SaveEvery != 3 || got.Plot != "l.svg" {
		t.Errorf("options %+v config %+v", got, c)
	}

	// Defaults: transformers' Trainer where it has one.
	cmd = NewCmdTrain(NewFactory(ios), func(o *TrainOptions) error { got = o; return nil })
	cmd.SetArgs([]string{"m.onnx", "--data", "d.jsonl", "-o", "out.onnx"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	c = got.Config
	if c.Steps != 0 || c.Epochs != 1 || c.BatchSize != 8 || c.GradAccum != 1 || c.LR != 2e-4 || c.Optimizer != "adamw" ||
		c.Beta1 != 0.9 || c.Beta2 != 0.999 || c.Eps != 1e-8 || c.Momentum != 0 || c.WeightDecay != 0 ||
		c.Scheduler != "linear" || c.Warmup != 0 || c.MaxGradNorm != 1 || got.Loss != "causal-lm" || !c.Shuffle ||
		got.PadID != 0 || got.Device != "cpu" {
		t.Errorf("defaults %+v config %+v", got, c)
	}
}

func TestTrainUsageErrors(t *testing.T) {
	m := model("tiny-gpt.onnx")
	d := filepath.Join(trainRefDir, "tiny-llama-adamw.jsonl")
	out := filepath.Join(t.TempDir(), "out.onnx")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"train", m, "--data", d}, "missing -o/--output"},
		{[]string{"train", m, "-o", out}, "missing --data"},
		{[]string{"train", m, "--data", d, "-o", m}, "is the input"},
		{[]string{"train", m, "--data", d, "-o", out, "--steps", "0"}, "--steps"},
		{[]string{"train", m, "--data", d, "-o", out, "--steps", "3", "--epochs", "2"}, "do not go together"},
		{[]string{"train", m, "--data", d, "-o", out, "--optimizer", "adam"}, "unknown optimizer"},
		{[]string{"train", m, "--data", d, "-o", out, "--lr-scheduler", "step"}, "unknown learning-rate scheduler"},
		{[]string{"train", m, "--data", d, "-o", out, "--loss", "nll"}, "--loss"},
		{[]string{"train", m, "--data", d, "-o", out, "--batch-size", "0"}, "batch size"},
		{[]string{"train", m, "--data", d, "-o", out, "--adam-beta1", "1"}, "betas"},
		{[]string{"train", m, "--data", d, "-o", out, "--eval-every", "5"}, "--eval-every needs --eval-data"},
		{[]string{"train", m, "--data", d, "-o", out, "--plot", "loss.pdf"}, "--plot"},
		{[]string{"train", m, "--data", d, "-o", out, "--device", "tpu"}, "--device"},
	} {
		r := run(t, tc.args...)
		if r.code != 2 || !strings.Contains(r.stderr, tc.want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and one line with %q", tc.args[3:], r.code, r.stderr, tc.want)
		}
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("a usage error wrote %s", out)
	}
}

// caseInject is how a reference case injects its model.
type caseInject struct {
	Targets       []string `json:"targets"`
	Rank          int      `json:"rank"`
	Alpha         float64  `json:"alpha"`
	ModulesToSave []string `json:"modules_to_save"`
}

// trainCase is a reference run of testdata/train/<name>.json, made by torch
// in float64.
type trainCase struct {
	Model    string                     `json:"model"`
	Inject   *caseInject                `json:"inject"`
	Data     string                     `json:"data"`
	Flags    map[string]any             `json:"flags"`
	Initial  map[string]trainCaseTensor `json:"initial"`
	Expected struct {
		Steps []train.Record             `json:"steps"`
		Final map[string]trainCaseTensor `json:"final"`
	} `json:"expected"`
}

type trainCaseTensor struct {
	Shape []int64   `json:"shape"`
	Data  []float64 `json:"data"`
}

func loadTrainCase(t *testing.T, name string) *trainCase {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(trainRefDir, name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var c trainCase
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return &c
}

// injectWith injects the case's adapters into its model with onnxlora
// inject and writes values (the case's initial values, or others) into
// the initializers, returning the model's path.
func (c *trainCase) injectWith(t *testing.T, dir, name string, values map[string]trainCaseTensor) string {
	t.Helper()
	injected := filepath.Join(dir, "injected.onnx")
	if _, err := os.Stat(injected); err != nil {
		args := []string{"inject", model(c.Model), "-o", injected, "--target", strings.Join(c.Inject.Targets, ","),
			"--rank", fmt.Sprint(c.Inject.Rank), "--alpha", fmt.Sprint(c.Inject.Alpha), "-q"}
		if len(c.Inject.ModulesToSave) > 0 {
			args = append(args, "--modules-to-save", strings.Join(c.Inject.ModulesToSave, ","))
		}
		mustRun(t, args...)
	}
	m, err := graph.Load(injected)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for n, v := range values {
		init, _ := m.Graph().Initializer(n)
		if init == nil {
			t.Fatalf("injected model has no initializer %s", n)
		}
		if err := graph.SetFloat64s(init, v.Data); err != nil {
			t.Fatal(err)
		}
	}
	p := filepath.Join(dir, name)
	if err := m.Save(p, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	return p
}

// args turns the case's flags into command-line flags.
func (c *trainCase) args() []string {
	var args []string
	for k, v := range c.Flags {
		args = append(args, fmt.Sprintf("--%s=%v", k, v))
	}
	return args
}

func readRecords(t *testing.T, stdout string) (steps, evals []train.Record) {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(stdout))
	for sc.Scan() {
		var r train.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("stdout line %q: %v", sc.Text(), err)
		}
		if r.Eval {
			evals = append(evals, r)
		} else {
			steps = append(steps, r)
		}
	}
	return steps, evals
}

func TestTrainMatchesTorch(t *testing.T) {
	orttest.Require(t)
	for _, name := range []string{
		"tiny-llama-adamw", "tiny-llama-sgd", "tiny-llama-accum-cosine",
		"tiny-gpt2-adamw", "tiny-gpt2-sgd", "tiny-gpt2-accum-cosine",
		"mlp-classifier-adamw", "mlp-classifier-sgd", "mlp-classifier-accum-cosine",
		"mlp-classifier-modules-to-save",
	} {
		t.Run(name, func(t *testing.T) {
			c := loadTrainCase(t, name)
			dir := t.TempDir()
			start := c.injectWith(t, dir, "start.onnx", c.Initial)
			out := filepath.Join(dir, "out.onnx")
			args := append([]string{"train", start, "--data", filepath.Join(trainRefDir, c.Data), "-o", out, "--json", "-q"}, c.args()...)
			r := mustRun(t, args...)
			steps, _ := readRecords(t, r.stdout)
			if len(steps) != len(c.Expected.Steps) {
				t.Fatalf("%d step records, want %d", len(steps), len(c.Expected.Steps))
			}
			for i, w := range c.Expected.Steps {
				g := steps[i]
				if g.Step != w.Step || math.Abs(g.LR-w.LR) > 1e-12*math.Abs(w.LR) {
					t.Errorf("step %d: step %d lr %v, torch step %d lr %v", i, g.Step, g.LR, w.Step, w.LR)
				}
				// ORT computes in float32, torch in float64.
				if math.Abs(g.Loss-w.Loss) > 1e-5*math.Abs(w.Loss) || math.Abs(g.GradNorm-w.GradNorm) > 1e-4*w.GradNorm {
					t.Errorf("step %d: loss %.9g grad_norm %.9g, torch %.9g %.9g", g.Step, g.Loss, g.GradNorm, w.Loss, w.GradNorm)
				}
			}
			tol := 1e-4
			if c.Flags["optimizer"] == "sgd" {
				tol = 1e-5
			}
			m, err := graph.Load(out)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			worst := 0.0
			for n, want := range c.Expected.Final {
				init, _ := m.Graph().Initializer(n)
				if init == nil {
					t.Fatalf("OUT has no %s", n)
				}
				got, err := m.Float64s(init)
				if err != nil {
					t.Fatal(err)
				}
				e := testutil.RelErr(got, want.Data)
				worst = math.Max(worst, e)
				if e > tol {
					t.Errorf("%s: relative error %.3g against torch, want <= %g", n, e, tol)
				}
			}
			t.Logf("%d tensors, worst relative error %.3g (tolerance %g); step-1 loss %.9g vs torch %.9g",
				len(c.Expected.Final), worst, tol, steps[0].Loss, c.Expected.Steps[0].Loss)

			// The trained model, merged, computes what the torch-trained
			// adapters compute.
			if name == "tiny-llama-adamw" || name == "mlp-classifier-sgd" {
				ref := c.injectWith(t, dir, "torch.onnx", c.Expected.Final)
				merged := filepath.Join(dir, "merged.onnx")
				mustRun(t, "merge", out, "-o", merged, "-q")
				mustRun(t, "verify", merged, ref, "-q")
			}
			// The head trained whole leaves as modules_to_save in the PEFT
			// export, and applying that to the base gives the torch result.
			if len(c.Inject.ModulesToSave) > 0 {
				ref := c.injectWith(t, dir, "torch.onnx", c.Expected.Final)
				peft := filepath.Join(dir, "peft")
				mustRun(t, "export-adapter", out, "-o", peft, "-q")
				applied := filepath.Join(dir, "applied.onnx")
				mustRun(t, "merge", model(c.Model), "--adapter", peft, "-o", applied, "-q")
				mustRun(t, "verify", applied, ref, "-q")
			}
		})
	}
}

// TestTrainStopAndResume stops a run after step 2 through its context, and
// checks OUT and the checkpoint are written and that --resume finishes with
// exactly the values of an uninterrupted run.
func TestTrainStopAndResume(t *testing.T) {
	orttest.Require(t)
	c := loadTrainCase(t, "tiny-gpt2-sgd")
	dir := t.TempDir()
	start := c.injectWith(t, dir, "start.onnx", c.Initial)
	data := filepath.Join(trainRefDir, c.Data)
	full := filepath.Join(dir, "full.onnx")
	mustRun(t, append([]string{"train", start, "--data", data, "-o", full, "-q"}, c.args()...)...)

	out := filepath.Join(dir, "out.onnx")
	ios, _, stdout, stderr := TestIO()
	f := NewFactory(ios)
	ctx, cancel := context.WithCancel(context.Background())
	cmd := NewCmdTrain(f, func(o *TrainOptions) error {
		o.ctx = ctx
		return runTrain(o)
	})
	cmd.SetArgs(append([]string{start, "--data", data, "-o", out, "--json"}, c.args()...))
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	// Cancel as soon as the second step's record is printed.
	ios.Out = &cancelAfter{w: stdout, n: 2, cancel: cancel}
	err := cmd.Execute()
	if err == nil || !strings.Contains(err.Error(), "interrupted after step 2") {
		t.Fatalf("stopped run: %v", err)
	}
	if _, err := os.Stat(out); err != nil {
		t.Fatalf("no OUT after a stop: %v", err)
	}
	if _, err := os.Stat(out + ".ckpt"); err != nil {
		t.Fatalf("no checkpoint after a stop: %v", err)
	}
	r := mustRun(t, append([]string{"train", start, "--data", data, "-o", out, "--resume", "--json", "-q"}, c.args()...)...)
	steps, _ := readRecords(t, r.stdout)
	if len(steps) != len(c.Expected.Steps)-2 || steps[0].Step != 3 {
		t.Fatalf("resumed run printed %d steps starting at %v", len(steps), steps)
	}
	a, _ := graph.Load(full)
	b, _ := graph.Load(out)
	defer a.Close()
	defer b.Close()
	for n := range c.Expected.Final {
		ta, _ := a.Graph().Initializer(n)
		tb, _ := b.Graph().Initializer(n)
		va, _ := a.Float64s(ta)
		vb, _ := b.Float64s(tb)
		for i := range va {
			if va[i] != vb[i] {
				t.Fatalf("%s[%d]: resumed %v, uninterrupted %v", n, i, vb[i], va[i])
			}
		}
	}
	// A resume with other settings is refused.
	r = run(t, append(append([]string{"train", start, "--data", data, "-o", out, "--resume"}, c.args()...), "--batch-size=3")...)
	if r.code != 1 || !strings.Contains(r.stderr, "batch_size") {
		t.Errorf("resume with another batch size: exit %d %q", r.code, r.stderr)
	}
}

// cancelAfter cancels a context once n lines have been written.
type cancelAfter struct {
	w      interface{ Write([]byte) (int, error) }
	n      int
	cancel context.CancelFunc
}

func (c *cancelAfter) Write(p []byte) (int, error) {
	c.n -= strings.Count(string(p), "\n")
	if c.n <= 0 {
		c.cancel()
	}
	return c.w.Write(p)
}

func TestTrainBadInput(t *testing.T) {
	orttest.Require(t)
	c := loadTrainCase(t, "tiny-llama-adamw")
	clf := loadTrainCase(t, "mlp-classifier-adamw")
	dir := t.TempDir()
	llama := c.injectWith(t, filepath.Join(dir), "llama.onnx", c.Initial)
	clfDir := filepath.Join(dir, "clf")
	os.Mkdir(clfDir, 0o755)
	mlp := clf.injectWith(t, clfDir, "mlp.onnx", clf.Initial)
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name  string
		model string
		data  string
		extra []string
		want  string
	}{
		{"not json", llama, write("a.jsonl", "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 2]\n"), nil, "a.jsonl:2: not a JSON object"},
		{"empty file", llama, write("b.jsonl", ""), nil, "no examples"},
		{"id outside embedding", llama, write("c.jsonl", "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 64]}\n"), nil, "c.jsonl:2: \"input_ids\"[1] = 64: token id outside [0, 64)"},
		{"row lacks input", mlp, write("d.jsonl", "{\"labels\": 1}\n"), []string{"--loss", "cross-entropy"}, "d.jsonl:1: the row lacks \"x\""},
		{"mismatched shape", mlp, write("e.jsonl", "{\"x\": [1, 2, 3], \"labels\": 1}\n"), []string{"--loss", "cross-entropy"}, "e.jsonl:1: \"x\" has shape [3] per row"},
		{"label outside classes", mlp, write("f.jsonl", "{\"x\": [0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0], \"labels\": 5}\n"), []string{"--loss", "cross-entropy"}, "label outside [0, 5)"},
		{"no adapters", model("tiny-llama.onnx"), write("g.jsonl", "{\"input_ids\": [1, 2]}\n"), nil, "no adapters to train"},
		{"missing data", llama, filepath.Join(dir, "none.jsonl"), nil, "none.jsonl"},
		{"no cuda here", llama, write("i.jsonl", "{\"input_ids\": [1, 2]}\n"), []string{"--device", "cuda"}, "CUDA"},
		{"pad id outside", llama, write("h.jsonl", "{\"input_ids\": [1, 2]}\n"), []string{"--pad-id", "64"}, "pad id 64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, "out-"+strings.ReplaceAll(tc.name, " ", "-")+".onnx")
			args := append([]string{"train", tc.model, "--data", tc.data, "-o", out, "--steps", "1"}, tc.extra...)
			r := run(t, args...)
			if r.code != 1 || !strings.Contains(r.stderr, tc.want) || strings.Count(r.stderr, "\n") != 1 || strings.Contains(r.stderr, "panic") {
				t.Errorf("exit %d, stderr %q; want exit 1 and one line with %q", r.code, r.stderr, tc.want)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("OUT written after an error")
			}
		})
	}
}

// TestTrainFineTuneLearns runs the shipped fine-tune (tiny-llama, LoRA on
// every projection, 96 AdamW steps on a bigram corpus) from the torch run's
// starting values and checks that the eval loss falls as far as torch's
// float64 loop takes it, eval by eval.
func TestTrainFineTuneLearns(t *testing.T) {
	orttest.Require(t)
	const dataDir = "../../testdata/data"
	b, err := os.ReadFile(filepath.Join(dataDir, "lm-finetune-torch.json"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		trainCase
		EvalData  string `json:"eval_data"`
		EvalEvery int    `json:"eval_every"`
		Expected  struct {
			Before float64        `json:"eval_loss_before"`
			After  float64        `json:"eval_loss_after"`
			Eval   []train.Record `json:"eval"`
			Steps  []train.Record `json:"steps"`
		} `json:"expected"`
	}
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	start := c.injectWith(t, dir, "start.onnx", c.Initial)
	out := filepath.Join(dir, "out.onnx")
	plot := filepath.Join(dir, "loss.svg")
	args := append([]string{"train", start, "--data", filepath.Join(dataDir, c.Data), "--eval-data", filepath.Join(dataDir, c.EvalData),
		"--eval-every", fmt.Sprint(c.EvalEvery), "-o", out, "--json", "--plot", plot}, c.args()...)
	r := mustRun(t, args...)
	steps, evals := readRecords(t, r.stdout)
	if len(steps) != len(c.Expected.Steps) || len(evals) != len(c.Expected.Eval) {
		t.Fatalf("%d steps and %d evals, want %d and %d", len(steps), len(evals), len(c.Expected.Steps), len(c.Expected.Eval))
	}
	for i, w := range c.Expected.Eval {
		g := evals[i]
		t.Logf("step %3d: eval loss %.6f, torch %.6f", g.Step, g.EvalLoss, w.EvalLoss)
		if g.Step != w.Step || math.Abs(g.EvalLoss-w.EvalLoss) > 1e-4*w.EvalLoss {
			t.Errorf("eval at step %d: %.6f, torch at step %d: %.6f", g.Step, g.EvalLoss, w.Step, w.EvalLoss)
		}
		if math.Abs(g.EvalPerplexity-math.Exp(g.EvalLoss)) > 1e-9*g.EvalPerplexity {
			t.Errorf("perplexity %v is not exp(eval loss %v)", g.EvalPerplexity, g.EvalLoss)
		}
	}
	if last := evals[len(evals)-1].EvalLoss; !(last < evals[0].EvalLoss-1.5) {
		t.Errorf("eval loss went from %.4f to %.4f; it should fall clearly", evals[0].EvalLoss, last)
	}
	if !strings.Contains(r.stderr, "eval loss") || !strings.Contains(r.stderr, "wrote "+out) {
		t.Errorf("summary: %q", r.stderr)
	}
	svg, err := os.ReadFile(plot)
	if err != nil || !strings.Contains(string(svg), "<svg") || !strings.Contains(string(svg), "eval loss") {
		t.Errorf("--plot wrote no SVG with the eval curve (%v)", err)
	}
}

// TestTrainFirstStepMatchesGradCases feeds each batch of testdata/grad as
// JSONL rows (padded rows cut to their length, without attention_mask and
// position_ids, so train must pad and fill them back) and checks the step-1
// loss and gradient norm of --json against torch autograd's, for all three
// losses.
func TestTrainFirstStepMatchesGradCases(t *testing.T) {
	orttest.Require(t)
	for _, name := range []string{"tiny-llama-causal-lm-pad", "tiny-llama-qv", "tiny-gpt-causal-lm",
		"tiny-gpt2-opset14-causal-lm", "mlp-classifier-cross-entropy", "mlp-classifier-mse", "mlp-gemm-transb-mse"} {
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("../../testdata/grad", name+".json"))
			if err != nil {
				t.Fatal(err)
			}
			var g struct {
				Model    string                     `json:"model"`
				Inject   *caseInject                `json:"inject"`
				Loss     string                     `json:"loss"`
				Inputs   map[string]trainCaseTensor `json:"inputs"`
				Params   map[string]trainCaseTensor `json:"params"`
				Expected struct {
					Loss  float64                    `json:"loss"`
					Grads map[string]trainCaseTensor `json:"grads"`
				} `json:"expected"`
			}
			if err := json.Unmarshal(b, &g); err != nil {
				t.Fatal(err)
			}
			c := &trainCase{Model: g.Model, Inject: g.Inject}
			dir := t.TempDir()
			start := c.injectWith(t, dir, "start.onnx", g.Params)

			// One JSONL row per batch row.
			var batch int64
			for _, v := range g.Inputs {
				batch = v.Shape[0]
			}
			mask, padded := g.Inputs["attention_mask"]
			var sb strings.Builder
			for i := int64(0); i < batch; i++ {
				row := map[string]any{}
				length := int64(-1)
				if padded {
					T := mask.Shape[1]
					length = 0
					for _, m := range mask.Data[i*T : (i+1)*T] {
						length += int64(m)
					}
				}
				for k, v := range g.Inputs {
					if padded && (k == "attention_mask" || k == "position_ids") {
						continue
					}
					per := int64(len(v.Data)) / batch
					vals := v.Data[i*per : (i+1)*per]
					switch {
					case len(v.Shape) == 1:
						row[k] = vals[0]
					case len(v.Shape) == 2 && length >= 0:
						row[k] = vals[:length]
					case len(v.Shape) == 2:
						row[k] = vals
					default:
						t.Fatalf("input %s has rank %d", k, len(v.Shape))
					}
				}
				line, _ := json.Marshal(row)
				sb.Write(append(line, '\n'))
			}
			data := filepath.Join(dir, "rows.jsonl")
			if err := os.WriteFile(data, []byte(sb.String()), 0o644); err != nil {
				t.Fatal(err)
			}
			r := mustRun(t, "train", start, "--data", data, "-o", filepath.Join(dir, "out.onnx"), "--steps", "1",
				"--batch-size", fmt.Sprint(batch), "--loss", g.Loss, "--optimizer", "sgd", "--lr", "0",
				"--max-grad-norm", "0", "--shuffle=false", "--json", "-q")
			steps, _ := readRecords(t, r.stdout)
			var sq float64
			for n, gr := range g.Expected.Grads {
				if strings.Contains(n, "lora_") {
					for _, x := range gr.Data {
						sq += x * x
					}
				}
			}
			norm := math.Sqrt(sq)
			if len(steps) != 1 || math.Abs(steps[0].Loss-g.Expected.Loss) > 1e-5*math.Abs(g.Expected.Loss) ||
				math.Abs(steps[0].GradNorm-norm) > 1e-4*norm {
				t.Fatalf("step 1 %+v; torch loss %.9g, adapter grad norm %.9g", steps, g.Expected.Loss, norm)
			}
			t.Logf("loss %.9g (torch %.9g), grad norm %.9g (torch %.9g)", steps[0].Loss, g.Expected.Loss, steps[0].GradNorm, norm)
		})
	}
}

// A model injected with --dropout trains with the adapters' dropout on by
// default (two runs draw different masks, so they differ) and without it
// under --adapter-dropout=false (two runs are identical); eval never drops.
func TestTrainAdapterDropout(t *testing.T) {
	orttest.Require(t)
	dir := t.TempDir()
	lora := filepath.Join(dir, "lora.onnx")
	mustRun(t, "inject", model("tiny-llama.onnx"), "-o", lora, "--target", "q_proj,v_proj", "--rank", "4", "--dropout", "0.3", "--init", "gaussian")
	data := "../../testdata/data/lm-train.jsonl"
	final := func(name string, extra ...string) (float64, float64) {
		out := filepath.Join(dir, name)
		args := append([]string{"train", lora, "--data", data, "--eval-data", data, "--steps", "4", "--batch-size", "4",
			"--lr", "1e-2", "--shuffle=false", "-o", out, "--json"}, extra...)
		steps, evals := readRecords(t, mustRun(t, args...).stdout)
		return steps[len(steps)-1].Loss, evals[0].EvalLoss
	}
	a, evalA := final("a.onnx")
	b, evalB := final("b.onnx")
	if a == b {
		t.Errorf("two runs with dropout gave the same last loss %v: dropout was not applied", a)
	}
	if evalA != evalB {
		t.Errorf("the eval before training differs between runs (%v, %v): eval must not drop", evalA, evalB)
	}
	c, _ := final("c.onnx", "--adapter-dropout=false")
	d, _ := final("d.onnx", "--adapter-dropout=false")
	if c != d {
		t.Errorf("without dropout two runs differ: %v and %v", c, d)
	}
}

// A model injected with --adapter-inputs trains once given --rank: the
// eval loss falls, the trained defaults have that rank, and the trained
// model merges into one that computes the same.
func TestTrainAdapterInputs(t *testing.T) {
	orttest.Require(t)
	dir := t.TempDir()
	lora := filepath.Join(dir, "inputs.onnx")
	mustRun(t, "inject", model("tiny-llama.onnx"), "-o", lora, "--target", "all-linear", "--adapter-inputs")
	data := "../../testdata/data/lm-train.jsonl"
	out := filepath.Join(dir, "trained.onnx")
	args := []string{"train", lora, "--data", data, "--eval-data", "../../testdata/data/lm-eval.jsonl", "--steps", "30",
		"--batch-size", "16", "--lr", "1e-2", "-o", out, "--json"}
	r := run(t, args...)
	if r.code != 1 || !strings.Contains(r.stderr, "--rank") {
		t.Fatalf("without --rank: exit %d, %q; want exit 1 naming --rank", r.code, r.stderr)
	}
	_, evals := readRecords(t, mustRun(t, append(args, "--rank", "4")...).stdout)
	if first, last := evals[0].EvalLoss, evals[len(evals)-1].EvalLoss; !(last < first-0.3) {
		t.Errorf("eval loss %.4f -> %.4f: adapter-input training did not learn", first, last)
	}
	m, err := graph.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a, _ := m.Graph().Initializer("model.layers.0.self_attn.q_proj.lora_A.weight")
	if a == nil || len(a.Dims) != 2 || a.Dims[1] != 4 {
		t.Fatalf("trained lora_A default: %v, want rank 4", a.GetDims())
	}
	merged := filepath.Join(dir, "merged.onnx")
	mustRun(t, "merge", out, "-o", merged)
	mustRun(t, "verify", out, merged, "--rtol", "1e-4", "--atol", "1e-5")
}

// Conv LoRA trains end to end: a 1x1 and a 3x3 Conv adapted, a frozen
// depthwise Conv downstream; the loss on a fixed target falls, and the
// trained model merges into one that computes the same.
func TestTrainConvLoRA(t *testing.T) {
	orttest.Require(t)
	dir := t.TempDir()
	lora := filepath.Join(dir, "conv-lora.onnx")
	mustRun(t, "inject", "../../testdata/variants-b/conv.onnx", "-o", lora, "--target", "pw,body", "--rank", "2", "--alpha", "4", "--init", "gaussian")
	var rows strings.Builder
	for r := 0; r < 4; r++ {
		x := make([][][]float64, 4)
		for c := range x {
			x[c] = make([][]float64, 9)
			for i := range x[c] {
				x[c][i] = make([]float64, 9)
				for j := range x[c][i] {
					x[c][i][j] = math.Sin(float64(r*1000 + c*100 + i*10 + j))
				}
			}
		}
		y := make([][][]float64, 6)
		for c := range y {
			y[c] = make([][]float64, 5)
			for i := range y[c] {
				y[c][i] = make([]float64, 5)
				for j := range y[c][i] {
					y[c][i][j] = 0.5 * math.Cos(float64(c+i+j))
				}
			}
		}
		b, _ := json.Marshal(map[string]any{"x": x, "labels": y})
		rows.Write(append(b, '\n'))
	}
	data := filepath.Join(dir, "conv.jsonl")
	if err := os.WriteFile(data, []byte(rows.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "trained.onnx")
	steps, _ := readRecords(t, mustRun(t, "train", lora, "--data", data, "--loss", "mse", "--batch-size", "2", "--steps", "30",
		"--lr", "2e-2", "--shuffle=false", "-o", out, "--json").stdout)
	if first, last := steps[0].Loss, steps[len(steps)-1].Loss; !(last < 0.9*first) {
		t.Errorf("mse %.4f -> %.4f: Conv LoRA did not learn", first, last)
	}
	merged := filepath.Join(dir, "merged.onnx")
	mustRun(t, "merge", out, "-o", merged)
	mustRun(t, "verify", out, merged, "--rtol", "1e-4", "--atol", "1e-5")
}
