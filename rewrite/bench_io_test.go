package rewrite

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
)

// TestBenchGenerateBase writes the bench model of size $ONNXLORA_BENCH_SIZE
// into the folder $ONNXLORA_BENCH_GEN, for scripts/bench-io.sh: the base
// model (base/model.onnx) and the injected one (injected/model.onnx), with
// weights in external data or, with ONNXLORA_BENCH_INLINE=1, inside the
// .onnx. It skips unless the variables are set.
func TestBenchGenerateBase(t *testing.T) {
	dir := os.Getenv("ONNXLORA_BENCH_GEN")
	if dir == "" {
		t.Skip("set ONNXLORA_BENCH_GEN=<folder> and ONNXLORA_BENCH_SIZE (scripts/bench-io.sh does)")
	}
	s, ok := benchShapes[os.Getenv("ONNXLORA_BENCH_SIZE")]
	if !ok {
		t.Fatalf("unknown bench size %q", os.Getenv("ONNXLORA_BENCH_SIZE"))
	}
	save := graph.SaveOptions{External: graph.ExternalAlways}
	if os.Getenv("ONNXLORA_BENCH_INLINE") == "1" {
		save.External = graph.ExternalNever
	}
	m := benchModel(t, s, 1)
	for _, sub := range []string{"base", "injected"} {
		if sub == "injected" {
			benchInject(t, m)
		}
		p := filepath.Join(dir, sub, "model.onnx")
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := m.Save(p, save); err != nil {
			t.Fatal(err)
		}
	}
}
