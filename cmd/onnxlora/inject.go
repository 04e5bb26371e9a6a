package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/termsafe"
	"github.com/onnxlora/onnxlora/rewrite"
)

// InjectOptions holds what `onnxlora inject` was asked to do.
type InjectOptions struct {
	IO *IOStreams

	Model    string
	Output   string
	Manifest string
	DryRun   bool
	JSON     bool
	External externalFlag

	Select  selectFlags
	RSLoRA  bool
	Dropout float64
	Init    string
	Seed    uint64
	// AdapterInputs is --adapter-inputs; conflicts lists the flags given
	// with it that it makes meaningless.
	AdapterInputs bool
	// AllowLargeRank is --allow-large-rank.
	AllowLargeRank bool
	// DoRA is --dora.
	DoRA bool
	// AdapterDType is --adapter-dtype: float32 or layer.
	AdapterDType string
	// Stack is --stack.
	Stack bool
	// ModulesToSave is --modules-to-save.
	ModulesToSave []string
	conflicts     []string

	// config is the validated configuration, set by the command.
	config rewrite.InjectConfig
}

// NewCmdInject builds `onnxlora inject`.
func NewCmdInject(f *Factory, runF func(*InjectOptions) error) *cobra.Command {
	opts := &InjectOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "inject MODEL -o OUT --target NAMES [flags]",
		Short: "Add LoRA adapters beside the selected MatMul/Gemm layers",
		Long: `Add a LoRA branch beside every selected layer:

  y = base(x) + scaling * ((dropout(x) · A) · B)

A is [in, r], B is [r, out], scaling is alpha/r (alpha/sqrt(r) with --rslora).
A is initialized like PEFT (kaiming uniform, or gaussian) and B is zero, so the
injected model computes exactly what the base model does until it is trained.
The new initializers are named <module>.lora_A.weight, <module>.lora_B.weight
and <module>.lora_scaling; a manifest describing every adapter is stored in the
model's metadata (key onnxlora.adapters). Its "trainable" list is what ONNX
Runtime training's generate_artifacts takes as requires_grad.

Layers are chosen the way PEFT's LoraConfig does: --target names modules by
suffix (q_proj matches model.layers.0.self_attn.q_proj), all-linear takes every
layer but the output head, --target-regex must match the whole path, exclusion
wins, --layers keeps layer indices. Run 'onnxlora inspect MODEL' to see the
module paths, or inject with --dry-run to see what would be adapted.

With --adapter-inputs, A and B are instead graph inputs <module>.lora_A.weight
[in, r] and <module>.lora_B.weight [r, out] with a symbolic r and rank-0
defaults, and the branch has no scaling node (it is in B): the model computes
exactly the base until ONNX Runtime feeds an .onnx_adapter per run, so one
session serves many adapters (docs/serving.md). No --rank or --alpha then.

On success the PEFT line "trainable params: N || all params: M || trainable%: P"
is printed. When nothing matches, the command fails and lists the module paths.`,
		Example: `  onnxlora inject model.onnx -o lora.onnx --target q_proj,v_proj --rank 8 --alpha 16
  onnxlora inject model.onnx -o lora.onnx --target all-linear --exclude lm_head
  onnxlora inject model.onnx -o lora.onnx --target q_proj,v_proj --layers 0,3
  onnxlora inject model.onnx -o lora.onnx --target-regex '.*\.(q|v)_proj' \
      --rank-pattern 'layers\.0\..*=16' --alpha-pattern 'v_proj=32'
  onnxlora inject model.onnx --target all-linear --dry-run
  onnxlora inject model.onnx -o lora.onnx --target q_proj,v_proj --manifest lora.json
  onnxlora inject model.onnx -o serve.onnx --target all-linear --adapter-inputs`,
		Args:              exactArgs(1, "one MODEL"),
		ValidArgsFunction: onnxFileCompletion,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Model = args[0]
			for _, name := range []string{"rank", "alpha", "rank-pattern", "alpha-pattern", "rslora", "init"} {
				if cmd.Flags().Changed(name) {
					opts.conflicts = append(opts.conflicts, "--"+name)
				}
			}
			if err := opts.validate(); err != nil {
				return err
			}
			if runF != nil {
				return runF(opts)
			}
			return runInject(opts)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&opts.Output, "output", "o", "", "file to write the injected model to (required unless --dry-run)")
	opts.Select.register(fl, `module names to adapt, e.g. q_proj,v_proj, or "all-linear" (PEFT target_modules)`)
	fl.BoolVar(&opts.RSLoRA, "rslora", false, "scale by alpha/sqrt(r) instead of alpha/r (PEFT use_rslora)")
	fl.BoolVar(&opts.DoRA, "dora", false, "DoRA (PEFT use_dora): a trainable magnitude per output feature beside A and B")
	fl.Float64Var(&opts.Dropout, "dropout", 0, "dropout probability on the adapter input, in [0, 1) (PEFT lora_dropout)")
	fl.StringVar(&opts.Init, "init", string(rewrite.InitKaiming), "initialization: kaiming (PEFT's default) or gaussian for A with B = 0; pissa, pissa_niter_N or olora for A and B from the weight's SVD or QR, the residual written into the base")
	fl.Uint64Var(&opts.Seed, "seed", 0, "random seed for lora_A; the same seed gives the same weights")
	fl.BoolVar(&opts.AllowLargeRank, "allow-large-rank", false, "allow a rank above min(in, out) of a layer (refused by default: it adds size, not expressiveness)")
	fl.StringVar(&opts.AdapterDType, "adapter-dtype", "float32", "type of lora_A/lora_B beside float16/bfloat16 layers: float32 (PEFT's, with Casts around the branch) or layer (the layer's own type)")
	fl.BoolVar(&opts.AdapterInputs, "adapter-inputs", false, "make lora_A/lora_B graph inputs with rank-0 defaults, the scaling in B, for ONNX Runtime's .onnx_adapter files (docs/serving.md)")
	fl.BoolVar(&opts.Stack, "stack", false, "add an adapter beside the one a layer already has (refused by default); merge folds both")
	fl.StringSliceVar(&opts.ModulesToSave, "modules-to-save", nil, "layers to train whole beside the adapters, e.g. classifier or score (PEFT modules_to_save; export-adapter writes them in full)")
	fl.StringVar(&opts.Manifest, "manifest", "", "also write the adapters' manifest as JSON to this file")
	fl.BoolVar(&opts.DryRun, "dry-run", false, "print the layers that would be adapted and write nothing")
	fl.BoolVar(&opts.JSON, "json", false, "print the result (counts and manifest) as JSON on stdout")
	registerExternalFlag(cmd, &opts.External)
	_ = cmd.RegisterFlagCompletionFunc("init", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return []string{"kaiming", "gaussian", "pissa", "pissa_niter_4", "olora"}, cobra.ShellCompDirectiveNoFileComp
	})
	_ = cmd.RegisterFlagCompletionFunc("target", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return []string{rewrite.AllLinear, "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, cobra.ShellCompDirectiveNoFileComp
	})
	return cmd
}

