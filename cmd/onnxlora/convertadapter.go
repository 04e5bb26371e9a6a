package main

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// ConvertAdapterOptions holds what `onnxlora convert-adapter` was asked to do.
type ConvertAdapterOptions struct {
	IO *IOStreams

	Input  string
	Output string
	Model  string
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

With --model, the adapter is made for that adapter-input model: each PEFT
module is matched to the model's <module>.lora_A.weight/.lora_B.weight inputs
whose module shares its longest dotted suffix (as merge --adapter matches
layers), the parameters take the model's names, their shapes are checked
against the inputs' fixed dims, and --dtype defaults to the inputs' type.
Every mismatch is an error and nothing is written.

.onnx_adapter to PEFT_DIR: lora_A = Aᵀ and lora_B = Bᵀ. The scaling already
sits in B and cannot be taken out again, so every module gets lora_alpha = r
(scaling 1, no rsLoRA): the adapter computes exactly the same update. Ranks
that differ between modules become rank_pattern and alpha_pattern entries.
--dtype sets the safetensors type (default: the adapter's own).`,
		Example: `  onnxlora convert-adapter ./my-peft-adapter -o my-adapter.onnx_adapter
  onnxlora convert-adapter ./my-peft-adapter -o my-adapter.onnx_adapter --dtype float16
  onnxlora convert-adapter ./my-peft-adapter -o my-adapter.onnx_adapter --model model-lora-inputs.onnx
  onnxlora convert-adapter my-adapter.onnx_adapter -o ./my-peft-adapter`,
		Args: exactArgs(1, "one PEFT_DIR or .onnx_adapter file"),
		RunE: runE(opts, &opts.Input, opts.validate, runF, runConvertAdapter),
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "the .onnx_adapter file (from a PEFT dir) or PEFT directory (from a file) to write")
	fl.StringVar(&opts.Model, "model", "", "adapter-input model to match names, shapes and dtype against (PEFT_DIR to .onnx_adapter only)")
	fl.StringVar(&opts.DType, "dtype", "", "element type written: float32 (default for .onnx_adapter), float16 or bfloat16")
	fl.BoolVar(&opts.JSON, "json", false, "print the converted modules as JSON on stdout")
	return cmd
}

