package main

import (
	"path/filepath"
	"testing"

	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// TestCombineCommand mixes a PEFT directory and an .onnx_adapter file of
// tiny-gpt. cat is the weighted sum of the deltas, so the base merged with
// the mix must equal the base merged with each adapter at its weight
// (merge --scale), one after the other; svd at the summed rank is the same
// delta. Checked in ONNX Runtime.
func TestCombineCommand(t *testing.T) {
	dir := t.TempDir()
	base := model("tiny-gpt.onnx")
	peft := filepath.Join(dir, "peft-a")
	mustRun(t, "export-adapter", trainedLoRAWith(t, dir, "a", "q_proj,v_proj", 4, 1), "-o", peft)
	adB := filepath.Join(dir, "b.onnx_adapter")
	mustRun(t, "export-adapter", trainedLoRAWith(t, dir, "b", "v_proj,o_proj", 2, 2), "-o", adB)

	half := filepath.Join(dir, "half.onnx")
	mustRun(t, "merge", base, "--adapter", peft, "--scale", "0.7", "-o", half)
	ref := filepath.Join(dir, "ref.onnx")
	mustRun(t, "merge", half, "--adapter", adB, "--scale", "-0.4", "-o", ref)

	var mixed []string
	for _, c := range []struct {
		name, out string
		extra     []string
	}{
		{"cat", "cat.onnx_adapter", []string{"--method", "cat"}},
		{"cat-peft", "cat-peft", []string{"--method", "cat"}},
		{"svd", "svd.onnx_adapter", []string{"--method", "svd", "--rank", "6"}},
	} {
		out := filepath.Join(dir, c.out)
		mustRun(t, append([]string{"combine", peft, adB, "--weights", "0.7,-0.4", "-o", out}, c.extra...)...)
		merged := filepath.Join(dir, c.name+"-merged.onnx")
		mustRun(t, "merge", base, "--adapter", out, "-o", merged)
		mixed = append(mixed, merged)
	}
	// linear needs one rank per module: two exports of rank-4 adapters.
	adC := filepath.Join(dir, "c.onnx_adapter")
	mustRun(t, "export-adapter", trainedLoRAWith(t, dir, "c", "q_proj,v_proj", 4, 3), "-o", adC)
	lin := filepath.Join(dir, "lin.onnx_adapter")
	mustRun(t, "combine", peft, adC, "--weights", "0.5,0.5", "--method", "linear", "-o", lin)

	if r := run(t, "combine", peft, adB, "--weights", "1", "-o", filepath.Join(dir, "x.onnx_adapter")); r.code != 2 {
		t.Errorf("one weight for two adapters: exit %d", r.code)
	}
	if r := run(t, "combine", peft, adB, "--weights", "1,1", "--method", "linear", "-o", filepath.Join(dir, "y.onnx_adapter")); r.code != 1 {
		t.Errorf("linear over different ranks: exit %d", r.code)
	}
	checkOneLineError(t, run(t, "combine", peft, filepath.Join(dir, "missing.onnx_adapter"), "--weights", "1,1", "-o", filepath.Join(dir, "z.onnx_adapter")), "missing")

	orttest.Require(t)
	for _, m := range mixed {
		mustRun(t, "verify", ref, m, "--rtol", "1e-4", "--atol", "1e-5")
	}
	if r := run(t, "verify", ref, base, "--rtol", "1e-4", "--atol", "1e-5"); r.code != 1 {
		t.Errorf("the mix does not change the base? verify exit %d", r.code)
	}
}
