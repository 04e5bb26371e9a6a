package main

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/rewrite"
)

// Adapter file formats of --format.
const (
	formatPEFT        = "peft"
	formatOnnxAdapter = "onnx-adapter"
)

// adapterFormat resolves --format: given, or by the output's extension
// (.onnx_adapter is an ONNX Runtime adapter, anything else a PEFT
// directory).
func adapterFormat(flag, output string) (string, error) {
	switch strings.ToLower(flag) {
	case "":
		if isOnnxAdapterPath(output) {
			return formatOnnxAdapter, nil
		}
		return formatPEFT, nil
	case formatPEFT:
		return formatPEFT, nil
	case formatOnnxAdapter, "onnx_adapter":
		return formatOnnxAdapter, nil
	}
	return "", usageErrorf("invalid argument %q for --format: want %s or %s", flag, formatPEFT, formatOnnxAdapter)
}

// isOnnxAdapterPath reports whether path names an .onnx_adapter file.
func isOnnxAdapterPath(path string) bool {
	return strings.HasSuffix(strings.ToLower(path), export.OnnxAdapterExt)
}

// isAdapterFile reports whether --adapter names an .onnx_adapter file
// rather than a PEFT directory: by extension, or a regular file.
func isAdapterFile(path string) bool {
	if isOnnxAdapterPath(path) {
		return true
	}
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}

// runExportOnnxAdapter writes the model's adapters as an .onnx_adapter file.
func runExportOnnxAdapter(opts *ExportAdapterOptions) error {
	ios := opts.IO
	if st, err := os.Stat(opts.Output); err == nil && st.IsDir() {
		return fmt.Errorf("output %s is a directory; an .onnx_adapter is a file", opts.Output)
	}
	m, err := loadModel(ios, opts.Model)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := checkPaths(m, nil, []string{"-o", opts.Output}); err != nil {
		return err
	}
	// PiSSA/OLoRA factors are a delta on residual weights, not on the base
	// an adapter-input model is made from.
	if err := rewrite.CheckPlainExport(m, opts.Only); err != nil {
		return err
	}
	a, rep, err := rewrite.ExportOnnxAdapter(m, rewrite.ExportOptions{Only: opts.Only})
	if err != nil {
		return err
	}
	if err := export.WriteOnnxAdapter(opts.Output, a); err != nil {
		return err
	}
	if opts.JSON {
		return writeJSON(ios.Out, rep)
	}
	fmt.Fprintf(ios.Out, "Exported %d adapter(s) as %d parameters to %s:\n", len(rep.Modules), len(a.Params), opts.Output)
	tw := tabwriter.NewWriter(ios.Out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  MODULE\tA\tB")
	for i, mod := range rep.Modules {
		pa, pb := a.Params[2*i], a.Params[2*i+1]
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", mod, formatDims(pa.Dims), formatDims(pb.Dims))
	}
	tw.Flush()
	ios.Notef("serve it with ONNX Runtime on a model made by 'onnxlora inject --adapter-inputs' (docs/serving.md)")
	return nil
}
