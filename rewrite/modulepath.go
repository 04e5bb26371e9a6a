package rewrite

import (
	"regexp"
	"strings"
)

// opSegmentRE matches the last segment of an exporter's node name when it
// names the operator rather than a module: torch.onnx writes "MatMul",
// "MatMul_1", "Gemm"; mobius writes "MatMul_node_29"; keras2onnx writes
// "MatMul_add" / "MatMul_1_add"; quantizers write "MatMul_Q4". The op names
// are case-sensitive ONNX/TensorFlow op types, so a module that happens to be
// called "matmul" is kept.
var opSegmentRE = regexp.MustCompile(`^(MatMul|Gemm|FusedMatMul|MatMulNBits|MatMulInteger|QLinearMatMul|BatchMatMul|BatchMatMulV2|BatchMatMulV3)(_[A-Za-z0-9_]*)?$`)

// paramSegmentRE matches the parameter part of a weight name: "weight",
// "bias", and the forms optimizers leave after renaming a folded copy
// ("weight_transposed" in PyTorch 1.1 exports, "weight_resize" after ORT's
// Conv1D rewrite, "weight_Q4" after quantization).
var paramSegmentRE = regexp.MustCompile(`^(weight|bias)(_[A-Za-z0-9_]*)?$`)

// tfWrapperSegments are TensorFlow name scopes that sit between a layer and
// its MatMul without being a layer themselves: keras' Dense on a rank-3 input
// lowers to Tensordot/MatMul.
var tfWrapperSegments = map[string]bool{"Tensordot": true}

// ModulePath derives the PEFT-style module path ("model.layers.0.self_attn.q_proj")
// of a MatMul or Gemm node. nodeName is the node's name and weightName the
// name of the constant initializer it multiplies by (after following
// Identity/Transpose/Cast), either of which may be empty.
//
// The path is taken, in order of preference, from:
//
//  1. a scoped node name, the form torch.onnx ("/model/layers.0/self_attn/q_proj/MatMul"),
//     mobius ("model/layers.0/mlp/up_proj/MatMul_node_48") and keras2onnx
//     ("tf_bert_for_question_answering/bert/encoder/layer_._0/attention/self/query/Tensordot/MatMul_add")
//     write: the op segment (and a TensorFlow "Tensordot" scope) is dropped and
//     the rest joined with dots. The node name comes first because it names the
//     calling module even when the weight is shared (a tied lm_head reads the
//     embedding matrix) or renamed by the exporter ("onnx::MatMul_255", "209").
//  2. the weight name, when it is a real parameter name: a trailing
//     ".weight"/".bias" (also "weight_transposed", "weight_resize", ...) and
//     then a trailing ".MatMul"/".Gemm" (onnxruntime-genai's
//     "model.layers.0.attn.q_proj.MatMul.weight") are stripped. Names with no
//     such suffix ("l0.q.w") are kept whole.
//  3. the node name as it is (slashes turned into dots), or the weight name
//     when the node has no name, so every node still gets a stable path.
//
// HuggingFace TensorFlow names are mapped the way transformers maps them to
// PyTorch names (convert_tf_weight_name_to_pt_weight_name): "_._" separates a
// list index ("layer_._0" -> "layer.0") and the top "tf_*" model scope is
// dropped, so the keras2onnx BERT above gives
// "bert.encoder.layer.0.attention.self.query", the same path as the PyTorch
// model and so the same PEFT target names and layer indices.
func ModulePath(nodeName, weightName string) string {
	if p, ok := pathFromNodeName(nodeName); ok {
		return p
	}
	if p, ok := pathFromWeightName(weightName); ok {
		return p
	}
	if nodeName != "" {
		if p := joinSegments(splitScoped(nodeName)); p != "" {
			return p
		}
		return nodeName
	}
	return weightName
}

// splitScoped splits a "/"-scoped name into its non-empty segments.
func splitScoped(name string) []string {
	var segs []string
	for _, s := range strings.Split(name, "/") {
		if s != "" {
			segs = append(segs, s)
		}
	}
	return segs
}

// joinSegments joins scope segments with dots, turning HuggingFace TF's
// "_._" list separator into a dot as transformers does.
func joinSegments(segs []string) string {
	return strings.ReplaceAll(strings.Join(segs, "."), "_._", ".")
}

// pathFromNodeName returns the module path of a scoped node name, or false
// when the name is not scoped or does not end in an op segment after at least
// one module segment.
func pathFromNodeName(name string) (string, bool) {
	if !strings.Contains(name, "/") {
		return "", false
	}
	segs := splitScoped(name)
	if len(segs) < 2 || !opSegmentRE.MatchString(segs[len(segs)-1]) {
		return "", false
	}
	segs = segs[:len(segs)-1]
	for len(segs) > 0 && tfWrapperSegments[segs[len(segs)-1]] {
		segs = segs[:len(segs)-1]
	}
	if len(segs) == 0 {
		return "", false
	}
	// A HuggingFace TF model wraps everything in a scope named after its class
	// (TFBertForQuestionAnswering -> tf_bert_for_question_answering), which
	// transformers drops when mapping names to PyTorch. torch.onnx names start
	// with "/" and never have it, so only unrooted names are checked.
	if !strings.HasPrefix(name, "/") && len(segs) > 1 && strings.HasPrefix(segs[0], "tf_") {
		segs = segs[1:]
	}
	return joinSegments(segs), true
}

// renamedWeight reports whether an initializer name was made up by the
// exporter and says nothing about the module: "onnx::MatMul_255" (torch.onnx
// for a transposed or folded parameter), "onnx__MatMul_255" (the same after
// sanitizing), purely numeric "209" (older torch.onnx), and TensorFlow
// tensor names with scopes or ":0" output indices.
func renamedWeight(name string) bool {
	if name == "" || strings.HasPrefix(name, "onnx::") || strings.HasPrefix(name, "onnx__") ||
		strings.ContainsAny(name, "/:") {
		return true
	}
	for _, r := range name {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// pathFromWeightName returns the module path a parameter name belongs to, or
// false when the name was made up by the exporter.
func pathFromWeightName(name string) (string, bool) {
	if renamedWeight(name) {
		return "", false
	}
	p := name
	if i := strings.LastIndexByte(p, '.'); i > 0 && paramSegmentRE.MatchString(p[i+1:]) {
		p = p[:i]
	}
	if i := strings.LastIndexByte(p, '.'); i > 0 && opSegmentRE.MatchString(p[i+1:]) {
		p = p[:i]
	}
	return p, true
}
