package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/train"
)

// TrainOptions holds what `onnxlora train` was asked to do.
type TrainOptions struct {
	IO *IOStreams

	Model       string
	Output      string
	Data        string
	EvalData    string
	Config      train.Config
	Loss        string
	ModelOutput string
	PadID       int64
	Resume      bool
	JSON        bool
	Plot        string
	Device      string
	Dropout     bool
	Rank        int
	External    externalFlag

	// ctx, when set (by tests), replaces the Ctrl-C handling context.
	ctx context.Context
}

// NewCmdTrain builds `onnxlora train`.
func NewCmdTrain(f *Factory, runF func(*TrainOptions) error) *cobra.Command {
	opts := &TrainOptions{IO: f.IO, Config: train.DefaultConfig()}
	cmd := &cobra.Command{
		Use:   "train MODEL --data FILE.jsonl -o OUT [flags]",
		Short: "Fine-tune the adapters of an injected model on ONNX Runtime",
		Long: `Train the tensors an injected model's manifest lists as trainable (every
lora_A and lora_B) on a JSONL dataset, and write MODEL with the trained values
to OUT, ready for merge, export-adapter and verify.

The loop follows PyTorch and transformers' Trainer: AdamW or SGD exactly as
torch.optim, the learning rate lr·λ(k) of get_{constant,linear,cosine}_
schedule_with_warmup at optimizer step k (from 0), global-norm clipping as
torch.nn.utils.clip_grad_norm_, --grad-accum batches per step with the mean of
their gradients. Batch j of an epoch is rows j·B..j·B+B-1 (of a shuffled order
unless --shuffle=false); when the steps outlast the data the next epoch
starts again.

Data: one JSON object a line; keys name graph inputs (nested arrays of
numbers) plus "labels". Sequences of different lengths are right-padded
(input_ids with --pad-id, attention_mask 0, labels -100); missing
attention_mask and position_ids are filled; causal-lm labels default to
input_ids. Losses: causal-lm (next token, HF's shift), cross-entropy, mse.

The step graph (loss and gradients) runs in one ONNX Runtime session; the
trainable values live in the process and are fed each step. Ctrl-C stops after
the current step and writes OUT and a checkpoint (OUT.ckpt); --resume goes on
from it.`,
		Example: `  onnxlora train lora.onnx --data train.jsonl -o trained.onnx --steps 200 --lr 1e-3
  onnxlora train lora.onnx --data train.jsonl --eval-data eval.jsonl --eval-every 50 -o trained.onnx
  onnxlora train lora.onnx --data train.jsonl -o trained.onnx --optimizer sgd --momentum 0.9 --lr-scheduler cosine --warmup-steps 10
  onnxlora train clf-lora.onnx --data rows.jsonl --loss cross-entropy -o trained.onnx --json`,
		Args:              exactArgs(1, "one MODEL"),
		ValidArgsFunction: onnxFileCompletion,
		RunE:              runE(opts, &opts.Model, opts.validate, runF, runTrain),
	}
	c := &opts.Config
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "file to write the trained model to")
	fl.StringVar(&opts.Data, "data", "", "training data, JSONL")
	fl.Int64Var(&c.Steps, "steps", 0, "total optimizer steps (default: from --epochs)")
	fl.Float64Var(&c.Epochs, "epochs", c.Epochs, "epochs over --data when --steps is not given")
	fl.IntVar(&c.BatchSize, "batch-size", c.BatchSize, "rows per batch")
	fl.IntVar(&c.GradAccum, "grad-accum", c.GradAccum, "batches per optimizer step (gradient accumulation)")
	fl.Float64Var(&c.LR, "lr", c.LR, "peak learning rate")
	fl.StringVar(&c.Optimizer, "optimizer", c.Optimizer, "adamw or sgd")
	fl.Float64Var(&c.Beta1, "adam-beta1", c.Beta1, "AdamW beta1")
	fl.Float64Var(&c.Beta2, "adam-beta2", c.Beta2, "AdamW beta2")
	fl.Float64Var(&c.Eps, "adam-epsilon", c.Eps, "AdamW epsilon")
	fl.Float64Var(&c.Momentum, "momentum", c.Momentum, "SGD momentum")
	fl.Float64Var(&c.WeightDecay, "weight-decay", c.WeightDecay, "weight decay (decoupled for AdamW, added to the gradient for SGD)")
	fl.StringVar(&c.Scheduler, "lr-scheduler", c.Scheduler, "constant, linear or cosine")
	fl.Int64Var(&c.Warmup, "warmup-steps", c.Warmup, "linear warmup steps from 0 to --lr")
	fl.Float64Var(&c.MaxGradNorm, "max-grad-norm", c.MaxGradNorm, "clip the global gradient norm to this; 0 turns clipping off")
	fl.StringVar(&opts.Loss, "loss", "causal-lm", "causal-lm, cross-entropy or mse")
	fl.StringVar(&opts.ModelOutput, "model-output", "", "model output the loss reads (default: the only float output, else logits)")
	fl.BoolVar(&c.Shuffle, "shuffle", c.Shuffle, "shuffle the rows each epoch; --shuffle=false keeps file order")
	fl.Uint64Var(&c.Seed, "seed", 42, "seed of the shuffle")
	fl.Int64Var(&opts.PadID, "pad-id", 0, "token id that pads input_ids")
	fl.StringVar(&opts.EvalData, "eval-data", "", "evaluation data, JSONL: eval loss (and perplexity for causal-lm) before, during and after training")
	fl.Int64Var(&c.EvalEvery, "eval-every", 0, "evaluate every N optimizer steps (default: before and after only)")
	fl.Int64Var(&c.SaveEvery, "save-every", 0, "write a checkpoint (OUT.ckpt) every N optimizer steps")
	fl.BoolVar(&opts.Resume, "resume", false, "go on from the checkpoint OUT.ckpt")
	fl.BoolVar(&opts.JSON, "json", false, "print one JSON object per step (and per eval) on stdout")
	fl.StringVar(&opts.Plot, "plot", "", "draw the loss curve to this .svg or .png file")
	fl.StringVar(&opts.Device, "device", "cpu", "cpu, or cuda for ONNX Runtime's CUDA provider")
	fl.IntVar(&opts.Rank, "rank", 0, "for a model injected with --adapter-inputs: start its adapters at this rank (A as inject draws it, B zero)")
	fl.BoolVar(&opts.Dropout, "adapter-dropout", true, "apply the adapters' dropout (inject --dropout) on training steps, as PEFT does; false trains without it, deterministically")
	registerExternalFlag(cmd, &opts.External)
	for flag, values := range map[string][]string{
		"optimizer": {"adamw", "sgd"}, "lr-scheduler": {"constant", "linear", "cosine"},
		"loss": {"causal-lm", "cross-entropy", "mse"}, "device": {"cpu", "cuda"},
	} {
		_ = cmd.RegisterFlagCompletionFunc(flag, cobra.FixedCompletions(values, cobra.ShellCompDirectiveNoFileComp))
	}
	_ = cmd.MarkFlagFilename("data", "jsonl")
	_ = cmd.MarkFlagFilename("eval-data", "jsonl")
	return cmd
}

