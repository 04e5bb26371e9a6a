package verify

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// valueInfo declares a tensor; dims are int (fixed) or string (symbolic).
func valueInfo(name string, dt ortrun.DType, dims ...any) *onnxpb.ValueInfoProto {
	shape := &onnxpb.TensorShapeProto{}
	for _, d := range dims {
		dim := &onnxpb.TensorShapeProto_Dimension{}
		switch v := d.(type) {
		case int:
			dim.Value = &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: int64(v)}
		case string:
			dim.Value = &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: v}
		}
		shape.Dim = append(shape.Dim, dim)
	}
	return &onnxpb.ValueInfoProto{
		Name: proto.String(name),
		Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: &onnxpb.TypeProto_Tensor{
			ElemType: proto.Int32(int32(dt)), Shape: shape,
		}}},
	}
}

func node(op string, inputs, outputs []string, attrs ...*onnxpb.AttributeProto) *onnxpb.NodeProto {
	return &onnxpb.NodeProto{OpType: proto.String(op), Name: proto.String(op + "_" + outputs[0]), Input: inputs, Output: outputs, Attribute: attrs}
}

func intAttr(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

// writeGraph saves g as an opset-17 model at dir/name.
func writeGraph(t *testing.T, dir, name string, g *onnxpb.GraphProto) string {
	t.Helper()
	g.Name = proto.String("test")
	mp := &onnxpb.ModelProto{
		IrVersion:   proto.Int64(8),
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(17)}},
		Graph:       g,
	}
	path := filepath.Join(dir, name)
	if err := graph.NewModel(mp, dir).Save(path, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	return path
}

// embedModel writes y = table[Cast(ids)] + small[ids], with table [rows,4]
// and small [7,4]: the bound of ids is min(rows, 7).
func embedModel(t *testing.T, dir, name string, rows int64) string {
	t.Helper()
	vals := func(n int64) []float64 {
		v := make([]float64, n*4)
		for i := range v {
			v[i] = float64(i%5) - 2
		}
		return v
	}
	table, _ := graph.NewFloatTensor("table", graph.Float, []int64{rows, 4}, vals(rows))
	small, _ := graph.NewFloatTensor("small", graph.Float, []int64{7, 4}, vals(7))
	return writeGraph(t, dir, name, &onnxpb.GraphProto{
		Node: []*onnxpb.NodeProto{
			node("Cast", []string{"ids"}, []string{"ids32"}, intAttr("to", int64(onnxpb.TensorProto_INT32))),
			node("Gather", []string{"table", "ids32"}, []string{"e1"}),
			node("Gather", []string{"small", "ids"}, []string{"e2"}),
			node("Add", []string{"e1", "e2"}, []string{"y"}),
		},
		Initializer: []*onnxpb.TensorProto{table, small},
		Input:       []*onnxpb.ValueInfoProto{valueInfo("ids", ortrun.Int64, "batch", "sequence")},
		Output:      []*onnxpb.ValueInfoProto{valueInfo("y", ortrun.Float32, "batch", "sequence", 4)},
	})
}

func TestCompareSelf(t *testing.T) {
	orttest.Require(t)
	for _, name := range []string{"tiny-gpt.onnx", "tiny-gpt-fp16.onnx", "tiny-bert.onnx", "tiny-gpt-extdata/model.onnx"} {
		path := testutil.TestModel(name)
		rep, err := Compare(path, path, Options{Samples: 2, Seed: 3})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !rep.Pass || len(rep.Failed()) != 0 {
			t.Errorf("%s vs itself fails: %+v", name, rep.Outputs)
		}
		for _, o := range rep.Outputs {
			if o.MaxAbs != 0 || o.MaxRel != 0 || o.FailedSamples != 0 || o.Problem != "" {
				t.Errorf("%s: output %s differs from itself: %+v", name, o.Name, o)
			}
			if o.Shape[0] != DefaultBatch || (o.Name != "pooler_output" && o.Shape[1] != DefaultSequence) {
				t.Errorf("%s: output %s shape %v", name, o.Name, o.Shape)
			}
		}
		if rep.Dims["batch"] != DefaultBatch || rep.Dims["sequence"] != DefaultSequence {
			t.Errorf("%s: dims %v", name, rep.Dims)
		}
		if rep.LatencyA <= 0 || rep.LatencyB <= 0 || rep.TimedRuns != DefaultTimedRuns || rep.Samples != 2 {
			t.Errorf("%s: latency %v %v over %d runs, %d samples", name, rep.LatencyA, rep.LatencyB, rep.TimedRuns, rep.Samples)
		}
		if rep.Inputs[0].Name != "input_ids" || rep.Inputs[0].Source != genIndex || rep.Inputs[0].High != 64 {
			t.Errorf("%s: input_ids plan %+v", name, rep.Inputs[0])
		}
		if strings.Contains(name, "fp16") && (rep.Outputs[0].RTol != 1e-2 || rep.Outputs[0].DType != ortrun.Float16) {
			t.Errorf("%s: tolerance %g for %v", name, rep.Outputs[0].RTol, rep.Outputs[0].DType)
		}
	}
}

