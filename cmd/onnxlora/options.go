package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/paths"
	"github.com/onnxlora/onnxlora/internal/termsafe"
	"github.com/onnxlora/onnxlora/rewrite"
)

// UsageError is a mistake in the command line: a bad flag or flag value, a
// wrong number of arguments, flags that do not go together. It exits with
// status 2; every other error exits with 1.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// usageErrorf returns a UsageError.
func usageErrorf(format string, args ...any) error {
	return &UsageError{fmt.Errorf(format, args...)}
}

// IsUsageError reports whether err is (or wraps) a UsageError.
func IsUsageError(err error) bool {
	var u *UsageError
	return errors.As(err, &u)
}

// exactArgs is cobra.ExactArgs with a usage error naming the arguments.
func exactArgs(n int, names string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageErrorf("%s takes %s, got %d argument(s)", cmd.CommandPath(), names, len(args))
		}
		return nil
	}
}

// noArgs refuses positional arguments with a usage error.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageErrorf("%s takes no arguments, got %q", cmd.CommandPath(), args)
	}
	return nil
}

// runE is the RunE of a command with one positional argument: it stores
// the argument in *arg, checks the flags with validate (usage errors, before
// any file is read), then runs runF when a test gave one, else run.
func runE[T any](opts *T, arg *string, validate func(*cobra.Command) error, runF, run func(*T) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		*arg = args[0]
		if err := validate(cmd); err != nil {
			return err
		}
		if runF != nil {
			return runF(opts)
		}
		return run(opts)
	}
}

// onnxFileCompletion completes positional arguments with .onnx files.
func onnxFileCompletion(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	return []string{"onnx"}, cobra.ShellCompDirectiveFilterFileExt
}

// selectFlags are the layer selection flags shared by inject and inspect
// (and any command that picks layers the PEFT way).
type selectFlags struct {
	Targets       []string
	TargetRegex   string
	Exclude       []string
	ExcludeRegex  string
	Layers        []int
	LayersPattern []string
	Rank          int
	Alpha         float64
	RankPattern   []string
	AlphaPattern  []string
}

// register adds the flags to fs. targetUsage describes --target for the
// command at hand.
func (s *selectFlags) register(fs *pflag.FlagSet, targetUsage string) {
	fs.StringSliceVarP(&s.Targets, "target", "t", nil, targetUsage)
	fs.StringVar(&s.TargetRegex, "target-regex", "", "regex that must match a whole module path (PEFT target_modules as a string)")
	fs.StringSliceVar(&s.Exclude, "exclude", nil, "module names to leave out, same rule as --target (PEFT exclude_modules)")
	fs.StringVar(&s.ExcludeRegex, "exclude-regex", "", "regex; modules whose whole path it matches are left out")
	fs.IntSliceVar(&s.Layers, "layers", nil, "only these layer indices, e.g. 0,3 (PEFT layers_to_transform)")
	fs.StringSliceVar(&s.LayersPattern, "layers-pattern", nil, "layer container names the index follows, e.g. layers,h (PEFT layers_pattern)")
	fs.IntVarP(&s.Rank, "rank", "r", 8, "LoRA rank r")
	fs.Float64Var(&s.Alpha, "alpha", 8, "lora_alpha; the adapter is scaled by alpha/r (alpha/sqrt(r) with --rslora)")
	fs.StringArrayVar(&s.RankPattern, "rank-pattern", nil, "regex=rank overriding --rank for matching modules; repeatable, first match wins (PEFT rank_pattern)")
	fs.StringArrayVar(&s.AlphaPattern, "alpha-pattern", nil, "regex=alpha overriding --alpha; repeatable (PEFT alpha_pattern)")
}

// hasTarget reports whether any target was given.
func (s *selectFlags) hasTarget() bool {
	return len(s.Targets) > 0 || s.TargetRegex != ""
}

