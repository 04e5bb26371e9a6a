package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// CombineOptions holds what `onnxlora combine` was asked to do.
type CombineOptions struct {
	IO *IOStreams

	Adapters []string
	Output   string
	Weights  []string
	Method   string
	Rank     int
	Format   string
	DType    string
	JSON     bool

	// weights are Weights parsed; format is Format resolved.
	weights []float64
	format  string
}

// NewCmdCombine builds `onnxlora combine`.
func NewCmdCombine(f *Factory, runF func(*CombineOptions) error) *cobra.Command {
	opts := &CombineOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "combine ADAPTER ADAPTER... --weights W,W... [--method linear|cat|svd] [--rank R] -o OUT",
		Short: "Mix LoRA adapters of one base into one, as PEFT's add_weighted_adapter",
		Long: `Combine LoRA adapters of the same base model (PEFT directories or .onnx_adapter
files, in any mix) into one, as PEFT's LoraModel.add_weighted_adapter does.
With weights wᵢ and each adapter's scaling sᵢ (alpha/r, alpha/sqrt(r) with
rsLoRA; 1 for an .onnx_adapter, whose B holds it):

  linear  A = Σ √(wᵢsᵢ)·Aᵢ, B = Σ √(wᵢsᵢ)·Bᵢ; one rank on every module, wᵢsᵢ >= 0.
          The delta has cross terms: it is not the weighted sum of the deltas.
  cat     A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...], rank Σ rᵢ:
          the delta is exactly Σ wᵢsᵢ·BᵢAᵢ.
  svd     the best rank-R approximation of Σ wᵢsᵢ·BᵢAᵢ (R = --rank, default the
          largest rank of the inputs): B = U·diag(σ), A = Vᵀ. (default)

A module some adapters lack is combined from those that have it. The result
has scaling 1 (lora_alpha = r on every module). Because linear mixes factors,
its result depends on how the scaling is split between A and B, so a PEFT
directory and the .onnx_adapter converted from it mix differently; cat and svd
do not. The output is a PEFT directory, or an .onnx_adapter file when OUT ends
in .onnx_adapter or --format onnx-adapter is given.`,
		Example: `  onnxlora combine a.onnx_adapter b.onnx_adapter --weights 0.7,0.3 -o mix.onnx_adapter
  onnxlora combine ./peft-a ./peft-b --weights 1,1 --method cat -o ./peft-ab
  onnxlora combine ./peft-a ./peft-b --weights 0.5,0.5 --method svd --rank 16 -o mix.onnx_adapter`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 {
				return usageErrorf("give the adapters to combine (PEFT directories or .onnx_adapter files)")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Adapters = args
			if err := opts.validate(); err != nil {
				return err
			}
			if runF != nil {
				return runF(opts)
			}
			return runCombine(opts)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "where to write the combined adapter: a PEFT directory or X.onnx_adapter")
	fl.StringSliceVar(&opts.Weights, "weights", nil, "one weight per adapter, e.g. 0.7,0.3")
	fl.StringVar(&opts.Method, "method", string(export.CombineSVD), "linear, cat or svd (PEFT's combination_type)")
	fl.IntVar(&opts.Rank, "rank", 0, "svd: the rank of the result (default: the largest rank of the inputs)")
	fl.StringVar(&opts.Format, "format", "", "peft or onnx-adapter; default by the output's extension")
	fl.StringVar(&opts.DType, "dtype", "", "element type of the result: float32, float16, bfloat16 or float64 (default: the first adapter's)")
	fl.BoolVar(&opts.JSON, "json", false, "print the combined modules as JSON on stdout")
	_ = cmd.RegisterFlagCompletionFunc("method", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return []string{"linear", "cat", "svd"}, cobra.ShellCompDirectiveNoFileComp
	})
	return cmd
}

// validate checks the flags before any file is read.
func (o *CombineOptions) validate() error {
	if o.Output == "" {
		return usageErrorf("missing -o/--output: where to write the combined adapter")
	}
	if err := checkOutput(o.Output, o.Adapters...); err != nil {
		return err
	}
	if len(o.Weights) != len(o.Adapters) {
		return usageErrorf("--weights needs one weight per adapter: %d adapter(s), %d weight(s)", len(o.Adapters), len(o.Weights))
	}
	o.weights = make([]float64, len(o.Weights))
	for i, w := range o.Weights {
		v, err := strconv.ParseFloat(strings.TrimSpace(w), 64)
		if err != nil || v != v || v > 1e300 || v < -1e300 {
			return usageErrorf("invalid weight %q in --weights: want a finite number", w)
		}
		o.weights[i] = v
	}
	switch export.CombineMethod(o.Method) {
	case export.CombineLinear, export.CombineCat, export.CombineSVD:
	default:
		return usageErrorf("invalid argument %q for --method: want linear, cat or svd", o.Method)
	}
	if o.Rank < 0 || (o.Rank > 0 && o.Method != string(export.CombineSVD)) {
		return usageErrorf("--rank goes with --method svd and must be positive")
	}
	if _, err := combineDType(o.DType); err != nil {
		return err
	}
	var err error
	o.format, err = adapterFormat(o.Format, o.Output)
	return err
}

