package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/rewrite"
)

var tinyGPTqv = []string{
	"model.layers.0.self_attn.q_proj",
	"model.layers.0.self_attn.v_proj",
	"model.layers.1.self_attn.q_proj",
	"model.layers.1.self_attn.v_proj",
}

func readManifest(t *testing.T, path string) *rewrite.Manifest {
	t.Helper()
	m, err := graph.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	man, err := rewrite.ReadManifest(m)
	if err != nil {
		t.Fatal(err)
	}
	if man == nil {
		t.Fatalf("%s has no manifest", path)
	}
	return man
}

func modules(man *rewrite.Manifest) []string {
	var out []string
	for _, a := range man.Adapters {
		out = append(out, a.Module)
	}
	return out
}

func TestInjectTinyGPT(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "lora.onnx")
	manifestFile := filepath.Join(dir, "lora.json")
	r := mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", out, "--target", "q_proj,v_proj",
		"--rank", "8", "--alpha", "16", "--manifest", manifestFile)

	want := "trainable params: 2,048 || all params: 27,904 || trainable%: 7.3394\n"
	if r.stdout != want {
		t.Errorf("stdout = %q, want %q", r.stdout, want)
	}
	if !strings.Contains(r.stderr, "q_proj x2, v_proj x2") {
		t.Errorf("stderr = %q, want a summary of the adapters", r.stderr)
	}
	testutil.CheckONNX(t, out)
	man := readManifest(t, out)
	if got := modules(man); !reflect.DeepEqual(got, tinyGPTqv) {
		t.Errorf("manifest modules = %q, want %q", got, tinyGPTqv)
	}
	for _, a := range man.Adapters {
		if a.Rank != 8 || a.Alpha != 16 || a.Scaling != 2 {
			t.Errorf("%s: rank %d alpha %v scaling %v, want 8, 16, 2", a.Module, a.Rank, a.Alpha, a.Scaling)
		}
	}
	if len(man.Trainable) != 8 {
		t.Errorf("trainable = %q, want 8 names", man.Trainable)
	}

	// --manifest wrote the same manifest as the model's metadata.
	data, err := os.ReadFile(manifestFile)
	if err != nil {
		t.Fatal(err)
	}
	var fromFile rewrite.Manifest
	if err := json.Unmarshal(data, &fromFile); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&fromFile, man) {
		t.Errorf("--manifest file differs from the model's manifest")
	}
}

func TestInjectQuietPrintsNothing(t *testing.T) {
	out := filepath.Join(t.TempDir(), "lora.onnx")
	r := mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", out, "--target", "q_proj", "--quiet")
	if r.stderr != "" {
		t.Errorf("stderr with --quiet = %q, want nothing", r.stderr)
	}
	if !strings.HasPrefix(r.stdout, "trainable params:") {
		t.Errorf("stdout = %q, want the PEFT line", r.stdout)
	}
}

func TestInjectDryRunWritesNothing(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "lora.onnx")
	r := mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", out, "--target", "q_proj,v_proj",
		"--rank", "8", "--alpha", "16", "--dry-run", "--manifest", filepath.Join(dir, "m.json"))
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("dry run wrote %d file(s) in %s", len(entries), dir)
	}
	for _, m := range tinyGPTqv {
		if !strings.Contains(r.stdout, m) {
			t.Errorf("dry run output does not list %s:\n%s", m, r.stdout)
		}
	}
	if !strings.Contains(r.stdout, "trainable params: 2,048 || all params: 27,904") {
		t.Errorf("dry run output lacks the PEFT line:\n%s", r.stdout)
	}
	testutil.Golden(t, "inject-dry-run.txt", []byte(strings.ReplaceAll(r.stdout, dir, "$TMP")))

	// Without -o, a dry run is fine too.
	mustRun(t, "inject", model("tiny-gpt.onnx"), "--target", "all-linear", "--dry-run")
}

