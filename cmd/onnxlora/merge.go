package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/termsafe"
	"github.com/onnxlora/onnxlora/rewrite"
)

// MergeOptions holds what `onnxlora merge` was asked to do.
type MergeOptions struct {
	IO *IOStreams

	Model        string
	Output       string
	Adapter      string
	Only         []string
	AdapterNames []string
	Maps         []string
	MapFile      string
	Preset       string
	Verbose      bool
	Scale        float64
	Safe         bool
	AllowPartial bool
	JSON         bool
	External     externalFlag
	// Dequantize and Requantize are --dequantize and --requantize.
	Dequantize, Requantize bool
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
adapter directory (adapter_config.json + adapter_model.safetensors). Only what
PEFT itself would load is applied: a key whose module the config's
target_modules / layers_to_transform / exclude_modules do not select is an
error. Each module path (the key after base_model.model.) goes to the layer
with the same path, or one that differs only by leading segments holding no
layer number (model.layers.0.q_proj finds layers.0.q_proj, but
model.layers.1.fc1 never finds a lone fc1); --map FROM=TO, --map-file and the
exporter preset (--preset, chosen from the model's producer: onnxruntime-genai
names self_attn "attn") rename paths first. Linear and Embedding LoRA,
modules_to_save weights and biases, r, lora_alpha, use_rslora, rank_pattern,
alpha_pattern and fan_in_fan_out are honoured; features a plain merge would
get wrong (DoRA, LoRA biases) are refused. 'onnxlora inspect MODEL --adapter
DIR' shows the mapping without writing anything.

With --adapter X.onnx_adapter, an ONNX Runtime adapter (scaling in B) is
merged, W += A·B: into a model made by 'inject --adapter-inputs', whose
adapter inputs must match the file's names, types and shapes (the result is
the plain model ONNX Runtime computes with the adapter active), or into a
plain base, matching modules by dotted suffix.

Weights are streamed tensor by tensor on all cores, so memory stays a small
fraction of the model's size.`,
		Example: `  onnxlora merge lora-trained.onnx -o merged.onnx
  onnxlora merge lora-trained.onnx -o merged.onnx --only model.layers.0.self_attn.q_proj
  onnxlora merge lora-trained.onnx -o half.onnx --scale 0.5 --safe
  onnxlora merge model.onnx --adapter ./my-peft-adapter -o merged.onnx
  onnxlora merge serve.onnx --adapter customer-a.onnx_adapter -o customer-a.onnx`,
		Args:              exactArgs(1, "one MODEL"),
		ValidArgsFunction: onnxFileCompletion,
		RunE:              runE(opts, &opts.Model, opts.validate, runF, runMerge),
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "file to write the merged model to")
	fl.StringVar(&opts.Adapter, "adapter", "", "a PEFT adapter directory or an .onnx_adapter file to apply to MODEL instead of its own adapters")
	fl.StringSliceVar(&opts.Only, "only", nil, "merge only these modules: paths or dotted suffixes as in --target (q_proj is every q_proj; PEFT module paths with --adapter); the others stay live")
	fl.StringSliceVar(&opts.AdapterNames, "adapter-name", nil, "same as --only; the two lists add up")
	fl.StringArrayVar(&opts.Maps, "map", nil, "with --adapter: rename PEFT module paths, `FROM=TO` (a regex; $1 or \\1 for groups), repeatable, applied in order")
	fl.StringVar(&opts.MapFile, "map-file", "", "with --adapter: module map rules from a JSON or YAML file ({FROM: TO} or [{from, to}]), applied before --map")
	fl.StringVar(&opts.Preset, "preset", "auto", "with --adapter: exporter naming preset (auto: by the model's producer; none; "+presetNames()+")")
	fl.BoolVar(&opts.Verbose, "verbose", false, "with --adapter: list every PEFT module that matches no layer")
	fl.Float64Var(&opts.Scale, "scale", 1, "merge at this strength: W += scale * scaling * A·B")
	fl.BoolVar(&opts.Safe, "safe", false, "refuse to write NaN or Inf weights (PEFT's safe_merge)")
	fl.BoolVar(&opts.Dequantize, "dequantize", false, "merge adapters beside quantized weights (MatMulNBits, DequantizeLinear) into float weights")
	fl.BoolVar(&opts.Requantize, "requantize", false, "merge adapters beside quantized weights and quantize W + dW again with the layer's bits and block size; reports the added error")
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
	if err := checkPaths(nil, append([]string{"the model", o.Model}, adapterFiles("the adapter", o.Adapter)...), modelOutputs("-o", o.Output)); err != nil {
		return err
	}
	if o.Scale == 0 || math.IsNaN(o.Scale) || math.IsInf(o.Scale, 0) {
		return usageErrorf("invalid argument %v for --scale: want a finite, non-zero number", o.Scale)
	}
	if o.Dequantize && o.Requantize {
		return usageErrorf("--dequantize and --requantize exclude each other")
	}
	if o.AllowPartial && o.Adapter == "" {
		return usageErrorf("--allow-partial goes with --adapter")
	}
	for _, name := range []string{"only", "adapter-name"} {
		// pflag reads --only "" as an empty list, which would mean "all".
		if f := cmd.Flags().Lookup(name); f != nil && f.Changed && f.Value.String() == "[]" {
			return usageErrorf("empty module name in --%s: name the modules to merge, or leave the flag out to merge all", name)
		}
	}
	for _, list := range [][]string{o.Only, o.AdapterNames} {
		for i, m := range list {
			if list[i] = strings.TrimSpace(m); list[i] == "" {
				return usageErrorf("empty module name in --only/--adapter-name: name the modules to merge, or leave the flag out to merge all")
			}
		}
	}
	if o.Adapter == "" && (len(o.Maps) > 0 || o.MapFile != "" || cmd.Flags().Changed("preset")) {
		return usageErrorf("--map, --map-file and --preset go with --adapter")
	}
	return nil
}

