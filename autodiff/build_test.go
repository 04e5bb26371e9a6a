package autodiff

import (
	"errors"
	"math"
	"math/rand"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
	"github.com/onnxlora/onnxlora/rewrite"
)

func TestBuildErrors(t *testing.T) {
	relu := fdCase{name: "relu", op: "Relu", args: []arg{f(2, 3)}}
	sin := fdCase{name: "sin", op: "Sin", args: []arg{f(2, 3)}}
	cases := []struct {
		name string
		c    fdCase
		opts Options
		want string
	}{
		{"unknown loss", relu, Options{Loss: "hinge", Params: []string{"x0"}}, `unknown loss "hinge"`},
		{"no params", relu, Options{Loss: "mse"}, "no trainable parameters"},
		{"not an initializer", relu, Options{Loss: "mse", Params: []string{"nope"}}, `trainable "nope" is not an initializer`},
		{"missing output", relu, Options{Loss: "mse", Output: "logits", Params: []string{"x0"}}, `no output "logits"`},
		{"no rule", sin, Options{Loss: "mse", Params: []string{"x0"}}, `node "/layer/Sin" (Sin): no gradient rule`},
		{"class loss on a vector", relu, Options{Loss: "cross-entropy", Params: []string{"x0"}}, "output has rank 1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			mp, _ := tc.c.build(t)
			mp.Graph.Output = []*onnxpb.ValueInfoProto{tensorValueInfo("y", graph.Double, []dim{{value: 6}})}
			_, err := Build(graph.NewModel(mp, ""), tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			if tc.name == "no rule" && !errors.Is(err, ErrNoRule) {
				t.Errorf("%v does not wrap ErrNoRule", err)
			}
		})
	}
}

// A trainable value read inside an If branch is refused, not silently
// treated as constant.
func TestBuildRefusesSubgraphs(t *testing.T) {
	mp, params := fdCase{name: "if", op: "Identity", args: []arg{f(3)}}.build(t)
	branch := func(name string) *onnxpb.GraphProto {
		return &onnxpb.GraphProto{Name: proto.String(name),
			Node:   []*onnxpb.NodeProto{node("Neg", []string{"x0"}, []string{name + "_out"})},
			Output: []*onnxpb.ValueInfoProto{tensorValueInfo(name+"_out", graph.Double, []dim{{value: 3}})}}
	}
	cond := tensorOf(graph.Bool, nil, []float64{1})
	cond.Name = proto.String("cond")
	mp.Graph.Initializer = append(mp.Graph.Initializer, cond)
	ifNode := node("If", []string{"cond"}, []string{"z"},
		&onnxpb.AttributeProto{Name: proto.String("then_branch"), Type: onnxpb.AttributeProto_GRAPH.Enum(), G: branch("then")},
		&onnxpb.AttributeProto{Name: proto.String("else_branch"), Type: onnxpb.AttributeProto_GRAPH.Enum(), G: branch("else")})
	mp.Graph.Node = append(mp.Graph.Node, ifNode, node("Add", []string{"y", "z"}, []string{"w"}))
	mp.Graph.Output = []*onnxpb.ValueInfoProto{tensorValueInfo("w", graph.Double, []dim{{value: 3}})}
	_, err := Build(graph.NewModel(mp, ""), Options{Loss: "mse", Params: params})
	if err == nil || !strings.Contains(err.Error(), "If/Loop/Scan") {
		t.Fatalf("got %v, want a refusal naming subgraphs", err)
	}
}