func TestInjectDryRunJSON(t *testing.T) {
	r := mustRun(t, "inject", model("tiny-gpt.onnx"), "--target", "q_proj,v_proj", "--dry-run", "--json")
	var res injectResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("--json output is not JSON: %v\n%s", err, r.stdout)
	}
	if !res.DryRun || res.Trainable != 2048 || res.Manifest == nil || len(res.Manifest.Adapters) != 4 {
		t.Errorf("unexpected result: %+v", res)
	}
}

func TestInjectNoMatch(t *testing.T) {
	out := filepath.Join(t.TempDir(), "lora.onnx")
	r := run(t, "inject", model("tiny-gpt.onnx"), "-o", out, "--target", "query,value")
	if r.code != 1 {
		t.Fatalf("exit %d, want 1; stderr %q", r.code, r.stderr)
	}
	if r.stdout != "" {
		t.Errorf("stdout = %q, want nothing", r.stdout)
	}
	lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
	if len(lines) != 1 {
		t.Fatalf("stderr has %d lines, want one:\n%s", len(lines), r.stderr)
	}
	for _, want := range []string{"onnxlora: no module matched", `"query"`, "model.layers.0.self_attn.q_proj", "lm_head"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("error %q does not contain %q", lines[0], want)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Errorf("a failed inject wrote %s", out)
	}
}

func TestInjectWarnsAboutUnmatchedTarget(t *testing.T) {
	r := mustRun(t, "inject", model("tiny-gpt.onnx"), "--target", "q_proj,vproj", "--dry-run")
	if !strings.Contains(r.stderr, `warning: target "vproj" matches no module`) {
		t.Errorf("stderr = %q, want a warning about vproj", r.stderr)
	}
}

func TestInjectOptions(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "lora.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", out, "--target", "q_proj,v_proj,up_proj",
		"--layers", "1", "--rank-pattern", `v_proj=4`, "--alpha-pattern", `up_proj=32`, "--rslora",
		"--dropout", "0.1", "--init", "gaussian", "--seed", "7", "--external", "always")
	man := readManifest(t, out)
	want := map[string][2]float64{
		"model.layers.1.self_attn.q_proj": {8, 8},
		"model.layers.1.self_attn.v_proj": {4, 8},
		"model.layers.1.mlp.up_proj":      {8, 32},
	}
	if len(man.Adapters) != len(want) {
		t.Fatalf("adapters %q, want %d", modules(man), len(want))
	}
	for _, a := range man.Adapters {
		w, ok := want[a.Module]
		if !ok {
			t.Errorf("unexpected adapter %s", a.Module)
			continue
		}
		if float64(a.Rank) != w[0] || a.Alpha != w[1] || !a.RSLoRA || a.Dropout != 0.1 {
			t.Errorf("%s: rank %d alpha %v rslora %v dropout %v, want %v", a.Module, a.Rank, a.Alpha, a.RSLoRA, a.Dropout, w)
		}
	}
	if _, err := os.Stat(out + ".data"); err != nil {
		t.Errorf("--external always: %v", err)
	}
	testutil.CheckONNX(t, out)
}

func TestInjectExistingAdapterRefused(t *testing.T) {
	dir := t.TempDir()
	first := filepath.Join(dir, "a.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", first, "--target", "q_proj")
	r := run(t, "inject", first, "-o", filepath.Join(dir, "b.onnx"), "--target", "q_proj")
	if r.code != 1 || !strings.Contains(r.stderr, "already has an adapter") {
		t.Errorf("exit %d, stderr %q; want 1 and 'already has an adapter'", r.code, r.stderr)
	}
	// Adding other modules works and keeps the first adapters.
	second := filepath.Join(dir, "b.onnx")
	mustRun(t, "inject", first, "-o", second, "--target", "v_proj")
	if got := len(readManifest(t, second).Adapters); got != 4 {
		t.Errorf("%d adapters after two injections, want 4", got)
	}
}

