package train

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/onnxlora/onnxlora/autodiff"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/rewrite"
)

// ModelOptions tune OpenModel.
type ModelOptions struct {
	// Loss is "causal-lm" (default), "cross-entropy" or "mse".
	Loss string
	// Output is the model output the loss reads; "" lets autodiff choose
	// (the only float output, else "logits").
	Output string
	// Trainable overrides the manifest's trainable list.
	Trainable []string
	// Session tunes the ONNX Runtime session (threads, optimization).
	Session ortrun.Options
	// Device is "cpu" (default) or "cuda" for ONNX Runtime's CUDA provider
	// on the first GPU.
	Device string
	// Dropout applies the model's Dropout nodes (the adapters' dropout)
	// on training steps, as PEFT does; evaluation never drops. Off, a run
	// is deterministic.
	Dropout bool
	// Rank starts the adapters of a model injected with adapter inputs
	// (whose factors are rank-0 defaults) at this rank: A as inject draws
	// it, B zero (rewrite.StartAdapterInputs). Such a model whose defaults
	// already have a rank trains them as they are when Rank is 0.
	Rank int
}

// Model is an injected ONNX model opened for training: the input model
// (where trained values are written back) and one ONNX Runtime session of
// its step graph. It implements Stepper.
type Model struct {
	path   string
	orig   *graph.Model
	step   *autodiff.Step
	sess   *ortrun.Session
	tmp    string
	params []*Param
	spec   BatchSpec
	outs   []string
}

// ErrNoAdapters is returned by OpenModel for a model with nothing to train.
var ErrNoAdapters = errors.New("no adapters to train")

// OpenModel loads the model at path, builds its step graph for the
// manifest's trainable tensors and opens it in ONNX Runtime once. The
// model file is not modified.
func OpenModel(path string, opts ModelOptions) (*Model, error) {
	if opts.Loss == "" {
		opts.Loss = "causal-lm"
	}
	switch opts.Loss {
	case "causal-lm", "cross-entropy", "mse":
	default:
		return nil, fmt.Errorf("unknown loss %q: want causal-lm, cross-entropy or mse", opts.Loss)
	}
	orig, err := graph.Load(path)
	if err != nil {
		return nil, err
	}
	m := &Model{path: path, orig: orig}
	ok := false
	defer func() {
		if !ok {
			m.Close()
		}
	}()
	man, err := rewrite.ReadManifest(orig)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	inputFactors, err := startAdapterInputs(orig, man, opts.Rank)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	trainable := opts.Trainable
	if len(trainable) == 0 {
		if man != nil {
			trainable = append(append(trainable, man.Trainable...), inputFactors...)
		}
		if len(trainable) == 0 {
			return nil, fmt.Errorf("%s: %w (it has no %s manifest); add adapters with onnxlora inject first", path, ErrNoAdapters, rewrite.ManifestKey)
		}
	}
	for _, name := range trainable {
		t, _ := orig.Graph().Initializer(name)
		if t == nil {
			return nil, fmt.Errorf("%s: trainable tensor %q is not an initializer of the main graph", path, name)
		}
		dt := graph.DataType(t.GetDataType())
		if !dt.IsFloat() {
			return nil, fmt.Errorf("%s: trainable tensor %q is %v, not floating point", path, name, dt)
		}
		vals, err := orig.Float64s(t)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		m.params = append(m.params, &Param{Name: name, DType: ortrun.DType(dt), Dims: append([]int64{}, t.Dims...), Value: vals})
	}
	limits := gatherLimits(orig.Graph())
	classes := outputClasses(orig.Graph().Proto, opts.Output)

	// The step graph is built on a second copy, so the first stays the
	// model that OUT is written from.
	sm, err := graph.Load(path)
	if err != nil {
		return nil, err
	}
	defer sm.Close()
	if _, err := startAdapterInputs(sm, man, opts.Rank); err != nil {
		return nil, err
	}
	step, err := autodiff.Build(sm, autodiff.Options{Loss: opts.Loss, Output: opts.Output, Params: trainable, Dropout: opts.Dropout})
	if err != nil {
		return nil, fmt.Errorf("%s: building the step graph: %w", path, err)
	}
	m.step = step
	if m.tmp, err = os.MkdirTemp("", "onnxlora-train-"); err != nil {
		return nil, err
	}
	stepPath := filepath.Join(m.tmp, "step.onnx")
	if err := sm.Save(stepPath, graph.SaveOptions{}); err != nil {
		return nil, fmt.Errorf("saving the step graph: %w", err)
	}
	switch opts.Device {
	case "", "cpu":
		m.sess, err = ortrun.Open(stepPath, &opts.Session)
	case "cuda":
		m.sess, err = ortrun.OpenCUDA(stepPath, &opts.Session, 0)
	default:
		err = fmt.Errorf("unknown device %q: want cpu or cuda", opts.Device)
	}
	if err != nil {
		return nil, err
	}

	inits := map[string]bool{}
	for _, t := range sm.Graph().Proto.Initializer {
		inits[t.GetName()] = true
	}
	isParam := map[string]bool{}
	for _, p := range step.Params {
		isParam[p.Name] = true
		m.outs = append(m.outs, p.Grad)
	}
	m.spec.Loss = opts.Loss
	for _, in := range m.sess.Inputs() {
		switch {
		case in.Name == step.Labels:
			m.spec.Labels = InputSpec{Name: in.Name, DType: in.DType, Dims: in.Shape, Limit: classes}
			if opts.Loss == "mse" {
				m.spec.Labels.Limit = 0
			}
		case isParam[in.Name] || inits[in.Name]:
		default:
			m.spec.Inputs = append(m.spec.Inputs, InputSpec{Name: in.Name, DType: in.DType, Dims: in.Shape, Limit: limits[in.Name]})
		}
	}
	if m.spec.Labels.Name == "" {
		return nil, fmt.Errorf("step graph has no %q input", step.Labels)
	}
	// Params in the step graph's order, which is the order of the grads.
	byName := map[string]*Param{}
	for _, p := range m.params {
		byName[p.Name] = p
	}
	m.params = m.params[:0]
	for _, p := range step.Params {
		q := byName[p.Name]
		if q == nil {
			return nil, fmt.Errorf("step graph trains %q, which is not trainable", p.Name)
		}
		m.params = append(m.params, q)
	}
	ok = true
	return m, nil
}

