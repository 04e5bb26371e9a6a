package autodiff

import (
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

func f(dims ...int64) arg { return arg{dims: dims} }

func TestElementwiseRules(t *testing.T) {
	runCases(t, []fdCase{
		{name: "Add/same", op: "Add", args: []arg{f(2, 3), f(2, 3)}},
		{name: "Add/broadcast-vector", op: "Add", args: []arg{f(2, 3), f(3)}},
		{name: "Add/broadcast-both", op: "Add", args: []arg{f(2, 1, 3), f(4, 1)}},
		{name: "Add/scalar", op: "Add", args: []arg{f(2, 3), f()}},
		{name: "Sub/broadcast", op: "Sub", args: []arg{f(3, 1), f(1, 4)}},
		{name: "Mul/size1", op: "Mul", args: []arg{f(2, 3), f(1)}},
		{name: "Mul/broadcast", op: "Mul", args: []arg{f(2, 3, 4), f(3, 1)}},
		{name: "Div/broadcast", op: "Div", args: []arg{f(2, 3), {dims: []int64{2, 1}, positive: true}}},
		{name: "Sum/three", op: "Sum", args: []arg{f(2, 3), f(3), f(2, 1)}},
		{name: "Pow/tensor", op: "Pow", args: []arg{{dims: []int64{2, 3}, positive: true}, f(3)}},
		{name: "Pow/constant", op: "Pow", args: []arg{f(2, 3), {vals: []float64{2}, fixed: true}}},
		{name: "Pow/float-exponent", op: "Pow", args: []arg{{dims: []int64{2, 3}, positive: true}, {dims: []int64{1}, dt: graph.Float, fixed: true, vals: []float64{1.5}}}},
		{name: "Neg", op: "Neg", args: []arg{f(2, 3)}},
		{name: "Identity", op: "Identity", args: []arg{f(4)}},
		{name: "Sqrt", op: "Sqrt", args: []arg{{dims: []int64{2, 3}, positive: true}}},
		{name: "Reciprocal", op: "Reciprocal", args: []arg{{dims: []int64{2, 3}, positive: true}}},
		{name: "Exp", op: "Exp", args: []arg{f(2, 3)}},
		{name: "Log", op: "Log", args: []arg{{dims: []int64{2, 3}, positive: true}}},
		{name: "Tanh", op: "Tanh", args: []arg{f(2, 3)}},
		{name: "Sigmoid", op: "Sigmoid", args: []arg{f(2, 3)}},
		{name: "Relu", op: "Relu", args: []arg{{dims: []int64{3, 4}, kink: true}}},
		{name: "LeakyRelu", op: "LeakyRelu", dt: graph.Float, attrs: []*onnxpb.AttributeProto{floatAttr("alpha", 0.2)}, args: []arg{{dims: []int64{3, 4}, kink: true}}},
		{name: "Erf", op: "Erf", dt: graph.Float, args: []arg{f(2, 3)}},
		{name: "Gelu/none", op: "Gelu", opset: 20, dt: graph.Float, args: []arg{f(2, 5)}},
		{name: "Gelu/tanh", op: "Gelu", opset: 20, dt: graph.Float, attrs: []*onnxpb.AttributeProto{stringAttr("approximate", "tanh")}, args: []arg{f(2, 5)}},
		{name: "Where", op: "Where", args: []arg{{dims: []int64{2, 3}, dt: graph.Bool, vals: []float64{1, 0, 1, 0, 0, 1}, fixed: true}, f(2, 3), f(3)}},
		{name: "Cast/to-float", op: "Cast", attrs: []*onnxpb.AttributeProto{intAttr("to", int64(graph.Double))}, args: []arg{{dims: []int64{2, 3}, dt: graph.Float}}},
	})
}

func ints(v ...int64) arg { return arg{ints: v} }

func TestShapeRules(t *testing.T) {
	split3 := []*onnxpb.AttributeProto{intAttr("axis", 1)}
	runCases(t, []fdCase{
		{name: "Reshape/zero-and-minus-one", op: "Reshape", args: []arg{f(2, 3, 4), ints(0, -1)}},
		{name: "Flatten/axis-neg", op: "Flatten", attrs: []*onnxpb.AttributeProto{intAttr("axis", -1)}, args: []arg{f(2, 3, 2)}},
		{name: "Squeeze/opset13", op: "Squeeze", opset: 13, args: []arg{f(2, 1, 3), ints(-2)}},
		{name: "Squeeze/opset11", op: "Squeeze", opset: 11, attrs: []*onnxpb.AttributeProto{intsAttr("axes", 1)}, args: []arg{f(2, 1, 3)}},
		{name: "Unsqueeze/opset13", op: "Unsqueeze", opset: 13, args: []arg{f(2, 3), ints(0, -1)}},
		{name: "Unsqueeze/opset11", op: "Unsqueeze", opset: 11, attrs: []*onnxpb.AttributeProto{intsAttr("axes", 1)}, args: []arg{f(2, 3)}},
		{name: "Transpose/perm", op: "Transpose", attrs: []*onnxpb.AttributeProto{intsAttr("perm", 1, 2, 0)}, args: []arg{f(2, 3, 4)}},
		{name: "Transpose/default", op: "Transpose", args: []arg{f(2, 3, 4)}},
		{name: "Expand/broadcast", op: "Expand", args: []arg{f(3, 1), ints(2, 3, 4)}},
		{name: "Expand/size1", op: "Expand", args: []arg{f(1), ints(5)}},
		{name: "Concat/neg-axis", op: "Concat", attrs: []*onnxpb.AttributeProto{intAttr("axis", -1)}, args: []arg{f(2, 3), f(2, 1), f(2, 2)}},
		{name: "Split/opset11-attr", op: "Split", opset: 11, outs: 2, attrs: []*onnxpb.AttributeProto{intAttr("axis", 1), intsAttr("split", 1, 3)}, args: []arg{f(2, 4)}},
		{name: "Split/opset13-input", op: "Split", opset: 13, outs: 3, attrs: split3, args: []arg{f(2, 6), ints(1, 2, 3)}},
		{name: "Split/unused-output", op: "Split", opset: 13, outs: 3, use: []int{0, 2}, attrs: split3, args: []arg{f(2, 6), ints(2, 2, 2)}},
		{name: "Split/num-outputs", op: "Split", opset: 18, outs: 2, attrs: []*onnxpb.AttributeProto{intAttr("axis", -1), intAttr("num_outputs", 2)}, args: []arg{f(3, 4)}},
		{name: "Slice/basic", op: "Slice", args: []arg{f(4, 5), ints(1, 0), ints(3, 4), ints(0, 1)}},
		{name: "Slice/negative-clamped", op: "Slice", args: []arg{f(4, 5), ints(-3), ints(1000), ints(-1)}},
		{name: "Slice/steps", op: "Slice", args: []arg{f(6, 3), ints(5), ints(-1000), ints(0), ints(-2)}},
		{name: "Slice/step2", op: "Slice", args: []arg{f(3, 7), ints(1), ints(7), ints(1), ints(2)}},
		{name: "Gather/embedding-scatternd", op: "Gather", args: []arg{f(5, 3), {ints: []int64{1, 3, 1, 0, 4, 1}, dims: []int64{2, 3}}}},
		{name: "Gather/embedding-onehot", op: "Gather", opset: 13, args: []arg{f(5, 3), {ints: []int64{1, 3, 1, -1}, dims: []int64{4}}}},
		{name: "Gather/scalar-index", op: "Gather", args: []arg{f(4, 3), {ints: []int64{2}, dims: []int64{}}}},
	})
}

func TestLinalgRules(t *testing.T) {
	gemm := func(transA, transB int64, alpha, beta float32) []*onnxpb.AttributeProto {
		return []*onnxpb.AttributeProto{intAttr("transA", transA), intAttr("transB", transB), floatAttr("alpha", alpha), floatAttr("beta", beta)}
	}
	runCases(t, []fdCase{
		{name: "MatMul/2d", op: "MatMul", args: []arg{f(2, 3), f(3, 4)}},
		{name: "MatMul/batched-weight", op: "MatMul", args: []arg{f(2, 2, 3), f(3, 4)}},
		{name: "MatMul/batched-both", op: "MatMul", args: []arg{f(2, 2, 3), f(2, 3, 4)}},
		{name: "MatMul/broadcast-batch", op: "MatMul", args: []arg{f(2, 1, 2, 3), f(3, 3, 2)}},
		{name: "MatMul/vector-left", op: "MatMul", args: []arg{f(3), f(2, 3, 4)}},
		{name: "MatMul/vector-right", op: "MatMul", args: []arg{f(2, 2, 3), f(3)}},
		{name: "MatMul/dot", op: "MatMul", args: []arg{f(3), f(3)}},
		{name: "Gemm/plain", op: "Gemm", args: []arg{f(2, 3), f(3, 4), f(4)}},
		{name: "Gemm/transA-alpha", op: "Gemm", attrs: gemm(1, 0, 0.5, 2), args: []arg{f(3, 2), f(3, 4), f(1, 4)}},
		{name: "Gemm/transB-beta", op: "Gemm", attrs: gemm(0, 1, 1.5, 0.5), args: []arg{f(2, 3), f(4, 3), f(2, 1)}},
		{name: "Gemm/both-scalarC", op: "Gemm", attrs: gemm(1, 1, -1, 3), args: []arg{f(3, 2), f(4, 3), f()}},
		{name: "Gemm/noC", op: "Gemm", attrs: gemm(0, 1, 1, 1), args: []arg{f(2, 3), f(4, 3)}},
		{name: "Softmax/last", op: "Softmax", args: []arg{f(2, 3, 4)}},
		{name: "Softmax/axis1", op: "Softmax", attrs: []*onnxpb.AttributeProto{intAttr("axis", 1)}, args: []arg{f(2, 3, 4)}},
		{name: "Softmax/opset11-flattened", op: "Softmax", opset: 11, attrs: []*onnxpb.AttributeProto{intAttr("axis", 1)}, args: []arg{f(2, 3, 4)}},
		{name: "LogSoftmax/neg", op: "LogSoftmax", attrs: []*onnxpb.AttributeProto{intAttr("axis", -2)}, args: []arg{f(2, 3, 4)}},
		{name: "LogSoftmax/opset11", op: "LogSoftmax", opset: 11, args: []arg{f(3, 4)}},
		{name: "ReduceSum/attr-keep", op: "ReduceSum", opset: 11, attrs: []*onnxpb.AttributeProto{intsAttr("axes", 1)}, args: []arg{f(2, 3, 4)}},
		{name: "ReduceSum/input-nokeep", op: "ReduceSum", attrs: []*onnxpb.AttributeProto{intAttr("keepdims", 0)}, args: []arg{f(2, 3, 4), ints(-1, 0)}},
		{name: "ReduceSum/all", op: "ReduceSum", attrs: []*onnxpb.AttributeProto{intAttr("keepdims", 0)}, args: []arg{f(2, 3)}},
		{name: "ReduceMean/attr-nokeep", op: "ReduceMean", attrs: []*onnxpb.AttributeProto{intsAttr("axes", -1), intAttr("keepdims", 0)}, args: []arg{f(2, 3, 4)}},
		{name: "ReduceMean/opset18-input", op: "ReduceMean", opset: 18, args: []arg{f(2, 3, 4), ints(1)}},
		{name: "ReduceMean/all-keep", op: "ReduceMean", args: []arg{f(2, 3)}},
	})
}

func TestNormRules(t *testing.T) {
	eps := floatAttr("epsilon", 1e-5)
	runCases(t, []fdCase{
		{name: "LayerNormalization/last", op: "LayerNormalization", args: []arg{f(2, 3, 4), f(4), f(4)}},
		{name: "LayerNormalization/axis1-nobias", op: "LayerNormalization", attrs: []*onnxpb.AttributeProto{intAttr("axis", 1), eps}, args: []arg{f(2, 3, 2), f(3, 2)}},
		{name: "LayerNormalization/float", op: "LayerNormalization", dt: graph.Float, args: []arg{f(3, 4), f(4), f(4)}},
		{name: "RMSNormalization", op: "RMSNormalization", opset: 23, dt: graph.Float, args: []arg{f(2, 3, 4), f(4)}},
		{name: "SimplifiedLayerNormalization", op: "SimplifiedLayerNormalization", dt: graph.Float, attrs: []*onnxpb.AttributeProto{intAttr("axis", -1), eps}, args: []arg{f(2, 3, 4), f(4)}},
		{name: "SkipSimplifiedLayerNormalization", op: "SkipSimplifiedLayerNormalization", domain: msDomain, dt: graph.Float, outs: 4, use: []int{0, 3}, attrs: []*onnxpb.AttributeProto{eps}, args: []arg{f(2, 3, 4), f(2, 3, 4), f(4), f(4)}},
	})
}

func TestLossOpRules(t *testing.T) {
	runCases(t, []fdCase{
		{name: "SoftmaxCrossEntropyLoss/mean-ignore", op: "SoftmaxCrossEntropyLoss", dt: graph.Float,
			attrs: []*onnxpb.AttributeProto{intAttr("ignore_index", -100)},
			args:  []arg{f(4, 5), {ints: []int64{1, -100, 3, 0}, dims: []int64{4}}}},
		{name: "SoftmaxCrossEntropyLoss/sum", op: "SoftmaxCrossEntropyLoss", dt: graph.Float,
			attrs: []*onnxpb.AttributeProto{stringAttr("reduction", "sum")},
			args:  []arg{f(3, 4), {ints: []int64{1, 2, 0}, dims: []int64{3}}}},
	})
}

func TestMoreRules(t *testing.T) {
	eps := floatAttr("epsilon", 1e-5)
	runCases(t, []fdCase{
		{name: "Abs", op: "Abs", args: []arg{{dims: []int64{2, 3}, kink: true}}},
		{name: "Clip/inputs", op: "Clip", args: []arg{{dims: []int64{3, 4}, kink: true}, {vals: []float64{-0.5}, dims: []int64{}, fixed: true}, {vals: []float64{0.55}, dims: []int64{}, fixed: true}}},
		{name: "Clip/max-only", op: "Clip", args: []arg{{dims: []int64{3, 4}, kink: true}, {absent: true}, {vals: []float64{0.35}, dims: []int64{}, fixed: true}}},
		{name: "Clip/opset10-attrs", op: "Clip", opset: 10, dt: graph.Float, attrs: []*onnxpb.AttributeProto{floatAttr("min", -0.45), floatAttr("max", 0.5)}, args: []arg{{dims: []int64{3, 4}, kink: true}}},
		{name: "BiasGelu", op: "BiasGelu", domain: msDomain, dt: graph.Float, args: []arg{f(2, 3, 4), f(4)}},
		{name: "FastGelu", op: "FastGelu", domain: msDomain, dt: graph.Float, args: []arg{f(2, 3, 4), f(4)}},
		{name: "SkipLayerNormalization", op: "SkipLayerNormalization", domain: msDomain, dt: graph.Float, outs: 4, use: []int{0, 3}, attrs: []*onnxpb.AttributeProto{eps}, args: []arg{f(2, 3, 4), f(2, 3, 4), f(4), f(4), f(4)}},
	})
}

func TestConvRule(t *testing.T) {
	attrs := func(kv ...any) []*onnxpb.AttributeProto {
		var as []*onnxpb.AttributeProto
		for i := 0; i < len(kv); i += 2 {
			as = append(as, intsAttr(kv[i].(string), kv[i+1].([]int64)...))
		}
		return as
	}
	runCases(t, []fdCase{
		{name: "Conv/3x3-stride2-pad1-bias", op: "Conv", dt: graph.Float, attrs: attrs("strides", []int64{2, 2}, "pads", []int64{1, 1, 1, 1}),
			args: []arg{f(2, 3, 5, 6), f(4, 3, 3, 3), f(4)}},
		{name: "Conv/dilated-asymmetric-pads", op: "Conv", dt: graph.Float, attrs: attrs("dilations", []int64{2, 1}, "pads", []int64{0, 1, 2, 0}),
			args: []arg{f(1, 2, 6, 5), f(3, 2, 2, 3)}},
		{name: "Conv/1x1", op: "Conv", dt: graph.Float, args: []arg{f(2, 4, 3, 3), f(5, 4, 1, 1)}},
		{name: "Conv/1d-stride3", op: "Conv", dt: graph.Float, attrs: attrs("strides", []int64{3}, "pads", []int64{1, 0}),
			args: []arg{f(2, 2, 8), f(3, 2, 3), f(3)}},
		{name: "Conv/depthwise-input", op: "Conv", dt: graph.Float, attrs: append(attrs("pads", []int64{1, 1, 1, 1}), intAttr("group", 3)),
			args: []arg{f(2, 3, 4, 4), {dims: []int64{3, 1, 3, 3}, fixed: true}}},
		{name: "Conv/grouped-input", op: "Conv", dt: graph.Float, attrs: append(attrs("strides", []int64{2, 1}), intAttr("group", 2)),
			args: []arg{f(1, 4, 5, 3), {dims: []int64{6, 2, 2, 2}, fixed: true}}},
		{name: "Conv/3d", op: "Conv", dt: graph.Float, attrs: attrs("pads", []int64{1, 0, 0, 1, 0, 0}),
			args: []arg{f(1, 2, 3, 3, 3), f(2, 2, 2, 2, 2)}},
	})
}
