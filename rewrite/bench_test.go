package rewrite

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Merge benchmarks. None of this runs in a plain `go test`:
//
//   - BenchmarkMergeFile (go test -bench MergeFile) merges a generated
//     ~25 MB Llama-shaped model; ONNXLORA_BENCH_MODEL=<injected model.onnx>
//     makes it merge that model instead.
//   - BenchmarkMergeRows measures the kernel alone.
//   - TestBenchGenerate and TestBenchMergeFile are the steps of
//     scripts/bench-merge.sh; they skip unless their variables are set.

// benchShape is a Llama-shaped decoder: hidden size, MLP size, layers, vocab.
type benchShape struct {
	hidden, inter, layers, vocab int64
}

// benchShapes are the sizes bench-merge.sh generates (float16 weights).
var benchShapes = map[string]benchShape{
	"25M":  {512, 1408, 4, 4096},    // about 26 MB
	"200M": {1024, 2816, 8, 8192},   // about 222 MB
	"1G":   {2048, 5632, 10, 16384}, // about 1.09 GB
	"3G":   {3072, 8192, 14, 32000}, // about 3.1 GB
}

// benchRandomF16 fills raw with random float16 values of moderate size
// (|x| in [2^-8, 2^-1)), fast enough for a gigabyte.
func benchRandomF16(rng *rand.Rand, raw []byte) {
	for i := 0; i+8 <= len(raw); i += 8 {
		x := rng.Uint64()
		for j := 0; j < 4; j++ {
			h := uint16(x >> (16 * j))
			h = h&0x83ff | (uint16(7+(h>>10)&7) << 10) // exponent 7..14
			raw[i+2*j], raw[i+2*j+1] = byte(h), byte(h>>8)
		}
	}
}

// benchModel builds a Llama-shaped float16 model: embedding Gather, per
// layer q/k/v/o and gate/up/down MatMuls wired like a decoder (attention
// reduced to a sum, so the graph stays valid and small), and an lm_head.
// Weights are [in, out] initializers named like onnxruntime-genai's builder.
func benchModel(tb testing.TB, s benchShape, seed uint64) *graph.Model {
	rng := rand.New(rand.NewPCG(seed, 1))
	g := &onnxpb.GraphProto{Name: proto.String("bench-llama")}
	dim := func(v int64, p string) *onnxpb.TensorShapeProto_Dimension {
		if p != "" {
			return &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: p}}
		}
		return &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: v}}
	}
	vi := func(name string, dt graph.DataType, dims ...*onnxpb.TensorShapeProto_Dimension) *onnxpb.ValueInfoProto {
		return &onnxpb.ValueInfoProto{Name: proto.String(name), Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{
			TensorType: &onnxpb.TypeProto_Tensor{ElemType: proto.Int32(int32(dt)), Shape: &onnxpb.TensorShapeProto{Dim: dims}}}}}
	}
	g.Input = []*onnxpb.ValueInfoProto{vi("input_ids", graph.Int64, dim(0, "batch"), dim(0, "sequence"))}
	g.Output = []*onnxpb.ValueInfoProto{vi("logits", graph.Float16, dim(0, "batch"), dim(0, "sequence"), dim(s.vocab, ""))}
	weight := func(name string, rows, cols int64) string {
		raw := make([]byte, 2*rows*cols)
		benchRandomF16(rng, raw)
		g.Initializer = append(g.Initializer, &onnxpb.TensorProto{
			Name: proto.String(name), DataType: proto.Int32(int32(graph.Float16)), Dims: []int64{rows, cols}, RawData: raw,
		})
		return name
	}
	node := func(op, name string, ins ...string) string {
		out := name + "/output_0"
		g.Node = append(g.Node, &onnxpb.NodeProto{OpType: proto.String(op), Name: proto.String(name), Input: ins, Output: []string{out}})
		return out
	}
	linear := func(x, scope string, in, out int64) string {
		w := weight(scope[1:]+".MatMul.weight", in, out)
		return node("MatMul", scope+"/MatMul", x, w)
	}
	emb := weight("model.embed_tokens.weight", s.vocab, s.hidden)
	x := node("Gather", "/model/embed_tokens/Gather", emb, "input_ids")
	for i := int64(0); i < s.layers; i++ {
		p := fmt.Sprintf("/model/layers.%d", i)
		q := linear(x, p+"/attn/q_proj", s.hidden, s.hidden)
		k := linear(x, p+"/attn/k_proj", s.hidden, s.hidden)
		v := linear(x, p+"/attn/v_proj", s.hidden, s.hidden)
		a := node("Add", p+"/attn/Add_1", node("Add", p+"/attn/Add", q, k), v)
		o := linear(a, p+"/attn/o_proj", s.hidden, s.hidden)
		h := node("Add", p+"/residual/Add", x, o)
		gate := linear(h, p+"/mlp/gate_proj", s.hidden, s.inter)
		up := linear(h, p+"/mlp/up_proj", s.hidden, s.inter)
		d := linear(node("Mul", p+"/mlp/Mul", gate, up), p+"/mlp/down_proj", s.inter, s.hidden)
		x = node("Add", p+"/residual/Add_1", h, d)
	}
	logits := linear(x, "/lm_head", s.hidden, s.vocab)
	g.Node = append(g.Node, &onnxpb.NodeProto{OpType: proto.String("Identity"), Name: proto.String("/lm_head/Identity"), Input: []string{logits}, Output: []string{"logits"}})
	mp := &onnxpb.ModelProto{
		IrVersion:    proto.Int64(8),
		ProducerName: proto.String("onnxlora bench"),
		OpsetImport:  []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(17)}},
		Graph:        g,
	}
	return graph.NewModel(mp, "")
}

