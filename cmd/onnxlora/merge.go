package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/rewrite"
)

// MergeOptions holds what `onnxlora merge` was asked to do.
type MergeOptions struct {
	IO *IOStreams

	Model        string
	Output       string
	Adapter      string
	Only         []string
	Scale        float64
	Safe         bool
	AllowPartial bool
	JSON         bool
	External     externalFlag
}

// NewCmdMerge builds `onnxlora merge`.
func NewCmdMerge(f *Factory, runF func(*MergeOptions) error) *cobra.Command {
	opts := &MergeOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "merge MODEL -o OUT [--adapter DIR]",
		Short: "Fold adapters into the base weights, or apply a PEFT adapter directory",
		Long: `Fold every LoRA adapter in MODEL into its base weight and remove the branch:

  W[in,out] += scaling * A·B        (W[out,in] += scaling * (A·B)ᵀ for Gemm transB=1
                                     or a weight reached through a Transpose)

The update is computed in float64 and rounded once (to nearest even) to the
weight's type, so fp16 and bf16 weights lose nothing to double rounding. The
result has exactly the base graph's nodes and names, with new weight values;
a weight shared with layers that were not adapted is copied first, so only the
adapted layer changes. Adapters are found from the model's manifest, or, if
its metadata was stripped, by the structure of their branches.

With --adapter DIR, MODEL is the ONNX export of a base model and DIR a PEFT
adapter directory (adapter_config.json + adapter_model.safetensors): each PEFT
module is matched to the ONNX layer whose module path shares its longest
dotted suffix (so base_model.model.model.layers.0.self_attn.q_proj finds
layers.0.self_attn.q_proj), and r, lora_alpha, use_rslora, rank_pattern and
alpha_pattern are honoured. Keys that match no layer or several are reported;
features that cannot be merged exactly (DoRA, LoRA biases) are refused.

Weights are streamed tensor by tensor on all cores, so memory stays a small
fraction of the model's size.`,
		Example: `  onnxlora merge lora-trained.onnx -o merged.onnx
  onnxlora merge lora-trained.onnx -o merged.onnx --only model.layers.0.self_attn.q_proj
  onnxlora merge lora-trained.onnx -o half.onnx --scale 0.5 --safe
  onnxlora merge model.onnx --adapter ./my-peft-adapter -o merged.onnx`,
		Args:              exactArgs(1, "one MODEL"),
		ValidArgsFunction: onnxFileCompletion,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Model = args[0]
			if err := opts.validate(cmd); err != nil {
				return err
			}
			if runF != nil {
				return runF(opts)
			}
			return runMerge(opts)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "file to write the merged model to")
	fl.StringVar(&opts.Adapter, "adapter", "", "a PEFT adapter directory to apply to MODEL instead of its own adapters")
	fl.StringSliceVar(&opts.Only, "only", nil, "merge only these modules (module paths; PEFT module names with --adapter); the others stay live")
	fl.StringSliceVar(&opts.Only, "adapter-name", nil, "same as --only")
	fl.Float64Var(&opts.Scale, "scale", 1, "merge at this strength: W += scale * scaling * A·B")
	fl.BoolVar(&opts.Safe, "safe", false, "refuse to write NaN or Inf weights (PEFT's safe_merge)")
	fl.BoolVar(&opts.AllowPartial, "allow-partial", false, "with --adapter: apply what matches and list the PEFT modules that match no layer")
	fl.BoolVar(&opts.JSON, "json", false, "print the merge report as JSON on stdout")
	registerExternalFlag(cmd, &opts.External)
	_ = cmd.MarkFlagDirname("adapter")
	return cmd
}

func (o *MergeOptions) validate(cmd *cobra.Command) error {
	if o.Output == "" {
		return usageErrorf("missing -o/--output: where to write the merged model")
	}
	if err := checkOutput(o.Output, o.Model); err != nil {
		return err
	}
	if o.Scale == 0 || math.IsNaN(o.Scale) || math.IsInf(o.Scale, 0) {
		return usageErrorf("invalid argument %v for --scale: want a finite, non-zero number", o.Scale)
	}
	if o.AllowPartial && o.Adapter == "" {
		return usageErrorf("--allow-partial goes with --adapter")
	}
	for i, m := range o.Only {
		o.Only[i] = strings.TrimSpace(m)
	}
	return nil
}

func runMerge(opts *MergeOptions) error {
	ios := opts.IO
	mo := rewrite.MergeOptions{Only: opts.Only, Scale: opts.Scale, Safe: opts.Safe, AllowPartial: opts.AllowPartial}
	save := graph.SaveOptions{External: opts.External.mode}
	stop := ios.StartProgress("merging " + opts.Model)
	var rep *rewrite.MergeReport
	var err error
	if opts.Adapter != "" {
		rep, err = rewrite.ApplyPEFTFile(opts.Model, opts.Adapter, opts.Output, mo, save)
	} else {
		rep, err = rewrite.MergeFile(opts.Model, opts.Output, mo, save)
	}
	stop()
	if err != nil {
		return err
	}
	if opts.JSON {
		return writeJSON(ios.Out, rep)
	}
	writeMergeTable(ios.Out, rep)
	for _, m := range rep.Unmatched {
		ios.Warnf("PEFT module %s matches no layer; not applied", m)
	}
	if len(rep.Kept) > 0 {
		ios.Notef("kept %d adapter(s) live: %s", len(rep.Kept), strings.Join(rep.Kept, ", "))
	}
	ios.Notef("wrote %s with %d adapter(s) merged", opts.Output, len(rep.Merged))
	return nil
}

// formatDims writes a shape as [a,b], the way the other tables do.
func formatDims(dims []int64) string {
	parts := make([]string, len(dims))
	for i, d := range dims {
		parts[i] = fmt.Sprint(d)
	}
	return "[" + strings.Join(parts, ",") + "]"
}

// writeMergeTable lists what was merged into which weight.
func writeMergeTable(w io.Writer, rep *rewrite.MergeReport) {
	fmt.Fprintf(w, "Merged %d adapter(s) (from %s):\n", len(rep.Merged), rep.Source)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  MODULE\tWEIGHT\tSHAPE\tDTYPE\tRANK\tFACTOR\tMAX |ΔW|\tCHANGED")
	for _, l := range rep.Merged {
		weight := l.Weight
		if l.Original != "" {
			weight += " (copy of " + l.Original + ")"
		}
		module := l.Module
		if l.PEFTModule != "" && l.PEFTModule != l.Module {
			module += " <- " + l.PEFTModule
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%d\t%.6g\t%.3g\t%d/%d\n", module, weight, formatDims(l.Shape), l.DType, l.Rank, l.Factor, l.MaxDelta, l.Changed, l.Elements)
	}
	tw.Flush()
}
