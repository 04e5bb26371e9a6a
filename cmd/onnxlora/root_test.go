package main

import (
	"bytes"
	"encoding/json"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

func TestHelp(t *testing.T) {
	r := mustRun(t, "--help")
	for _, want := range []string{"Model commands:", "inspect", "inject", "Other commands:", "version", "completion", "Examples:", "--quiet"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("onnxlora --help lacks %q:\n%s", want, r.stdout)
		}
	}
	for _, cmd := range []string{"inject", "inspect", "version", "completion"} {
		r := mustRun(t, cmd, "--help")
		if !strings.Contains(r.stdout, "Examples:") || !strings.Contains(r.stdout, "onnxlora "+cmd) {
			t.Errorf("onnxlora %s --help lacks examples:\n%s", cmd, r.stdout)
		}
	}
	// No arguments at all prints the help and succeeds.
	if r := mustRun(t); !strings.Contains(r.stdout, "Usage:") {
		t.Errorf("onnxlora without arguments: %q", r.stdout)
	}
}

func TestCompletion(t *testing.T) {
	for _, sh := range []string{"bash", "zsh", "fish", "powershell"} {
		r := mustRun(t, "completion", sh)
		if !strings.Contains(r.stdout, "onnxlora") {
			t.Errorf("completion %s: no script", sh)
		}
	}
	// Flag values complete from the registered lists.
	r := mustRun(t, "__complete", "inject", "m.onnx", "--external", "")
	if !strings.Contains(r.stdout, "always") {
		t.Errorf("completion of --external: %q", r.stdout)
	}
}

func fakeBuild(settings ...debug.BuildSetting) func() (*debug.BuildInfo, bool) {
	return func() (*debug.BuildInfo, bool) {
		return &debug.BuildInfo{GoVersion: "go1.24.0", Main: debug.Module{Version: "v0.2.0"}, Settings: settings}, true
	}
}

func TestVersion(t *testing.T) {
	cases := []struct {
		name  string
		build func() (*debug.BuildInfo, bool)
		want  []string
	}{
		{"vcs", fakeBuild(
			debug.BuildSetting{Key: "vcs.revision", Value: "f9dc1d3f73c7fac90dfd523364a03d1a1cbe5ec6"},
			debug.BuildSetting{Key: "vcs.time", Value: "2026-11-28T16:55:19Z"},
			debug.BuildSetting{Key: "vcs.modified", Value: "true"},
		), []string{"onnxlora v0.2.0\n", "commit: f9dc1d3f73c7fac90dfd523364a03d1a1cbe5ec6 (2026-11-28T16:55:19Z), with uncommitted changes\n", "built with go1.24.0"}},
		{"buildvcs=false", fakeBuild(), []string{"onnxlora v0.2.0\n", "commit: unknown (built without VCS information)\n"}},
		{"no build info", func() (*debug.BuildInfo, bool) { return nil, false }, []string{"onnxlora (devel)\n", "commit: unknown"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ios, _, out, _ := TestIO()
			f := NewFactory(ios)
			f.BuildInfo = c.build
			if code := Main(f, []string{"version"}); code != 0 {
				t.Fatalf("exit %d", code)
			}
			for _, w := range c.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("version output lacks %q:\n%s", w, out)
				}
			}
		})
	}

	ios, _, out, _ := TestIO()
	f := NewFactory(ios)
	f.BuildInfo = fakeBuild(debug.BuildSetting{Key: "vcs.revision", Value: "abc123"})
	if code := Main(f, []string{"version", "--json"}); code != 0 {
		t.Fatalf("exit %d", code)
	}
	var v VersionInfo
	if err := json.Unmarshal(out.Bytes(), &v); err != nil || v.Version != "v0.2.0" || v.Commit != "abc123" {
		t.Errorf("version --json: %v %+v", err, v)
	}

	ios, _, out, _ = TestIO()
	f = NewFactory(ios)
	f.BuildInfo = fakeBuild(debug.BuildSetting{Key: "vcs.revision", Value: "f9dc1d3f73c7fac90dfd523364a03d1a1cbe5ec6"})
	if code := Main(f, []string{"--version"}); code != 0 || out.String() != "onnxlora v0.2.0 (f9dc1d3f73c7)\n" {
		t.Errorf("--version: exit %d, %q", code, out)
	}
}

func TestPrintErrorIsOneLine(t *testing.T) {
	var b bytes.Buffer
	printError(&b, "first\n\n  second\nthird\n")
	if got := b.String(); got != "onnxlora: first second third\n" {
		t.Errorf("printError = %q", got)
	}
}

func TestProgressOnlyOnTerminal(t *testing.T) {
	var b bytes.Buffer
	ios := &IOStreams{ErrOut: &b, ProgressDelay: time.Millisecond}
	stop := ios.StartProgress("loading x")
	time.Sleep(20 * time.Millisecond)
	stop()
	if b.Len() != 0 {
		t.Errorf("progress drawn on a non-terminal: %q", b.String())
	}

	ios.ErrTTY = true
	stop = ios.StartProgress("loading x")
	time.Sleep(300 * time.Millisecond)
	stop()
	stop() // stopping twice is fine
	if s := b.String(); !strings.Contains(s, "loading x") || !strings.HasSuffix(s, "\r\x1b[K") {
		t.Errorf("progress on a terminal = %q, want a spinner then a cleared line", s)
	}

	b.Reset()
	ios.Quiet = true
	stop = ios.StartProgress("loading x")
	time.Sleep(20 * time.Millisecond)
	stop()
	if b.Len() != 0 {
		t.Errorf("progress drawn with --quiet: %q", b.String())
	}

	// A fast operation draws nothing even on a terminal.
	ios = &IOStreams{ErrOut: &b, ErrTTY: true}
	ios.StartProgress("quick")()
	if b.Len() != 0 {
		t.Errorf("progress drawn for a fast operation: %q", b.String())
	}
}

// TestCommandConventions holds every command, including ones added later,
// to the CLI's conventions (see the comment at the top of root.go).
func TestCommandConventions(t *testing.T) {
	ios, _, _, _ := TestIO()
	root := NewCmdRoot(NewFactory(ios))
	for _, c := range root.Commands() {
		if c.Name() == "help" {
			continue
		}
		if c.Short == "" || c.Example == "" {
			t.Errorf("%s: needs a Short description and Examples", c.Name())
		}
		if c.RunE == nil {
			t.Errorf("%s: use RunE so errors reach Main", c.Name())
		}
		if f := c.Flags().Lookup("output"); f != nil && f.Shorthand != "o" {
			t.Errorf("%s: --output must have the shorthand -o", c.Name())
		}
		if f := c.Flags().Lookup("json"); f != nil && f.Value.Type() != "bool" {
			t.Errorf("%s: --json must be a bool flag", c.Name())
		}
		if f := c.LocalFlags().Lookup("quiet"); f != nil {
			t.Errorf("%s: --quiet is global; read IOStreams.Quiet instead of defining it", c.Name())
		}
	}
}