// perturb writes a copy of the model with one element of an initializer
// changed by delta.
func perturb(t *testing.T, src, dst, init string, delta float64) {
	t.Helper()
	m, err := graph.Load(src)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	w, _ := m.Graph().Initializer(init)
	if w == nil {
		t.Fatalf("%s has no initializer %s", src, init)
	}
	vals, err := m.Float64s(w)
	if err != nil {
		t.Fatal(err)
	}
	vals[0] += delta
	if err := graph.SetFloat64s(w, vals); err != nil {
		t.Fatal(err)
	}
	if err := m.Save(dst, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestComparePerturbedWeight(t *testing.T) {
	orttest.Require(t)
	base := testutil.TestModel("tiny-bert.onnx")
	bad := filepath.Join(t.TempDir(), "bad.onnx")
	// The pooler only feeds pooler_output: last_hidden_state must still
	// match, so the report has to name the right output.
	perturb(t, base, bad, "pooler.dense.weight", 0.5)
	rep, err := Compare(base, bad, Options{Samples: 3})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Pass {
		t.Fatal("a perturbed weight passes")
	}
	failed := rep.Failed()
	if len(failed) != 1 || failed[0].Name != "pooler_output" || failed[0].FailedSamples != 3 || failed[0].MaxAbs < 1e-3 {
		t.Errorf("failed outputs %+v, want pooler_output in all 3 samples", failed)
	}
	if o := rep.Outputs[0]; o.Name != "last_hidden_state" || !o.Pass || o.MaxAbs != 0 {
		t.Errorf("last_hidden_state: %+v", o)
	}

	// A generous tolerance lets it pass.
	loose := 10.0
	rep, err = Compare(base, bad, Options{ATol: &loose})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Pass || rep.Outputs[1].ATol != 10 || rep.Outputs[1].RTol != 1e-3 {
		t.Errorf("with atol 10: pass %v, tolerances %+v", rep.Pass, rep.Outputs[1])
	}
	neg := -1.0
	if _, err := Compare(base, bad, Options{RTol: &neg}); err == nil {
		t.Error("negative rtol accepted")
	}
}

func TestCompareMismatchedModels(t *testing.T) {
	orttest.Require(t)
	gpt, bert, fp16 := testutil.TestModel("tiny-gpt.onnx"), testutil.TestModel("tiny-bert.onnx"), testutil.TestModel("tiny-gpt-fp16.onnx")
	_, err := Compare(gpt, bert, Options{})
	if err == nil || !strings.Contains(err.Error(), `input "attention_mask" of B is not in A`) || !strings.Contains(err.Error(), `output "logits" of A is not in B`) {
		t.Errorf("gpt vs bert: %v", err)
	}
	_, err = Compare(gpt, fp16, Options{})
	if err == nil || !strings.Contains(err.Error(), `output "logits" is float32 in A, float16 in B`) {
		t.Errorf("fp32 vs fp16: %v", err)
	}
	if _, err := Compare(gpt, filepath.Join(t.TempDir(), "missing.onnx"), Options{}); err == nil {
		t.Error("missing model accepted")
	}

	// Different output shapes are a failure of that output, not an error.
	dir := t.TempDir()
	x := valueInfo("x", ortrun.Float32, "batch", 4)
	a := writeGraph(t, dir, "a.onnx", &onnxpb.GraphProto{
		Node:  []*onnxpb.NodeProto{node("Identity", []string{"x"}, []string{"y"})},
		Input: []*onnxpb.ValueInfoProto{x}, Output: []*onnxpb.ValueInfoProto{valueInfo("y", ortrun.Float32, "batch", "n")},
	})
	b := writeGraph(t, dir, "b.onnx", &onnxpb.GraphProto{
		Node:  []*onnxpb.NodeProto{node("Concat", []string{"x", "x"}, []string{"y"}, intAttr("axis", 1))},
		Input: []*onnxpb.ValueInfoProto{x}, Output: []*onnxpb.ValueInfoProto{valueInfo("y", ortrun.Float32, "batch", "n")},
	})
	rep, err := Compare(a, b, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Pass || rep.Outputs[0].Problem != "shape [2,8] in B, [2,4] in A" {
		t.Errorf("shape mismatch: %+v", rep.Outputs[0])
	}

	// Inputs with contradicting fixed dims cannot be fed the same tensor.
	c := writeGraph(t, dir, "c.onnx", &onnxpb.GraphProto{
		Node:  []*onnxpb.NodeProto{node("Identity", []string{"x"}, []string{"y"})},
		Input: []*onnxpb.ValueInfoProto{valueInfo("x", ortrun.Float32, "batch", 5)}, Output: []*onnxpb.ValueInfoProto{valueInfo("y", ortrun.Float32, "batch", 5)},
	})
	if _, err := Compare(a, c, Options{}); err == nil || !strings.Contains(err.Error(), `input "x" is [batch,4] in A, [batch,5] in B`) {
		t.Errorf("input shapes: %v", err)
	}
}

func TestCompareIndexBoundsRun(t *testing.T) {
	orttest.Require(t)
	// Gather fails in ORT on an index past the table, so passing proves
	// ids stayed below the smaller table.
	path := embedModel(t, t.TempDir(), "embed.onnx", 10)
	rep, err := Compare(path, path, Options{Samples: 4, Dims: map[string]int64{"sequence": 32}})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Pass || rep.Inputs[0].High != 7 || !slices.Equal(rep.Inputs[0].Shape, []int64{2, 32}) {
		t.Errorf("embed model: pass %v, plan %+v", rep.Pass, rep.Inputs[0])
	}
	if _, err := Compare(path, path, Options{Dims: map[string]int64{"seq": 3}}); err == nil || !strings.Contains(err.Error(), "seq") {
		t.Errorf("unknown dim: %v", err)
	}
}

func TestCompareInputsFile(t *testing.T) {
	orttest.Require(t)
	// golden.json's inputs are in the JSON inputs format.
	raw, err := os.ReadFile(testutil.TestModel("golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var all map[string]struct {
		Inputs json.RawMessage `json:"inputs"`
	}
	if err := json.Unmarshal(raw, &all); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "inputs.json")
	if err := os.WriteFile(file, all["tiny-bert.onnx"].Inputs, 0o644); err != nil {
		t.Fatal(err)
	}
	base := testutil.TestModel("tiny-bert.onnx")
	rep, err := Compare(base, base, Options{InputsFile: file, Samples: 2})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Pass || rep.Dims["batch"] != 2 || rep.Dims["sequence"] != 6 {
		t.Errorf("pass %v, dims %v (golden inputs are [2,6])", rep.Pass, rep.Dims)
	}
	for _, p := range rep.Inputs {
		if p.Source != genFile || !slices.Equal(p.Shape, []int64{2, 6}) {
			t.Errorf("input %s: %+v", p.Name, p)
		}
	}

	// Only some inputs in the file: the others are random, shaped by it.
	part := filepath.Join(t.TempDir(), "part.json")
	os.WriteFile(part, []byte(`{"input_ids": {"shape": [1, 3], "dtype": "int64", "data": [1, 2, 3]}}`), 0o644)
	rep, err = Compare(base, base, Options{InputsFile: part})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Inputs[1].Source != genMask || !slices.Equal(rep.Inputs[1].Shape, []int64{1, 3}) {
		t.Errorf("attention_mask with partial file: %+v", rep.Inputs[1])
	}

	bad := filepath.Join(t.TempDir(), "bad.json")
	os.WriteFile(bad, []byte(`{"input_id": {"data": [[1, 2]]}}`), 0o644)
	if _, err := Compare(base, base, Options{InputsFile: bad}); err == nil || !strings.Contains(err.Error(), `fixed input "input_id" is not an input`) {
		t.Errorf("misnamed input: %v", err)
	}
	if _, err := Compare(base, base, Options{InputsFile: part, Dims: map[string]int64{"sequence": 4}}); err == nil || !strings.Contains(err.Error(), "dim sequence is 3") {
		t.Errorf("conflicting --dim: %v", err)
	}
}
