package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// ConvertAdapterOptions holds what `onnxlora convert-adapter` was asked to do.
type ConvertAdapterOptions struct {
	IO *IOStreams

	Input  string
	Output string
	DType  string
	JSON   bool
}

// convertDTypes are the --dtype values, as adapter and PEFT types.
var convertDTypes = map[string]struct {
	onnx graph.DataType
	peft export.DType
}{
	"float32":  {graph.Float, export.DTypeF32},
	"float16":  {graph.Float16, export.DTypeF16},
	"bfloat16": {graph.BFloat16, export.DTypeBF16},
}

// NewCmdConvertAdapter builds `onnxlora convert-adapter`.
func NewCmdConvertAdapter(f *Factory, runF func(*ConvertAdapterOptions) error) *cobra.Command {
	opts := &ConvertAdapterOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "convert-adapter PEFT_DIR -o X.onnx_adapter | X.onnx_adapter -o PEFT_DIR",
		Short: "Convert a PEFT adapter directory to an ONNX Runtime .onnx_adapter file, or back",
		Long: `Convert between a PEFT LoRA adapter directory (adapter_config.json +
adapter_model.safetensors) and an ONNX Runtime adapter file (.onnx_adapter),
which ONNX Runtime 1.20+ makes active per run on a model whose LoRA weights
are graph inputs (as Olive and onnxruntime-genai build them).

PEFT_DIR to .onnx_adapter: for each PEFT module (its key without the
"base_model.model." prefix),
  <module>.lora_A.weight = lora_Aᵀ            [in, r]
  <module>.lora_B.weight = scaling · lora_Bᵀ  [r, out]
with scaling = lora_alpha/r (lora_alpha/√r with use_rslora), rank_pattern and
alpha_pattern resolved per module, computed in float64 and rounded once to
--dtype (default float32; it must match the model's inputs). fan_in_fan_out
changes nothing: lora_A and lora_B have the same shapes either way.

.onnx_adapter to PEFT_DIR: lora_A = Aᵀ and lora_B = Bᵀ. The scaling already
sits in B and cannot be taken out again, so every module gets lora_alpha = r
(scaling 1, no rsLoRA): the adapter computes exactly the same update. Ranks
that differ between modules become rank_pattern and alpha_pattern entries.
--dtype sets the safetensors type (default: the adapter's own).`,
		Example: `  onnxlora convert-adapter ./my-peft-adapter -o my-adapter.onnx_adapter
  onnxlora convert-adapter ./my-peft-adapter -o my-adapter.onnx_adapter --dtype float16
  onnxlora convert-adapter my-adapter.onnx_adapter -o ./my-peft-adapter`,
		Args: exactArgs(1, "one PEFT_DIR or .onnx_adapter file"),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Input = args[0]
			if opts.Output == "" {
				return usageErrorf("missing -o/--output: the .onnx_adapter file or PEFT directory to write")
			}
			if opts.DType != "" {
				if _, ok := convertDTypes[opts.DType]; !ok {
					return usageErrorf("--dtype %q: want float32, float16 or bfloat16", opts.DType)
				}
			}
			if err := checkOutput(opts.Output, opts.Input); err != nil {
				return err
			}
			if runF != nil {
				return runF(opts)
			}
			return runConvertAdapter(opts)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "the .onnx_adapter file (from a PEFT dir) or PEFT directory (from a file) to write")
	fl.StringVar(&opts.DType, "dtype", "", "element type written: float32 (default for .onnx_adapter), float16 or bfloat16")
	fl.BoolVar(&opts.JSON, "json", false, "print the converted modules as JSON on stdout")
	return cmd
}

// convertedModule is one module in the command's report.
type convertedModule struct {
	Module  string  `json:"module"`
	Rank    int     `json:"rank"`
	In      int     `json:"in"`
	Out     int     `json:"out"`
	Scaling float64 `json:"scaling"`
}

type convertReport struct {
	Input   string            `json:"input"`
	Output  string            `json:"output"`
	Format  string            `json:"format"`
	DType   string            `json:"dtype"`
	Modules []convertedModule `json:"modules"`
}