func (o *TrainOptions) validate(cmd *cobra.Command) error {
	if o.Output == "" {
		return usageErrorf("missing -o/--output: where to write the trained model")
	}
	if o.Data == "" {
		return usageErrorf("missing --data: the training data (JSONL)")
	}
	if o.Rank < 0 {
		return usageErrorf("invalid argument %d for --rank: want a positive rank", o.Rank)
	}
	if err := checkPaths(nil, []string{"the model", o.Model, "--data", o.Data, "--eval-data", o.EvalData},
		append(modelOutputs("-o", o.Output), "the checkpoint", o.checkpointPath(), "--plot", o.Plot)); err != nil {
		return err
	}
	if cmd.Flags().Changed("steps") && cmd.Flags().Changed("epochs") {
		return usageErrorf("--steps and --epochs do not go together")
	}
	if cmd.Flags().Changed("steps") && o.Config.Steps < 1 {
		return usageErrorf("invalid argument %d for --steps: want >= 1", o.Config.Steps)
	}
	if o.Config.EvalEvery > 0 && o.EvalData == "" {
		return usageErrorf("--eval-every needs --eval-data")
	}
	switch o.Loss {
	case "causal-lm", "cross-entropy", "mse":
	default:
		return usageErrorf("invalid argument %q for --loss: want causal-lm, cross-entropy or mse", o.Loss)
	}
	switch o.Device {
	case "cpu", "cuda":
	default:
		return usageErrorf("invalid argument %q for --device: want cpu or cuda", o.Device)
	}
	if o.Plot != "" && !strings.HasSuffix(o.Plot, ".svg") && !strings.HasSuffix(o.Plot, ".png") {
		return usageErrorf("--plot %s: want a .svg or .png file", o.Plot)
	}
	if err := o.Config.Validate(); err != nil {
		return &UsageError{err}
	}
	return nil
}

// checkpointPath is where checkpoints go: beside OUT.
func (o *TrainOptions) checkpointPath() string { return o.Output + ".ckpt" }

// runConfig records the settings a checkpoint must be resumed with.
func (o *TrainOptions) runConfig(total int64) map[string]any {
	c := o.Config
	m := map[string]any{
		"total_steps": total, "batch_size": c.BatchSize, "grad_accum": c.GradAccum, "optimizer": c.Optimizer,
		"lr": c.LR, "lr_scheduler": c.Scheduler, "warmup_steps": c.Warmup, "shuffle": c.Shuffle,
		"seed": c.Seed, "loss": o.Loss, "pad_id": o.PadID,
	}
	// As it reads back from the checkpoint's JSON.
	b, _ := json.Marshal(m)
	var out map[string]any
	_ = json.Unmarshal(b, &out)
	return out
}

