package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/verify"
)

// VerifyOptions holds what `onnxlora verify` was asked to do.
type VerifyOptions struct {
	IO *IOStreams

	// A is the reference model, B the one checked against it.
	A, B string

	Inputs  string
	Samples int
	Seed    uint64
	RTol    float64
	ATol    float64
	Dims    []string
	JSON    bool
	// Adapter is --adapter: an .onnx_adapter file active on the first
	// model's runs; the second is then the reference.
	Adapter string

	// rtolSet and atolSet tell a given --rtol/--atol from the per-dtype
	// default; dims is --dim parsed.
	rtolSet, atolSet bool
	dims             map[string]int64
}

// NewCmdVerify builds `onnxlora verify`.
func NewCmdVerify(f *Factory, runF func(*VerifyOptions) error) *cobra.Command {
	opts := &VerifyOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "verify A B | MODEL --adapter X.onnx_adapter REFERENCE [--inputs FILE] [--samples N] [--rtol R --atol A] [--seed S] [--dim NAME=VALUE ...] [--json]",
		Short: "Check in ONNX Runtime that two models compute the same outputs",
		Long: `Run models A and B in ONNX Runtime on the same inputs and compare every
output with numpy.allclose's rule |B - A| <= atol + rtol*|A| (A is the
reference). For each output it prints the largest absolute and relative
differences and PASS or FAIL, then the median latency of each model. The exit
status is 1 when any output fails, so it can gate a pipeline:

  inject, then verify against the base: untrained adapters (B = 0) must not
  change anything;
  merge, then verify against the unmerged model: merging must not change the
  outputs, only make them cheaper.

The models must have the same inputs and outputs (names and types).

Inputs are random unless given with --inputs, and the same for both models:
  - floats: N(0,1) in the input's type (float16 and bfloat16 included);
  - integer inputs that index a table (input_ids into the embedding, token
    types, followed through Cast/Reshape to a Gather): [0, table rows);
  - *position_ids*: 0, 1, ... along the last axis, after any past length;
  - *mask*: random 0/1, first and last position of each row kept at 1;
  - other integers: [0, 4); bool: random.

Symbolic dims take --dim NAME=VALUE, else a value chosen by name:
  *past* (and any dim only past_* inputs use)  0 (empty KV cache)
  *total*                                      past + sequence
  *seq*, *len*, *token*, *step*                8
  *batch*                                      2
  anything else                                1

Default tolerances depend on the output type, loosened to the type of the
models' weights when that is narrower (a merge rounds W + s*A*B to it):
float32 rtol 1e-3 atol 1e-4, float16 1e-2/1e-2, bfloat16 5e-2/5e-2, float64
1e-7/1e-9, integers and bool exact. --rtol and --atol replace them for every
output.

--inputs reads fixed inputs from a JSON file,
  {"input_ids": {"shape": [1, 4], "dtype": "int64", "data": [1, 2, 3, 4]}}
(data flat or nested; dtype optional, converted to the input's type), or from
a safetensors file of tensors named like the inputs. Inputs the file leaves
out are random, with the dims the file's tensors set.

With --adapter X.onnx_adapter, the first model is an adapter-input model
(inject --adapter-inputs) run with the adapter active on every run, through
ONNX Runtime's LoRA adapter API, and the second is the reference it must
match, e.g. 'onnxlora merge MODEL --adapter X.onnx_adapter' or the base merged
with the adapter. Parameters the model has no input for, or of another type or
shape, are an error.

Needs the ONNX Runtime library: run scripts/install-ort.sh, or set
ONNXLORA_ORT_LIB to libonnxruntime.so.`,
		Example: `  onnxlora verify model.onnx lora.onnx
  onnxlora verify lora.onnx merged.onnx --samples 10 --seed 1
  onnxlora verify model.onnx merged.onnx --dim batch=1 --dim sequence=32
  onnxlora verify model.onnx merged.onnx --inputs prompt.json --atol 1e-3
  onnxlora verify lora.onnx merged.onnx --json | jq '.outputs[] | {name, max_abs, pass}'
  onnxlora verify serve.onnx --adapter customer-a.onnx_adapter customer-a-merged.onnx`,
		Args:              exactArgs(2, "two models, A and B"),
		ValidArgsFunction: onnxFileCompletion,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.A, opts.B = args[0], args[1]
			if opts.Adapter != "" {
				opts.A, opts.B = args[1], args[0] // REFERENCE is the reference
			}
			opts.rtolSet = cmd.Flags().Changed("rtol")
			opts.atolSet = cmd.Flags().Changed("atol")
			if err := opts.validate(); err != nil {
				return err
			}
			if runF != nil {
				return runF(opts)
			}
			return runVerify(opts)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&opts.Inputs, "inputs", "", "read fixed inputs from this JSON or safetensors file (others stay random)")
	fl.IntVarP(&opts.Samples, "samples", "n", 3, "number of random input sets to compare")
	fl.Uint64Var(&opts.Seed, "seed", 0, "random seed for the inputs; the same seed gives the same inputs")
	fl.Float64Var(&opts.RTol, "rtol", 0, "relative tolerance for every output (default: by output type, 1e-3 for float32)")
	fl.Float64Var(&opts.ATol, "atol", 0, "absolute tolerance for every output (default: by output type, 1e-4 for float32)")
	fl.StringArrayVar(&opts.Dims, "dim", nil, "value of a symbolic input dim, NAME=VALUE (e.g. batch=1, sequence_length=16); repeatable")
	fl.BoolVar(&opts.JSON, "json", false, "print the report as JSON")
	fl.StringVar(&opts.Adapter, "adapter", "", "an .onnx_adapter file to make active on every run of the first model; the second is then the reference")
	return cmd
}