// validate checks the flags before any file is read. Every error is a
// usage error.
func (o *InjectOptions) validate() error {
	if !o.Select.hasTarget() {
		return usageErrorf("no target: give --target (e.g. q_proj,v_proj or all-linear) or --target-regex")
	}
	sel, err := o.Select.options()
	if err != nil {
		return err
	}
	if o.Output == "" && !o.DryRun {
		return usageErrorf("missing -o/--output: where to write the injected model (or use --dry-run)")
	}
	if !o.DryRun {
		if err := checkPaths(nil, []string{"the model", o.Model}, o.outputs()); err != nil {
			return err
		}
	}
	init := rewrite.Init(strings.ToLower(o.Init))
	if init.Check() != nil {
		return usageErrorf("invalid argument %q for --init: want kaiming, gaussian, pissa, pissa_niter_N or olora", o.Init)
	}
	if o.Dropout < 0 || o.Dropout >= 1 || math.IsNaN(o.Dropout) {
		return usageErrorf("invalid argument %v for --dropout: want a probability in [0, 1)", o.Dropout)
	}
	if o.AdapterInputs && len(o.conflicts) > 0 {
		return usageErrorf("--adapter-inputs takes no %s: the rank and scaling come with each adapter file", strings.Join(o.conflicts, ", "))
	}
	o.config = rewrite.InjectConfig{SelectOptions: sel, RSLoRA: o.RSLoRA, Dropout: o.Dropout, Init: init, Seed: o.Seed, AdapterInputs: o.AdapterInputs, AllowLargeRank: o.AllowLargeRank}
	o.config.DoRA = o.DoRA
	o.config.ModulesToSave = o.ModulesToSave
	o.config.Stack = o.Stack
	switch strings.ToLower(o.AdapterDType) {
	case "float32", "float", "fp32":
		o.config.AdapterDType = graph.Float
	case "layer":
	default:
		return usageErrorf("invalid argument %q for --adapter-dtype: want float32 or layer", o.AdapterDType)
	}
	return nil
}

// outputs lists what inject writes, for checkPaths.
func (o *InjectOptions) outputs() []string {
	return append(modelOutputs("-o", o.Output), "--manifest", o.Manifest)
}

// injectResult is what --json prints.
type injectResult struct {
	Model            string            `json:"model"`
	Output           string            `json:"output,omitempty"`
	DryRun           bool              `json:"dry_run"`
	Trainable        int64             `json:"trainable"`
	All              int64             `json:"all"`
	TrainablePercent float64           `json:"trainable_percent"`
	Summary          string            `json:"summary"`
	Manifest         *rewrite.Manifest `json:"manifest"`
}

