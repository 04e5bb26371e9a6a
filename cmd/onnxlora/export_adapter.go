package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/rewrite"
)

// ExportAdapterOptions holds what `onnxlora export-adapter` was asked to do.
type ExportAdapterOptions struct {
	IO *IOStreams

	Model     string
	Output    string
	BaseModel string
	TaskType  string
	Only      []string
	JSON      bool
	// Initial is --initial: the step-0 model (or PEFT directory) of
	// PiSSA/OLoRA adapters, to export them as a plain LoRA.
	Initial string
	// Format is --format: peft or onnx-adapter; by default chosen by the
	// output's extension.
	Format string
	// Force replaces an existing PEFT directory; Prefix is the key prefix.
	Force  bool
	Prefix string
}

// NewCmdExportAdapter builds `onnxlora export-adapter`.
func NewCmdExportAdapter(f *Factory, runF func(*ExportAdapterOptions) error) *cobra.Command {
	opts := &ExportAdapterOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "export-adapter MODEL -o DIR|FILE.onnx_adapter",
		Short: "Write an injected model's adapters as a PEFT directory or an .onnx_adapter file",
		Long: `Write the LoRA adapters of an injected (and trained) model as a PEFT adapter
directory: adapter_config.json and adapter_model.safetensors, with keys
base_model.model.<module>.lora_A.weight ([r, in]) and .lora_B.weight ([out, r]),
so adapters trained in ONNX load with PEFT's PeftModel.from_pretrained.
Ranks and alphas that differ between modules become rank_pattern and
alpha_pattern entries.

Exporting and then 'onnxlora merge BASE --adapter DIR' gives the same model as
'onnxlora merge MODEL'. The module paths are the ONNX export's; if they lack a
prefix the PyTorch model has, PEFT's loader may need the keys renamed.

With -o X.onnx_adapter (or --format onnx-adapter) the adapters are written as
an ONNX Runtime adapter file instead: <module>.lora_A.weight = A [in, r] and
<module>.lora_B.weight = scaling·B [r, out], in the factors' type, which ONNX
Runtime feeds to a model made by 'inject --adapter-inputs' (docs/serving.md).
MODEL may be in either mode; an adapter-input model must have trained
(non-empty) defaults.`,
		Example: `  onnxlora export-adapter lora-trained.onnx -o my-adapter
  onnxlora export-adapter lora-trained.onnx -o customer-a.onnx_adapter
  onnxlora export-adapter lora-trained.onnx -o my-adapter --base-model meta-llama/Llama-3.2-1B --task-type CAUSAL_LM`,
		Args:              exactArgs(1, "one MODEL"),
		ValidArgsFunction: onnxFileCompletion,
		RunE:              runE(opts, &opts.Model, opts.validate, runF, runExport),
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "directory to write adapter_config.json and adapter_model.safetensors to")
	fl.StringVar(&opts.BaseModel, "base-model", "", "base_model_name_or_path to record, e.g. a HuggingFace model id")
	fl.StringVar(&opts.TaskType, "task-type", "", "task_type to record, e.g. CAUSAL_LM")
	fl.StringSliceVar(&opts.Only, "only", nil, "export only these modules (module paths)")
	fl.BoolVar(&opts.JSON, "json", false, "print the exported modules as JSON on stdout")
	fl.BoolVar(&opts.Force, "force", false, "replace an existing adapter directory (refused otherwise, so a trained export is not lost)")
	fl.StringVar(&opts.Prefix, "prefix", export.PEFTKeyPrefix, `key prefix before each module path ("" for bare module paths)`)
	fl.StringVar(&opts.Initial, "initial", "", "PiSSA/OLoRA adapters: the model as injected at step 0 (or its PEFT directory), to write a plain LoRA for the original weights (r and alpha doubled)")
	fl.StringVar(&opts.Format, "format", "", "peft (a directory) or onnx-adapter (an ONNX Runtime .onnx_adapter file); default by the output's extension")
	_ = cmd.MarkFlagDirname("output")
	return cmd
}

// validate checks the flags before anything is read and settles the
// output format.
func (o *ExportAdapterOptions) validate(*cobra.Command) error {
	if o.Output == "" {
		return usageErrorf("missing -o/--output: the directory to write the adapter to")
	}
	format, err := adapterFormat(o.Format, o.Output)
	if err != nil {
		return err
	}
	if o.Format = format; format == formatOnnxAdapter {
		return checkOutput(o.Output, o.Model)
	}
	if st, err := os.Stat(o.Output); err == nil && !st.IsDir() {
		return usageErrorf("output %s exists and is not a directory", o.Output)
	}
	return checkPaths(nil, []string{"the model", o.Model}, peftFiles("-o", o.Output))
}

// runExport writes the format validate settled on.
func runExport(opts *ExportAdapterOptions) error {
	if opts.Format == formatOnnxAdapter {
		return runExportOnnxAdapter(opts)
	}
	return runExportAdapter(opts)
}

func runExportAdapter(opts *ExportAdapterOptions) error {
	ios := opts.IO
	m, err := loadModel(ios, opts.Model)
	if err != nil {
		return err
	}
	defer m.Close()
	// The folder is made by the writer, only once everything is ready.
	if err := checkPaths(m, nil, peftFiles("-o", opts.Output)); err != nil {
		return err
	}
	if entries, err := os.ReadDir(opts.Output); err == nil && len(entries) > 0 && !opts.Force {
		return fmt.Errorf("%s already exists and is not empty; add --force to replace it", opts.Output)
	}
	if done, err := exportConverted(opts, m); done || err != nil {
		return err
	}
	rep, err := rewrite.ExportPEFT(m, opts.Output, rewrite.ExportOptions{BaseModel: opts.BaseModel, TaskType: opts.TaskType, Only: opts.Only, Prefix: &opts.Prefix})
	if err != nil {
		return err
	}
	switch {
	case rep.Untrained && len(rep.Saved) > 0:
		ios.Warnf("every lora_B is zero: the LoRA adapters are untrained; only the modules_to_save weights can change the model")
	case rep.Untrained:
		ios.Warnf("every lora_B is zero: the adapters are untrained, so the exported adapter changes nothing")
	}
	if opts.JSON {
		return writeJSON(ios.Out, rep)
	}
	if !ios.Quiet {
		fmt.Fprintf(ios.Out, "Exported %d adapter(s) (r=%d, lora_alpha=%g, fan_in_fan_out=%v) to %s:\n", len(rep.Modules), rep.Config.R, rep.Config.LoraAlpha, rep.FanInFanOut, opts.Output)
		for _, mod := range rep.Modules {
			fmt.Fprintf(ios.Out, "  %s\n", mod)
		}
		for _, mod := range rep.Saved {
			fmt.Fprintf(ios.Out, "  %s (modules_to_save: the whole trained weight)\n", mod)
		}
	}
	ios.Notef("wrote %s and %s", export.PEFTConfigFile, export.PEFTWeightsFile)
	return nil
}
