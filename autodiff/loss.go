package autodiff

import (
	"fmt"
	"math"
	"sort"

	"github.com/onnxlora/onnxlora/graph"
)

// IgnoreIndex is the label that class losses skip, as in PyTorch and
// HuggingFace (padding and prompt tokens).
const IgnoreIndex = -100

// A lossFunc appends the loss on output out as forward nodes, adds the
// labels input, and returns the scalar loss and the labels' type.
type lossFunc func(e *emitter, out string) (loss string, labels graph.DataType, err error)

var losses = map[string]lossFunc{
	"causal-lm":     causalLMLoss,
	"cross-entropy": crossEntropyLoss,
	"mse":           mseLoss,
}

// LossNames returns the losses Build knows, sorted.
func LossNames() []string {
	names := make([]string, 0, len(losses))
	for n := range losses {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// lossInput casts half-precision outputs to float: losses are computed in
// float32 (double models stay double).
func (e *emitter) lossInput(out string) (string, error) {
	dt := e.ti.elem[out]
	switch dt {
	case graph.Float, graph.Double:
		return out, nil
	case graph.Float16, graph.BFloat16:
		return e.cast(out, graph.Float), nil
	}
	return "", fmt.Errorf("output type %s is not a float type", dt)
}

// addLabels declares the labels input with the given type and dims.
func (e *emitter) addLabels(dt graph.DataType, dims []dim) {
	e.g.Proto.Input = append(e.g.Proto.Input, tensorValueInfo(LabelsName, dt, dims))
	e.g.Reindex()
	e.ti.elem[LabelsName] = dt
	e.ti.shape[LabelsName] = dims
}

// classDims returns the output's declared dims without the class axis, for
// the labels' shape, or nil when its rank is not declared.
func (e *emitter) classDims(out string, wantRank ...int) ([]dim, error) {
	s, ok := e.ti.shape[out]
	if !ok {
		return nil, nil
	}
	for _, r := range wantRank {
		if len(s) == r {
			return s[:r-1], nil
		}
	}
	return nil, fmt.Errorf("output has rank %d, want %v", len(s), wantRank)
}

// classLoss is the mean cross-entropy of scores [.., C] against labels
// [..], skipping labels equal to IgnoreIndex, as torch's cross_entropy
// computes it: -Σ valid·log_softmax(scores)[label] / Σ valid. It is written
// with plain ops (LogSoftmax, a one-hot product, sums), all of which have
// gradient rules, so the loss needs no opset beyond the model's.
func (e *emitter) classLoss(scores, labels string) string {
	dt := e.ti.elem[scores]
	// [.., C] -> [N, C] with Flatten, which shape inference follows (a
	// Reshape to a computed shape would leave the rank unknown).
	axis := int64(-1)
	if e.opset < 11 {
		axis = int64(e.ti.rank(scores) - 1)
	}
	flat := e.op("Flatten", []string{scores}, intAttr("axis", axis))
	lab := e.reshape(labels, e.ints(-1))
	ignored := e.op("Equal", []string{lab, e.scalar(graph.Int64, IgnoreIndex)})
	safe := e.where(ignored, e.scalar(graph.Int64, 0), lab)
	valid := e.cast(e.op("Not", []string{ignored}), dt)
	logp := e.op("LogSoftmax", []string{flat}, intAttr("axis", 1))
	depth := e.op("Gather", []string{e.shape(flat), e.scalar(graph.Int64, 1)})
	// Declared shapes let the backward see that no product here
	// broadcasts, which older opsets need to know when the graph is built.
	rows, classes := dim{value: -1, param: "/loss/rows"}, dim{value: -1, param: "/loss/classes"}
	onehot := e.oneHot(safe, depth, dt, -1)
	for _, v := range []string{flat, logp, onehot} {
		e.ti.shape[v] = []dim{rows, classes}
	}
	e.ti.shape[valid] = []dim{rows}
	picked := e.reduce("ReduceSum", e.mul(logp, onehot), []int64{1}, false)
	e.ti.shape[picked] = []dim{rows}
	total := e.reduce("ReduceSum", e.mul(picked, valid), nil, false)
	count := e.reduce("ReduceSum", valid, nil, false)
	loss := e.neg(e.div(total, count))
	e.ti.shape[loss] = []dim{}
	return loss
}

// causalLMLoss follows HuggingFace: logits[:, :-1] predict labels[:, 1:].
func causalLMLoss(e *emitter, out string) (string, graph.DataType, error) {
	dims, err := e.classDims(out, 3)
	if err != nil {
		return "", 0, err
	}
	if dims == nil {
		dims = []dim{{value: -1, param: "batch"}, {value: -1, param: "sequence"}}
	}
	logits, err := e.lossInput(out)
	if err != nil {
		return "", 0, err
	}
	e.addLabels(graph.Int64, dims)
	if e.opset < 10 {
		return "", 0, fmt.Errorf("the causal-lm loss needs opset 10 or later (Slice inputs); the model has %d", e.opset)
	}
	shifted := e.slice1(logits, e.ints(0), e.ints(-1), 1)
	next := e.slice1(LabelsName, e.ints(1), e.ints(math.MaxInt64), 1)
	return e.classLoss(shifted, next), graph.Int64, nil
}

// crossEntropyLoss takes class labels [b] for [b, C] outputs, [b, t] for
// [b, t, C].
func crossEntropyLoss(e *emitter, out string) (string, graph.DataType, error) {
	dims, err := e.classDims(out, 2, 3)
	if err != nil {
		return "", 0, err
	}
	if dims == nil {
		return "", 0, fmt.Errorf("the output's rank is not declared; cross-entropy needs [b, C] or [b, t, C]")
	}
	scores, err := e.lossInput(out)
	if err != nil {
		return "", 0, err
	}
	e.addLabels(graph.Int64, dims)
	return e.classLoss(scores, LabelsName), graph.Int64, nil
}

// mseLoss is the mean of (output - labels)² over every element; labels have
// the output's shape and type.
func mseLoss(e *emitter, out string) (string, graph.DataType, error) {
	dt := e.ti.elem[out]
	pred, err := e.lossInput(out)
	if err != nil {
		return "", 0, err
	}
	dims, ok := e.ti.shape[out]
	if !ok {
		return "", 0, fmt.Errorf("the output's shape is not declared; mse labels take it")
	}
	e.addLabels(dt, dims)
	d := e.sub(pred, e.cast(LabelsName, e.ti.elem[pred]))
	loss := e.reduce("ReduceMean", e.mul(d, d), nil, false)
	e.ti.shape[loss] = []dim{}
	return loss, dt, nil
}