// presetNames lists the module map presets for help text.
func presetNames() string {
	var names []string
	for _, p := range rewrite.MapPresets {
		names = append(names, p.Name)
	}
	return strings.Join(names, ", ")
}

// mapRules reads --map-file and --map, in that order.
func (o *MergeOptions) mapRules() ([]rewrite.MapRule, error) {
	var rules []rewrite.MapRule
	if o.MapFile != "" {
		r, err := rewrite.ReadMapFile(o.MapFile)
		if err != nil {
			return nil, err
		}
		rules = append(rules, r...)
	}
	r, err := rewrite.ParseMapRules(o.Maps)
	if err != nil {
		return nil, usageErrorf("invalid --map: %v", err)
	}
	return append(rules, r...), nil
}

// unmatchedError turns ApplyPEFT's unmatched-module error into one line
// naming the flags that fix it (the list goes to stderr with --verbose).
func (o *MergeOptions) unmatchedError(ue *rewrite.UnmatchedError) error {
	if o.Verbose {
		fmt.Fprintf(o.IO.ErrOut, "PEFT modules that match no layer:\n%s", ue.Details())
		return fmt.Errorf("%s; rename them with --map FROM=TO (or --map-file), or add --allow-partial to apply the rest", ue.Error())
	}
	return fmt.Errorf("%s; rename them with --map FROM=TO (or --map-file), or add --allow-partial to apply the rest (--verbose lists them all)", ue.Error())
}

func runMerge(opts *MergeOptions) error {
	ios := opts.IO
	only := append(append([]string(nil), opts.Only...), opts.AdapterNames...)
	mo := rewrite.MergeOptions{Only: only, Scale: opts.Scale, Safe: opts.Safe, AllowPartial: opts.AllowPartial, Preset: opts.Preset}
	switch {
	case opts.Dequantize:
		mo.Quantized = rewrite.QuantDequantize
	case opts.Requantize:
		mo.Quantized = rewrite.QuantRequantize
	}
	if opts.Adapter != "" {
		rules, err := opts.mapRules()
		if err != nil {
			return err
		}
		mo.Map = rules
	}
	save := graph.SaveOptions{External: opts.External.mode}
	stop := ios.StartProgress("merging " + opts.Model)
	var rep *rewrite.MergeReport
	var err error
	if opts.Adapter != "" && isAdapterFile(opts.Adapter) {
		rep, err = rewrite.ApplyOnnxAdapterFile(opts.Model, opts.Adapter, opts.Output, mo, save)
	} else if opts.Adapter != "" {
		rep, err = rewrite.ApplyPEFTFile(opts.Model, opts.Adapter, opts.Output, mo, save)
	} else {
		rep, err = rewrite.MergeFile(opts.Model, opts.Output, mo, save)
	}
	stop()
	var ue *rewrite.UnmatchedError
	if errors.As(err, &ue) {
		return opts.unmatchedError(ue)
	}
	if err != nil {
		return err
	}
	warnNonFinite(ios, rep)
	if opts.JSON {
		return writeJSON(ios.Out, rep)
	}
	if !ios.Quiet {
		writeMergeTable(ios.Out, rep)
	}
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
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%d\t%.6g\t%.3g\t%d/%d\n", termsafe.Quote(module), termsafe.Quote(weight), formatDims(l.Shape), l.DType, l.Rank, l.Factor, l.MaxDelta, l.Changed, l.Elements)
	}
	tw.Flush()
}