// Dropout in training mode: the gradient uses the forward's own mask. The
// mask is random, so the check is against the formula on the same run's
// mask and output: gx = 2(y - labels)/n · mask/(1 - ratio).
func TestDropoutTrainingMode(t *testing.T) {
	orttest.Require(t)
	c := fdCase{name: "dropout", op: "Dropout", outs: 2, use: []int{0}, dt: graph.Float,
		args: []arg{f(4, 5), {vals: []float64{0.3}, dims: []int64{}, fixed: true}, {dt: graph.Bool, dims: []int64{}, vals: []float64{1}, fixed: true}}}
	mp, params := c.build(t)
	mp.Graph.Output = []*onnxpb.ValueInfoProto{
		tensorValueInfo("y", graph.Float, []dim{{value: 20}}),
		tensorValueInfo("y1", graph.Bool, []dim{{value: 4}, {value: 5}}),
	}
	m := graph.NewModel(mp, "")
	step, err := Build(m, Options{Loss: "mse", Params: params, KeepOutputs: true})
	if err != nil {
		t.Fatal(err)
	}
	s := orttest.Open(t, saveProto(t, m.Proto, "step.onnx"))
	labels := make([]float64, 20)
	for i := range labels {
		labels[i] = float64(i%3) - 1
	}
	lt, _ := ortrun.FromFloat64(LabelsName, ortrun.Float32, []int64{20}, labels)
	out, err := s.RunOutputs([]ortrun.Tensor{lt}, []string{step.Params[0].Grad, "y", "y1"})
	if err != nil {
		t.Fatal(err)
	}
	grad, _ := out[0].Float64s()
	y, _ := out[1].Float64s()
	mask, _ := out[2].Float64s()
	kept := 0
	for i := range grad {
		want := 2 * (y[i] - labels[i]) / 20 * mask[i] / 0.7
		if math.Abs(grad[i]-want) > 1e-6 {
			t.Fatalf("element %d: grad %g, want %g (mask %g)", i, grad[i], want, mask[i])
		}
		kept += int(mask[i])
	}
	if kept == 0 || kept == 20 {
		t.Fatalf("mask kept %d of 20: dropout was not active", kept)
	}
}

