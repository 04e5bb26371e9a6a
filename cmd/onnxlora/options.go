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

	"github.com/onnxlora/onnxlora/graph"
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
	m, err := graph.Load(path)
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
// path, or the same file through a link). graph.Save refuses to overwrite a
// model's own files too; checking first gives the error before any work.
func checkOutput(output string, inputs ...string) error {
	for _, in := range inputs {
		if in == "" {
			continue
		}
		if samePath(output, in) {
			return usageErrorf("output %s is the input %s; choose another output file", output, in)
		}
	}
	return nil
}

// samePath reports whether a and b name the same file.
func samePath(a, b string) bool {
	aa, err1 := filepath.Abs(a)
	bb, err2 := filepath.Abs(b)
	if err1 == nil && err2 == nil && aa == bb {
		return true
	}
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(sa, sb)
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
