package main

import (
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/autodiff"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/rewrite"
)

// GradOptions holds what `onnxlora grad` was asked to do.
type GradOptions struct {
	IO *IOStreams

	Model    string
	Output   string
	Loss     string
	LossOut  string
	Params   []string
	JSON     bool
	External externalFlag
}

// NewCmdGrad builds `onnxlora grad`.
func NewCmdGrad(f *Factory, runF func(*GradOptions) error) *cobra.Command {
	opts := &GradOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "grad MODEL -o STEP.onnx [--loss causal-lm|cross-entropy|mse] [--model-output NAME] [--params PATTERN...]",
		Short: "Write a training-step graph: the loss and its gradients, in plain ONNX",
		Long: `Differentiate MODEL: append a loss on one of its outputs and the reverse-mode
gradient of that loss with respect to the trainable initializers, written with
standard ONNX ops only, so the step graph runs on any inference build of ONNX
Runtime (any provider, any language binding).

The step graph's inputs are the model's inputs, "labels" and every trainable
tensor (an input whose default is the initializer, so a runner feeds new
values each step); its outputs are "loss" and "<param>_grad" for each
trainable tensor, the names ONNX Runtime training uses.

Losses (labels are the input "labels"):
  causal-lm      logits[:, :-1] predict labels[:, 1:] (int64 [batch, sequence]),
                 labels -100 are skipped, mean over counted tokens
  cross-entropy  class labels, int64 [batch] for [batch, C] outputs or
                 [batch, sequence] for [batch, sequence, C]; -100 skipped
  mse            mean squared error against labels of the output's shape

The trainable tensors are the manifest's "trainable" list (every lora_A and
lora_B of an injected model) plus the initializers --params names (exact
names or regular expressions matching a whole name), e.g. a LayerNorm weight,
or every weight of a small model for a full fine-tune.`,
		Example: `  onnxlora grad lora.onnx -o step.onnx
  onnxlora grad classifier-lora.onnx -o step.onnx --loss cross-entropy
  onnxlora grad lora.onnx -o step.onnx --params model.norm.weight
  onnxlora grad mlp.onnx -o step.onnx --loss mse --params '.*\.weight'`,
		Args:              exactArgs(1, "one MODEL"),
		ValidArgsFunction: onnxFileCompletion,
		RunE:              runE(opts, &opts.Model, opts.validate, runF, runGrad),
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "file to write the step graph to")
	fl.StringVar(&opts.Loss, "loss", "causal-lm", "loss: causal-lm, cross-entropy or mse")
	fl.StringVar(&opts.LossOut, "model-output", "", `model output the loss reads (default: the only float output, else "logits")`)
	fl.StringArrayVar(&opts.Params, "params", nil, "more initializers to train: a name or a regular expression matching whole names (repeatable)")
	fl.BoolVar(&opts.JSON, "json", false, "print the step graph's trainable tensors and names as JSON on stdout")
	registerExternalFlag(cmd, &opts.External)
	_ = cmd.RegisterFlagCompletionFunc("loss", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return autodiff.LossNames(), cobra.ShellCompDirectiveNoFileComp
	})
	return cmd
}

func isKnownLoss(name string) bool {
	for _, l := range autodiff.LossNames() {
		if l == name {
			return true
		}
	}
	return false
}

// gradResult is what --json prints.
type gradResult struct {
	Model  string         `json:"model"`
	Output string         `json:"output"`
	Step   *autodiff.Step `json:"step"`
}

// validate checks the flags before anything is read.
func (o *GradOptions) validate(*cobra.Command) error {
	if o.Output == "" {
		return usageErrorf("missing -o/--output: where to write the step graph")
	}
	if !isKnownLoss(o.Loss) {
		return usageErrorf("invalid argument %q for --loss: want %s", o.Loss, strings.Join(autodiff.LossNames(), ", "))
	}
	for _, p := range o.Params {
		if _, err := regexp.Compile("^(?:" + p + ")$"); err != nil {
			return usageErrorf("invalid argument %q for --params: %v", p, err)
		}
	}
	return checkPaths(nil, []string{"the model", o.Model}, modelOutputs("-o", o.Output))
}

func runGrad(opts *GradOptions) error {
	ios := opts.IO
	m, err := loadModel(ios, opts.Model)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := checkPaths(m, nil, modelOutputs("-o", opts.Output)); err != nil {
		return err
	}
	params, err := trainableTensors(m, opts.Params)
	if err != nil {
		return err
	}
	if len(params) == 0 {
		return fmt.Errorf("%s has no trainable tensors: inject adapters first (onnxlora inject), or name initializers with --params", opts.Model)
	}
	step, err := autodiff.Build(m, autodiff.Options{Loss: opts.Loss, Output: opts.LossOut, Params: params})
	if err != nil {
		return err
	}
	if err := saveModel(ios, m, opts.Output, graph.SaveOptions{External: opts.External.mode}); err != nil {
		return err
	}
	if opts.JSON {
		return writeJSON(ios.Out, gradResult{Model: opts.Model, Output: opts.Output, Step: step})
	}
	var values int64
	for _, p := range step.Params {
		n, _ := graph.NumElements(p.Dims)
		values += n
	}
	fmt.Fprintf(ios.Out, "%s loss on %q; %d trainable tensors (%d values); outputs %s and <param>%s\n",
		opts.Loss, step.Output, len(step.Params), values, step.Loss, autodiff.GradSuffix)
	ios.Notef("wrote %s (opset %d); feed the model's inputs, %q and the trainable tensors each step", opts.Output, step.Opset, step.Labels)
	return nil
}

// trainableTensors is the manifest's trainable list plus the initializers
// the patterns match, in the model's order; a pattern matching nothing is
// an error, so a typo does not silently train less.
func trainableTensors(m *graph.Model, patterns []string) ([]string, error) {
	man, err := rewrite.ReadManifest(m)
	if err != nil {
		return nil, err
	}
	var names []string
	seen := map[string]bool{}
	if man != nil {
		for _, n := range man.Trainable {
			if !seen[n] {
				seen[n] = true
				names = append(names, n)
			}
		}
	}
	for _, p := range patterns {
		re := regexp.MustCompile("^(?:" + p + ")$") // validated by the command
		matched := false
		for _, t := range m.Proto.GetGraph().GetInitializer() {
			if re.MatchString(t.GetName()) {
				matched = true
				if !seen[t.GetName()] && graph.DataType(t.GetDataType()).IsFloat() {
					seen[t.GetName()] = true
					names = append(names, t.GetName())
				}
			}
		}
		if !matched {
			var all []string
			for _, t := range m.Proto.GetGraph().GetInitializer() {
				if graph.DataType(t.GetDataType()).IsFloat() {
					all = append(all, t.GetName())
				}
			}
			sort.Strings(all)
			if len(all) > 12 {
				all = append(all[:12], "...")
			}
			return nil, fmt.Errorf("--params %q matches no initializer of %s (float initializers: %s)", p, m.Path(), strings.Join(all, ", "))
		}
	}
	return names, nil
}
