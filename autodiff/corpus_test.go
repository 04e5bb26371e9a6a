package autodiff

import (
	"encoding/binary"
	"math"
	"math/rand"
	"path/filepath"
	"sort"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
	"github.com/onnxlora/onnxlora/rewrite"
)

// Real exports of the shared corpus (PyTorch 1.1 to 1.9 at opsets 11 and
// 12, which are raised to 13; fp16): inject adapters on every linear layer,
// build the step graph, run it, and check the largest gradient elements of
// several adapters against central differences of the step graph's own
// loss. float32 models, so the tolerance is a few percent: this catches a
// wrong rule (sign, scale, a missing reduction), not rounding.
func TestCorpusGradients(t *testing.T) {
	cases := []struct {
		file string
		loss string
		fd   bool
	}{
		{"cnn-mnist-gemm-transb.onnx", "mse", true},
		{"bert-toy-tied-embeddings.onnx", "mse", true},
		{"gpt2-megatron-pytorch19.onnx", "causal-lm", true},
		{"whisper-encoder-attention-fp16.onnx", "mse", false}, // fp16: run only
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			path := testutil.Corpus(t, c.file)
			orttest.Require(t)
			corpusCase(t, path, c.loss, c.fd)
		})
	}
}

func corpusCase(t *testing.T, path, loss string, checkFD bool) {
	m, err := graph.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	inj, err := rewrite.Inject(m, rewrite.InjectConfig{SelectOptions: rewrite.SelectOptions{Targets: []string{rewrite.AllLinear}, Rank: 2, Alpha: 4}, Seed: 9, Init: rewrite.InitGaussian})
	if err != nil {
		t.Fatal(err)
	}
	// Non-zero B, so every A gets a gradient.
	g := m.Graph()
	rng := rand.New(rand.NewSource(1))
	for _, a := range inj.Manifest.Adapters {
		tp, _ := g.Initializer(a.LoraB)
		fillRandom(tp.RawData, graph.DataType(tp.GetDataType()), rng, 0.1)
	}
	output := ""
	if loss == "mse" {
		output = m.Proto.Graph.Output[0].GetName()
	}
	step, err := Build(m, Options{Loss: loss, Output: output, Params: inj.Manifest.Trainable})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	stepPath := filepath.Join(dir, "step.onnx")
	if err := m.Save(stepPath, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	s := orttest.Open(t, stepPath)
	feeds := corpusFeeds(t, s, step)
	params := map[string]ortrun.Tensor{}
	for _, p := range step.Params {
		tp, _ := m.Graph().Initializer(p.Name)
		raw, err := m.RawData(tp)
		if err != nil {
			t.Fatal(err)
		}
		params[p.Name] = ortrun.Tensor{Name: p.Name, DType: ortrun.DType(p.DType), Shape: p.Dims, Data: append([]byte(nil), raw...)}
	}
	run := func(names []string) []ortrun.Tensor {
		all := append([]ortrun.Tensor(nil), feeds...)
		for _, p := range step.Params {
			all = append(all, params[p.Name])
		}
		out, err := s.RunOutputs(all, names)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	names := step.OutputNames()
	out := run(names)
	l0, _ := out[0].Float64s()
	if math.IsNaN(l0[0]) || math.IsInf(l0[0], 0) {
		t.Fatalf("loss %v", l0[0])
	}
	nonzero := 0
	for i := range step.Params {
		gv, _ := out[i+1].Float64s()
		for _, v := range gv {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				t.Fatalf("%s has non-finite values", step.Params[i].Grad)
			}
		}
		if maxAbs(gv) > 0 {
			nonzero++
		}
	}
	if nonzero == 0 {
		t.Fatal("every gradient is zero")
	}
	t.Logf("loss %.5g, %d of %d gradients non-zero, opset %d (raised from %d)", l0[0], nonzero, len(step.Params), step.Opset, step.RaisedFrom)
	if !checkFD {
		return
	}
	// The largest element of up to 6 gradients, spread over the model.
	checked, worst := 0, 0.0
	for i := 0; i < len(step.Params) && checked < 6; i += max(1, len(step.Params)/6) {
		p := step.Params[i]
		gv, _ := out[i+1].Float64s()
		j := argMaxAbs(gv)
		if math.Abs(gv[j]) < 1e-4 {
			continue
		}
		orig := params[p.Name]
		vals, _ := orig.Float64s()
		h := 1e-2 * math.Max(1, math.Abs(vals[j]))
		lossAt := func(v float64) float64 {
			w := append([]float64(nil), vals...)
			w[j] = v
			tt, _ := ortrun.FromFloat64(p.Name, orig.DType, orig.Shape, w)
			params[p.Name] = tt
			r := run([]string{step.Loss})
			f, _ := r[0].Float64s()
			return f[0]
		}
		fd := (lossAt(vals[j]+h) - lossAt(vals[j]-h)) / (2 * h)
		params[p.Name] = orig
		rel := math.Abs(fd-gv[j]) / math.Abs(gv[j])
		worst = math.Max(worst, rel)
		if rel > 0.05 {
			t.Errorf("%s[%d]: gradient %.6g, finite difference %.6g (rel %.2g)", p.Name, j, gv[j], fd, rel)
		}
		checked++
	}
	if checked == 0 {
		t.Fatal("no gradient element large enough to check")
	}
	t.Logf("%d gradient elements against finite differences: worst rel error %.2g", checked, worst)
}

// corpusFeeds makes inputs from the session's declared inputs: symbolic
// dims 2 (past lengths 1), token ids 1, masks 1, floats random.
func corpusFeeds(t *testing.T, s *ortrun.Session, step *Step) []ortrun.Tensor {
	rng := rand.New(rand.NewSource(2))
	var feeds []ortrun.Tensor
	trainable := map[string]bool{}
	for _, p := range step.Params {
		trainable[p.Name] = true
	}
	infos := s.Inputs()
	sort.Slice(infos, func(i, j int) bool { return infos[i].Name < infos[j].Name })
	var labelShape []int64
	for _, in := range infos {
		if trainable[in.Name] {
			continue
		}
		shape := make([]int64, len(in.Shape))
		for i, d := range in.Shape {
			shape[i] = d
			if d < 0 {
				shape[i] = 2
				if i < len(in.DimNames) && in.DimNames[i] == "past_seq_len" {
					shape[i] = 1
				}
			}
		}
		if in.Name == LabelsName {
			labelShape = shape
			continue
		}
		n, _ := ortrun.NumElements(shape)
		vals := make([]float64, n)
		for i := range vals {
			if in.DType.IsFloat() {
				vals[i] = rng.Float64()*2 - 1
			} else {
				vals[i] = 1
			}
		}
		tt, err := ortrun.FromFloat64(in.Name, in.DType, shape, vals)
		if err != nil {
			t.Fatal(err)
		}
		feeds = append(feeds, tt)
	}
	// Labels: mse targets random, class labels 1 (a valid class and token).
	n, _ := ortrun.NumElements(labelShape)
	vals := make([]float64, n)
	for i := range vals {
		vals[i] = 1
		if step.LabelsType.IsFloat() {
			vals[i] = rng.Float64()*2 - 1
		}
	}
	lt, err := ortrun.FromFloat64(LabelsName, ortrun.DType(step.LabelsType), labelShape, vals)
	if err != nil {
		t.Fatal(err)
	}
	return append(feeds, lt)
}

func fillRandom(raw []byte, dt graph.DataType, rng *rand.Rand, scale float64) {
	for i := 0; i < len(raw); {
		v := (rng.Float64()*2 - 1) * scale
		switch dt {
		case graph.Float:
			binary.LittleEndian.PutUint32(raw[i:], math.Float32bits(float32(v)))
			i += 4
		case graph.Float16:
			binary.LittleEndian.PutUint16(raw[i:], graph.Float16Bits(v))
			i += 2
		default:
			return
		}
	}
}

func maxAbs(v []float64) float64 {
	m := 0.0
	for _, x := range v {
		m = math.Max(m, math.Abs(x))
	}
	return m
}

func argMaxAbs(v []float64) int {
	j := 0
	for i, x := range v {
		if math.Abs(x) > math.Abs(v[j]) {
			j = i
		}
	}
	return j
}
