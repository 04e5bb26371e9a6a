package autodiff

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
	"github.com/onnxlora/onnxlora/rewrite"
)

// A gradient reference case written by testdata/models/generate.py: a
// model, how to inject it, a batch, parameter values, and the loss and
// gradients torch autograd computed in float64.
type gradCase struct {
	Model  string `json:"model"`
	Inject *struct {
		Targets []string `json:"targets"`
		Rank    int      `json:"rank"`
		Alpha   float64  `json:"alpha"`
	} `json:"inject"`
	Loss      string                `json:"loss"`
	Output    string                `json:"output"`
	Inputs    map[string]jsonTensor `json:"inputs"`
	Params    map[string]jsonTensor `json:"params"`
	Trainable []string              `json:"trainable"`
	Expected  struct {
		Loss  float64               `json:"loss"`
		Grads map[string]jsonTensor `json:"grads"`
	} `json:"expected"`
}

type jsonTensor struct {
	DType string    `json:"dtype"`
	Shape []int64   `json:"shape"`
	Data  []float64 `json:"data"`
}

var dtypeNames = map[string]ortrun.DType{"float32": ortrun.Float32, "float64": ortrun.Float64, "int64": ortrun.Int64,
	"float16": ortrun.Float16, "int32": ortrun.Int32, "bool": ortrun.Bool}

// TestTorchReferences: on the testdata models, the step graph run in ONNX
// Runtime gives the loss and every gradient torch autograd gives on the
// same batch.
func TestTorchReferences(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(testutil.RepoRoot(), "testdata", "grad", "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no reference cases in testdata/grad (%v)", err)
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".json"), func(t *testing.T) {
			orttest.Require(t)
			runGradCase(t, file)
		})
	}
}

func runGradCase(t *testing.T, file string) {
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var c gradCase
	if err := json.Unmarshal(data, &c); err != nil {
		t.Fatal(err)
	}
	m, err := graph.Load(testutil.TestModel(c.Model))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if c.Inject != nil {
		_, err := rewrite.Inject(m, rewrite.InjectConfig{SelectOptions: rewrite.SelectOptions{
			Targets: c.Inject.Targets, Rank: c.Inject.Rank, Alpha: c.Inject.Alpha}, Seed: 1})
		if err != nil {
			t.Fatal(err)
		}
	}
	g := m.Graph()
	for name, v := range c.Params {
		tp, _ := g.Initializer(name)
		if tp == nil {
			t.Fatalf("parameter %q is not an initializer of the model", name)
		}
		if graph.DataType(tp.GetDataType()) != graph.Float || !slices.Equal(tp.Dims, v.Shape) {
			t.Fatalf("parameter %q: model has %s %v, case %s %v", name, graph.DataType(tp.GetDataType()), tp.Dims, v.DType, v.Shape)
		}
		raw := make([]byte, 4*len(v.Data))
		for i, x := range v.Data {
			binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(float32(x)))
		}
		tp.RawData, tp.FloatData = raw, nil
	}
	step, err := Build(m, Options{Loss: c.Loss, Output: c.Output, Params: c.Trainable})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "step.onnx")
	if err := m.Save(path, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	if dir := os.Getenv("AUTODIFF_KEEP"); dir != "" { // to look at a step graph in Netron
		data, _ := os.ReadFile(path)
		os.WriteFile(filepath.Join(dir, filepath.Base(file)+".onnx"), data, 0o644)
	}
	testutil.CheckONNX(t, path)
	s := orttest.Open(t, path)
	var feeds []ortrun.Tensor
	for name, v := range c.Inputs {
		tt, err := ortrun.FromFloat64(name, dtypeNames[v.DType], v.Shape, v.Data)
		if err != nil {
			t.Fatal(err)
		}
		feeds = append(feeds, tt)
	}
	names := step.OutputNames()
	outs, err := s.RunOutputs(feeds, names)
	if err != nil {
		t.Fatal(err)
	}
	loss, _ := outs[0].Float64s()
	if rel := math.Abs(loss[0]-c.Expected.Loss) / math.Abs(c.Expected.Loss); rel > 1e-5 {
		t.Errorf("loss %.9g, torch %.9g (rel %.2g)", loss[0], c.Expected.Loss, rel)
	}
	worst := 0.0
	for i, p := range step.Params {
		want, ok := c.Expected.Grads[p.Name]
		if !ok {
			t.Fatalf("no reference gradient for %q", p.Name)
		}
		got, _ := outs[i+1].Float64s()
		rel := testutil.RelErr(got, want.Data)
		worst = math.Max(worst, rel)
		if rel > 1e-4 {
			t.Errorf("%s: gradient rel error %.3g", p.Name, rel)
		}
	}
	t.Logf("loss %.7g (torch %.7g); %d gradients, worst rel error %.2g", loss[0], c.Expected.Loss, len(step.Params), worst)
}
