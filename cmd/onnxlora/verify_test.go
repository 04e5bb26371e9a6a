package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

func TestVerifyOptions(t *testing.T) {
	var got *VerifyOptions
	ios, _, _, _ := TestIO()
	cmd := NewCmdVerify(NewFactory(ios), func(o *VerifyOptions) error { got = o; return nil })
	cmd.SetArgs([]string{"a.onnx", "b.onnx", "--samples", "5", "--seed", "9", "--rtol", "0", "--dim", "batch=1",
		"--dim", "sequence=16,past_sequence_length=4", "--inputs", "in.json", "--json"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if got.A != "a.onnx" || got.B != "b.onnx" || got.Samples != 5 || got.Seed != 9 || got.Inputs != "in.json" || !got.JSON {
		t.Errorf("options %+v", got)
	}
	vo := got.compareOptions()
	if vo.RTol == nil || *vo.RTol != 0 || vo.ATol != nil {
		t.Errorf("tolerances: rtol %v atol %v; want rtol set to 0 and atol left to the defaults", vo.RTol, vo.ATol)
	}
	if want := map[string]int64{"batch": 1, "sequence": 16, "past_sequence_length": 4}; !reflect.DeepEqual(vo.Dims, want) {
		t.Errorf("dims %v, want %v", vo.Dims, want)
	}
	if vo.Samples != 5 || vo.Seed != 9 || vo.InputsFile != "in.json" {
		t.Errorf("verify options %+v", vo)
	}
}

func TestVerifyHelp(t *testing.T) {
	r := e2eMustRun(t, "verify", "--help")
	for _, want := range []string{"onnxlora verify A B", "Examples:", "--inputs", "--samples", "--rtol", "--atol", "--seed", "--dim", "--json", "install-ort.sh"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("verify --help lacks %q", want)
		}
	}
}

func TestVerifyUsageErrors(t *testing.T) {
	a := model("tiny-gpt.onnx")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"verify", a}, "takes two models, A and B, got 1"},
		{[]string{"verify", a, a, "--samples", "0"}, "--samples"},
		{[]string{"verify", a, a, "--rtol", "-1"}, "--rtol"},
		{[]string{"verify", a, a, "--atol", "NaN"}, "--atol"},
		{[]string{"verify", a, a, "--dim", "batch"}, `"batch" for --dim`},
		{[]string{"verify", a, a, "--dim", "batch=-2"}, "--dim"},
		{[]string{"verify", a, a, "--dim", "batch=1", "--dim", "batch=2"}, "given twice"},
		{[]string{"verify", a, a, "--samples", "x"}, "--samples"},
	} {
		r := e2eRun(t, tc.args...)
		if r.code != 2 || !strings.Contains(r.stderr, tc.want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and one line with %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}

func TestVerifyTableAndFailure(t *testing.T) {
	orttest.Require(t)
	base := model("tiny-bert.onnx")
	bad := filepath.Join(t.TempDir(), "bad.onnx")
	m, err := graph.Load(base)
	if err != nil {
		t.Fatal(err)
	}
	w, _ := m.Graph().Initializer("pooler.dense.weight")
	vals, _ := m.Float64s(w)
	vals[5] += 1
	graph.SetFloat64s(w, vals)
	if err := m.Save(bad, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}

	r := e2eMustRun(t, "verify", base, base)
	for _, want := range []string{"OUTPUT", "MAX ABS", "last_hidden_state", "pooler_output", "float32", "[2,8,32]", "PASS", "latency (median of 5 runs): A ", "PASS: all 2 output(s) match on 3 sample(s)"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("stdout lacks %q:\n%s", want, r.stdout)
		}
	}
	for _, want := range []string{"3 sample(s), seed 0", "input_ids", "int64[2,8]", "random integers in [0, 64)", "attention_mask", "mask"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	t.Logf("passing run:\n%s%s", r.stderr, r.stdout)

	r = e2eRun(t, "verify", base, bad)
	if r.code != 1 {
		t.Fatalf("perturbed model: exit %d, want 1\n%s%s", r.code, r.stdout, r.stderr)
	}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	var poolerRow, hiddenRow string
	for _, l := range lines {
		if strings.HasPrefix(l, "pooler_output") {
			poolerRow = l
		}
		if strings.HasPrefix(l, "last_hidden_state") {
			hiddenRow = l
		}
	}
	if !strings.Contains(poolerRow, "FAIL (3 of 3 samples)") || !strings.HasSuffix(hiddenRow, "PASS") {
		t.Errorf("rows:\n%s\n%s", poolerRow, hiddenRow)
	}
	errLines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	last := errLines[len(errLines)-1]
	if !strings.HasPrefix(last, "onnxlora: "+bad+" does not match "+base+": 1 of 2 output(s) differ: pooler_output (max abs ") {
		t.Errorf("error line %q", last)
	}
	t.Logf("failing run:\n%s%s", r.stderr, r.stdout)

	// --quiet keeps the table and the error, drops the notes.
	r = e2eRun(t, "verify", base, bad, "--quiet")
	if r.code != 1 || strings.Count(r.stderr, "\n") != 1 || !strings.Contains(r.stdout, "FAIL") {
		t.Errorf("--quiet: exit %d, stderr %q", r.code, r.stderr)
	}
	// --json reports the failure too, and exits 1.
	r = e2eRun(t, "verify", base, bad, "--json", "--samples", "1")
	var rep map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || r.code != 1 || rep["pass"] != false {
		t.Errorf("--json: exit %d, err %v\n%s", r.code, err, r.stdout)
	}
	// A huge tolerance passes.
	e2eMustRun(t, "verify", base, bad, "--atol", "100")
}

func TestVerifyInputsFileAndErrors(t *testing.T) {
	orttest.Require(t)
	dir := t.TempDir()
	in := filepath.Join(dir, "prompt.json")
	os.WriteFile(in, []byte(`{"input_ids": {"dtype": "int64", "data": [[5, 6, 7]]}}`), 0o644)
	r := e2eMustRun(t, "verify", model("tiny-gpt.onnx"), model("tiny-gpt.onnx"), "--inputs", in)
	if !strings.Contains(r.stdout, "[1,3,64]") || !strings.Contains(r.stderr, "from the inputs file") {
		t.Errorf("with --inputs:\n%s%s", r.stderr, r.stdout)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{model("tiny-gpt.onnx"), model("tiny-bert.onnx")}, `models differ in their interface`},
		{[]string{model("tiny-gpt.onnx"), model("tiny-gpt-fp16.onnx")}, `output "logits" is float32 in A, float16 in B`},
		{[]string{model("tiny-gpt.onnx"), filepath.Join(dir, "missing.onnx")}, "missing.onnx"},
		{[]string{model("tiny-gpt.onnx"), model("tiny-gpt.onnx"), "--dim", "seq=4"}, "no input has a symbolic dim named seq"},
		{[]string{model("tiny-gpt.onnx"), model("tiny-gpt.onnx"), "--inputs", filepath.Join(dir, "nope.json")}, "nope.json"},
	} {
		r := e2eRun(t, append([]string{"verify"}, tc.args...)...)
		if r.code != 1 || !strings.Contains(r.stderr, tc.want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("verify %q: exit %d, stderr %q; want exit 1 and one line with %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}

// TestVerifyHelperProcess is not a test: TestVerifyWithoutORT runs the test
// binary again with it to get a process whose ORT library is missing
// (ortrun.Init caches its result for the life of a process).
func TestVerifyHelperProcess(t *testing.T) {
	if os.Getenv("ONNXLORA_VERIFY_HELPER") != "1" {
		return
	}
	args := strings.Split(os.Getenv("ONNXLORA_VERIFY_ARGS"), "\n")
	os.Exit(Main(NewFactory(SystemIO()), args))
}

func TestVerifyWithoutORT(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestVerifyHelperProcess$")
	missing := filepath.Join(t.TempDir(), "libonnxruntime.so.1")
	cmd.Env = append(os.Environ(), "ONNXLORA_VERIFY_HELPER=1", ortrun.EnvLib+"="+missing,
		"ONNXLORA_VERIFY_ARGS="+strings.Join([]string{"verify", model("tiny-gpt.onnx"), model("tiny-gpt.onnx")}, "\n"))
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	msg := stderr.String()
	if code != 1 || stdout.Len() != 0 || strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "onnxlora: ") ||
		!strings.Contains(msg, "scripts/install-ort.sh") || !strings.Contains(msg, ortrun.EnvLib) || !strings.Contains(msg, missing) {
		t.Errorf("without ORT: exit %d, stdout %q, stderr %q; want exit 1 and one line naming the library, install-ort.sh and %s", code, stdout.String(), msg, ortrun.EnvLib)
	}
}
