package rewrite_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/rewrite"
)

// The whole injection: load a model, pick layers the PEFT way, add the
// adapters and save. The saved model carries its manifest in its metadata;
// its Trainable list is what ONNX Runtime training takes as requires_grad.
func Example() {
	m, err := graph.Load("../testdata/models/tiny-gpt.onnx")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	inj, err := rewrite.Inject(m, rewrite.InjectConfig{
		SelectOptions: rewrite.SelectOptions{Targets: []string{"q_proj", "v_proj"}, Rank: 8, Alpha: 16},
		Seed:          42,
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(inj)
	for _, a := range inj.Manifest.Adapters {
		fmt.Printf("%s: A [%d,%d], B [%d,%d], scaling %g\n", a.Module, a.InFeatures, a.Rank, a.Rank, a.OutFeatures, a.Scaling)
	}

	dir, err := os.MkdirTemp("", "onnxlora-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "tiny-gpt-lora.onnx")
	if err := m.Save(out, graph.SaveOptions{}); err != nil {
		log.Fatal(err)
	}

	saved, err := graph.Load(out)
	if err != nil {
		log.Fatal(err)
	}
	defer saved.Close()
	man, err := rewrite.ReadManifest(saved)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("trainable:", man.Trainable[0], "...", len(man.Trainable), "initializers")
	// Output:
	// trainable params: 2,048 || all params: 27,904 || trainable%: 7.3394
	// model.layers.0.self_attn.q_proj: A [32,8], B [8,32], scaling 2
	// model.layers.0.self_attn.v_proj: A [32,8], B [8,32], scaling 2
	// model.layers.1.self_attn.q_proj: A [32,8], B [8,32], scaling 2
	// model.layers.1.self_attn.v_proj: A [32,8], B [8,32], scaling 2
	// trainable: model.layers.0.self_attn.q_proj.lora_A.weight ... 8 initializers
}

// Plan is a dry run: it lists what Inject would adapt without changing the
// model.
func ExamplePlan() {
	m, err := graph.Load("../testdata/models/tiny-bert.onnx")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	layers, sel, err := rewrite.Plan(m, rewrite.SelectOptions{
		Targets: []string{"query", "value"}, Layers: []int{1}, Rank: 8, Alpha: 8,
		RankPattern: []rewrite.PatternEntry{{Key: "value", Value: 4}},
	})
	if err != nil {
		log.Fatal(err)
	}
	for _, s := range sel {
		l := layers[s.Index]
		fmt.Printf("%s (%s %s) rank %d\n", s.Module, l.Op, l.Node.GetName(), s.Rank)
	}
	// Output:
	// encoder.layer.1.attention.self.query (MatMul /encoder/layer.1/attention/self/query/MatMul) rank 8
	// encoder.layer.1.attention.self.value (MatMul /encoder/layer.1/attention/self/value/MatMul) rank 4
}

// FindLayers lists every adaptable MatMul/Gemm with its module path, and
// the MatMul-like nodes it skipped with the reason.
func ExampleFindLayers() {
	m, err := graph.Load("../testdata/models/shared-weight.onnx")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	layers, skipped := rewrite.FindLayers(m)
	for _, l := range layers {
		fmt.Printf("%s: %s [%d,%d] weight %s shared=%v\n", l.Module, l.Op, l.In, l.Out, l.WeightName(), l.Shared)
	}
	fmt.Println(len(skipped), "skipped")
	// Output:
	// branch_a: MatMul [16,16] weight shared.weight shared=true
	// branch_b: MatMul [16,16] weight shared.weight shared=true
	// lm_head: MatMul [16,64] weight embed_tokens.weight shared=true
	// 0 skipped
}

// Module paths come from exporters' node names, or from real weight names
// when the node name says nothing.
func ExampleModulePath() {
	fmt.Println(rewrite.ModulePath("/model/layers.0/self_attn/q_proj/MatMul", "onnx::MatMul_235"))
	fmt.Println(rewrite.ModulePath("", "model.layers.0.attn.q_proj.MatMul.weight"))
	fmt.Println(rewrite.ModulePath("tf_bert_for_question_answering/bert/encoder/layer_._0/attention/self/query/Tensordot/MatMul_add", ""))
	fmt.Println(rewrite.ModulePath("Gemm_12", "fc1.weight"))
	// Output:
	// model.layers.0.self_attn.q_proj
	// model.layers.0.attn.q_proj
	// bert.encoder.layer.0.attention.self.query
	// fc1
}

// Select applies PEFT's LoraConfig rules to module paths: names match a
// dot-separated suffix, exclusion wins, and rank_pattern keys take the
// first match.
func ExampleSelect() {
	cands := []rewrite.Candidate{
		{Module: "model.layers.0.self_attn.q_proj"},
		{Module: "model.layers.0.self_attn.v_proj"},
		{Module: "model.layers.1.self_attn.q_proj"},
		{Module: "model.layers.1.self_attn.v_proj"},
		{Module: "lm_head", OutputHead: true},
	}
	patterns, err := rewrite.ParsePatterns([]string{`layers\.1\..*=16`})
	if err != nil {
		log.Fatal(err)
	}
	sel, err := rewrite.Select(cands, rewrite.SelectOptions{
		Targets: []string{"all-linear"}, Exclude: []string{"layers.0.self_attn.v_proj"},
		Rank: 8, Alpha: 16, RankPattern: patterns,
	})
	if err != nil {
		log.Fatal(err)
	}
	for _, s := range sel {
		fmt.Println(s.Module, s.Rank, s.Alpha)
	}

	_, err = rewrite.Select(cands, rewrite.SelectOptions{Targets: []string{"query"}, Rank: 8, Alpha: 8})
	fmt.Println(err)
	// Output:
	// model.layers.0.self_attn.q_proj 8 16
	// model.layers.1.self_attn.q_proj 16 16
	// model.layers.1.self_attn.v_proj 16 16
	// no module matched target modules ["query"]; the model has 5 module(s): model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj, model.layers.1.self_attn.q_proj, model.layers.1.self_attn.v_proj, lm_head
}

// Merge folds trained adapters into their base weights: the result has the
// base model's nodes and names, with new weight values.
func ExampleMerge() {
	m, err := graph.Load("../testdata/models/mlp-gemm-transb.onnx")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	nodes := len(m.Proto.Graph.Node)
	inj, err := rewrite.Inject(m, rewrite.InjectConfig{
		SelectOptions: rewrite.SelectOptions{Targets: []string{"fc1"}, Rank: 4, Alpha: 8},
	})
	if err != nil {
		log.Fatal(err)
	}
	// Training would change lora_B; give it a value so the merge shows.
	b, _ := m.Graph().Initializer(inj.Manifest.Adapters[0].LoraB)
	ones := make([]float64, 4*32)
	for i := range ones {
		ones[i] = 0.01
	}
	if err := graph.SetFloat64s(b, ones); err != nil {
		log.Fatal(err)
	}
	fmt.Println("nodes after inject:", len(m.Proto.Graph.Node))

	rep, err := rewrite.Merge(m, rewrite.MergeOptions{})
	if err != nil {
		log.Fatal(err)
	}
	l := rep.Merged[0]
	fmt.Printf("merged %s into %s %v (stored [out,in]: %v), factor %g\n", l.Module, l.Weight, l.Shape, l.Transposed, l.Factor)
	fmt.Println("nodes after merge:", len(m.Proto.Graph.Node), "base:", nodes)
	_, hasManifest := m.Metadata(rewrite.ManifestKey)
	fmt.Println("manifest left:", hasManifest)
	// Output:
	// nodes after inject: 9
	// merged fc1 into fc1.weight [32 16] (stored [out,in]: true), factor 2
	// nodes after merge: 5 base: 5
	// manifest left: false
}
