package main

import (
	"github.com/spf13/cobra"
)

// NewCmdCompletion builds `onnxlora completion SHELL`, which prints cobra's
// completion script for bash, zsh, fish or PowerShell.
func NewCmdCompletion(f *Factory) *cobra.Command {
	var noDesc bool
	cmd := &cobra.Command{
		Use:   "completion bash|zsh|fish|powershell",
		Short: "Print a shell completion script",
		Long: `Print the completion script for a shell. Completion covers commands,
flags, flag values (--external, --init) and .onnx files for MODEL.`,
		Example: `  # bash, for the current shell:
  source <(onnxlora completion bash)
  # bash, for every session (Debian's bash-completion):
  onnxlora completion bash > ~/.local/share/bash-completion/completions/onnxlora

  # zsh:
  onnxlora completion zsh > "${fpath[1]}/_onnxlora"

  # fish:
  onnxlora completion fish > ~/.config/fish/completions/onnxlora.fish

  # PowerShell:
  onnxlora completion powershell | Out-String | Invoke-Expression`,
		ValidArgs: []string{"bash", "zsh", "fish", "powershell"},
		Args: func(cmd *cobra.Command, args []string) error {
			if err := exactArgs(1, "one SHELL (bash, zsh, fish or powershell)")(cmd, args); err != nil {
				return err
			}
			if err := cobra.OnlyValidArgs(cmd, args); err != nil {
				return &UsageError{err}
			}
			return nil
		},
		DisableFlagsInUseLine: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			root := cmd.Root()
			out := f.IO.Out
			switch args[0] {
			case "bash":
				return root.GenBashCompletionV2(out, !noDesc)
			case "zsh":
				if noDesc {
					return root.GenZshCompletionNoDesc(out)
				}
				return root.GenZshCompletion(out)
			case "fish":
				return root.GenFishCompletion(out, !noDesc)
			default:
				if noDesc {
					return root.GenPowerShellCompletion(out)
				}
				return root.GenPowerShellCompletionWithDesc(out)
			}
		},
	}
	cmd.Flags().BoolVar(&noDesc, "no-descriptions", false, "leave the descriptions out of completions")
	return cmd
}
