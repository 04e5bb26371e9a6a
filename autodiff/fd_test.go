package autodiff

import (
	"fmt"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// The finite-difference harness: a case is one node (or a few) whose float
// inputs are trainable initializers; the harness wraps the node's outputs in
// an mse loss, builds the step graph, runs it in ONNX Runtime, and compares
// every gradient element with a central difference of the same step
// graph's loss, fed the perturbed parameter.

// arg is one input of the node under test.
type arg struct {
	dims     []int64
	ints     []int64   // an int64 constant input (dims default [len])
	vals     []float64 // fixed float values (default random)
	fixed    bool      // a float constant, not trainable
	positive bool      // random values in [0.5, 1.5]
	kink     bool      // random values at least 0.1 away from 0 (Relu's kink)
	dt       graph.DataType
	absent   bool // an omitted optional input
	name     string
}

type fdCase struct {
	name   string
	op     string
	domain string
	opset  int64 // default 17
	attrs  []*onnxpb.AttributeProto
	args   []arg
	outs   int            // node outputs (default 1)
	use    []int          // outputs that feed the loss (default all)
	dt     graph.DataType // default DOUBLE
	// extra nodes after the node under test, reading "y0".. and writing
	// the single output "y" (instead of the default flatten+concat).
	tail []*onnxpb.NodeProto
}

func node(op string, in, out []string, attrs ...*onnxpb.AttributeProto) *onnxpb.NodeProto {
	return &onnxpb.NodeProto{OpType: proto.String(op), Name: proto.String(op + "_" + out[0]), Input: in, Output: out, Attribute: attrs}
}

// build makes the forward model of c; trainable names are returned.
func (c fdCase) build(t *testing.T) (*onnxpb.ModelProto, []string) {
	rng := rand.New(rand.NewSource(int64(len(c.name)) * 7919))
	dt := c.dt
	if dt == 0 {
		dt = graph.Double
	}
	opset := c.opset
	if opset == 0 {
		opset = 17
	}
	g := &onnxpb.GraphProto{Name: proto.String("fd")}
	var inputs, params []string
	for i, a := range c.args {
		if a.absent {
			inputs = append(inputs, "")
			continue
		}
		name := a.name
		if name == "" {
			name = fmt.Sprintf("x%d", i)
		}
		inputs = append(inputs, name)
		var tp *onnxpb.TensorProto
		switch {
		case a.ints != nil:
			dims := a.dims
			if dims == nil {
				dims = []int64{int64(len(a.ints))}
			}
			f := make([]float64, len(a.ints))
			for j, v := range a.ints {
				f[j] = float64(v)
			}
			tp = tensorOf(graph.Int64, dims, f)
		default:
			adt := dt
			if a.dt != 0 {
				adt = a.dt
			}
			n := int64(1)
			for _, d := range a.dims {
				n *= d
			}
			vals := a.vals
			if vals == nil {
				vals = make([]float64, n)
				for j := range vals {
					switch {
					case a.positive:
						vals[j] = 0.5 + rng.Float64()
					case a.kink:
						vals[j] = 0.1 + 0.9*rng.Float64()
						if rng.Intn(2) == 0 {
							vals[j] = -vals[j]
						}
					default:
						vals[j] = rng.Float64()*2 - 1
					}
				}
			}
			tp = tensorOf(adt, a.dims, vals)
			if !a.fixed && isDifferentiableType(adt) {
				params = append(params, name)
			}
		}
		tp.Name = proto.String(name)
		g.Initializer = append(g.Initializer, tp)
	}
	outs := c.outs
	if outs == 0 {
		outs = 1
	}
	var ys []string
	for i := 0; i < outs; i++ {
		ys = append(ys, fmt.Sprintf("y%d", i))
	}
	n := node(c.op, inputs, ys, c.attrs...)
	n.Name = proto.String("/layer/" + c.op)
	if c.domain != "" {
		n.Domain = proto.String(c.domain)
	}
	g.Node = append(g.Node, n)
	if c.tail != nil {
		g.Node = append(g.Node, c.tail...)
	} else {
		use := c.use
		if use == nil {
			for i := range ys {
				use = append(use, i)
			}
		}
		var flat []string
		minus1 := tensorOf(graph.Int64, []int64{1}, []float64{-1})
		minus1.Name = proto.String("minus1")
		g.Initializer = append(g.Initializer, minus1)
		for _, i := range use {
			f := fmt.Sprintf("flat%d", i)
			g.Node = append(g.Node, node("Reshape", []string{ys[i], "minus1"}, []string{f}))
			flat = append(flat, f)
		}
		g.Node = append(g.Node, node("Concat", flat, []string{"y"}, intAttr("axis", 0)))
	}
	outDT := dt
	g.Output = []*onnxpb.ValueInfoProto{tensorValueInfo("y", outDT, []dim{{value: -1, param: "n"}})}
	mp := &onnxpb.ModelProto{IrVersion: proto.Int64(8), Graph: g,
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(opset)}}}
	if c.domain != "" {
		mp.OpsetImport = append(mp.OpsetImport, &onnxpb.OperatorSetIdProto{Domain: proto.String(c.domain), Version: proto.Int64(1)})
	}
	return mp, params
}