// startAdapterInputs returns the factors of the model's adapter-input
// branches (inject --adapter-inputs), giving them rank r first when r > 0.
// Their defaults are rank 0 as inject writes them; training those would
// train nothing, so a rank is then required.
func startAdapterInputs(m *graph.Model, man *rewrite.Manifest, r int) ([]string, error) {
	var names []string
	if man != nil {
		for _, a := range man.Adapters {
			if a.Mode == rewrite.ModeAdapterInputs {
				names = append(names, a.LoraA, a.LoraB)
			}
		}
	}
	if len(names) == 0 {
		if r > 0 {
			return nil, errors.New("--rank is for models injected with --adapter-inputs; this one has its rank already")
		}
		return nil, nil
	}
	if r > 0 {
		return rewrite.StartAdapterInputs(m, r, rewrite.InjectConfig{})
	}
	for _, name := range names {
		t, _ := m.Graph().Initializer(name)
		if t == nil || len(t.Dims) != 2 || t.Dims[0] == 0 || t.Dims[1] == 0 {
			return nil, fmt.Errorf("the adapter inputs (inject --adapter-inputs) have rank-0 defaults: give --rank R to start them at rank R")
		}
	}
	return names, nil
}

// gatherLimits maps each graph input that a Gather uses as indices into a
// constant table to the table's size along the gathered axis: the ids an
// embedding accepts.
func gatherLimits(g *graph.Graph) map[string]int64 {
	lim := map[string]int64{}
	for _, n := range g.Proto.Node {
		if n.GetOpType() != "Gather" || n.GetDomain() != "" || len(n.Input) < 2 || !g.IsGraphInput(n.Input[1]) {
			continue
		}
		t, _, _ := g.ConstantTensor(n.Input[0])
		if t == nil {
			continue
		}
		axis := int64(0)
		for _, a := range n.Attribute {
			if a.GetName() == "axis" {
				axis = a.GetI()
			}
		}
		if axis < 0 {
			axis += int64(len(t.Dims))
		}
		if axis < 0 || axis >= int64(len(t.Dims)) {
			continue
		}
		if l, seen := lim[n.Input[1]]; !seen || t.Dims[axis] < l {
			lim[n.Input[1]] = t.Dims[axis]
		}
	}
	return lim
}

