package ortrun_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

func TestProviders(t *testing.T) {
	orttest.Require(t)
	provs, err := ortrun.Providers()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(provs, "CPUExecutionProvider") {
		t.Fatalf("providers %v lack the CPU", provs)
	}
	// Tests run on the CPU: without a usable CUDA provider, OpenCUDA must
	// fail cleanly, naming the problem.
	model := "../testdata/models/mlp-gemm-transb.onnx"
	s, err := ortrun.OpenCUDA(model, nil, 0)
	if err == nil {
		// A usable GPU: it must compute what the CPU computes.
		defer s.Close()
		cpu := orttest.Open(t, model)
		x := make([]float32, 2*16)
		for i := range x {
			x[i] = float32(i%7) - 3
		}
		in, _ := ortrun.NewTensor("input", []int64{2, 16}, x)
		a, err1 := cpu.Run([]ortrun.Tensor{in})
		b, err2 := s.Run([]ortrun.Tensor{in})
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		va, _ := a[0].Float64s()
		vb, _ := b[0].Float64s()
		for i := range va {
			if d := va[i] - vb[i]; d > 1e-4 || d < -1e-4 {
				t.Fatalf("CUDA output[%d] = %v, CPU %v", i, vb[i], va[i])
			}
		}
		return
	}
	if !strings.Contains(err.Error(), "CUDA") || strings.Contains(err.Error(), "\n") {
		t.Errorf("OpenCUDA error %q: want one line naming CUDA", err)
	}
}