// validate checks the flags before anything is read.
func (o *ConvertAdapterOptions) validate(*cobra.Command) error {
	if o.Output == "" {
		return usageErrorf("missing -o/--output: the .onnx_adapter file or PEFT directory to write")
	}
	if o.DType != "" {
		if _, ok := convertDTypes[o.DType]; !ok {
			return usageErrorf("--dtype %q: want float32, float16 or bfloat16", o.DType)
		}
	}
	return checkPaths(nil, convertInputs(o), convertOutputs(o))
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
	} else if opts.Model != "" {
		return usageErrorf("--model goes with a PEFT_DIR input: it checks the .onnx_adapter being made")
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
	_, mods, err := export.ReadPEFTAdapter(opts.Input)
	if err != nil {
		return nil, err
	}
	name := opts.DType
	if opts.Model != "" {
		if name, err = matchModelInputs(opts, mods); err != nil {
			return nil, err
		}
	}
	if name == "" {
		name = "float32"
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

// loraInputs is one module's pair of LoRA inputs in an adapter-input model.
type loraInputs struct {
	module string
	a, b   *onnxpb.ValueInfoProto
}

// modelLoraInputs lists the model's <module>.lora_A.weight /
// <module>.lora_B.weight graph-input pairs, by module.
func modelLoraInputs(m *graph.Model) map[string]*loraInputs {
	ins := map[string]*onnxpb.ValueInfoProto{}
	for _, vi := range m.Graph().Proto.GetInput() {
		ins[vi.GetName()] = vi
	}
	out := map[string]*loraInputs{}
	for name, vi := range ins {
		mod, ok := strings.CutSuffix(name, export.OnnxAdapterSuffixA)
		if !ok || mod == "" {
			continue
		}
		if b, ok := ins[mod+export.OnnxAdapterSuffixB]; ok {
			out[mod] = &loraInputs{module: mod, a: vi, b: b}
		}
	}
	return out
}

// commonSuffixSegments counts the trailing dotted segments a and b share.
func commonSuffixSegments(a, b string) int {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	n := 0
	for n < len(as) && n < len(bs) && as[len(as)-1-n] == bs[len(bs)-1-n] {
		n++
	}
	return n
}

// matchModelInputs renames mods to the model's LoRA input modules (longest
// common dotted suffix, ties and misses are errors), checks their shapes
// against the inputs' fixed dims and returns the --dtype to use: the
// inputs' type, which an explicit --dtype must equal.
func matchModelInputs(opts *ConvertAdapterOptions, mods []export.PEFTModule) (string, error) {
	m, err := loadModel(opts.IO, opts.Model)
	if err != nil {
		return "", err
	}
	defer m.Close()
	inputs := modelLoraInputs(m)
	if len(inputs) == 0 {
		return "", fmt.Errorf("%s has no LoRA adapter inputs (<module>%s and <module>%s graph inputs)", opts.Model, export.OnnxAdapterSuffixA, export.OnnxAdapterSuffixB)
	}
	names := make([]string, 0, len(inputs))
	for n := range inputs {
		names = append(names, n)
	}
	sort.Strings(names)
	claimed := map[string]string{}
	dtName := opts.DType
	for i := range mods {
		pm := &mods[i]
		best, bestN, tie := "", 0, false
		for _, n := range names {
			c := commonSuffixSegments(pm.Name, n)
			switch {
			case c > bestN:
				best, bestN, tie = n, c, false
			case c == bestN && c > 0:
				tie = true
			}
		}
		if bestN == 0 {
			return "", fmt.Errorf("PEFT module %s matches no LoRA input of %s (it has %s, ...)", pm.Name, opts.Model, names[0])
		}
		if tie {
			return "", fmt.Errorf("PEFT module %s matches several LoRA inputs of %s equally well", pm.Name, opts.Model)
		}
		if prev, ok := claimed[best]; ok {
			return "", fmt.Errorf("PEFT modules %s and %s both match the model's %s", prev, pm.Name, best)
		}
		claimed[best] = pm.Name
		in := inputs[best]
		for _, c := range []struct {
			vi   *onnxpb.ValueInfoProto
			want []int
		}{{in.a, []int{pm.InFeatures, pm.Rank}}, {in.b, []int{pm.Rank, pm.OutFeatures}}} {
			tt := c.vi.GetType().GetTensorType()
			if tt == nil {
				return "", fmt.Errorf("model input %s is not a tensor", c.vi.GetName())
			}
			dt := graph.DataType(tt.GetElemType())
			name := ""
			for n, d := range convertDTypes {
				if d.onnx == dt {
					name = n
				}
			}
			if name == "" {
				return "", fmt.Errorf("model input %s is %v, not float32, float16 or bfloat16", c.vi.GetName(), dt)
			}
			if dtName == "" {
				dtName = name
			} else if dtName != name {
				if opts.DType != "" {
					return "", fmt.Errorf("--dtype %s, but model input %s is %s", opts.DType, c.vi.GetName(), name)
				}
				return "", fmt.Errorf("model inputs mix %s and %s (%s)", dtName, name, c.vi.GetName())
			}
			dims := tt.GetShape().GetDim()
			if tt.GetShape() != nil && len(dims) != 2 {
				return "", fmt.Errorf("model input %s has rank %d, want 2", c.vi.GetName(), len(dims))
			}
			for k, d := range dims {
				if d.GetDimParam() == "" && d.Value != nil && d.GetDimValue() != int64(c.want[k]) {
					return "", fmt.Errorf("PEFT module %s gives %s shape %v, but model input %s has dim %d = %d", pm.Name, c.vi.GetName(), c.want, c.vi.GetName(), k, d.GetDimValue())
				}
			}
		}
		if best != pm.Name {
			opts.IO.Notef("PEFT module %s -> model input %s", pm.Name, best+export.OnnxAdapterSuffixA)
		}
		pm.Name = best
	}
	if n := len(inputs) - len(claimed); n > 0 {
		opts.IO.Warnf("%d of the model's %d LoRA input pairs get nothing from %s and keep their defaults", n, len(inputs), opts.Input)
	}
	return dtName, nil
}