// outputClasses returns the static last dim of the output the loss reads
// (the class count of its logits), or 0 when unknown.
func outputClasses(p *onnxpb.GraphProto, name string) int64 {
	var pick *onnxpb.ValueInfoProto
	var floats []*onnxpb.ValueInfoProto
	for _, o := range p.Output {
		if name != "" && o.GetName() == name {
			pick = o
		}
		if graph.DataType(o.GetType().GetTensorType().GetElemType()).IsFloat() {
			floats = append(floats, o)
		}
		if name == "" && o.GetName() == "logits" {
			pick = o
		}
	}
	if name == "" && len(floats) == 1 {
		pick = floats[0]
	}
	if pick == nil {
		return 0
	}
	dims := pick.GetType().GetTensorType().GetShape().GetDim()
	if len(dims) == 0 || dims[len(dims)-1].GetDimValue() <= 0 {
		return 0
	}
	return dims[len(dims)-1].GetDimValue()
}

// Params returns the trainable tensors with the model's values, in the
// step graph's order. The slice and values are the model's own: training
// updates them in place.
func (m *Model) Params() []*Param { return m.params }

// Spec returns how rows become the step graph's inputs, with padID for
// input_ids. A pad id outside the embedding is refused here, since it
// would fail in ONNX Runtime only at the first padded batch.
func (m *Model) Spec(padID int64) (*BatchSpec, error) {
	s := m.spec
	s.Inputs = append([]InputSpec{}, m.spec.Inputs...)
	s.PadID = padID
	if lim := s.limitOf("input_ids"); lim > 0 && (padID < 0 || padID >= lim) {
		return nil, fmt.Errorf("pad id %d is outside the embedding's ids [0, %d)", padID, lim)
	}
	return &s, nil
}

func (s *BatchSpec) limitOf(name string) int64 {
	if in := s.input(name); in != nil {
		return in.Limit
	}
	return 0
}

func (m *Model) feeds(b *Batch, params []*Param) ([]ortrun.Tensor, error) {
	in := append([]ortrun.Tensor{}, b.Inputs...)
	for _, p := range params {
		t, err := ortrun.FromFloat64(p.Name, p.DType, p.Dims, p.Value)
		if err != nil {
			return nil, err
		}
		in = append(in, t)
	}
	return in, nil
}

// Step implements Stepper: one run of the step graph, with dropout on
// when the model was opened with it.
func (m *Model) Step(b *Batch, params []*Param) (float64, [][]float64, error) {
	in, err := m.feeds(b, params)
	if err != nil {
		return 0, nil, err
	}
	if m.step.TrainingMode != "" {
		on, err := ortrun.NewTensor(m.step.TrainingMode, []int64{}, []bool{true})
		if err != nil {
			return 0, nil, err
		}
		in = append(in, on)
	}
	outs, err := m.sess.RunOutputs(in, append([]string{m.step.Loss}, m.outs...))
	if err != nil {
		return 0, nil, err
	}
	loss, err := scalar(outs[0])
	if err != nil {
		return 0, nil, err
	}
	grads := make([][]float64, len(m.outs))
	for i := range m.outs {
		if grads[i], err = outs[i+1].Float64s(); err != nil {
			return 0, nil, err
		}
	}
	return loss, grads, nil
}

// Loss implements Stepper: the loss output only, so ORT skips the
// backward pass.
func (m *Model) Loss(b *Batch, params []*Param) (float64, error) {
	in, err := m.feeds(b, params)
	if err != nil {
		return 0, err
	}
	outs, err := m.sess.RunOutputs(in, []string{m.step.Loss})
	if err != nil {
		return 0, err
	}
	return scalar(outs[0])
}

func scalar(t ortrun.Tensor) (float64, error) {
	v, err := t.Float64s()
	if err != nil {
		return 0, err
	}
	if len(v) != 1 {
		return 0, fmt.Errorf("loss output %q has %d values, want 1", t.Name, len(v))
	}
	return v[0], nil
}

// Save writes the input model with params' values in their initializers
// (rounded once to each initializer's type) to path, atomically: on error
// nothing is left at path.
func (m *Model) Save(path string, params []*Param, opts graph.SaveOptions) error {
	for _, p := range params {
		t, _ := m.orig.Graph().Initializer(p.Name)
		if t == nil {
			return fmt.Errorf("model has no initializer %q", p.Name)
		}
		if err := graph.SetFloat64s(t, p.Value); err != nil {
			return err
		}
	}
	return m.orig.Save(path, opts)
}

// Close releases the session and the step graph's temporary files.
func (m *Model) Close() error {
	if m.sess != nil {
		m.sess.Close()
		m.sess = nil
	}
	if m.tmp != "" {
		os.RemoveAll(m.tmp)
		m.tmp = ""
	}
	if m.orig != nil {
		m.orig.Close()
	}
	return nil
}
