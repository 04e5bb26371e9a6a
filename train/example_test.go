package train_test

import (
	"context"
	"fmt"
	"log"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/train"
)

// scaleModel is y = w·x with mean squared error, its gradient written by
// hand: a Stepper needs nothing more than loss and gradients.
type scaleModel struct{}

func (scaleModel) Step(b *train.Batch, ps []*train.Param) (float64, [][]float64, error) {
	x, _ := b.Inputs[0].Float64s()
	y, _ := b.Inputs[1].Float64s()
	w := ps[0].Value[0]
	var loss, grad float64
	for i := range x {
		r := w*x[i] - y[i]
		loss += r * r / float64(len(x))
		grad += 2 * r * x[i] / float64(len(x))
	}
	return loss, [][]float64{{grad}}, nil
}

func (m scaleModel) Loss(b *train.Batch, ps []*train.Param) (float64, error) {
	l, _, err := m.Step(b, ps)
	return l, err
}

// A Trainer runs any Stepper; here one that learns y = 3x.
func ExampleTrainer() {
	data, err := train.ReadJSONL(strings.NewReader(`{"x": [1], "labels": [3]}
{"x": [2], "labels": [6]}
{"x": [-1], "labels": [-3]}
`), "rows.jsonl")
	if err != nil {
		log.Fatal(err)
	}
	spec := &train.BatchSpec{
		Inputs: []train.InputSpec{{Name: "x", DType: ortrun.Float32, Dims: []int64{-1, 1}}},
		Labels: train.InputSpec{Name: "labels", DType: ortrun.Float32, Dims: []int64{-1, 1}},
		Loss:   "mse",
	}
	if err := data.Validate(spec); err != nil {
		log.Fatal(err)
	}
	cfg := train.DefaultConfig()
	cfg.Steps, cfg.BatchSize, cfg.LR = 20, 3, 0.1
	cfg.Optimizer, cfg.Scheduler, cfg.MaxGradNorm = "sgd", "constant", 0
	w := &train.Param{Name: "w", DType: ortrun.Float32, Dims: []int64{1}, Value: []float64{0}}
	tr := &train.Trainer{Config: cfg, Stepper: scaleModel{}, Params: []*train.Param{w}, Data: data, Spec: spec}
	res, err := tr.Run(context.Background())
	if err != nil {
		log.Fatal(err)
	}
	// w - 3 shrinks by 1 - lr·2·mean(x²) = 0.6 a step.
	fmt.Printf("%d steps: w = %.5f\n", res.Steps, w.Value[0])
	// Output: 20 steps: w = 2.99989
}

// Training an injected ONNX model: OpenModel builds the step graph and
// opens it in ONNX Runtime; the Model is the Trainer's Stepper and writes
// the trained values back.
func ExampleOpenModel() {
	m, err := train.OpenModel("model-lora.onnx", train.ModelOptions{Loss: "causal-lm"})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	data, err := train.LoadJSONL("train.jsonl")
	if err != nil {
		log.Fatal(err)
	}
	spec, err := m.Spec(0)
	if err != nil {
		log.Fatal(err)
	}
	if err := data.Validate(spec); err != nil {
		log.Fatal(err)
	}
	cfg := train.DefaultConfig()
	cfg.Steps, cfg.LR = 200, 1e-3
	tr := &train.Trainer{Config: cfg, Stepper: m, Params: m.Params(), Data: data, Spec: spec,
		OnRecord: func(r train.Record) { fmt.Println(r.Step, r.Loss) }}
	if _, err := tr.Run(context.Background()); err != nil {
		log.Fatal(err)
	}
	if err := m.Save("model-trained.onnx", m.Params(), graph.SaveOptions{}); err != nil {
		log.Fatal(err)
	}
}