func runInject(opts *InjectOptions) error {
	ios := opts.IO
	m, err := loadModel(ios, opts.Model)
	if err != nil {
		return err
	}
	defer m.Close()

	// Targets that match nothing are worth a warning when other targets
	// matched (a typo is otherwise silent); when none matched, Inject's
	// error says it all.
	var unmatched []string
	layers, _ := rewrite.FindLayers(m)
	if sel, err := rewrite.NewSelector(opts.config.SelectOptions); err == nil {
		unmatched = sel.Unmatched(rewrite.Candidates(layers))
	}
	before, err := rewrite.ReadManifest(m)
	if err != nil {
		return err
	}
	already := 0
	if before != nil {
		already = len(before.Adapters)
	}

	// A dry run injects into the loaded model too (adapter tensors are
	// small and base weights are never read), so it reports exactly what a
	// real run would, errors included; it just does not save.
	inj, err := rewrite.Inject(m, opts.config)
	if err != nil {
		return err
	}
	added := inj.Manifest.Adapters[already:]
	for _, t := range unmatched {
		ios.Warnf("target %q matches no module of %s", t, opts.Model)
	}
	warnLargeRanks(ios, added)

	if opts.DryRun {
		if opts.JSON {
			return writeJSON(ios.Out, newInjectResult(opts, inj))
		}
		fmt.Fprintf(ios.Out, "Dry run: would add %d adapter(s) to %s; nothing written.\n", len(added), opts.Model)
		writeAdapterTable(ios.Out, added)
		if names := savedNames(inj.Manifest); names != "" {
			fmt.Fprintf(ios.Out, "Would train whole (modules_to_save): %s\n", names)
		}
		fmt.Fprintln(ios.Out, inj.String())
		return nil
	}

	// Every output is checked and written before any replaces an old one.
	if err := checkPaths(m, nil, opts.outputs()); err != nil {
		return err
	}
	var manifest *graph.StagedFile
	if opts.Manifest != "" {
		data, err := inj.Manifest.MarshalIndent()
		if err != nil {
			return err
		}
		manifest, err = graph.StageFile(opts.Manifest, func(w io.Writer) error {
			_, err := w.Write(append(data, '\n'))
			return err
		})
		if err != nil {
			return err
		}
		defer manifest.Abort()
	}
	save := graph.SaveOptions{External: opts.External.mode}
	if err := saveModel(ios, m, opts.Output, save); err != nil {
		return err
	}
	if manifest != nil {
		if err := manifest.Commit(); err != nil {
			return err
		}
	}
	if opts.JSON {
		return writeJSON(ios.Out, newInjectResult(opts, inj))
	}
	fmt.Fprintln(ios.Out, inj.String())
	ios.Notef("wrote %s with %d new adapter(s): %s", opts.Output, len(added), summarizeModules(added))
	if names := savedNames(inj.Manifest); names != "" {
		ios.Notef("trained whole (modules_to_save): %s", names)
	}
	if opts.Manifest != "" {
		ios.Notef("wrote the manifest to %s", opts.Manifest)
	}
	return nil
}

func newInjectResult(opts *InjectOptions, inj *rewrite.Injection) injectResult {
	res := injectResult{
		Model: opts.Model, DryRun: opts.DryRun, Trainable: inj.Trainable, All: inj.All,
		Summary: inj.String(), Manifest: inj.Manifest,
	}
	if !opts.DryRun {
		res.Output = opts.Output
	}
	if inj.All > 0 {
		res.TrainablePercent = float64(int64(1e6*100*float64(inj.Trainable)/float64(inj.All)+0.5)) / 1e6
	}
	return res
}

// writeAdapterTable lists adapters as a table.
func writeAdapterTable(w io.Writer, adapters []rewrite.Adapter) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  MODULE\tOP\t[IN,OUT]\tRANK\tALPHA\tSCALING\tPARAMS")
	for _, a := range adapters {
		fmt.Fprintf(tw, "  %s\t%s\t[%d,%d]\t%d\t%g\t%.6g\t%d\n", termsafe.Quote(a.Module), a.Op, a.InFeatures, a.OutFeatures, a.Rank, a.Alpha, a.Scaling, int64(a.Rank)*(a.InFeatures+a.OutFeatures))
	}
	tw.Flush()
}

// summarizeModules counts adapters by their last path segment:
// "q_proj x2, v_proj x2".
func summarizeModules(adapters []rewrite.Adapter) string {
	var order []string
	count := map[string]int{}
	for _, a := range adapters {
		name := a.Module
		if i := strings.LastIndexByte(name, '.'); i >= 0 {
			name = name[i+1:]
		}
		if count[name] == 0 {
			order = append(order, name)
		}
		count[name]++
	}
	parts := make([]string, len(order))
	for i, n := range order {
		parts[i] = n
		if count[n] > 1 {
			parts[i] = fmt.Sprintf("%s x%d", n, count[n])
		}
	}
	return strings.Join(parts, ", ")
}

// savedNames lists the manifest's modules_to_save layers, "" for none.
func savedNames(man *rewrite.Manifest) string {
	names := make([]string, len(man.Saved))
	for i, s := range man.Saved {
		names[i] = s.Module
	}
	return strings.Join(names, ", ")
}
