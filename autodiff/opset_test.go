package autodiff

import (
	"math"
	"math/rand"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// An opset-11 model whose gradient needs run-time reduction axes is raised
// to opset 13. The raised step graph must compute the original model's
// loss (Softmax before 13 normalises over every axis from `axis` on, which
// the upgrade writes out), and its gradient must match finite differences.
func TestRaiseToOpset13(t *testing.T) {
	orttest.Require(t)
	dt := graph.Double
	sym := func(name string, dims ...dim) *onnxpb.ValueInfoProto { return tensorValueInfo(name, dt, dims) }
	batch, two, three, four := dim{value: -1, param: "batch"}, dim{value: 2}, dim{value: 3}, dim{value: 4}
	rng := rand.New(rand.NewSource(5))
	rnd := func(n int) []float64 {
		v := make([]float64, n)
		for i := range v {
			v[i] = rng.Float64()*2 - 1
		}
		return v
	}
	w := tensorOf(dt, []int64{3, 4}, rnd(12))
	w.Name = proto.String("w")
	consts := []*onnxpb.TensorProto{w}
	for name, v := range map[string]float64{"zero": 0, "one": 1, "two": 2} {
		c := tensorOf(graph.Int64, []int64{1}, []float64{v})
		c.Name = proto.String(name)
		consts = append(consts, c)
	}
	g := &onnxpb.GraphProto{Name: proto.String("old"),
		Input:       []*onnxpb.ValueInfoProto{sym("x", batch, two, three)},
		Output:      []*onnxpb.ValueInfoProto{sym("y", batch, two, four)},
		Initializer: consts,
		Node: []*onnxpb.NodeProto{
			node("MatMul", []string{"x", "w"}, []string{"h"}),
			// A slice's size is not followed statically, so the
			// broadcast in Mul is known only at run time.
			node("Slice", []string{"h", "zero", "one", "two"}, []string{"s"}),
			node("Mul", []string{"h", "s"}, []string{"z"}),
			node("Unsqueeze", []string{"z"}, []string{"z4"}, intsAttr("axes", 0)),
			node("Squeeze", []string{"z4"}, []string{"z3"}, intsAttr("axes", 0)),
			node("Softmax", []string{"z3"}, []string{"y"}, intAttr("axis", 1)),
		}}
	mp := &onnxpb.ModelProto{IrVersion: proto.Int64(6), Graph: g,
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(11)}}}
	fwd := orttest.Open(t, saveProto(t, proto.Clone(mp).(*onnxpb.ModelProto), "old.onnx"))

	m := graph.NewModel(mp, "")
	step, err := Build(m, Options{Loss: "mse", Params: []string{"w"}})
	if err != nil {
		t.Fatal(err)
	}
	if step.RaisedFrom != 11 || m.Opset() != 13 {
		t.Fatalf("raised from %d to %d, want 11 to 13", step.RaisedFrom, m.Opset())
	}
	s := orttest.Open(t, saveProto(t, m.Proto, "step.onnx"))

	xv, labels := rnd(3*2*3), rnd(3*2*4)
	x, _ := ortrun.FromFloat64("x", ortrun.Float64, []int64{3, 2, 3}, xv)
	lt, _ := ortrun.FromFloat64(LabelsName, ortrun.Float64, []int64{3, 2, 4}, labels)
	wv := tensorValues(t, w)
	feedW := func(v []float64) ortrun.Tensor {
		tt, _ := ortrun.FromFloat64("w", ortrun.Float64, []int64{3, 4}, v)
		return tt
	}
	out, err := fwd.Run([]ortrun.Tensor{x})
	if err != nil {
		t.Fatal(err)
	}
	y, _ := out[0].Float64s()
	var want float64
	for i := range y {
		want += (y[i] - labels[i]) * (y[i] - labels[i]) / float64(len(y))
	}
	res, err := s.RunOutputs([]ortrun.Tensor{x, lt, feedW(wv)}, []string{"loss", "w_grad"})
	if err != nil {
		t.Fatal(err)
	}
	loss, _ := res[0].Float64s()
	if math.Abs(loss[0]-want) > 1e-12 {
		t.Fatalf("raised step graph's loss %.15g, the opset-11 model's %.15g", loss[0], want)
	}
	grad, _ := res[1].Float64s()
	for j := range wv {
		v := append([]float64(nil), wv...)
		v[j] += 1e-6
		up, _ := s.RunOutputs([]ortrun.Tensor{x, lt, feedW(v)}, []string{"loss"})
		v[j] -= 2e-6
		down, _ := s.RunOutputs([]ortrun.Tensor{x, lt, feedW(v)}, []string{"loss"})
		a, _ := up[0].Float64s()
		b, _ := down[0].Float64s()
		if fd := (a[0] - b[0]) / 2e-6; math.Abs(fd-grad[j]) > 1e-7 {
			t.Errorf("w_grad[%d] = %g, finite difference %g", j, grad[j], fd)
		}
	}
}