// validate checks the flags before any model is read. Every error is a
// usage error.
func (o *VerifyOptions) validate() error {
	if o.Samples < 1 {
		return usageErrorf("invalid argument %d for --samples: want at least 1", o.Samples)
	}
	for _, tol := range []struct {
		name string
		v    float64
		set  bool
	}{{"rtol", o.RTol, o.rtolSet}, {"atol", o.ATol, o.atolSet}} {
		if tol.set && (tol.v < 0 || math.IsNaN(tol.v) || math.IsInf(tol.v, 0)) {
			return usageErrorf("invalid argument %v for --%s: want a finite number >= 0", tol.v, tol.name)
		}
	}
	o.dims = map[string]int64{}
	for _, arg := range o.Dims {
		// Commas are accepted too: --dim batch=1,sequence=16.
		for _, kv := range strings.Split(arg, ",") {
			name, value, ok := strings.Cut(strings.TrimSpace(kv), "=")
			name = strings.TrimSpace(name)
			v, err := strconv.ParseInt(strings.TrimSpace(value), 10, 64)
			if !ok || name == "" || err != nil || v < 0 {
				return usageErrorf("invalid argument %q for --dim: want NAME=VALUE with a whole VALUE >= 0, e.g. batch=1", kv)
			}
			if old, dup := o.dims[name]; dup && old != v {
				return usageErrorf("--dim %s given twice, as %d and %d", name, old, v)
			}
			o.dims[name] = v
		}
	}
	return nil
}

// compareOptions turns the flags into verify.Options.
func (o *VerifyOptions) compareOptions() verify.Options {
	vo := verify.Options{Samples: o.Samples, Seed: o.Seed, Dims: o.dims, InputsFile: o.Inputs, Adapter: o.Adapter}
	if o.rtolSet {
		vo.RTol = &o.RTol
	}
	if o.atolSet {
		vo.ATol = &o.ATol
	}
	return vo
}

func runVerify(opts *VerifyOptions) error {
	ios := opts.IO
	stop := ios.StartProgress(fmt.Sprintf("running %s and %s", opts.A, opts.B))
	rep, err := verify.Compare(opts.A, opts.B, opts.compareOptions())
	stop()
	if err != nil {
		if errors.Is(err, ortrun.ErrNoLibrary) && !strings.Contains(err.Error(), "install-ort.sh") {
			return fmt.Errorf("verify needs ONNX Runtime: %w; build with cgo, then run scripts/install-ort.sh or set %s", err, ortrun.EnvLib)
		}
		return err
	}
	for _, w := range rep.Warnings {
		ios.Warnf("%s", w)
	}
	if opts.JSON {
		if err := writeJSON(ios.Out, rep); err != nil {
			return err
		}
	} else {
		writeInputNotes(ios, rep)
		writeVerifyTable(ios.Out, rep)
	}
	if !rep.Pass {
		return verifyFailure(rep)
	}
	return nil
}