// benchInject adapts the seven projections of every layer at r=16 with
// random, non-zero A and B.
func benchInject(tb testing.TB, m *graph.Model) {
	_, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{
		Targets: []string{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, Rank: 16, Alpha: 32,
	}, Seed: 1})
	if err != nil {
		tb.Fatal(err)
	}
	mgRandomizeAdapters(tb, m, 2)
}

// benchGenerate writes an injected bench model to dir/model.onnx with its
// weights in dir/model.onnx.data.
func benchGenerate(tb testing.TB, size, dir string) string {
	s, ok := benchShapes[size]
	if !ok {
		tb.Fatalf("unknown bench size %q (have 25M, 200M, 1G)", size)
	}
	m := benchModel(tb, s, 1)
	benchInject(tb, m)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	path := filepath.Join(dir, "model.onnx")
	if err := m.Save(path, graph.SaveOptions{External: graph.ExternalAlways}); err != nil {
		tb.Fatal(err)
	}
	return path
}

// TestBenchGenerate writes the injected bench model of size
// $ONNXLORA_BENCH_SIZE into the folder $ONNXLORA_BENCH_GEN.
func TestBenchGenerate(t *testing.T) {
	dir := os.Getenv("ONNXLORA_BENCH_GEN")
	if dir == "" {
		t.Skip("set ONNXLORA_BENCH_GEN=<folder> and ONNXLORA_BENCH_SIZE=200M|1G to generate a bench model (scripts/bench-merge.sh does)")
	}
	size := os.Getenv("ONNXLORA_BENCH_SIZE")
	if size == "" {
		size = "200M"
	}
	start := time.Now()
	path := benchGenerate(t, size, dir)
	st, _ := os.Stat(path + ".data")
	t.Logf("wrote %s (%d bytes of data) in %v", path, st.Size(), time.Since(start))
}