// options turns the flags into validated SelectOptions. All errors are
// usage errors: they are found before the model is read.
func (s *selectFlags) options() (rewrite.SelectOptions, error) {
	opts := rewrite.SelectOptions{
		Targets: s.Targets, TargetRegex: s.TargetRegex, Exclude: s.Exclude, ExcludeRegex: s.ExcludeRegex,
		Layers: s.Layers, LayersPattern: s.LayersPattern, Rank: s.Rank, Alpha: s.Alpha,
	}
	var err error
	if opts.RankPattern, err = rewrite.ParsePatterns(s.RankPattern); err != nil {
		return opts, &UsageError{fmt.Errorf("--rank-pattern: %w", err)}
	}
	if opts.AlphaPattern, err = rewrite.ParsePatterns(s.AlphaPattern); err != nil {
		return opts, &UsageError{fmt.Errorf("--alpha-pattern: %w", err)}
	}
	if _, err := rewrite.NewSelector(opts); err != nil {
		return opts, &UsageError{err}
	}
	return opts, nil
}

// externalFlag is the --external flag: auto, always or never.
type externalFlag struct{ mode graph.ExternalMode }

func (e *externalFlag) String() string {
	switch e.mode {
	case graph.ExternalAlways:
		return "always"
	case graph.ExternalNever:
		return "never"
	}
	return "auto"
}

func (e *externalFlag) Set(s string) error {
	switch strings.ToLower(s) {
	case "auto":
		e.mode = graph.ExternalAuto
	case "always":
		e.mode = graph.ExternalAlways
	case "never":
		e.mode = graph.ExternalNever
	default:
		return fmt.Errorf("want auto, always or never")
	}
	return nil
}

func (e *externalFlag) Type() string { return "auto|always|never" }

// registerExternalFlag adds --external to a command that saves a model.
func registerExternalFlag(cmd *cobra.Command, e *externalFlag) {
	cmd.Flags().Var(e, "external", "where weights go: auto keeps the input's layout (external data if it had any, or past 2 GiB), always writes tensors >= 1 KiB to OUT.data, never stores everything inline")
	_ = cmd.RegisterFlagCompletionFunc("external", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return []string{"auto", "always", "never"}, cobra.ShellCompDirectiveNoFileComp
	})
}

// loadModel loads an ONNX model, with a spinner on a terminal for slow loads.
func loadModel(ios *IOStreams, path string) (*graph.Model, error) {
	stop := ios.StartProgress("loading " + path)
	m, err := graph.LoadLazy(path) // inline weights stay in the file until read
	stop()
	return m, err
}

// saveModel saves a model, with a spinner on a terminal for slow saves.
func saveModel(ios *IOStreams, m *graph.Model, path string, opts graph.SaveOptions) error {
	stop := ios.StartProgress("writing " + path)
	err := m.Save(path, opts)
	stop()
	return err
}

// checkOutput refuses an output path that is one of the inputs (the same
// path, or the same file through a link), or one of the PEFT files in an
// input folder. It is checkPaths for a command with one output.
func checkOutput(output string, inputs ...string) error {
	var ins []string
	for _, in := range inputs {
		ins = append(ins, "the input", in)
		if st, err := os.Stat(in); err == nil && st.IsDir() {
			ins = append(ins, peftFiles("the input adapter", in)...)
		}
	}
	return checkPaths(nil, ins, []string{"output", output})
}

// checkPaths is the one check every command makes before it writes: no
// output may be a file the command reads (the same path, or the same file
// through symbolic links, "..", or a hard link) or another output, and no
// output that names a file may be "-". inputs and outputs alternate a
// description and a path, e.g. {"the model", MODEL} and {"-o", OUT}; empty
// paths are skipped. With a model, its file and its external data files
// are inputs too. Errors are usage errors, found before anything is
// written (graph.Save checks the model's own files again as it writes).
func checkPaths(m *graph.Model, inputs, outputs []string) error {
	var g paths.Guard
	if m != nil {
		g.Input("a file of the model", m.InputFiles()...)
	}
	for i := 0; i+1 < len(inputs); i += 2 {
		g.Input(inputs[i], inputs[i+1])
	}
	for i := 0; i+1 < len(outputs); i += 2 {
		what, path := outputs[i], outputs[i+1]
		if path == paths.Stdout {
			return usageErrorf("%s -: this output is a file and cannot go to standard output; give a file name", what)
		}
		if err := g.Output(what, path); err != nil {
			return &UsageError{err}
		}
	}
	return nil
}