func saveProto(t *testing.T, mp *onnxpb.ModelProto, name string) string {
	t.Helper()
	data, err := proto.Marshal(mp)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// run checks the case's gradients against central differences.
func (c fdCase) run(t *testing.T) {
	orttest.Require(t)
	mp, params := c.build(t)
	if len(params) == 0 {
		t.Fatal("case has no trainable input")
	}
	// The forward run fixes the output's length, for the labels.
	fwd := orttest.Open(t, saveProto(t, mp, "forward.onnx"))
	outs, err := fwd.Run(nil)
	if err != nil {
		t.Fatalf("forward: %v", err)
	}
	y := outs[0]
	mp.Graph.Output = []*onnxpb.ValueInfoProto{tensorValueInfo("y", graph.DataType(y.DType), staticDims(y.Shape))}

	m := graph.NewModel(mp, "")
	step, err := Build(m, Options{Loss: "mse", Params: params})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	path := saveProto(t, m.Proto, "step.onnx")
	if dir := os.Getenv("AUTODIFF_KEEP"); dir != "" { // to look at a step graph in Netron
		data, _ := os.ReadFile(path)
		os.WriteFile(filepath.Join(dir, filepath.Base(filepath.Dir(filepath.Dir(path)))+".onnx"), data, 0o644)
	}
	s := orttest.Open(t, path)

	rng := rand.New(rand.NewSource(42))
	n := int(y.Shape[0])
	labels := make([]float64, n)
	for i := range labels {
		labels[i] = rng.Float64()*2 - 1
	}
	labelT, err := ortrun.FromFloat64(LabelsName, y.DType, y.Shape, labels)
	if err != nil {
		t.Fatal(err)
	}
	values := map[string][]float64{}
	dtypes := map[string]ortrun.DType{}
	dims := map[string][]int64{}
	for _, tp := range mp.Graph.Initializer {
		for _, p := range params {
			if tp.GetName() == p {
				values[p] = tensorValues(t, tp)
				dtypes[p] = ortrun.DType(tp.GetDataType())
				dims[p] = tp.Dims
			}
		}
	}
	feeds := func(override string, vals []float64) []ortrun.Tensor {
		feeds := []ortrun.Tensor{labelT}
		for _, p := range params {
			v := values[p]
			if p == override {
				v = vals
			}
			tt, err := ortrun.FromFloat64(p, dtypes[p], dims[p], v)
			if err != nil {
				t.Fatal(err)
			}
			feeds = append(feeds, tt)
		}
		return feeds
	}
	names := step.OutputNames()
	res, err := s.RunOutputs(feeds("", nil), names)
	if err != nil {
		t.Fatalf("step: %v", err)
	}
	loss := func(override string, vals []float64) float64 {
		r, err := s.RunOutputs(feeds(override, vals), []string{step.Loss})
		if err != nil {
			t.Fatal(err)
		}
		f, _ := r[0].Float64s()
		return f[0]
	}
	for i, p := range step.Params {
		h, tol := 1e-6, 1e-6
		if p.DType != graph.Double {
			h, tol = 1e-3, 2e-3
		}
		got, err := res[i+1].Float64s()
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(values[p.Name]) {
			t.Fatalf("%s: gradient has %d elements, parameter %d", p.Name, len(got), len(values[p.Name]))
		}
		var maxErr, scale float64
		for j := range values[p.Name] {
			v := append([]float64(nil), values[p.Name]...)
			v[j] += h
			up := loss(p.Name, v)
			v[j] -= 2 * h
			down := loss(p.Name, v)
			fd := (up - down) / (2 * h)
			maxErr = math.Max(maxErr, math.Abs(fd-got[j]))
			scale = math.Max(scale, math.Abs(fd))
		}
		if scale == 0 {
			t.Errorf("%s: the loss does not depend on it; the case tests nothing", p.Name)
		}
		if maxErr > tol*math.Max(scale, 1e-3) {
			t.Errorf("%s: max |grad - finite difference| = %.3g (scale %.3g, tol %.1g)", p.Name, maxErr, scale, tol)
		} else {
			t.Logf("%s: max error %.2g of scale %.2g", p.Name, maxErr, scale)
		}
	}
}

func tensorValues(t *testing.T, tp *onnxpb.TensorProto) []float64 {
	t.Helper()
	m := graph.NewModel(&onnxpb.ModelProto{}, "")
	raw, err := m.RawData(tp)
	if err != nil {
		t.Fatal(err)
	}
	tt := ortrun.Tensor{Name: tp.GetName(), DType: ortrun.DType(tp.GetDataType()), Shape: tp.Dims, Data: raw}
	v, err := tt.Float64s()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func runCases(t *testing.T, cases []fdCase) {
	for _, c := range cases {
		t.Run(c.name, c.run)
	}
}
