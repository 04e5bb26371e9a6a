package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// version can be set at link time: go build -ldflags "-X main.version=v1.2.3".
// It wins over the module version recorded by the Go toolchain.
var version = ""

// VersionOptions holds the version command's flags.
type VersionOptions struct {
	IO        *IOStreams
	BuildInfo func() (*debug.BuildInfo, bool)
	JSON      bool
}

// VersionInfo is what `onnxlora version --json` prints.
type VersionInfo struct {
	// Version is the module version ("v0.3.0"), or "(devel)" for a build
	// from a source checkout.
	Version string `json:"version"`
	// Commit, CommitTime and Modified come from the VCS stamp Go embeds;
	// they are empty when the binary was built with -buildvcs=false or
	// outside a repository.
	Commit     string `json:"commit,omitempty"`
	CommitTime string `json:"commit_time,omitempty"`
	Modified   bool   `json:"modified,omitempty"`
	GoVersion  string `json:"go_version"`
	Platform   string `json:"platform"`
}

// NewCmdVersion builds `onnxlora version`.
func NewCmdVersion(f *Factory, runF func(*VersionOptions) error) *cobra.Command {
	opts := &VersionOptions{IO: f.IO, BuildInfo: f.BuildInfo}
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version and the commit onnxlora was built from",
		Long: `Print onnxlora's module version and the VCS commit it was built from.

The commit comes from the build information the Go toolchain embeds. Builds
made with -buildvcs=false (or outside a git checkout) have none; the version
then says so instead of failing.`,
		Example: `  onnxlora version
  onnxlora version --json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if runF != nil {
				return runF(opts)
			}
			return runVersion(opts)
		},
	}
	cmd.Flags().BoolVar(&opts.JSON, "json", false, "print the version information as JSON")
	return cmd
}

func runVersion(opts *VersionOptions) error {
	info := readVersion(opts.BuildInfo)
	if opts.JSON {
		return writeJSON(opts.IO.Out, info)
	}
	out := opts.IO.Out
	fmt.Fprintf(out, "onnxlora %s\n", info.Version)
	switch {
	case info.Commit == "":
		fmt.Fprintln(out, "commit: unknown (built without VCS information)")
	default:
		line := "commit: " + info.Commit
		if info.CommitTime != "" {
			line += " (" + info.CommitTime + ")"
		}
		if info.Modified {
			line += ", with uncommitted changes"
		}
		fmt.Fprintln(out, line)
	}
	fmt.Fprintf(out, "built with %s for %s\n", info.GoVersion, info.Platform)
	return nil
}

// readVersion collects the version from the link-time variable and the
// embedded build information, whichever is there.
func readVersion(buildInfo func() (*debug.BuildInfo, bool)) VersionInfo {
	info := VersionInfo{Version: "(devel)", GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	var bi *debug.BuildInfo
	ok := false
	if buildInfo != nil {
		bi, ok = buildInfo()
	}
	if ok && bi != nil {
		if v := bi.Main.Version; v != "" {
			info.Version = v
		}
		if bi.GoVersion != "" {
			info.GoVersion = bi.GoVersion
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				info.Commit = s.Value
			case "vcs.time":
				info.CommitTime = s.Value
			case "vcs.modified":
				info.Modified = s.Value == "true"
			}
		}
	}
	if version != "" {
		info.Version = version
	}
	return info
}

// shortVersion is the one-line version for --version.
func shortVersion(f *Factory) string {
	info := readVersion(f.BuildInfo)
	v := info.Version
	if info.Commit != "" {
		c := info.Commit
		if len(c) > 12 {
			c = c[:12]
		}
		v += " (" + c
		if info.Modified {
			v += "+dirty"
		}
		v += ")"
	}
	return v
}