func runConvertAdapter(opts *ConvertAdapterOptions) error {
	st, err := os.Stat(opts.Input)
	if err != nil {
		return fmt.Errorf("%s: %w", opts.Input, unwrapStatError(err))
	}
	var rep *convertReport
	if st.IsDir() {
		rep, err = peftToOnnxAdapter(opts)
	} else {
		rep, err = onnxAdapterToPEFT(opts)
	}
	if err != nil {
		return err
	}
	if opts.JSON {
		return writeJSON(opts.IO.Out, rep)
	}
	out := opts.IO.Out
	fmt.Fprintf(out, "Converted %d module(s) to %s %s (%s):\n", len(rep.Modules), rep.Format, rep.Output, rep.DType)
	for _, m := range rep.Modules {
		fmt.Fprintf(out, "  %s  r=%d  [%d -> %d]  scaling %g\n", m.Module, m.Rank, m.In, m.Out, m.Scaling)
	}
	return nil
}

func unwrapStatError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func peftToOnnxAdapter(opts *ConvertAdapterOptions) (*convertReport, error) {
	if st, err := os.Stat(opts.Output); err == nil && st.IsDir() {
		return nil, fmt.Errorf("output %s is a directory; converting a PEFT directory writes one .onnx_adapter file", opts.Output)
	}
	name := opts.DType
	if name == "" {
		name = "float32"
	}
	_, mods, err := export.ReadPEFTAdapter(opts.Input)
	if err != nil {
		return nil, err
	}
	a, err := export.OnnxAdapterFromPEFT(mods, convertDTypes[name].onnx)
	if err != nil {
		return nil, fmt.Errorf("peft adapter %s: %w", opts.Input, err)
	}
	if !strings.HasSuffix(opts.Output, export.OnnxAdapterExt) {
		opts.IO.Warnf("%s does not end in %s, the extension ONNX Runtime tools expect", opts.Output, export.OnnxAdapterExt)
	}
	if err := export.WriteOnnxAdapter(opts.Output, a); err != nil {
		return nil, err
	}
	rep := &convertReport{Input: opts.Input, Output: opts.Output, Format: "onnx-adapter", DType: name}
	for _, m := range mods {
		rep.Modules = append(rep.Modules, convertedModule{m.Name, m.Rank, m.InFeatures, m.OutFeatures, m.Scaling})
	}
	opts.IO.Notef("scaling folded into lora_B; feed %s to a model whose LoRA weights are inputs", opts.Output)
	return rep, nil
}

func onnxAdapterToPEFT(opts *ConvertAdapterOptions) (*convertReport, error) {
	if st, err := os.Stat(opts.Output); err == nil && !st.IsDir() {
		return nil, fmt.Errorf("output %s exists and is not a directory; converting an .onnx_adapter file writes a PEFT directory", opts.Output)
	}
	a, err := export.ReadOnnxAdapter(opts.Input)
	if err != nil {
		return nil, err
	}
	var dt export.DType
	if opts.DType != "" {
		dt = convertDTypes[opts.DType].peft
	}
	cfg, mods, err := export.PEFTFromOnnxAdapter(a, dt)
	if err != nil {
		return nil, fmt.Errorf("onnx adapter %s: %w", opts.Input, err)
	}
	_, statErr := os.Stat(opts.Output)
	if err := export.WritePEFTAdapter(opts.Output, cfg, mods); err != nil {
		if os.IsNotExist(statErr) {
			os.Remove(opts.Output) // only if empty: never removes what was there
		}
		return nil, err
	}
	name := opts.DType
	if name == "" {
		name = strings.ToLower(a.Params[0].DataType.String())
		for n, d := range convertDTypes {
			if d.onnx == a.Params[0].DataType {
				name = n
			}
		}
	}
	rep := &convertReport{Input: opts.Input, Output: opts.Output, Format: "peft", DType: name}
	for _, m := range mods {
		rep.Modules = append(rep.Modules, convertedModule{m.Name, m.Rank, m.InFeatures, m.OutFeatures, m.Scaling})
	}
	opts.IO.Notef("lora_alpha = r for every module (scaling 1): the adapter's scaling stays inside lora_B")
	return rep, nil
}
