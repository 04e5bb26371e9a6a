package main

import (
	"io"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/inspect"
)

// validateSpectra checks --spectra and --plot against the other flags.
func (o *InspectOptions) validateSpectra() error {
	if !o.Spectra && o.Plot == "" {
		return nil
	}
	if o.DOT || o.Layer != "" || o.NoNorms {
		return usageErrorf("--spectra/--plot cannot be combined with --dot, --layer or --no-norms")
	}
	if o.Select.hasTarget() {
		return usageErrorf("--spectra/--plot describe the adapters present; they take no selection")
	}
	if isOnnxAdapterFile(o.Model) {
		return usageErrorf("--spectra/--plot need a model with adapters, not an .onnx_adapter file")
	}
	if o.Plot != "" {
		if err := checkOutput(o.Plot, o.Model); err != nil {
			return usageErrorf("--plot: %v", err)
		}
	}
	return nil
}

// runInspectSpectra prints the singular values of the model's adapters
// and, with --plot, draws them.
func runInspectSpectra(opts *InspectOptions, m *graph.Model) error {
	r, err := inspect.BuildSpectra(m)
	if err != nil {
		return err
	}
	r.Model = opts.Model
	if opts.Plot != "" {
		if err := inspect.WriteSpectraPlot(opts.Plot, r); err != nil {
			return err
		}
		opts.IO.Notef("wrote %s", opts.Plot)
		if !opts.Spectra {
			return nil
		}
	}
	write := func(w io.Writer) error { return inspect.WriteSpectraText(w, r) }
	if opts.JSON {
		write = func(w io.Writer) error { return inspect.WriteSpectraJSON(w, r) }
	}
	return openOutput(opts.IO, opts.Output, write)
}
