package inspect_test

import (
	"fmt"
	"log"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/inspect"
	"github.com/onnxlora/onnxlora/rewrite"
)

// Build a report with a selection, then read it as a struct.
func ExampleBuild() {
	m, err := graph.Load("../testdata/models/tiny-gpt.onnx")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	r, err := inspect.Build(m, inspect.Options{
		Select: &rewrite.SelectOptions{Targets: []string{"q_proj", "v_proj"}, Layers: []int{0}, Rank: 8, Alpha: 16},
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%d adaptable layers, %d skipped\n", r.Totals.Layers, r.Totals.Skipped)
	for _, l := range r.Layers[:3] {
		fmt.Printf("%s %s [%d,%d] selected=%v\n", l.Module, l.Op, l.In, l.Out, l.Selected)
	}
	fmt.Println(r.Selection.Summary)
	// Output:
	// 15 adaptable layers, 4 skipped
	// model.layers.0.self_attn.q_proj MatMul [32,32] selected=true
	// model.layers.0.self_attn.k_proj MatMul [32,32] selected=false
	// model.layers.0.self_attn.v_proj MatMul [32,32] selected=true
	// trainable params: 1,024 || all params: 26,880 || trainable%: 3.8095
}

// After inject, the report lists the adapters from the model's manifest.
// A fresh adapter has B = 0, so its update scaling·A·B has norm 0.
func ExampleBuild_adapters() {
	m, err := graph.Load("../testdata/models/mlp-gemm-transb.onnx")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	cfg := rewrite.InjectConfig{SelectOptions: rewrite.SelectOptions{Targets: []string{"fc1", "fc2"}, Rank: 4, Alpha: 8}}
	if _, err := rewrite.Inject(m, cfg); err != nil {
		log.Fatal(err)
	}

	r, err := inspect.Build(m, inspect.Options{})
	if err != nil {
		log.Fatal(err)
	}
	for _, a := range r.Adapters {
		fmt.Printf("%s: rank %d, alpha %g, scaling %g, ||scaling*A*B||_F = %g\n", a.Module, a.Rank, a.Alpha, a.Scaling, *a.Norm)
	}
	// Output:
	// fc1: rank 4, alpha 8, scaling 2, ||scaling*A*B||_F = 0
	// fc2: rank 4, alpha 8, scaling 2, ||scaling*A*B||_F = 0
}
