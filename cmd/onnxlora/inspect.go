package main

import (
	"io"
	"regexp"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/inspect"
	"github.com/onnxlora/onnxlora/internal/termsafe"
	"github.com/onnxlora/onnxlora/rewrite"
)

// InspectOptions holds what `onnxlora inspect` was asked to show.
type InspectOptions struct {
	IO *IOStreams

	Model   string
	Output  string
	JSON    bool
	DOT     bool
	Layer   string
	NoNorms bool
	Spectra bool
	Plot    string
	Select  selectFlags
	Adapter adapterDirFlags

	// selection is the validated selection, nil when no target was given.
	selection *rewrite.SelectOptions
	layerRE   *regexp.Regexp
}

// NewCmdInspect builds `onnxlora inspect`.
func NewCmdInspect(f *Factory, runF func(*InspectOptions) error) *cobra.Command {
	opts := &InspectOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "inspect MODEL [--target NAMES] [--json | --dot [--layer REGEX]]",
		Short: "Show the layers that can take an adapter, and the adapters present",
		Long: `Describe a model for LoRA:

  - its header: producer, IR version, opsets, file size, external data files;
  - every adaptable layer (MatMul or Gemm with a constant 2-D float weight):
    module path, op, node, weight, shape [in,out], dtype, params, and whether
    the weight is shared with other nodes;
  - with --target/--target-regex (and --exclude, --layers, --rank, ...): which
    layers inject would adapt with the same flags, and PEFT's trainable line;
  - the adapters already in the model (from its onnxlora.adapters manifest)
    with rank, alpha, scaling and the Frobenius norm of scaling*A*B, which is 0
    until the adapter is trained;
  - the MatMul-like nodes that cannot take an adapter, and why.

--json prints the same as stable JSON (schema: docs/reference.md). --dot draws
the selected layers and their adapters as a Graphviz graph, one cluster per
layer; --layer narrows it to module paths matching a regex.

Only the protobuf is read, plus the adapters' A and B for their norms
(--no-norms skips that); base weights in external data are never loaded.

Given an ONNX Runtime adapter file (.onnx_adapter), inspect lists its
parameters (shape, dtype, Frobenius norm) and its LoRA modules (rank, in,
out, ‖A·B‖), in text or with --json.`,
		Example: `  onnxlora inspect model.onnx
  onnxlora inspect model.onnx --target q_proj,v_proj --layers 0,1
  onnxlora inspect model.onnx --json | jq '.layers[].module'
  onnxlora inspect lora.onnx --dot --layer 'layers\.0\.' | dot -Tsvg > lora.svg
  onnxlora inspect model.onnx --target all-linear --dot -o plan.dot
  onnxlora inspect my-adapter.onnx_adapter --json`,
		Args:              exactArgs(1, "one MODEL"),
		ValidArgsFunction: onnxFileCompletion,
		RunE:              runE(opts, &opts.Model, opts.validate, runF, runInspect),
	}
	fl := cmd.Flags()
	opts.Select.register(fl, `module names a selection would adapt, e.g. q_proj,v_proj, or "all-linear"`)
	fl.BoolVar(&opts.JSON, "json", false, "print the report as JSON")
	fl.BoolVar(&opts.DOT, "dot", false, "print a Graphviz drawing of the selected layers and their adapters")
	fl.StringVar(&opts.Layer, "layer", "", "with --dot: draw only layers whose module path matches this regex")
	fl.BoolVar(&opts.NoNorms, "no-norms", false, "do not read adapter weights to compute their norms")
	fl.BoolVar(&opts.Spectra, "spectra", false, "print the singular values of every adapter's scaling*A*B instead (with --json: as JSON)")
	fl.StringVar(&opts.Plot, "plot", "", "draw the adapters' singular values (log scale) to this .svg, .png or .pdf file")
	fl.StringVarP(&opts.Output, "output", "o", "", "write the report to this file instead of stdout")
	opts.Adapter.register(fl)
	return cmd
}

func (o *InspectOptions) validate(cmd *cobra.Command) error {
	if err := o.validateSpectra(); err != nil {
		return err
	}
	if o.JSON && o.DOT {
		return usageErrorf("--json and --dot cannot be combined")
	}
	if o.Layer != "" {
		if !o.DOT {
			return usageErrorf("--layer goes with --dot")
		}
		re, err := regexp.Compile(o.Layer)
		if err != nil {
			return usageErrorf("--layer: invalid regex %q: %v", o.Layer, err)
		}
		o.layerRE = re
	}
	if o.Output != "-" {
		if err := checkPaths(nil, []string{"the model", o.Model}, []string{"-o", o.Output}); err != nil {
			return err
		}
	}
	if !o.Select.hasTarget() {
		for _, name := range []string{"exclude", "exclude-regex", "layers", "layers-pattern", "rank", "alpha", "rank-pattern", "alpha-pattern"} {
			if cmd.Flags().Changed(name) {
				return usageErrorf("--%s describes a selection: give --target or --target-regex too", name)
			}
		}
		return nil
	}
	sel, err := o.Select.options()
	if err != nil {
		return err
	}
	o.selection = &sel
	return nil
}

func runInspect(opts *InspectOptions) error {
	if isOnnxAdapterFile(opts.Model) {
		return runInspectAdapterFile(opts)
	}
	m, err := loadModel(opts.IO, opts.Model)
	if err != nil {
		return err
	}
	defer m.Close()
	if opts.Output != "-" {
		if err := checkPaths(m, nil, []string{"-o", opts.Output}); err != nil {
			return err
		}
	}
	if opts.Adapter.Dir != "" {
		return runInspectAdapterDir(opts, m)
	}
	if opts.Spectra || opts.Plot != "" {
		return runInspectSpectra(opts, m)
	}
	r, err := inspect.Build(m, inspect.Options{Select: opts.selection, SkipNorms: opts.NoNorms})
	if err != nil {
		return err
	}
	// Report the path as the user gave it.
	r.Model.Path = opts.Model
	if r.Selection != nil {
		for _, u := range r.Selection.Unmatched {
			opts.IO.Warnf("target %q matches no module of %s", u, opts.Model)
		}
	}
	var write func(io.Writer) error
	switch {
	case opts.JSON:
		write = func(w io.Writer) error { return inspect.WriteJSON(w, r) }
	case opts.DOT:
		// Check before creating any output file.
		if err := inspect.WriteDOT(io.Discard, r, inspect.DOTOptions{Layer: opts.layerRE}); err != nil {
			return err
		}
		write = func(w io.Writer) error { return inspect.WriteDOT(w, r, inspect.DOTOptions{Layer: opts.layerRE}) }
	default:
		termsafe.QuoteAll(r) // names from the file, for a terminal
		write = func(w io.Writer) error { return inspect.WriteText(w, r) }
	}
	return openOutput(opts.IO, opts.Output, write)
}