// TestInjectModulesToSave checks --modules-to-save at the command line:
// the dry run names the layer, a name matching nothing and an export that
// cannot hold whole weights each fail with one line and no output.
func TestInjectModulesToSave(t *testing.T) {
	dir := t.TempDir()
	clf := model("mlp-classifier.onnx")
	r := mustRun(t, "inject", clf, "--target", "fc1", "--modules-to-save", "fc2", "--dry-run")
	if !strings.Contains(r.stdout, "Would train whole (modules_to_save): fc2") {
		t.Errorf("dry run does not name the saved layer:\n%s", r.stdout)
	}
	bad := filepath.Join(dir, "bad.onnx")
	r = run(t, "inject", clf, "--target", "fc1", "--modules-to-save", "head", "-o", bad)
	if r.code != 1 || !strings.Contains(r.stderr, `"head" matches no`) || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("exit %d, stderr %q; want 1 and one line naming \"head\"", r.code, r.stderr)
	}
	if _, err := os.Stat(bad); !os.IsNotExist(err) {
		t.Errorf("%s written after an error", bad)
	}
	inj := filepath.Join(dir, "inj.onnx")
	mustRun(t, "inject", clf, "--target", "fc1", "--modules-to-save", "fc2", "-o", inj, "-q")
	if m := readManifest(t, inj); len(m.Saved) != 1 || !slices.Contains(m.Trainable, "fc2.weight") || !slices.Contains(m.Trainable, "fc2.bias") {
		t.Errorf("manifest saved %+v, trainable %v", m.Saved, m.Trainable)
	}
	file := filepath.Join(dir, "x.onnx_adapter")
	r = run(t, "export-adapter", inj, "-o", file)
	if r.code != 1 || !strings.Contains(r.stderr, "modules_to_save layer fc2") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("exit %d, stderr %q; want 1 and one line about fc2", r.code, r.stderr)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("%s written after an error", file)
	}
}

// TestInjectStack checks --stack at the command line: a second adapter
// beside the first, a third refused, exports refused, merge folding both.
func TestInjectStack(t *testing.T) {
	dir := t.TempDir()
	one, two := filepath.Join(dir, "one.onnx"), filepath.Join(dir, "two.onnx")
	mustRun(t, "inject", model("tiny-gpt.onnx"), "-o", one, "--target", "q_proj", "-q")
	r := run(t, "inject", one, "-o", two, "--target", "q_proj")
	if r.code != 1 || !strings.Contains(r.stderr, "--stack") {
		t.Errorf("exit %d, stderr %q; want 1 and a hint at --stack", r.code, r.stderr)
	}
	mustRun(t, "inject", one, "-o", two, "--target", "q_proj", "--stack", "-r", "2", "-q")
	if got := len(readManifest(t, two).Adapters); got != 4 {
		t.Errorf("%d adapters after stacking, want 4", got)
	}
	r = run(t, "inject", two, "-o", filepath.Join(dir, "three.onnx"), "--target", "q_proj", "--stack")
	if r.code != 1 || !strings.Contains(r.stderr, "the most a layer can take") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("third adapter: exit %d, stderr %q", r.code, r.stderr)
	}
	r = run(t, "export-adapter", two, "-o", filepath.Join(dir, "peft"))
	if r.code != 1 || !strings.Contains(r.stderr, "stacked adapters") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("export: exit %d, stderr %q", r.code, r.stderr)
	}
	merged := filepath.Join(dir, "merged.onnx")
	mustRun(t, "merge", two, "-o", merged, "-q")
	m, err := graph.Load(merged)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if man, err := rewrite.ReadManifest(m); err != nil || man != nil {
		t.Errorf("merged model keeps a manifest (%v)", err)
	}
}

func TestInjectRefusesOutputEqualToInput(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "m.onnx")
	data, err := os.ReadFile(model("mlp-gemm-transb.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in, data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{in, filepath.Join(dir, ".", "m.onnx")} {
		r := run(t, "inject", in, "-o", out, "--target", "fc1")
		if r.code != 2 || !strings.Contains(r.stderr, "is the input") {
			t.Errorf("-o %s: exit %d, stderr %q; want 2 and 'is the input'", out, r.code, r.stderr)
		}
	}
	after, _ := os.ReadFile(in)
	if !reflect.DeepEqual(after, data) {
		t.Error("the input was modified")
	}
}