func runTrain(opts *TrainOptions) error {
	ios := opts.IO
	data, err := train.LoadJSONL(opts.Data)
	if err != nil {
		return err
	}
	var eval *train.Dataset
	if opts.EvalData != "" {
		if eval, err = train.LoadJSONL(opts.EvalData); err != nil {
			return err
		}
	}
	stop := ios.StartProgress("building the step graph of " + opts.Model)
	model, err := train.OpenModel(opts.Model, train.ModelOptions{Loss: opts.Loss, Output: opts.ModelOutput, Device: opts.Device, Dropout: opts.Dropout, Rank: opts.Rank})
	stop()
	if err != nil {
		return err
	}
	defer model.Close()
	spec, err := model.Spec(opts.PadID)
	if err != nil {
		return fmt.Errorf("--pad-id: %w", err)
	}
	if err := data.Validate(spec); err != nil {
		return err
	}
	if eval != nil {
		if err := eval.Validate(spec); err != nil {
			return err
		}
	}

	tr := &train.Trainer{Config: opts.Config, Stepper: model, Params: model.Params(), Data: data, Eval: eval, Spec: spec}
	total := opts.Config.TotalSteps(len(data.Rows))
	config := opts.runConfig(total)
	if opts.Resume {
		c, err := train.LoadCheckpoint(opts.checkpointPath())
		if err != nil {
			return fmt.Errorf("--resume: %w", err)
		}
		for k, v := range config {
			if fmt.Sprint(c.Config[k]) != fmt.Sprint(v) {
				return fmt.Errorf("--resume: the checkpoint was made with %s = %v, this run has %v", k, c.Config[k], v)
			}
		}
		if err := tr.Resume(c); err != nil {
			return fmt.Errorf("--resume: %w", err)
		}
		ios.Notef("resuming at step %d of %d", c.Step, total)
	}
	save := func(c *train.Checkpoint) error {
		c.Config = config
		return train.SaveCheckpoint(opts.checkpointPath(), c)
	}
	tr.OnCheckpoint = save

	var bar *progressbar.ProgressBar
	if ios.ErrTTY && !ios.Quiet {
		bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(ios.ErrOut),
			progressbar.OptionSetDescription("training"),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString("step"),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
	}
	var firstLoss, firstEval = math.NaN(), math.NaN()
	var jsonErr error
	tr.OnRecord = func(r train.Record) {
		if opts.JSON && jsonErr == nil {
			b, err := json.Marshal(r)
			if err == nil {
				_, err = ios.Out.Write(append(b, '\n'))
			}
			jsonErr = err
		}
		if r.Eval && math.IsNaN(firstEval) {
			firstEval = r.EvalLoss
		} else if !r.Eval && math.IsNaN(firstLoss) {
			firstLoss = r.Loss
		}
		if bar != nil {
			if r.Eval {
				bar.Describe(fmt.Sprintf("eval loss %.4f", r.EvalLoss))
			} else {
				bar.Describe(fmt.Sprintf("loss %.4f lr %.3g", r.Loss, r.LR))
				_ = bar.Set64(r.Step)
			}
		}
	}

	ctx := opts.ctx
	if ctx == nil {
		var cancel context.CancelFunc
		ctx, cancel = signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer cancel()
		go func() {
			// After the first signal the default handling comes back, so
			// a second Ctrl-C kills at once (OUT is written atomically).
			<-ctx.Done()
			cancel()
		}()
	}
	res, err := tr.Run(ctx)
	if bar != nil {
		_ = bar.Finish()
	}
	if err != nil {
		return err
	}
	if jsonErr != nil {
		return jsonErr
	}
	saveOpts := graph.SaveOptions{External: opts.External.mode}
	stop = ios.StartProgress("writing " + opts.Output)
	err = model.Save(opts.Output, model.Params(), saveOpts)
	stop()
	if err != nil {
		return err
	}
	if res.Stopped || opts.Config.SaveEvery > 0 {
		if err := save(tr.Checkpoint()); err != nil {
			return err
		}
	}
	if opts.Plot != "" {
		if err := writePlot(opts.Plot, res.History); err != nil {
			return err
		}
	}
	if res.Stopped {
		return fmt.Errorf("interrupted after step %d of %d: wrote %s and %s; run again with --resume to go on", res.Steps, res.Total, opts.Output, opts.checkpointPath())
	}
	msg := fmt.Sprintf("trained %d step(s): loss %.4f -> %.4f", res.Steps, firstLoss, res.Last.Loss)
	if !math.IsNaN(res.EvalLoss) {
		msg += fmt.Sprintf("; eval loss %.4f -> %.4f", firstEval, res.EvalLoss)
	}
	ios.Notef("%s; wrote %s", msg, opts.Output)
	return nil
}