// writeInputNotes describes the inputs on ErrOut (silenced by --quiet), so
// a failure can be reproduced.
func writeInputNotes(ios *IOStreams, rep *verify.Report) {
	if ios.Quiet {
		return
	}
	b := rep.B
	if rep.Adapter != "" {
		b += " with adapter " + rep.Adapter
	}
	ios.Notef("A = %s, B = %s; %d sample(s), seed %d", rep.A, b, rep.Samples, rep.Seed)
	tw := tabwriter.NewWriter(ios.ErrOut, 0, 0, 2, ' ', 0)
	for _, in := range rep.Inputs {
		fmt.Fprintf(tw, "  %s\t%s%s\t%s\n", in.Name, in.DType, verifyShape(in.Shape), in.Describe())
	}
	tw.Flush()
}

// writeVerifyTable prints one row per output, the latencies and the verdict.
func writeVerifyTable(w io.Writer, rep *verify.Report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "OUTPUT\tDTYPE\tSHAPE\tMAX ABS\tMAX REL\tRTOL\tATOL\tRESULT")
	for _, o := range rep.Outputs {
		result := "PASS"
		if !o.Pass {
			result = "FAIL"
			if o.Problem != "" {
				result += " (" + o.Problem + ")"
			} else if rep.Samples > 1 {
				result += fmt.Sprintf(" (%d of %d samples)", o.FailedSamples, rep.Samples)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%g\t%g\t%s\n", o.Name, o.DType, verifyShape(o.Shape), verifyNum(o.MaxAbs), verifyNum(o.MaxRel), o.RTol, o.ATol, result)
	}
	tw.Flush()
	fmt.Fprintf(w, "\nlatency (median of %d runs): A %s, B %s%s\n", rep.TimedRuns, verifyMS(rep.LatencyA), verifyMS(rep.LatencyB), verifyRatio(rep.LatencyA, rep.LatencyB))
	if rep.Pass {
		fmt.Fprintf(w, "PASS: all %d output(s) match on %d sample(s)\n", len(rep.Outputs), rep.Samples)
	} else {
		fmt.Fprintf(w, "FAIL: %d of %d output(s) differ\n", len(rep.Failed()), len(rep.Outputs))
	}
}

// verifyFailure is the one-line error of a failed comparison, naming the
// outputs that differ and by how much.
func verifyFailure(rep *verify.Report) error {
	failed := rep.Failed()
	var parts []string
	for i, o := range failed {
		if i == 3 {
			parts = append(parts, fmt.Sprintf("and %d more", len(failed)-3))
			break
		}
		if o.Problem != "" {
			parts = append(parts, fmt.Sprintf("%s (%s)", o.Name, o.Problem))
			continue
		}
		parts = append(parts, fmt.Sprintf("%s (max abs %s, max rel %s; rtol %g, atol %g)", o.Name, verifyNum(o.MaxAbs), verifyNum(o.MaxRel), o.RTol, o.ATol))
	}
	return fmt.Errorf("%s does not match %s: %d of %d output(s) differ: %s", rep.B, rep.A, len(failed), len(rep.Outputs), strings.Join(parts, ", "))
}

// verifyNum prints an error with 3 significant digits.
func verifyNum(v float64) string {
	if math.IsInf(v, 1) {
		return "inf"
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}

// verifyMS prints a duration in milliseconds.
func verifyMS(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/1e6, 'f', 3, 64) + " ms"
}

// verifyRatio says how much slower or faster B is: " (B +12%)".
func verifyRatio(a, b time.Duration) string {
	if a <= 0 || b <= 0 {
		return ""
	}
	return fmt.Sprintf(" (B %+.0f%%)", 100*(float64(b)/float64(a)-1))
}

// verifyShape prints a shape as [2,8,64].
func verifyShape(shape []int64) string {
	parts := make([]string, len(shape))
	for i, d := range shape {
		parts[i] = strconv.FormatInt(d, 10)
	}
	return "[" + strings.Join(parts, ",") + "]"
}
