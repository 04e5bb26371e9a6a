package main

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestGuideOutputs runs every command the user guide shows output for and
// compares: a block after "<!-- output of: onnxlora ARGS -->" must be what
// ARGS prints (stdout on success, stderr on failure), line by line with
// trailing spaces ignored, where a line "..." stands for any number of
// lines. ARGS run from the repository root; OUT.onnx is a temporary file.
func TestGuideOutputs(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(root, "docs", "guide.md"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type example struct {
		line int
		args []string
		want []string
	}
	var examples []example
	sc := bufio.NewScanner(f)
	n := 0
	var cur *example
	inBlock := false
	for sc.Scan() {
		n++
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "<!-- output of: onnxlora ") && strings.HasSuffix(line, " -->"):
			cmd := strings.TrimSuffix(strings.TrimPrefix(line, "<!-- output of: onnxlora "), " -->")
			cur = &example{line: n, args: strings.Fields(cmd)}
		case cur != nil && !inBlock && strings.HasPrefix(line, "```"):
			inBlock = true
		case cur != nil && inBlock && line == "```":
			examples = append(examples, *cur)
			cur, inBlock = nil, false
		case cur != nil && inBlock:
			cur.want = append(cur.want, strings.TrimRight(line, " "))
		}
	}
	if len(examples) < 5 {
		t.Fatalf("found %d checked examples in docs/guide.md", len(examples))
	}
	t.Chdir(root)
	for _, ex := range examples {
		args := append([]string(nil), ex.args...)
		for i, a := range args {
			if a == "OUT.onnx" {
				args[i] = filepath.Join(t.TempDir(), "out.onnx")
			}
		}
		r := run(t, args...)
		got := r.stdout
		if r.code != 0 {
			got = r.stderr
		}
		var lines []string
		for _, l := range strings.Split(strings.TrimRight(got, "\n"), "\n") {
			lines = append(lines, strings.TrimRight(l, " "))
		}
		if !matchLines(ex.want, lines) {
			t.Errorf("docs/guide.md:%d: onnxlora %s printed (exit %d):\n%s\nthe guide shows:\n%s", ex.line, strings.Join(ex.args, " "), r.code, strings.Join(lines, "\n"), strings.Join(ex.want, "\n"))
		}
	}
}

// matchLines matches got against want, where "..." in want skips any
// number of lines.
func matchLines(want, got []string) bool {
	if len(want) == 0 {
		return len(got) == 0
	}
	if want[0] == "..." {
		for i := 0; i <= len(got); i++ {
			if matchLines(want[1:], got[i:]) {
				return true
			}
		}
		return false
	}
	return len(got) > 0 && got[0] == want[0] && matchLines(want[1:], got[1:])
}
