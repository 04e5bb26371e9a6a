package main

// How to add a command
//
// Every command lives in its own file (inject.go, inspect.go, ...) and has
// three parts, in the style of GitHub's gh CLI:
//
//  1. An options struct holding the command's I/O and everything its flags
//     and arguments set:
//
//	type MergeOptions struct {
//		IO     *IOStreams
//		Model  string
//		Output string
//		...
//	}
//
//  2. A constructor that only declares flags and parses them into the
//     options. runF lets tests capture the parsed options without running
//     anything; it is nil in production:
//
//	func NewCmdMerge(f *Factory, runF func(*MergeOptions) error) *cobra.Command {
//		opts := &MergeOptions{IO: f.IO}
//		cmd := &cobra.Command{
//			Use:     "merge MODEL -o OUT",
//			Short:   "...",
//			Example: "  onnxlora merge ...",
//			Args:    exactArgs(1, "one MODEL"),
//			RunE: func(cmd *cobra.Command, args []string) error {
//				opts.Model = args[0]
//				// Check flag combinations here; return usageErrorf(...) (exit 2).
//				if runF != nil {
//					return runF(opts)
//				}
//				return runMerge(opts)
//			},
//		}
//		cmd.Flags().StringVarP(&opts.Output, "output", "o", "", "...")
//		return cmd
//	}
//
//  3. runX(opts) does the work against opts.IO: results on IO.Out, notes on
//     IO.ErrOut through IO.Notef/Warnf (silenced by --quiet). It returns
//     errors instead of printing them; Main prints "onnxlora: <message>" on
//     one line and exits 1 (2 for a *UsageError).
//
// Then add ONE line to the list in NewCmdRoot below. Shared helpers in
// options.go: exactArgs/noArgs, usageErrorf, selectFlags (--target, --exclude,
// --layers, --rank, ...), externalFlag + registerExternalFlag (--external),
// loadModel/saveModel (with a spinner on terminals), checkOutput (refuse
// -o equal to an input), writeJSON, onnxFileCompletion. Conventions: -o/--output
// for files written, --json for machine-readable output, --quiet is global.
// TestCommandConventions (root_test.go) checks every registered command for a
// Short description, Examples, RunE and those flags. Test a command through
// run(t, args...) (helpers_test.go), which calls Main on in-memory streams
// and returns the exit code, stdout and stderr.

import (
	"fmt"
	"io"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/onnxlora/onnxlora/internal/termsafe"
)

// Factory carries what commands share: the I/O streams and the build
// information. Tests build their own with TestIO.
type Factory struct {
	IO *IOStreams
	// BuildInfo returns the binary's build information
	// (runtime/debug.ReadBuildInfo); tests replace it.
	BuildInfo func() (*debug.BuildInfo, bool)
}

// NewFactory returns a Factory on the given streams.
func NewFactory(ios *IOStreams) *Factory {
	return &Factory{IO: ios, BuildInfo: debug.ReadBuildInfo}
}

// command groups for `onnxlora --help`.
const (
	groupLifecycle = "lifecycle"
	groupOther     = "other"
)