// modelOutputs is the outputs a model saved to out writes, for checkPaths:
// out and its data file (the data file's name as Save picks it).
func modelOutputs(flag, out string) []string {
	if out == "" || out == paths.Stdout {
		return []string{flag, out}
	}
	_, data, err := graph.SaveOptions{}.WithDefaults(out)
	if err != nil {
		return []string{flag, out}
	}
	return []string{flag, out, "the data file of " + flag, data}
}

// adapterFiles is peftFiles for a folder, or the path itself for an
// adapter file (such as X.onnx_adapter).
func adapterFiles(what, path string) []string {
	if st, err := os.Stat(path); err == nil && !st.IsDir() {
		return []string{what, path}
	}
	return peftFiles(what, path)
}

// peftFiles lists the files of a PEFT adapter folder that onnxlora reads
// and writes, for checkPaths.
func peftFiles(what, dir string) []string {
	switch dir {
	case "":
		return nil
	case paths.Stdout:
		return []string{what, dir} // refused by checkPaths
	}
	return []string{
		what + " config", filepath.Join(dir, export.PEFTConfigFile),
		what + " weights", filepath.Join(dir, export.PEFTWeightsFile),
	}
}

// writeJSON writes v as indented JSON and a newline.
func writeJSON(w io.Writer, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(data, '\n'))
	return err
}

// openOutput runs write on where a command's report goes: the -o file
// (written atomically: a failed write leaves no file) or, for "" and "-", Out.
func openOutput(ios *IOStreams, path string, write func(io.Writer) error) error {
	if path == "" || path == "-" {
		return write(ios.Out)
	}
	return graph.WriteFileAtomic(path, write)
}

// convertInputs and convertOutputs are what convert-adapter reads and
// writes: a PEFT folder's files or an adapter file, either way round.
func convertInputs(o *ConvertAdapterOptions) []string {
	ins := []string{"--model", o.Model}
	if st, err := os.Stat(o.Input); err == nil && st.IsDir() {
		return append(ins, peftFiles("the input adapter", o.Input)...)
	}
	return append(ins, "the input adapter", o.Input)
}

func convertOutputs(o *ConvertAdapterOptions) []string {
	if st, err := os.Stat(o.Input); err == nil && !st.IsDir() {
		return append([]string{"-o", o.Output}, peftFiles("-o", o.Output)...)
	}
	return []string{"-o", o.Output}
}

// registerAllowSymlinks adds the global --allow-symlinks flag: external
// data may lead through symbolic links into these folders (a Hugging Face
// cache's blobs), not only stay in the model's folder.
func registerAllowSymlinks(root *cobra.Command) {
	var dirs []string
	root.PersistentFlags().StringArrayVar(&dirs, "allow-symlinks", nil, "let external data files be symlinks to files inside this folder (e.g. a Hugging Face cache: ~/.cache/huggingface/hub); repeatable")
	root.PersistentPreRunE = func(*cobra.Command, []string) error {
		if err := graph.AllowSymlinksUnder(dirs...); err != nil {
			return usageErrorf("--allow-symlinks: %v", err)
		}
		return nil
	}
}

// samePath reports whether a and b name the same file (paths.Same).
func samePath(a, b string) bool { return paths.Same(a, b) }

// warnNonFinite says, even with --quiet, which merged weights hold NaN or
// infinite values: the model was written (without --safe), but it is
// almost certainly broken.
func warnNonFinite(ios *IOStreams, rep *rewrite.MergeReport) {
	for _, l := range rep.Merged {
		if l.NonFinite > 0 {
			fmt.Fprintln(ios.ErrOut, "warning: "+termsafe.Escape(fmt.Sprintf("merging %s wrote %d NaN or infinite values (of %d) into %s; --safe refuses such a merge", l.Module, l.NonFinite, l.Elements, l.Weight)))
		}
	}
}

// warnLargeRanks names the adapters whose rank is above min(in, out) of
// their layer (allowed, as in PEFT, but only larger, not more expressive).
func warnLargeRanks(ios *IOStreams, adapters []rewrite.Adapter) {
	for _, a := range adapters {
		if lim := min(a.InFeatures, a.OutFeatures); a.Rank > 0 && int64(a.Rank) > lim {
			ios.Warnf("module %s: rank %d is more than min(in, out) = %d of its [%d,%d] weight; the update is no more expressive, only larger", a.Module, a.Rank, lim, a.InFeatures, a.OutFeatures)
		}
	}
}
