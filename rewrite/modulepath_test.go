package rewrite

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// The names below are copied from the models in ../shared/corpus (see its
// README): node name, resolved weight initializer name, expected path.
func TestModulePath(t *testing.T) {
	tests := []struct {
		from, node, weight, want string
	}{
		// torch.onnx (onnxruntime-genai builder): node and weight agree.
		{"llama-tiny", "/model/layers.0/attn/q_proj/MatMul", "model.layers.0.attn.q_proj.MatMul.weight", "model.layers.0.attn.q_proj"},
		{"llama-tiny weight only", "", "model.layers.1.mlp.down_proj.MatMul.weight", "model.layers.1.mlp.down_proj"},
		{"torch _N suffix", "/layers.0/self_attn/q_proj/MatMul_1", "onnx::MatMul_99", "layers.0.self_attn.q_proj"},
		{"torch Gemm", "/linear1_with_gemm/Gemm", "linear1_with_gemm.weight", "linear1_with_gemm"},
		{"torch renamed weight", "/linear2_with_matmul/MatMul", "onnx::MatMul_14", "linear2_with_matmul"},
		{"whisper decoder", "/encoder_attn/k_proj/MatMul", "onnx::MatMul_255", "encoder_attn.k_proj"},
		{"whisper encoder", "/self_attn/out_proj/MatMul", "onnx::MatMul_127", "self_attn.out_proj"},
		{"gpt2 lm_head renamed", "/lm_head/MatMul", "onnx::MatMul_1400", "lm_head"},
		// A tied head: the node names the caller, the weight the embedding.
		{"tied head prefers node", "/lm_head/MatMul", "model.embed_tokens.weight", "lm_head"},
		// mobius: unrooted node names, op segment "MatMul_node_N".
		{"mobius", "model/layers.0/self_attn/q_proj/MatMul_node_29", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj"},
		{"mobius lm_head", "lm_head/MatMul_node_81", "lm_head.weight", "lm_head"},
		// ORT transformer optimizer: flat node names, real weight names.
		{"ort optimizer", "GptAttention_0_matmul", "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj"},
		{"ort optimizer fc", "FullyConnect_MatMul_1", "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj"},
		// PyTorch 1.x: flat node names, optimizer-suffixed weights.
		{"pytorch 1.1 transposed", "MatMul_28", "bert.encoder.layer.0.attention.self.query.weight_transposed", "bert.encoder.layer.0.attention.self.query"},
		{"pytorch 1.1 gemm", "Gemm_609", "bert.pooler.dense.weight", "bert.pooler.dense"},
		{"pytorch 1.1 tied", "MatMul_635", "bert.embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings"},
		{"pytorch 1.6 conv1d", "Gemm_67", "h.0.attn.c_attn.weight_resize", "h.0.attn.c_attn"},
		{"cnn unnamed", "", "fc1.weight", "fc1"},
		// Unnamed nodes, weights with no known suffix: kept whole.
		{"qwen unnamed", "", "l0.q.w", "l0.q.w"},
		{"ort lora test", "", "weight_x", "weight_x"},
		// Both unusable: node name, else weight name.
		{"megatron numeric", "MatMul_17", "209", "MatMul_17"},
		{"beamsearch renamed", "MatMul_1165", "onnx::MatMul_1438", "MatMul_1165"},
		{"onnx gemm renamed", "Gemm_3", "onnx::Gemm_5", "Gemm_3"},
		{"nothing named", "", "onnx::MatMul_5", "onnx::MatMul_5"},
		{"both empty", "", "", ""},
		// Scoped but not ending in an op: dotted node name.
		{"scoped non-op", "/model/custom/thing", "123", "model.custom.thing"},
		{"op only", "/MatMul", "", "MatMul"},
		// keras2onnx (HuggingFace TF): tf_ model scope dropped, "_._" is a
		// list index, Tensordot dropped.
		{"keras2onnx bert", "tf_bert_for_question_answering/bert/encoder/layer_._0/attention/self/query/Tensordot/MatMul_add",
			"tf_bert_for_question_answering/bert/encoder/layer_._0/attention/self/query/Tensordot/Reshape_1:0_resize",
			"bert.encoder.layer.0.attention.self.query"},
		{"keras2onnx layer 11", "tf_bert_for_question_answering/bert/encoder/layer_._11/output/dense/Tensordot/MatMul_add", "", "bert.encoder.layer.11.output.dense"},
		{"keras2onnx qa head", "tf_bert_for_question_answering/qa_outputs/Tensordot/MatMul_add", "", "qa_outputs"},
		// TF1-style names keep their first scope.
		{"tf1 bert", "bert/encoder/layer_0/attention/self/query/Tensordot/MatMul", "", "bert.encoder.layer_0.attention.self.query"},
		{"tf1 plain MatMul", "bert/pooler/dense/MatMul", "bert/pooler/dense/kernel:0", "bert.pooler.dense"},
		// A lowercase "matmul" segment is a module name, not the op.
		{"module named matmul", "/model/matmul", "onnx::MatMul_1", "model.matmul"},
		// Quantized: op segment with a suffix, weight with one.
		{"quantized", "/model/layers.0/attn/q_proj/MatMul_Q4", "model.layers.0.attn.q_proj.MatMul.weight_Q4", "model.layers.0.attn.q_proj"},
		// A weight that is only "weight" keeps its name.
		{"bare weight", "", "weight", "weight"},
	}
	for _, tc := range tests {
		if got := ModulePath(tc.node, tc.weight); got != tc.want {
			t.Errorf("%s: ModulePath(%q, %q) = %q, want %q", tc.from, tc.node, tc.weight, got, tc.want)
		}
	}
}

func TestRenamedWeight(t *testing.T) {
	tests := []struct {
		name string
		want bool
	}{
		{"onnx::MatMul_123", true},
		{"onnx::Gemm_5", true},
		{"onnx__MatMul_7", true},
		{"209", true},
		{"", true},
		{"a/b/kernel:0", true},
		{"fc1.weight", false},
		{"l0.q.w", false},
		{"h.0.attn.c_attn.weight_resize", false},
		{"1a", false},
	}
	for _, tc := range tests {
		if got := renamedWeight(tc.name); got != tc.want {
			t.Errorf("renamedWeight(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// mpCorpusDir is where the shared real models live, relative to this package.
const mpCorpusDir = "../../shared/corpus"

// mpLinear is a weighted MatMul/Gemm found in a corpus model.
type mpLinear struct {
	node, weight string
	output       bool // the node's output is a graph output
}

// mpLinears walks g and its subgraphs and returns the MatMul/Gemm nodes
// whose weight input is an initializer, directly or through
// Identity/Transpose/Cast, as the inject code resolves them.
func mpLinears(g *onnxpb.GraphProto, outer map[string]bool) []mpLinear {
	inits := map[string]bool{}
	for k := range outer {
		inits[k] = true
	}
	for _, t := range g.GetInitializer() {
		inits[t.GetName()] = true
	}
	producer := map[string]*onnxpb.NodeProto{}
	for _, n := range g.GetNode() {
		for _, o := range n.GetOutput() {
			producer[o] = n
		}
	}
	outputs := map[string]bool{}
	for _, o := range g.GetOutput() {
		outputs[o.GetName()] = true
	}
	var out []mpLinear
	for _, n := range g.GetNode() {
		if (n.GetOpType() == "MatMul" || n.GetOpType() == "Gemm") && len(n.GetInput()) > 1 {
			w := n.GetInput()[1]
			for !inits[w] {
				p := producer[w]
				if p == nil || len(p.GetInput()) == 0 || (p.GetOpType() != "Identity" && p.GetOpType() != "Transpose" && p.GetOpType() != "Cast") {
					break
				}
				w = p.GetInput()[0]
			}
			if inits[w] {
				out = append(out, mpLinear{n.GetName(), w, outputs[n.GetOutput()[0]]})
			}
		}
		for _, a := range n.GetAttribute() {
			if a.GetG() != nil {
				out = append(out, mpLinears(a.GetG(), inits)...)
			}
			for _, sg := range a.GetGraphs() {
				out = append(out, mpLinears(sg, inits)...)
			}
		}
	}
	return out
}

func mpLoadModel(t *testing.T, file string) *onnxpb.ModelProto {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(mpCorpusDir, file))
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	m := &onnxpb.ModelProto{}
	if err := proto.Unmarshal(data, m); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return m
}

func mpSkipWithoutCorpus(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(mpCorpusDir); err != nil {
		t.Skipf("real-model corpus %s not found (it sits beside the clone in CI): %v", mpCorpusDir, err)
	}
}

// TestModulePathCorpus derives the paths of every weighted linear layer of
// the real models and checks counts, spot values and that paths are
// distinct and clean where the model's names allow it.
func TestModulePathCorpus(t *testing.T) {
	mpSkipWithoutCorpus(t)
	tests := []struct {
		file     string
		count    int
		distinct bool            // every layer gets its own path
		clean    bool            // no path keeps "/" or "::"
		spot     map[int]string  // index -> path
		heads    map[string]bool // paths whose node is a graph output
		suffixes map[string]int  // PEFT target name -> how many paths it matches
	}{
		{file: "llama-tiny-fp16-extdata/model.onnx", count: 15, distinct: true, clean: true,
			spot:     map[int]string{0: "model.layers.0.attn.q_proj", 6: "model.layers.0.mlp.down_proj", 14: "lm_head"},
			heads:    map[string]bool{"lm_head": true},
			suffixes: map[string]int{"q_proj": 2, "attn.o_proj": 2, "gate_proj": 2}},
		{file: "decoder-transposed-weights-opset24.onnx", count: 15, distinct: true, clean: true,
			spot:     map[int]string{0: "model.layers.0.self_attn.q_proj", 13: "model.layers.1.mlp.down_proj", 14: "lm_head"},
			heads:    map[string]bool{"lm_head": true},
			suffixes: map[string]int{"self_attn.v_proj": 2, "up_proj": 2}},
		{file: "gpt2-tiny-fp32/model.onnx", count: 16, distinct: true, clean: true,
			spot:     map[int]string{0: "transformer.h.0.attn.c_proj", 1: "transformer.h.0.mlp.c_fc", 15: "lm_head"},
			heads:    map[string]bool{"lm_head": true},
			suffixes: map[string]int{"c_proj": 10, "mlp.c_proj": 5, "c_fc": 5}},
		{file: "gpt2-tiny-fp16/model.onnx", count: 16, distinct: true, clean: true,
			spot: map[int]string{15: "lm_head"}},
		{file: "gpt2-beamsearch-subgraph.onnx", count: 16, distinct: true, clean: true,
			spot:  map[int]string{0: "transformer.h.0.attn.c_proj", 15: "MatMul_1165"},
			heads: map[string]bool{"MatMul_1165": true}},
		{file: "gpt2-conv1d-gemm-pytorch16.onnx", count: 48, distinct: true, clean: true,
			spot:     map[int]string{0: "h.0.attn.c_attn", 47: "h.11.mlp.c_proj"},
			suffixes: map[string]int{"c_attn": 12, "attn.c_proj": 12}},
		{file: "gpt2-megatron-pytorch19.onnx", count: 5, distinct: true, clean: true,
			spot: map[int]string{0: "MatMul_17", 4: "MatMul_157"}, heads: map[string]bool{"MatMul_157": true}},
		{file: "bert-toy-tied-embeddings.onnx", count: 34, distinct: true, clean: true,
			spot: map[int]string{0: "bert.encoder.layer.0.attention.self.query", 30: "bert.pooler.dense",
				32: "bert.embeddings.word_embeddings", 33: "cls.seq_relationship"},
			heads:    map[string]bool{"cls.seq_relationship": true},
			suffixes: map[string]int{"query": 5, "attention.output.dense": 5, "dense": 17}},
		{file: "cnn-mnist-gemm-transb.onnx", count: 2, distinct: true, clean: true,
			spot: map[int]string{0: "fc1", 1: "fc2"}},
		{file: "linear-gemm-and-matmul-pytorch201.onnx", count: 3, distinct: true, clean: true,
			spot: map[int]string{0: "linear1_with_gemm", 1: "linear2_with_matmul", 2: "linear3_with_matmul"}},
		{file: "qwen-tiny-fp16-unnamed-nodes.onnx", count: 13, distinct: true, clean: true,
			spot:  map[int]string{0: "l0.q.w", 11: "l1.dn.w", 12: "lm_head.w"},
			heads: map[string]bool{"lm_head.w": true}, suffixes: map[string]int{"q.w": 2}},
		{file: "whisper-decoder-attention-fp32.onnx", count: 7, distinct: true, clean: true,
			spot:     map[int]string{0: "encoder_attn.k_proj", 2: "self_attn.out_proj", 6: "fc2"},
			suffixes: map[string]int{"out_proj": 2, "k_proj": 1}},
		{file: "whisper-encoder-attention-fp16.onnx", count: 3, distinct: true, clean: true,
			spot: map[int]string{0: "self_attn.out_proj", 1: "fc1", 2: "fc2"}},
		{file: "bert-qa-keras2onnx.onnx", count: 145, distinct: true, clean: true,
			spot: map[int]string{0: "bert.encoder.layer.0.attention.self.value",
				1: "bert.encoder.layer.0.attention.self.query", 144: "qa_outputs"},
			suffixes: map[string]int{"query": 24, "intermediate.dense": 24}},
		{file: "ort-lora-two-params.onnx", count: 3, distinct: true, clean: true,
			spot: map[int]string{0: "weight_x"}},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			m := mpLoadModel(t, tc.file)
			lins := mpLinears(m.GetGraph(), nil)
			if len(lins) != tc.count {
				t.Fatalf("found %d weighted MatMul/Gemm, want %d", len(lins), tc.count)
			}
			paths := make([]string, len(lins))
			seen := map[string]int{}
			for i, l := range lins {
				p := ModulePath(l.node, l.weight)
				paths[i] = p
				if p == "" {
					t.Errorf("layer %d (%q, %q): empty path", i, l.node, l.weight)
				}
				if tc.clean && (strings.Contains(p, "/") || strings.Contains(p, "::")) {
					t.Errorf("layer %d (%q, %q): path %q keeps exporter syntax", i, l.node, l.weight, p)
				}
				if j, dup := seen[p]; dup && tc.distinct {
					t.Errorf("layers %d and %d share path %q", j, i, p)
				}
				seen[p] = i
				if want, ok := tc.heads[p]; ok && l.output != want {
					t.Errorf("%s: graph output = %v, want %v", p, l.output, want)
				}
			}
			for i, want := range tc.spot {
				if paths[i] != want {
					t.Errorf("layer %d (%q, %q): path %q, want %q", i, lins[i].node, lins[i].weight, paths[i], want)
				}
			}
			for name, want := range tc.suffixes {
				n := 0
				for _, p := range paths {
					if exact, suffix := nameMatches(p, []string{name}); exact || suffix {
						n++
					}
				}
				if n != want {
					t.Errorf("target %q matches %d paths, want %d", name, n, want)
				}
			}
		})
	}
}
