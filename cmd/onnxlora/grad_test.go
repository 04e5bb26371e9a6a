package main

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// inject then grad on the Gemm classifier, with one more parameter named by
// --params; the step graph passes onnx.checker and runs in ONNX Runtime.
func TestGradCommand(t *testing.T) {
	dir := t.TempDir()
	lora := filepath.Join(dir, "lora.onnx")
	step := filepath.Join(dir, "step.onnx")
	mustRun(t, "inject", model("mlp-classifier.onnx"), "-o", lora, "--target", "fc1,fc2", "--rank", "2", "--alpha", "4")
	r := mustRun(t, "grad", lora, "-o", step, "--loss", "cross-entropy", "--params", `fc2\.bias`, "--json")
	var res struct {
		Step struct {
			Loss   string `json:"loss"`
			Params []struct {
				Name string  `json:"name"`
				Grad string  `json:"grad"`
				Dims []int64 `json:"dims"`
			} `json:"params"`
		} `json:"step"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("--json output: %v\n%s", err, r.stdout)
	}
	if len(res.Step.Params) != 5 || res.Step.Params[4].Name != "fc2.bias" || res.Step.Params[4].Grad != "fc2.bias_grad" {
		t.Fatalf("params %+v: want the 4 adapter tensors then fc2.bias", res.Step.Params)
	}
	testutil.CheckONNX(t, step)

	s := orttest.Open(t, step)
	x := make([]float32, 3*16)
	for i := range x {
		x[i] = float32(math.Sin(float64(i)))
	}
	xt, _ := ortrun.NewTensor("x", []int64{3, 16}, x)
	lt, _ := ortrun.NewTensor("labels", []int64{3}, []int64{0, 4, -100})
	out, err := s.RunOutputs([]ortrun.Tensor{xt, lt}, []string{"loss", "fc1.lora_A.weight_grad", "fc2.bias_grad"})
	if err != nil {
		t.Fatal(err)
	}
	loss, _ := out[0].Float64s()
	if math.IsNaN(loss[0]) || loss[0] <= 0 {
		t.Errorf("loss %v, want a positive cross-entropy", loss[0])
	}
	if got := out[1].Shape; len(got) != 2 || got[0] != 16 || got[1] != 2 {
		t.Errorf("fc1.lora_A.weight_grad has shape %v, want [16 2]", got)
	}
	// The bias gradient of a mean cross-entropy sums to zero over classes.
	bias, _ := out[2].Float64s()
	var sum float64
	for _, v := range bias {
		sum += v
	}
	if math.Abs(sum) > 1e-6 {
		t.Errorf("fc2.bias_grad sums to %g, want 0", sum)
	}
}

func TestGradErrors(t *testing.T) {
	dir := t.TempDir()
	sin := filepath.Join(dir, "sin.onnx")
	writeSinModel(t, sin)
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no trainable", []string{"grad", model("mlp-classifier.onnx"), "-o", "OUT"}, 1, "has no trainable tensors"},
		{"unknown loss", []string{"grad", model("mlp-classifier.onnx"), "-o", "OUT", "--loss", "hinge"}, 2, `invalid argument "hinge" for --loss`},
		{"missing -o", []string{"grad", model("mlp-classifier.onnx")}, 2, "missing -o/--output"},
		{"missing output", []string{"grad", model("mlp-classifier.onnx"), "-o", "OUT", "--params", `fc1\.weight`, "--model-output", "probs"}, 1, `no output "probs"`},
		{"pattern matches nothing", []string{"grad", model("mlp-classifier.onnx"), "-o", "OUT", "--params", "nope"}, 1, `--params "nope" matches no initializer`},
		{"op without a rule", []string{"grad", sin, "-o", "OUT", "--loss", "mse", "--params", "w"}, 1, `node "sin" (Sin): no gradient rule`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".onnx")
			args := append([]string(nil), tc.args...)
			for i, a := range args {
				if a == "OUT" {
					args[i] = out
				}
			}
			r := run(t, args...)
			if r.code != tc.code || !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", r.code, r.stderr, tc.code, tc.want)
			}
			if n := strings.Count(strings.TrimSpace(r.stderr), "\n"); n > 0 && tc.code == 1 {
				t.Errorf("error is %d lines, want one:\n%s", n+1, r.stderr)
			}
			if _, err := os.Stat(out); err == nil {
				t.Errorf("%s was written", out)
			}
		})
	}
}

// writeSinModel writes y = sin(x·w): Sin has no gradient rule.
func writeSinModel(t *testing.T, path string) {
	t.Helper()
	f32 := onnxpb.TensorProto_FLOAT
	vi := func(name string, dims ...int64) *onnxpb.ValueInfoProto {
		shape := &onnxpb.TensorShapeProto{}
		for _, d := range dims {
			shape.Dim = append(shape.Dim, &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d}})
		}
		return &onnxpb.ValueInfoProto{Name: proto.String(name), Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{
			TensorType: &onnxpb.TypeProto_Tensor{ElemType: proto.Int32(int32(f32)), Shape: shape}}}}
	}
	mp := &onnxpb.ModelProto{IrVersion: proto.Int64(8), OpsetImport: []*onnxpb.OperatorSetIdProto{{Version: proto.Int64(17)}},
		Graph: &onnxpb.GraphProto{Name: proto.String("sin"),
			Input:       []*onnxpb.ValueInfoProto{vi("x", 2, 2)},
			Output:      []*onnxpb.ValueInfoProto{vi("y", 2, 2)},
			Initializer: []*onnxpb.TensorProto{{Name: proto.String("w"), Dims: []int64{2, 2}, DataType: proto.Int32(int32(f32)), FloatData: []float32{1, 2, 3, 4}}},
			Node: []*onnxpb.NodeProto{
				{Name: proto.String("mm"), OpType: proto.String("MatMul"), Input: []string{"x", "w"}, Output: []string{"h"}},
				{Name: proto.String("sin"), OpType: proto.String("Sin"), Input: []string{"h"}, Output: []string{"y"}},
			}}}
	data, err := proto.Marshal(mp)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// A model with external data gives a step graph with external data, and
// the input's files are left as they were.
func TestGradExternalData(t *testing.T) {
	dir := t.TempDir()
	lora := filepath.Join(dir, "lora.onnx")
	mustRun(t, "inject", model("tiny-gpt-extdata/model.onnx"), "-o", lora, "--target", "q_proj", "--rank", "2")
	before, err := os.ReadFile(model("tiny-gpt-extdata/model.onnx.data"))
	if err != nil {
		t.Fatal(err)
	}
	step := filepath.Join(dir, "step", "step.onnx")
	if err := os.Mkdir(filepath.Dir(step), 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "grad", lora, "-o", step)
	if _, err := os.Stat(step + ".data"); err != nil {
		t.Fatalf("no external data next to the step graph: %v", err)
	}
	after, _ := os.ReadFile(model("tiny-gpt-extdata/model.onnx.data"))
	if string(before) != string(after) {
		t.Fatal("the input's data file changed")
	}
	orttest.Open(t, step)
}
