package rewrite

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// mgFeedSpec says how to build a model's inputs: values for symbolic dims and
// for some inputs by name.
type mgFeedSpec struct {
	dims   map[string]int64
	values map[string]func(shape []int64) []float64
}

var mgGolden map[string]struct {
	Inputs map[string]struct {
		Data  []float64 `json:"data"`
		DType string    `json:"dtype"`
		Shape []int64   `json:"shape"`
	} `json:"inputs"`
}

// mgGoldenFeeds returns the fixed inputs of a testdata model.
func mgGoldenFeeds(t testing.TB, model string) []ortrun.Tensor {
	t.Helper()
	if mgGolden == nil {
		data, err := os.ReadFile(filepath.Join(mgTestModels, "golden.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(data, &mgGolden); err != nil {
			t.Fatal(err)
		}
	}
	g, ok := mgGolden[model]
	if !ok {
		t.Fatalf("golden.json has no %s", model)
	}
	var feeds []ortrun.Tensor
	for _, name := range sortedKeys(g.Inputs) {
		in := g.Inputs[name]
		dt := map[string]ortrun.DType{"int64": ortrun.Int64, "float32": ortrun.Float32, "float16": ortrun.Float16}[in.DType]
		tt, err := ortrun.FromFloat64(name, dt, in.Shape, in.Data)
		if err != nil {
			t.Fatal(err)
		}
		feeds = append(feeds, tt)
	}
	return feeds
}

// mgMakeFeeds builds deterministic inputs for a session from a spec: integer
// inputs are small ids (masks are ones), float inputs are N(0, 0.5²).
func mgMakeFeeds(t testing.TB, s *ortrun.Session, spec mgFeedSpec) []ortrun.Tensor {
	t.Helper()
	rng := rand.New(rand.NewPCG(42, 43))
	var feeds []ortrun.Tensor
	for _, in := range s.Inputs() {
		shape := make([]int64, len(in.Shape))
		for i, d := range in.Shape {
			if d >= 0 {
				shape[i] = d
				continue
			}
			v, ok := spec.dims[in.DimNames[i]]
			if !ok {
				t.Fatalf("input %s: no value for dim %q", in.Name, in.DimNames[i])
			}
			shape[i] = v
		}
		n, _ := ortrun.NumElements(shape)
		var vals []float64
		if f := spec.values[in.Name]; f != nil {
			vals = f(shape)
		} else {
			vals = make([]float64, n)
			for i := range vals {
				switch {
				case in.DType.IsFloat():
					vals[i] = 0.5 * rng.NormFloat64()
				case strings.Contains(in.Name, "mask"):
					vals[i] = 1
				default:
					vals[i] = float64(rng.IntN(8))
				}
			}
		}
		tt, err := ortrun.FromFloat64(in.Name, in.DType, shape, vals)
		if err != nil {
			t.Fatal(err)
		}
		feeds = append(feeds, tt)
	}
	return feeds
}

// mgInputIDs is a feeds function for mgRunModel giving every run the same
// int64 input_ids.
func mgInputIDs(t testing.TB, shape []int64, ids []float64) func(*ortrun.Session) []ortrun.Tensor {
	return func(*ortrun.Session) []ortrun.Tensor {
		in, err := ortrun.FromFloat64("input_ids", ortrun.Int64, shape, ids)
		if err != nil {
			t.Fatal(err)
		}
		return []ortrun.Tensor{in}
	}
}

func mgRunModel(t testing.TB, path string, feeds func(*ortrun.Session) []ortrun.Tensor) []ortrun.Tensor {
	t.Helper()
	s := orttest.Open(t, path)
	out, err := s.Run(feeds(s))
	if err != nil {
		t.Fatalf("running %s: %v", path, err)
	}
	return out
}

// mgCompareRuns checks got against want output by output with
// |got-want| <= tol·max|want| (+ tol relative), and returns the largest
// difference relative to the output's scale.
func mgCompareRuns(t testing.TB, got, want []ortrun.Tensor, tol float64) float64 {
	t.Helper()
	worst := 0.0
	if len(got) != len(want) {
		t.Fatalf("%d outputs, want %d", len(got), len(want))
	}
	for i := range got {
		if !want[i].DType.IsFloat() {
			if !slices.Equal(got[i].Data, want[i].Data) || !slices.Equal(got[i].Shape, want[i].Shape) {
				t.Errorf("output %s differs", want[i].Name)
			}
			continue
		}
		g, err := got[i].Float64s()
		if err != nil {
			t.Fatal(err)
		}
		w, err := want[i].Float64s()
		if err != nil {
			t.Fatal(err)
		}
		scale := 0.0
		for _, v := range w {
			scale = math.Max(scale, math.Abs(v))
		}
		if scale == 0 {
			scale = 1
		}
		maxAbs, _, ok := ortrun.Compare(g, w, tol, tol*scale)
		worst = math.Max(worst, maxAbs/scale)
		if !ok || !slices.Equal(got[i].Shape, want[i].Shape) {
			t.Errorf("output %s: max |diff| %.3g (%.3g of its scale %.3g), tolerance %.3g", want[i].Name, maxAbs, maxAbs/scale, scale, tol)
		}
	}
	return worst
}

// feeds returns the case's ORT inputs.
func (c mgBaseCase) feeds(t testing.TB) func(*ortrun.Session) []ortrun.Tensor {
	name := c.golden
	if name == "" && strings.HasPrefix(c.path, mgTestModels+"/") {
		name = strings.TrimPrefix(c.path, mgTestModels+"/")
	}
	if name != "" {
		return func(*ortrun.Session) []ortrun.Tensor { return mgGoldenFeeds(t, name) }
	}
	return func(s *ortrun.Session) []ortrun.Tensor { return mgMakeFeeds(t, s, c.spec) }
}

// ---- merged == unmerged in ONNX Runtime ----

func arange(from float64) func(shape []int64) []float64 {
	return func(shape []int64) []float64 {
		n, _ := ortrun.NumElements(shape)
		last := shape[len(shape)-1]
		v := make([]float64, n)
		for i := range v {
			v[i] = from + float64(int64(i)%last)
		}
		return v
	}
}

func fill(x float64) func(shape []int64) []float64 {
	return func(shape []int64) []float64 {
		n, _ := ortrun.NumElements(shape)
		v := make([]float64, n)
		for i := range v {
			v[i] = x
		}
		return v
	}
}

type valueFns = map[string]func([]int64) []float64

func withInject(c mgBaseCase, cfg InjectConfig) mgBaseCase {
	c.inject = cfg
	return c
}

func mgCorpusCases() []mgBaseCase {
	llm := map[string]int64{"batch_size": 1, "batch": 1, "seq_len": 3, "sequence_length": 3, "total_seq_len": 5, "total_sequence_length": 5, "past_seq_len": 2, "past_sequence_length": 2}
	c := func(name, file string, tol float64, spec mgFeedSpec) mgBaseCase {
		return mgBaseCase{name: name, path: mgCorpusDir + "/" + file, tol: tol, spec: spec}
	}
	return []mgBaseCase{
		// The genai builder's mask reformat takes a prefill (no past) or one new token.
		c("llama-tiny-fp16-extdata", "llama-tiny-fp16-extdata/model.onnx", 2e-2, mgFeedSpec{
			dims: map[string]int64{"batch_size": 1, "sequence_length": 4, "total_sequence_length": 4, "past_sequence_length": 0}, values: valueFns{"position_ids": arange(0)}}),
		c("gpt2-tiny-fp32", "gpt2-tiny-fp32/model.onnx", 1e-4, mgFeedSpec{dims: llm, values: valueFns{"position_ids": arange(2)}}),
		c("gpt2-tiny-fp16", "gpt2-tiny-fp16/model.onnx", 2e-2, mgFeedSpec{dims: llm, values: valueFns{"position_ids": arange(2)}}),
		c("gpt2-conv1d-gemm-pytorch16", "gpt2-conv1d-gemm-pytorch16.onnx", 1e-4, mgFeedSpec{dims: map[string]int64{"batch_size": 1, "seq_len": 2}}),
		c("gpt2-megatron-pytorch19", "gpt2-megatron-pytorch19.onnx", 1e-4, mgFeedSpec{dims: llm, values: valueFns{"position_ids": arange(2), "attention_mask": fill(1)}}),
		c("bert-toy-tied-embeddings", "bert-toy-tied-embeddings.onnx", 1e-4, mgFeedSpec{dims: map[string]int64{"batch": 1, "max_seq_len_in_batch": 4}, values: valueFns{"token_type_ids": fill(0)}}),
		c("bert-qa-keras2onnx", "bert-qa-keras2onnx.onnx", 1e-4, mgFeedSpec{dims: map[string]int64{"batch_size": 1}, values: valueFns{"token_type_ids": fill(0)}}),
		// Opset 9: the branch's Dropout takes its ratio as an attribute.
		withInject(c("cnn-mnist-gemm-transb", "cnn-mnist-gemm-transb.onnx", 1e-4, mgFeedSpec{}), InjectConfig{Dropout: 0.1}),
		c("linear-gemm-and-matmul-pytorch201", "linear-gemm-and-matmul-pytorch201.onnx", 1e-4, mgFeedSpec{}),
		c("decoder-transposed-weights-opset24", "decoder-transposed-weights-opset24.onnx", 1e-4, mgFeedSpec{
			dims: map[string]int64{"batch": 1, "sequence_len": 2}, values: valueFns{"position_ids": arange(0), "write_indices": fill(0), "nonpad_kv_seqlen": fill(2)}}),
		c("qwen-tiny-fp16-unnamed-nodes", "qwen-tiny-fp16-unnamed-nodes.onnx", 2e-2, mgFeedSpec{dims: llm}),
		c("whisper-decoder-attention-fp32", "whisper-decoder-attention-fp32.onnx", 1e-4, mgFeedSpec{}),
		c("whisper-encoder-attention-fp16", "whisper-encoder-attention-fp16.onnx", 2e-2, mgFeedSpec{}),
		c("gpt2-beamsearch-subgraph", "gpt2-beamsearch-subgraph.onnx", 1e-4, mgFeedSpec{
			dims: map[string]int64{"batch_size": 1, "sequence_length": 4},
			values: valueFns{"max_length": fill(8), "min_length": fill(1), "num_beams": fill(2), "num_return_sequences": fill(1),
				"length_penalty": fill(1), "repetition_penalty": fill(1)}}),
	}
}

func TestMergeMatchesUnmergedORT(t *testing.T) {
	orttest.Require(t)
	cases := append(mgTestdataCases(), mgCorpusCases()...)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			basePath := c.modelPath(t)
			m := loadModel(t, basePath)
			inj := mgInjectRandom(t, m, c.inject, 21)
			injPath := mgSaveModel(t, m, filepath.Join(dir, "injected", "model.onnx"))
			feeds := c.feeds(t)
			want := mgRunModel(t, injPath, feeds)
			before := mgRunModel(t, basePath, feeds)

			mm := loadModel(t, injPath)
			rep, err := Merge(mm, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Merged) != len(inj.Manifest.Adapters) {
				t.Fatalf("merged %d adapters, injected %d", len(rep.Merged), len(inj.Manifest.Adapters))
			}
			if _, ok := mm.Metadata(ManifestKey); ok {
				t.Error("the manifest is still in the merged model")
			}
			mergedPath := mgSaveModel(t, mm, filepath.Join(dir, "merged", "model.onnx"))
			got := mgRunModel(t, mergedPath, feeds)
			worst := mgCompareRuns(t, got, want, c.tol)
			effect := mgCompareRunsQuiet(got, before)
			t.Logf("%d adapters merged; merged vs unmerged: %.3g of scale; the adapters move outputs by %.3g", len(rep.Merged), worst, effect)
			if effect <= 10*worst && effect < 1e-3 && !strings.Contains(c.name, "beamsearch") {
				t.Errorf("the adapters barely change the outputs (%.3g): the test would not catch a wrong merge", effect)
			}

			// Streaming gives the same bytes, through the external data path
			// even for models that had none.
			streamPath := filepath.Join(dir, "stream", "model.onnx")
			os.MkdirAll(filepath.Dir(streamPath), 0o755)
			if _, err := MergeFile(injPath, streamPath, MergeOptions{}, graph.SaveOptions{External: graph.ExternalAlways}); err != nil {
				t.Fatal(err)
			}
			mgSameTensors(t, loadModel(t, mergedPath), loadModel(t, streamPath))
			if len(got) > 0 {
				mgCompareRuns(t, mgRunModel(t, streamPath, feeds), got, 0)
			}
		})
	}
}

// mgCompareRunsQuiet returns the largest difference of float outputs
// relative to their scale.
func mgCompareRunsQuiet(got, want []ortrun.Tensor) float64 {
	worst := 0.0
	for i := range got {
		if !want[i].DType.IsFloat() {
			if !slices.Equal(got[i].Data, want[i].Data) {
				worst = math.Inf(1)
			}
			continue
		}
		g, _ := got[i].Float64s()
		w, _ := want[i].Float64s()
		scale := 0.0
		for _, v := range w {
			scale = math.Max(scale, math.Abs(v))
		}
		if scale == 0 {
			scale = 1
		}
		maxAbs, _, _ := ortrun.Compare(g, w, 0, 0)
		worst = math.Max(worst, maxAbs/scale)
	}
	return worst
}