// combineDType maps --dtype to a safetensors dtype ("" for the default).
func combineDType(s string) (export.DType, error) {
	switch strings.ToLower(s) {
	case "":
		return "", nil
	case "float32", "float", "f32":
		return export.DTypeF32, nil
	case "float16", "f16", "half":
		return export.DTypeF16, nil
	case "bfloat16", "bf16":
		return export.DTypeBF16, nil
	case "float64", "double", "f64":
		return export.DTypeF64, nil
	}
	return "", usageErrorf("invalid argument %q for --dtype: want float32, float16, bfloat16 or float64", s)
}

// graphDType maps a safetensors float dtype to an ONNX one.
var graphDType = map[export.DType]graph.DataType{
	export.DTypeF32: graph.Float, export.DTypeF16: graph.Float16, export.DTypeBF16: graph.BFloat16, export.DTypeF64: graph.Double,
}

// readAdapterModules reads a PEFT directory or an .onnx_adapter file as
// PEFT modules (an .onnx_adapter with scaling 1).
func readAdapterModules(path string) ([]export.PEFTModule, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		_, mods, err := export.ReadPEFTAdapter(path)
		return mods, err
	}
	a, err := export.ReadOnnxAdapter(path)
	if err != nil {
		return nil, err
	}
	_, mods, err := export.PEFTFromOnnxAdapter(a, "")
	if err != nil {
		return nil, fmt.Errorf("onnx adapter %s: %w", path, err)
	}
	return mods, nil
}

// combineResult is what --json prints.
type combineResult struct {
	Output  string          `json:"output"`
	Method  string          `json:"method"`
	Weights []float64       `json:"weights"`
	Modules []combineModule `json:"modules"`
}

type combineModule struct {
	Name string `json:"name"`
	Rank int    `json:"rank"`
	In   int    `json:"in_features"`
	Out  int    `json:"out_features"`
}

func runCombine(opts *CombineOptions) error {
	ios := opts.IO
	var all [][]export.PEFTModule
	for _, p := range opts.Adapters {
		mods, err := readAdapterModules(p)
		if err != nil {
			return err
		}
		all = append(all, mods)
	}
	dt, _ := combineDType(opts.DType)
	mods, err := export.CombineAdapters(all, export.CombineOptions{Method: export.CombineMethod(opts.Method), Weights: opts.weights, Rank: opts.Rank, DType: dt})
	if err != nil {
		return err
	}
	if opts.format == formatOnnxAdapter {
		gdt, ok := graphDType[mods[0].DType]
		if !ok {
			return fmt.Errorf("the adapters are %s, not a float type", mods[0].DType)
		}
		a, err := export.OnnxAdapterFromPEFT(mods, gdt)
		if err != nil {
			return err
		}
		if err := export.WriteOnnxAdapter(opts.Output, a); err != nil {
			return err
		}
	} else {
		if err := export.WritePEFTAdapter(opts.Output, combinedConfig(mods), mods); err != nil {
			return err
		}
	}
	res := combineResult{Output: opts.Output, Method: opts.Method, Weights: opts.weights}
	for _, m := range mods {
		res.Modules = append(res.Modules, combineModule{m.Name, m.Rank, m.InFeatures, m.OutFeatures})
	}
	if opts.JSON {
		return writeJSON(ios.Out, res)
	}
	fmt.Fprintf(ios.Out, "Combined %d adapter(s) (%s, weights %s) into %d module(s):\n", len(opts.Adapters), opts.Method, strings.Join(opts.Weights, ","), len(mods))
	tw := tabwriter.NewWriter(ios.Out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  MODULE\tRANK\t[IN,OUT]")
	for _, m := range res.Modules {
		fmt.Fprintf(tw, "  %s\t%d\t[%d,%d]\n", m.Name, m.Rank, m.In, m.Out)
	}
	tw.Flush()
	ios.Notef("wrote %s", opts.Output)
	return nil
}

// combinedConfig describes combined modules: scaling 1 on every module,
// the most common rank as r, patterns for the others.
func combinedConfig(mods []export.PEFTModule) *export.PEFTConfig {
	count := map[int]int{}
	best := mods[0].Rank
	for _, m := range mods {
		count[m.Rank]++
		if count[m.Rank] > count[best] {
			best = m.Rank
		}
	}
	cfg := export.NewPEFTConfig(best, float64(best))
	for _, m := range mods {
		if m.Rank != best {
			cfg.RankPattern = append(cfg.RankPattern, export.Pattern[int]{Key: m.Name, Value: m.Rank})
			cfg.AlphaPattern = append(cfg.AlphaPattern, export.Pattern[float64]{Key: m.Name, Value: float64(m.Rank)})
		}
	}
	return cfg
}