// NewCmdRoot builds the onnxlora command tree.
func NewCmdRoot(f *Factory) *cobra.Command {
	root := &cobra.Command{
		Use:   "onnxlora <command> [flags]",
		Short: "Add LoRA adapters to ONNX models, train them, and merge them back",
		Long: `onnxlora adds LoRA adapters to ONNX models, trains them, and merges trained
adapters back, so fine-tuned models run in any ONNX runtime without Python.

The lifecycle of a model:

  inspect   list the layers that can take an adapter, and the adapters present
  inject    add LoRA branches (A, B, scaling) beside the chosen MatMul/Gemm layers
  train     fine-tune the adapters on JSONL data, on ONNX Runtime, with
            torch's optimizers and Trainer's schedules
  grad      write the training-step graph (loss and gradients in plain ONNX)
  merge     fold trained adapters into the base weights (W + scaling*A*B),
            or apply a PEFT adapter directory (merge BASE --adapter DIR)
  verify    run two models in ONNX Runtime on the same inputs and compare
  export-adapter  write the adapters as a PEFT directory

Layers are named by PEFT-style module paths (model.layers.0.self_attn.q_proj)
and chosen with PEFT's rules, so a LoraConfig's target_modules, rank_pattern
and layers_to_transform carry over as flags.`,
		Example: `  onnxlora inspect model.onnx
  onnxlora inspect model.onnx --target q_proj,v_proj
  onnxlora inject model.onnx -o lora.onnx --target q_proj,v_proj --rank 8 --alpha 16
  onnxlora inject model.onnx --target all-linear --dry-run
  onnxlora merge trained.onnx -o merged.onnx
  onnxlora verify trained.onnx merged.onnx`,
		SilenceErrors: true,
		SilenceUsage:  true,
		Version:       shortVersion(f),
	}
	root.SetVersionTemplate("onnxlora {{.Version}}\n")
	root.PersistentFlags().BoolVarP(&f.IO.Quiet, "quiet", "q", false, "print only requested output and errors")
	registerAllowSymlinks(root)
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return &UsageError{err}
	})
	root.SetIn(f.IO.In)
	root.SetOut(f.IO.Out)
	root.SetErr(f.IO.ErrOut)
	root.CompletionOptions.DisableDefaultCmd = true
	root.AddGroup(
		&cobra.Group{ID: groupLifecycle, Title: "Model commands:"},
		&cobra.Group{ID: groupOther, Title: "Other commands:"},
	)
	root.SetHelpCommandGroupID(groupOther)

	// The commands, one line each. To add one, see the comment at the top
	// of this file.
	root.AddCommand(
		NewCmdInspect(f, nil),
		NewCmdInject(f, nil),
		NewCmdGrad(f, nil),
		NewCmdTrain(f, nil),
		NewCmdMerge(f, nil),
		NewCmdResize(f, nil),
		NewCmdExportAdapter(f, nil),
		NewCmdConvertAdapter(f, nil),
		NewCmdCombine(f, nil),
		NewCmdVerify(f, nil),
		NewCmdVersion(f, nil),
		NewCmdCompletion(f),
	)

	for _, c := range root.Commands() {
		if c.GroupID != "" {
			continue
		}
		switch c.Name() {
		case "version", "completion", "help":
			c.GroupID = groupOther
		default:
			c.GroupID = groupLifecycle
		}
	}
	return root
}

// Main runs onnxlora with args (without the program name) and returns the
// exit status: 0 on success, 1 on failure, 2 on a usage error. Errors are
// printed as one line, "onnxlora: <message>", on ErrOut.
func Main(f *Factory, args []string) int {
	root := NewCmdRoot(f)
	if args == nil {
		args = []string{} // cobra reads os.Args for a nil slice
	}
	root.SetArgs(args)
	cmd, err := root.ExecuteC()
	if err == nil {
		return 0
	}
	code := 1
	msg := err.Error()
	if cmd == nil {
		cmd = root
	}
	if unknown, ok := unknownCommand(root, err); ok {
		msg, code = unknown, 2
	} else if IsUsageError(err) {
		code = 2
		msg += fmt.Sprintf(" (see '%s --help')", cmd.CommandPath())
	}
	printError(f.IO.ErrOut, msg)
	return code
}

// unknownCommand rewrites cobra's multi-line "unknown command" error (it
// has no error type) as one line with its suggestions.
func unknownCommand(root *cobra.Command, err error) (string, bool) {
	msg := err.Error()
	if !strings.HasPrefix(msg, "unknown command ") {
		return "", false
	}
	first, _, _ := strings.Cut(msg, "\n")
	name := ""
	if i := strings.IndexByte(first, '"'); i >= 0 {
		if j := strings.IndexByte(first[i+1:], '"'); j >= 0 {
			name = first[i+1 : i+1+j]
		}
	}
	if s := root.SuggestionsFor(name); len(s) > 0 {
		for i := range s {
			s[i] = strconv.Quote(s[i])
		}
		first += fmt.Sprintf("; did you mean %s?", strings.Join(s, " or "))
	}
	return first + " (see 'onnxlora --help')", true
}

// printError writes msg as a single line: newlines inside an error (from a
// library, say) are folded so scripts can rely on one line per error.
func printError(w io.Writer, msg string) {
	var parts []string
	for _, line := range strings.Split(msg, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			parts = append(parts, line)
		}
	}
	fmt.Fprintf(w, "onnxlora: %s\n", termsafe.Escape(strings.Join(parts, " ")))
}
