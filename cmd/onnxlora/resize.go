package main

import (
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/rewrite"
)

// ResizeOptions holds what `onnxlora resize` was asked to do.
type ResizeOptions struct {
	IO *IOStreams

	Input    string
	Output   string
	Rank     int
	Energy   float64
	Alpha    float64
	Only     []string
	JSON     bool
	External externalFlag

	// peft is true when Input is a PEFT adapter directory.
	peft bool
}

// NewCmdResize builds `onnxlora resize`.
func NewCmdResize(f *Factory, runF func(*ResizeOptions) error) *cobra.Command {
	opts := &ResizeOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "resize MODEL|ADAPTER_DIR (--rank R | --energy E) -o OUT",
		Short: "Change adapters' rank by truncated SVD of scaling*A*B",
		Long: `Refactor every adapter at a new rank: the update ΔW = scaling·A·B is
decomposed by SVD (from QR factors of A and Bᵀ, so the in×out matrix is never
formed), truncated, and split evenly into new A and B. By Eckart–Young this is
the best approximation of that rank; the Frobenius error per layer, sqrt of
the sum of the discarded squared singular values, is printed. Resizing to the
full rank is lossless.

--rank R gives every adapter rank R (an adapter with fewer singular values,
min(r, in, out), keeps them all). --energy E picks per adapter the smallest
rank keeping the fraction E of Σσ² (e.g. 0.99). The scaling stays the same
(alpha becomes scaling·R) unless --alpha sets a new lora_alpha, which the
factors absorb.

MODEL is an injected .onnx model (written to OUT as a model with the resized
adapters; the manifest follows). ADAPTER_DIR is a PEFT adapter directory
(written to the directory OUT, with r, lora_alpha, rank_pattern and
alpha_pattern rebuilt). 'onnxlora inspect MODEL --spectra' shows the
singular values first.`,
		Example: `  onnxlora resize trained.onnx --rank 4 -o trained-r4.onnx
  onnxlora resize trained.onnx --energy 0.99 -o trained-small.onnx --json
  onnxlora resize ./my-adapter --rank 8 --alpha 16 -o ./my-adapter-r8`,
		Args:              exactArgs(1, "one MODEL or ADAPTER_DIR"),
		ValidArgsFunction: onnxFileCompletion,
		RunE:              runE(opts, &opts.Input, opts.validate, runF, runResize),
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "model file (for a MODEL) or directory (for an ADAPTER_DIR) to write")
	fl.IntVar(&opts.Rank, "rank", 0, "new rank of every adapter")
	fl.Float64Var(&opts.Energy, "energy", 0, "keep this fraction of each update's Σσ², in (0, 1]; the rank is chosen per adapter")
	fl.Float64Var(&opts.Alpha, "alpha", 0, "new lora_alpha (default: keep each adapter's scaling)")
	fl.StringSliceVar(&opts.Only, "only", nil, "resize only these modules (module paths); the others are kept")
	fl.BoolVar(&opts.JSON, "json", false, "print the per-layer report as JSON on stdout")
	registerExternalFlag(cmd, &opts.External)
	return cmd
}

func (o *ResizeOptions) validate(cmd *cobra.Command) error {
	if o.Output == "" {
		return usageErrorf("missing -o/--output: where to write the resized model or adapter")
	}
	switch {
	case o.Rank == 0 && !cmd.Flags().Changed("energy"):
		return usageErrorf("give --rank R or --energy E")
	case o.Rank != 0 && cmd.Flags().Changed("energy"):
		return usageErrorf("--rank and --energy cannot be combined")
	case o.Rank < 0:
		return usageErrorf("invalid argument %d for --rank: want a positive rank", o.Rank)
	case cmd.Flags().Changed("energy") && !(o.Energy > 0 && o.Energy <= 1):
		return usageErrorf("invalid argument %v for --energy: want a fraction in (0, 1]", o.Energy)
	case math.IsNaN(o.Alpha) || math.IsInf(o.Alpha, 0):
		return usageErrorf("invalid argument %v for --alpha", o.Alpha)
	}
	for i, m := range o.Only {
		o.Only[i] = strings.TrimSpace(m)
	}
	if st, err := os.Stat(o.Input); err == nil && st.IsDir() {
		if _, err := os.Stat(filepath.Join(o.Input, export.PEFTConfigFile)); err != nil {
			return usageErrorf("%s is a directory without %s: give an .onnx model or a PEFT adapter directory", o.Input, export.PEFTConfigFile)
		}
		o.peft = true
		if st, err := os.Stat(o.Output); err == nil && !st.IsDir() {
			return usageErrorf("output %s exists and is not a directory (a PEFT adapter is written as a directory)", o.Output)
		}
		if cmd.Flags().Changed("external") {
			return usageErrorf("--external is for models; a PEFT adapter has no external data")
		}
		return nil
	}
	return checkOutput(o.Output, o.Input)
}

func runResize(opts *ResizeOptions) error {
	ios := opts.IO
	ro := rewrite.ResizeOptions{Rank: opts.Rank, Energy: opts.Energy, Alpha: opts.Alpha, Only: opts.Only}
	var rep *rewrite.ResizeReport
	var err error
	if opts.peft {
		if err := os.MkdirAll(opts.Output, 0o755); err != nil {
			return err
		}
		rep, err = rewrite.ResizePEFT(opts.Input, opts.Output, ro)
		if err != nil {
			return err
		}
	} else {
		m, err := loadModel(ios, opts.Input)
		if err != nil {
			return err
		}
		defer m.Close()
		if rep, err = rewrite.Resize(m, ro); err != nil {
			return err
		}
		if err := saveModel(ios, m, opts.Output, graph.SaveOptions{External: opts.External.mode}); err != nil {
			return err
		}
	}
	if opts.JSON {
		return writeJSON(ios.Out, rep)
	}
	writeResizeTable(ios.Out, rep)
	ios.Notef("wrote %s with %d adapter(s) resized", opts.Output, len(rep.Layers))
	return nil
}

// writeResizeTable lists each adapter's old and new rank and the error.
func writeResizeTable(w io.Writer, rep *rewrite.ResizeReport) {
	fmt.Fprintf(w, "Resized %d adapter(s) (from %s):\n", len(rep.Layers), rep.Source)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  MODULE\tRANK\tALPHA\t‖ΔW‖_F\tERROR ‖ΔW−ΔW_R‖_F\tRELATIVE\tENERGY KEPT")
	for _, l := range rep.Layers {
		fmt.Fprintf(tw, "  %s\t%d -> %d\t%g -> %.6g\t%.4g\t%.4g\t%.3g\t%.6f\n", l.Module, l.OldRank, l.NewRank, l.OldAlpha, l.NewAlpha, l.Norm, l.Error, l.RelError, l.Energy)
	}
	tw.Flush()
}