// The step graph fixes no batch or sequence size: one built for tiny-llama
// runs on batches of other shapes, and a batch of two identical rows gives
// the loss and gradients of one row (the mean over tokens is the same).
func TestStepGraphAnyBatchShape(t *testing.T) {
	orttest.Require(t)
	m, err := graph.Load(testutil.TestModel("tiny-llama.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	inj, err := rewrite.Inject(m, rewrite.InjectConfig{SelectOptions: rewrite.SelectOptions{Targets: []string{"q_proj", "v_proj"}, Rank: 4, Alpha: 8}, Seed: 3, Init: rewrite.InitGaussian})
	if err != nil {
		t.Fatal(err)
	}
	// B = 0 after inject would zero A's gradient; make B non-zero.
	g := m.Graph()
	for _, a := range inj.Manifest.Adapters {
		tp, _ := g.Initializer(a.Module + ".lora_B.weight")
		for i := 0; i+4 <= len(tp.RawData); i += 4 {
			tp.RawData[i+3] = 0x3c // about 0.01..0.02
		}
	}
	step, err := Build(m, Options{Loss: "causal-lm", Params: inj.Manifest.Trainable})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "step.onnx")
	if err := m.Save(path, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	s := orttest.Open(t, path)
	run := func(rows [][]int64) []ortrun.Tensor {
		b, tlen := int64(len(rows)), int64(len(rows[0]))
		var ids, mask, pos []int64
		for _, r := range rows {
			for j, v := range r {
				ids = append(ids, v)
				mask = append(mask, 1)
				pos = append(pos, int64(j))
			}
		}
		shape := []int64{b, tlen}
		var feeds []ortrun.Tensor
		for name, v := range map[string][]int64{"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": ids} {
			tt, err := ortrun.NewTensor(name, shape, v)
			if err != nil {
				t.Fatal(err)
			}
			feeds = append(feeds, tt)
		}
		names := step.OutputNames()
		out, err := s.RunOutputs(feeds, names)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	row := []int64{5, 9, 2, 33, 7, 1, 60, 12, 3}
	one := run([][]int64{row})
	two := run([][]int64{row, row})
	run([][]int64{{1, 2, 3}, {4, 5, 6}, {7, 8, 9}}) // another batch and length
	for i := range one {
		a, _ := one[i].Float64s()
		b, _ := two[i].Float64s()
		if rel := testutil.RelErr(b, a); rel > 1e-5 || math.IsNaN(rel) {
			t.Errorf("output %d: two identical rows differ from one row by %.3g", i, rel)
		}
	}
}

// An fp16 model: the loss is computed in float32 and the gradients come
// out in float16; they agree with the float32 model's (the same weights
// before rounding) to fp16 precision.
func TestFloat16Model(t *testing.T) {
	orttest.Require(t)
	grads := map[string]map[string][]float64{}
	for _, name := range []string{"tiny-gpt.onnx", "tiny-gpt-fp16.onnx"} {
		m, err := graph.Load(testutil.TestModel(name))
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		inj, err := rewrite.Inject(m, rewrite.InjectConfig{SelectOptions: rewrite.SelectOptions{Targets: []string{"q_proj", "v_proj"}, Rank: 4, Alpha: 8}, Seed: 5})
		if err != nil {
			t.Fatal(err)
		}
		g := m.Graph()
		for _, a := range inj.Manifest.Adapters {
			tp, _ := g.Initializer(a.LoraB)
			fillRandom(tp.RawData, graph.DataType(tp.GetDataType()), rand.New(rand.NewSource(int64(len(a.Module)))), 0.5)
		}
		step, err := Build(m, Options{Loss: "causal-lm", Params: inj.Manifest.Trainable})
		if err != nil {
			t.Fatal(err)
		}
		if name == "tiny-gpt-fp16.onnx" && (step.Params[0].DType != graph.Float16 || graph.DataType(m.Proto.Graph.Output[0].GetType().GetTensorType().GetElemType()) != graph.Float) {
			t.Fatalf("fp16 model: parameter type %s, loss type %d; want FLOAT16 and FLOAT", step.Params[0].DType, m.Proto.Graph.Output[0].GetType().GetTensorType().GetElemType())
		}
		path := filepath.Join(t.TempDir(), "step.onnx")
		if err := m.Save(path, graph.SaveOptions{}); err != nil {
			t.Fatal(err)
		}
		s := orttest.Open(t, path)
		ids := []int64{3, 17, 9, 42, 5, 11, 60, 2, 8, 30, 1, 4}
		var feeds []ortrun.Tensor
		for _, in := range s.Inputs() {
			switch in.Name {
			case "input_ids", "labels":
				tt, _ := ortrun.NewTensor(in.Name, []int64{2, 6}, ids)
				feeds = append(feeds, tt)
			case "attention_mask":
				ones := make([]int64, 12)
				for i := range ones {
					ones[i] = 1
				}
				tt, _ := ortrun.NewTensor(in.Name, []int64{2, 6}, ones)
				feeds = append(feeds, tt)
			}
		}
		names := step.OutputNames()
		out, err := s.RunOutputs(feeds, names)
		if err != nil {
			t.Fatal(err)
		}
		grads[name] = map[string][]float64{}
		for i, n := range names {
			grads[name][strings.TrimSuffix(n, GradSuffix)], _ = out[i].Float64s()
		}
	}
	worst := 0.0
	for name, want := range grads["tiny-gpt.onnx"] {
		got := grads["tiny-gpt-fp16.onnx"][name]
		rel := testutil.RelErr(got, want)
		if rel > 2e-2 || math.IsNaN(rel) {
			t.Errorf("%s: fp16 model differs from fp32 by %.3g", name, rel)
		}
		worst = math.Max(worst, rel)
	}
	t.Logf("fp16 loss and gradients within %.2g of the fp32 model's", worst)
}

// Options.Dropout wires a training_mode input: false is the identity, true
// drops elements (their gradient is 0) and scales the kept ones and their
// gradients by 1/(1-ratio).
func TestDropoutWiring(t *testing.T) {
	orttest.Require(t)
	c := fdCase{name: "dropout-wired", op: "Dropout", dt: graph.Float,
		args: []arg{{dims: []int64{4, 5}, kink: true}, {vals: []float64{0.3}, dims: []int64{}, fixed: true}}}
	mp, params := c.build(t)
	mp.Graph.Output = []*onnxpb.ValueInfoProto{tensorValueInfo("y", graph.Float, []dim{{value: 20}})}
	m := graph.NewModel(mp, "")
	step, err := Build(m, Options{Loss: "mse", Params: params, Dropout: true, KeepOutputs: true})
	if err != nil {
		t.Fatal(err)
	}
	if step.TrainingMode != TrainingModeName {
		t.Fatalf("TrainingMode %q, want %q", step.TrainingMode, TrainingModeName)
	}
	s := orttest.Open(t, saveProto(t, m.Proto, "step.onnx"))
	labels := make([]float64, 20)
	lt, _ := ortrun.FromFloat64(LabelsName, ortrun.Float32, []int64{20}, labels)
	x := tensorValues(t, mp.Graph.Initializer[0])
	for _, on := range []bool{false, true} {
		feeds := []ortrun.Tensor{lt}
		if on { // not fed: the default, false
			tm, _ := ortrun.NewTensor(TrainingModeName, []int64{}, []bool{true})
			feeds = append(feeds, tm)
		}
		out, err := s.RunOutputs(feeds, []string{step.Params[0].Grad, "y"})
		if err != nil {
			t.Fatal(err)
		}
		grad, _ := out[0].Float64s()
		y, _ := out[1].Float64s()
		dropped := 0
		for i := range grad {
			want := 2 * y[i] / 20 // labels are 0
			switch {
			case !on:
				if y[i] != float64(float32(x[i])) {
					t.Fatalf("training_mode false: y[%d] = %g, want x = %g", i, y[i], x[i])
				}
			case y[i] == 0:
				dropped++
				want = 0
			default:
				want /= 0.7
			}
			if math.Abs(grad[i]-want) > 1e-6 {
				t.Fatalf("training_mode %v, element %d: grad %g, want %g", on, i, grad[i], want)
			}
		}
		if on && (dropped == 0 || dropped == 20) {
			t.Fatalf("dropped %d of 20: dropout was not active", dropped)
		}
	}
}

// A detached value is a constant to the backward: for y = x·stop(x) the
// gradient is stop(x) = x, not 2x; by name (Options.Detach) or by the
// node's doc_string marker.
func TestDetach(t *testing.T) {
	orttest.Require(t)
	for _, byMarker := range []bool{false, true} {
		mp, params := fdCase{name: "detach", op: "Identity", args: []arg{f(6)}}.build(t)
		// Graph so far: x0 -> Identity -> y0 -> Reshape -> flat0 -> Concat -> y.
		// Make y0 = x0 · Identity(x0) with the Identity detached.
		id := mp.Graph.Node[0]
		id.Output[0] = "stopped"
		if byMarker {
			id.DocString = proto.String(DetachMarker)
		}
		mp.Graph.Node = append([]*onnxpb.NodeProto{id, node("Mul", []string{"x0", "stopped"}, []string{"y0"})}, mp.Graph.Node[1:]...)
		mp.Graph.Output = []*onnxpb.ValueInfoProto{tensorValueInfo("y", graph.Double, []dim{{value: 6}})}
		opts := Options{Loss: "mse", Params: params}
		if !byMarker {
			opts.Detach = []string{"stopped"}
		}
		m := graph.NewModel(mp, "")
		step, err := Build(m, opts)
		if err != nil {
			t.Fatal(err)
		}
		s := orttest.Open(t, saveProto(t, m.Proto, "step.onnx"))
		zeros, _ := ortrun.FromFloat64(LabelsName, ortrun.Float64, []int64{6}, make([]float64, 6))
		out, err := s.RunOutputs([]ortrun.Tensor{zeros}, []string{step.Params[0].Grad})
		if err != nil {
			t.Fatal(err)
		}
		grad, _ := out[0].Float64s()
		x := tensorValues(t, mp.Graph.Initializer[0])
		for i := range grad {
			// loss = mean(y²), y = x·s: dloss/dx = 2y/6 · s with s = x.
			want := 2 * x[i] * x[i] / 6 * x[i]
			if math.Abs(grad[i]-want) > 1e-12 {
				t.Fatalf("marker %v, element %d: grad %g, want %g (detached)", byMarker, i, grad[i], want)
			}
		}
	}
}
