package main

import (
	"fmt"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/rewrite"
)

// exportConverted is export-adapter's handling of adapters injected with
// a base-altering init (pissa, pissa_niter_N, olora): with --initial it
// writes them as a plain LoRA for the original weights and reports done;
// without, it refuses them, since their A and B are a delta on the
// residual weights. Other models pass through (done false, no error).
func exportConverted(opts *ExportAdapterOptions, m *graph.Model) (done bool, err error) {
	if opts.Initial == "" {
		return false, rewrite.CheckPlainExport(m, opts.Only)
	}
	rep, err := rewrite.ExportPEFTConverted(m, opts.Initial, opts.Output, rewrite.ExportOptions{BaseModel: opts.BaseModel, TaskType: opts.TaskType, Only: opts.Only})
	if err != nil {
		return true, err
	}
	if opts.JSON {
		return true, writeJSON(opts.IO.Out, rep)
	}
	fmt.Fprintf(opts.IO.Out, "Exported %d adapter(s) as plain LoRA for the original weights (r=%d, lora_alpha=%g: trained and initial factors side by side) to %s:\n", len(rep.Modules), rep.Config.R, rep.Config.LoraAlpha, opts.Output)
	for _, mod := range rep.Modules {
		fmt.Fprintf(opts.IO.Out, "  %s\n", mod)
	}
	opts.IO.Notef("wrote %s and %s", export.PEFTConfigFile, export.PEFTWeightsFile)
	return true, nil
}