// TestBenchMergeFile merges $ONNXLORA_BENCH_IN into $ONNXLORA_BENCH_OUT
// with MergeFile and prints the time and a JSON summary: the Go side of
// scripts/bench-merge.sh, run under /usr/bin/time for its peak RSS.
func TestBenchMergeFile(t *testing.T) {
	in, out := os.Getenv("ONNXLORA_BENCH_IN"), os.Getenv("ONNXLORA_BENCH_OUT")
	if in == "" || out == "" {
		t.Skip("set ONNXLORA_BENCH_IN=<injected model.onnx> and ONNXLORA_BENCH_OUT=<output model.onnx> (scripts/bench-merge.sh does)")
	}
	start := time.Now()
	rep, err := MergeFile(in, out, MergeOptions{}, graph.SaveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	var elems int64
	for _, ml := range rep.Merged {
		elems += ml.Elements
	}
	summary, _ := json.Marshal(map[string]any{
		"seconds": elapsed.Seconds(), "adapters": len(rep.Merged), "merged_elements": elems,
	})
	fmt.Printf("BENCH_MERGE %s\n", summary)
}

// BenchmarkMergeFile times MergeFile on a generated 25M model, or on the
// injected model named by $ONNXLORA_BENCH_MODEL.
func BenchmarkMergeFile(b *testing.B) {
	in := os.Getenv("ONNXLORA_BENCH_MODEL")
	if in == "" {
		in = benchGenerate(b, "25M", filepath.Join(b.TempDir(), "in"))
	}
	st, err := os.Stat(in + ".data")
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(st.Size())
	outDir := b.TempDir()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := MergeFile(in, filepath.Join(outDir, "model.onnx"), MergeOptions{}, graph.SaveOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMergeRows times the kernel on one [2048, 5632] weight at r=16
// (bytes/s counts the weight once); for float16 and bfloat16 also with the
// certified float32 kernel off ("/float64"), the baseline in the same run.
func BenchmarkMergeRows(b *testing.B) {
	for _, c := range []struct {
		dt      graph.DataType
		float64 bool
	}{{graph.Float16, false}, {graph.Float16, true}, {graph.Float, false}, {graph.BFloat16, false}, {graph.BFloat16, true}} {
		name := c.dt.String()
		if c.float64 {
			name += "/float64"
		}
		dt := c.dt
		b.Run(name, func(b *testing.B) {
			if c.float64 {
				defer func(old bool) { hasFMA = old }(hasFMA)
				hasFMA = false
			}
			rows, cols, r := 2048, 5632, 16
			rng := rand.New(rand.NewPCG(1, 2))
			w := make([]float64, rows*cols)
			for i := range w {
				w[i] = rng.NormFloat64() * 0.02
			}
			src, _ := graph.NewFloatTensor("w", dt, []int64{int64(rows), int64(cols)}, w)
			u := &update{src: src, dst: src, rows: rows, cols: cols, r: r, coef: 2,
				u: make([]float64, rows*r), v: make([]float64, r*cols)}
			for i := range u.u {
				u.u[i] = rng.NormFloat64()
			}
			for i := range u.v {
				u.v[i] = rng.NormFloat64()
			}
			out := make([]byte, len(src.RawData))
			scratch := make([]float64, 2*cols)
			b.SetBytes(int64(len(src.RawData)))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				mergeRows(out, src.RawData, u, 0, rows, scratch)
			}
		})
	}
}

// TestBenchCompare compares the tensors of $ONNXLORA_BENCH_A and
// $ONNXLORA_BENCH_B (bench-merge.sh: the Go merge and the Python reference):
// same names, shapes and types, float values at most one unit in the last
// place apart. It prints a JSON summary.
func TestBenchCompare(t *testing.T) {
	pa, pb := os.Getenv("ONNXLORA_BENCH_A"), os.Getenv("ONNXLORA_BENCH_B")
	if pa == "" || pb == "" {
		t.Skip("set ONNXLORA_BENCH_A and ONNXLORA_BENCH_B to two models to compare (scripts/bench-merge.sh does)")
	}
	a, b := loadModel(t, pa), loadModel(t, pb)
	gb := b.Graph()
	if len(a.Proto.Graph.Node) != len(b.Proto.Graph.Node) {
		t.Fatalf("%d nodes vs %d", len(a.Proto.Graph.Node), len(b.Proto.Graph.Node))
	}
	for i, n := range a.Proto.Graph.Node {
		if !proto.Equal(n, b.Proto.Graph.Node[i]) {
			t.Fatalf("node %d differs: %v vs %v", i, n, b.Proto.Graph.Node[i])
		}
	}
	var tensors, identical, maxULP int64
	for _, ta := range a.Proto.Graph.Initializer {
		tb, _ := gb.Initializer(ta.GetName())
		if tb == nil || !slices.Equal(ta.Dims, tb.Dims) || ta.GetDataType() != tb.GetDataType() {
			t.Fatalf("tensor %s: missing or different in %s", ta.GetName(), pb)
		}
		ra, rb := mgRawOf(t, a, ta), mgRawOf(t, b, tb)
		tensors++
		if slices.Equal(ra, rb) {
			identical++
			continue
		}
		dt := graph.DataType(ta.GetDataType())
		if dt != graph.Float16 && dt != graph.Float {
			t.Fatalf("tensor %s (%v) differs", ta.GetName(), dt)
		}
		w := dt.BitSize() / 8
		for i := 0; i < len(ra); i += w {
			d := ulpDistance(ra[i:i+w], rb[i:i+w])
			if d > maxULP {
				maxULP = d
			}
		}
	}
	summary, _ := json.Marshal(map[string]any{"tensors": tensors, "identical": identical, "max_ulp": maxULP})
	fmt.Printf("BENCH_COMPARE %s\n", summary)
	if maxULP > 1 {
		t.Errorf("values differ by up to %d ulp", maxULP)
	}
}

// ulpDistance is how many representable values apart two little-endian
// float16 (2 bytes) or float32 (4 bytes) values are.
func ulpDistance(a, b []byte) int64 {
	ord := func(x []byte) int64 {
		var bits, sign uint64
		if len(x) == 2 {
			bits, sign = uint64(leU16(x)), 1<<15
		} else {
			bits, sign = uint64(leU32(x)), 1<<31
		}
		if bits&sign != 0 {
			return -int64(bits &^ sign)
		}
		return int64(bits)
	}
	d := ord(a) - ord(b)
	if d < 0 {
		d = -d
	}
	return d
}