func TestUsageErrorsExit2(t *testing.T) {
	tiny := model("tiny-gpt.onnx")
	cases := [][]string{
		{"inject", tiny, "-o", "x.onnx", "--target", "q_proj", "--bogus"},
		{"inject", tiny, "-o", "x.onnx", "--target", "q_proj", "--rank", "eight"},
		{"inject", tiny, "-o", "x.onnx", "--target", "q_proj", "--rank", "0"},
		{"inject", tiny, "-o", "x.onnx", "--target", "q_proj", "--init", "xavier"},
		{"inject", tiny, "-o", "x.onnx", "--target", "q_proj", "--dropout", "1.5"},
		{"inject", tiny, "-o", "x.onnx", "--target", "q_proj", "--external", "sometimes"},
		{"inject", tiny, "-o", "x.onnx", "--target", "q_proj", "--rank-pattern", "q_proj"},
		{"inject", tiny, "-o", "x.onnx", "--target-regex", "(q_proj"},
		{"inject", tiny, "-o", "x.onnx", "--target", "all-linear", "--layers", "0"},
		{"inject", tiny, "-o", "x.onnx"},
		{"inject", tiny, "--target", "q_proj"},
		{"inject", "--target", "q_proj", "-o", "x.onnx"},
		{"inject", tiny, tiny, "--target", "q_proj", "-o", "x.onnx"},
		{"inspect"},
		{"inspect", tiny, "--json", "--dot"},
		{"inspect", tiny, "--layer", "q_proj"},
		{"inspect", tiny, "--exclude", "q_proj"},
		{"version", "extra"},
		{"completion", "tcsh"},
		{"nosuchcommand"},
		{"--nosuchflag"},
	}
	for _, args := range cases {
		r := run(t, args...)
		if r.code != 2 {
			t.Errorf("onnxlora %s: exit %d, want 2 (stderr %q)", strings.Join(args, " "), r.code, r.stderr)
			continue
		}
		if !strings.HasPrefix(r.stderr, "onnxlora: ") || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("onnxlora %s: stderr %q, want one 'onnxlora: ' line", strings.Join(args, " "), r.stderr)
		}
		if r.stdout != "" {
			t.Errorf("onnxlora %s: stdout %q, want nothing", strings.Join(args, " "), r.stdout)
		}
	}
}

func TestMissingFileIsOneLine(t *testing.T) {
	for _, args := range [][]string{
		{"inject", "does-not-exist.onnx", "-o", filepath.Join(t.TempDir(), "x.onnx"), "--target", "q_proj"},
		{"inspect", "does-not-exist.onnx"},
	} {
		r := run(t, args...)
		want := "onnxlora: does-not-exist.onnx: no such file or directory\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("onnxlora %s: exit %d, stderr %q; want 1 and %q", strings.Join(args, " "), r.code, r.stderr, want)
		}
	}
}

func TestRunFReceivesParsedOptions(t *testing.T) {
	ios, _, _, _ := TestIO()
	f := NewFactory(ios)
	var got *InjectOptions
	cmd := NewCmdInject(f, func(o *InjectOptions) error { got = o; return nil })
	cmd.SetArgs([]string{"m.onnx", "-o", "out.onnx", "-t", "q_proj,v_proj", "-r", "4", "--alpha", "32",
		"--layers", "0,3", "--rank-pattern", "a{1,2}=2", "--rank-pattern", "b=3", "--external", "never"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if got == nil {
		t.Fatal("runF was not called")
	}
	c := got.config
	if got.Model != "m.onnx" || got.Output != "out.onnx" || c.Rank != 4 || c.Alpha != 32 ||
		!reflect.DeepEqual(c.Targets, []string{"q_proj", "v_proj"}) || !reflect.DeepEqual(c.Layers, []int{0, 3}) ||
		got.External.mode != graph.ExternalNever {
		t.Errorf("parsed options: %+v", got)
	}
	wantPats := []rewrite.PatternEntry{{Key: "a{1,2}", Value: 2}, {Key: "b", Value: 3}}
	if !reflect.DeepEqual(c.RankPattern, wantPats) {
		t.Errorf("rank patterns = %+v, want %+v (a comma in a regex must not split it)", c.RankPattern, wantPats)
	}
}
