package autodiff

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Options say what to differentiate.
type Options struct {
	// Loss is "causal-lm", "cross-entropy" or "mse".
	Loss string
	// Output is the model output the loss reads; "" picks the only float
	// output, else the one named "logits".
	Output string
	// Params are the trainable initializers of the main graph.
	Params []string
	// Dropout switches every Dropout node to training mode through a new
	// boolean scalar input, TrainingModeName, whose default (false) keeps
	// the inference behaviour: a runner feeds true on training steps, and
	// the gradient uses the mask the forward drew. Without it, Dropout
	// nodes stay as the model has them (an identity unless a training_mode
	// input is already wired).
	Dropout bool
	// Detach lists values treated as constants, as torch's detach(): no
	// gradient flows back through them. Nodes whose doc_string is
	// DetachMarker are detached too (DoRA's weight norm, which PEFT
	// detaches, is written so).
	Detach []string
	// KeepOutputs keeps the model's own outputs after loss and gradients
	// (for metrics such as accuracy); by default the step graph has only
	// loss and gradients, so nothing else is computed.
	KeepOutputs bool
}

// Param is one trainable tensor of a step graph.
type Param struct {
	// Name is the initializer, also a graph input of the step graph (the
	// initializer is its default), so a runner feeds new values each step.
	Name string `json:"name"`
	// Grad is the output holding its gradient, Name + "_grad".
	Grad string `json:"grad"`
	// DType and Dims are the parameter's, and so its gradient's.
	DType graph.DataType `json:"dtype"`
	Dims  []int64        `json:"dims"`
}

// Step describes a step graph written by Build.
type Step struct {
	// Loss is the scalar loss output ("loss"): float32, or double for
	// double models.
	Loss string `json:"loss"`
	// Labels is the labels input ("labels").
	Labels string `json:"labels"`
	// LabelsType is the labels' element type: INT64 for the class losses,
	// the output's type for mse.
	LabelsType graph.DataType `json:"labels_type"`
	// Output is the model output the loss reads.
	Output string `json:"output"`
	// Params lists the trainable tensors in the order given.
	Params []Param `json:"params"`
	// Opset is the default-domain opset of the step graph.
	Opset int64 `json:"opset"`
	// TrainingMode is the training-mode input that Options.Dropout added
	// ("" when it added none: no Dropout in the model).
	TrainingMode string `json:"training_mode,omitempty"`
	// RaisedFrom is the model's opset when Build raised it to 13 (0 if
	// it did not).
	RaisedFrom int64 `json:"raised_from,omitempty"`
}

// OutputNames lists the step graph's outputs: the loss, then each
// parameter's gradient in the order of Params.
func (s *Step) OutputNames() []string {
	names := []string{s.Loss}
	for _, p := range s.Params {
		names = append(names, p.Grad)
	}
	return names
}

// Names of the step graph's fixed inputs and outputs (those ONNX Runtime
// training uses).
const (
	LossName   = "loss"
	LabelsName = "labels"
	// DetachMarker, as a node's doc_string, detaches the node's outputs.
	DetachMarker = "onnxlora:detach"
	// TrainingModeName is the input Options.Dropout adds.
	TrainingModeName = "training_mode"
	GradSuffix       = "_grad"
)

// ErrNoRule is wrapped by the error Build returns when a node on the path
// from a trainable tensor to the loss has an op without a gradient rule.
var ErrNoRule = errors.New("no gradient rule")

// Build rewrites m in place into a step graph: the loss on opts.Output
// added as ONNX nodes, then the backward nodes, written with standard ops.
// The step graph's inputs are the model's inputs, `labels` and every
// parameter; its outputs are `loss` and `<param>_grad`. Only nodes on a path
// from a parameter to the loss are differentiated, reusing forward values.
//
// A model of opset 9..12 is raised to opset 13 (see the package doc) when,
// and only when, a gradient needs reduction axes known only at run time;
// Step.Opset says which opset the step graph has.
func Build(m *graph.Model, opts Options) (*Step, error) {
	if m.Proto.GetGraph() == nil {
		return nil, errors.New("autodiff: the model has no graph")
	}
	if m.Opset() >= 13 {
		return build(m, opts)
	}
	orig := proto.Clone(m.Proto).(*onnxpb.ModelProto)
	step, err := build(m, opts)
	if !errors.Is(err, errNeedsOpset13) {
		return step, err
	}
	m.Proto = orig
	from := m.Opset()
	if uerr := upgradeToOpset13(m); uerr != nil {
		return nil, fmt.Errorf("%w; raising the model to opset 13 failed: %v", err, uerr)
	}
	step, err = build(m, opts)
	if err != nil {
		return nil, fmt.Errorf("%w (after raising the model from opset %d to 13)", err, from)
	}
	step.RaisedFrom = from
	return step, nil
}

func build(m *graph.Model, opts Options) (*Step, error) {
	if m.Proto.GetGraph() == nil {
		return nil, errors.New("autodiff: the model has no graph")
	}
	lossFn, ok := losses[opts.Loss]
	if !ok {
		return nil, fmt.Errorf("autodiff: unknown loss %q (want %s)", opts.Loss, strings.Join(LossNames(), ", "))
	}
	if len(opts.Params) == 0 {
		return nil, errors.New("autodiff: no trainable parameters")
	}
	g := m.Graph()
	if err := g.Toposort(); err != nil {
		return nil, fmt.Errorf("autodiff: %w", err)
	}
	opset := m.Opset()
	ti := newTypeInfo(g)
	step := &Step{Loss: LossName, Labels: LabelsName, Opset: opset}

	params, err := checkParams(g, ti, opts.Params)
	if err != nil {
		return nil, err
	}
	step.Params = params
	out, err := pickOutput(g, ti, opts.Output)
	if err != nil {
		return nil, err
	}
	step.Output = out
	for _, name := range []string{LossName, LabelsName} {
		if g.IsUsed(name) {
			return nil, fmt.Errorf("autodiff: the model already has a value named %q", name)
		}
	}

	if opts.Dropout {
		wired, err := wireDropout(g, ti, opset)
		if err != nil {
			return nil, err
		}
		if wired {
			step.TrainingMode = TrainingModeName
		}
	}
	e := newEmitter(g, ti, opset)
	e.scope = "/loss"
	loss, labelsType, err := lossFn(e, out)
	if err != nil {
		return nil, fmt.Errorf("autodiff: %s loss on %q: %w", opts.Loss, out, err)
	}
	step.LabelsType = labelsType
	forward := slices.Clone(g.Proto.Node)

	b := &backward{e: e, g: g, ti: ti, grads: map[string][]string{}, detached: map[string]bool{}}
	for _, v := range opts.Detach {
		b.detached[v] = true
	}
	for _, n := range forward {
		if n.GetDocString() == DetachMarker {
			for _, o := range n.Output {
				b.detached[o] = true
			}
		}
	}
	if err := b.run(forward, params, loss); err != nil {
		return nil, err
	}

	// Outputs: the loss and one gradient per parameter.
	lossDT := ti.elem[loss]
	e.scope = "/loss"
	loss = e.rename(loss, LossName)
	kept := g.Proto.Output
	g.Proto.Output = []*onnxpb.ValueInfoProto{valueInfo(LossName, lossDT, []int64{})}
	finals := make([]string, len(params))
	uses := map[string]int{}
	for i, p := range params {
		e.scope = "/grad/" + p.Name
		if contributions := b.grads[p.Name]; len(contributions) > 0 {
			finals[i] = e.cast(b.sum(contributions), p.DType)
		} else {
			finals[i] = e.zerosLike(p.Name) // the parameter does not reach the loss
		}
		uses[finals[i]]++
	}
	for i, p := range params {
		e.scope = "/grad/" + p.Name
		if uses[finals[i]] > 1 {
			e.identity(finals[i], p.Grad) // one value is the gradient of several
		} else {
			e.rename(finals[i], p.Grad)
		}
		g.Proto.Output = append(g.Proto.Output, valueInfo(p.Grad, p.DType, p.Dims))
	}
	if opts.KeepOutputs {
		g.Proto.Output = append(g.Proto.Output, kept...)
	}
	addParamInputs(m, g, params)
	g.Reindex()
	g.Cleanup()
	if err := g.Toposort(); err != nil {
		return nil, fmt.Errorf("autodiff: step graph: %w", err)
	}
	return step, nil
}

// wireDropout makes the training_mode input of every Dropout node without
// one the new input TrainingModeName (default false).
func wireDropout(g *graph.Graph, ti *typeInfo, opset int64) (bool, error) {
	wired := false
	for _, n := range g.Proto.Node {
		if n.GetOpType() != "Dropout" || !graph.IsStandardOp(n) || input(n, 2) != "" {
			continue
		}
		if opset < 12 {
			return false, fmt.Errorf("autodiff: node %q: Dropout in training mode needs opset 12 or later (the model has %d)", n.GetName(), opset)
		}
		if !wired {
			if g.IsUsed(TrainingModeName) {
				return false, fmt.Errorf("autodiff: the model already has a value named %q", TrainingModeName)
			}
			off := tensorOf(graph.Bool, nil, []float64{0})
			off.Name = proto.String(TrainingModeName)
			g.AddInitializer(off)
			g.Proto.Input = append(g.Proto.Input, valueInfo(TrainingModeName, graph.Bool, []int64{}))
			ti.elem[TrainingModeName] = graph.Bool
			ti.shape[TrainingModeName] = []dim{}
			wired = true
		}
		for len(n.Input) < 2 {
			n.Input = append(n.Input, "") // the default ratio
		}
		n.Input = append(n.Input[:2], TrainingModeName)
	}
	if wired {
		g.Reindex()
	}
	return wired, nil
}

func checkParams(g *graph.Graph, ti *typeInfo, names []string) ([]Param, error) {
	var params []Param
	seen := map[string]bool{}
	for _, name := range names {
		if seen[name] {
			continue
		}
		seen[name] = true
		t, owner := g.Initializer(name)
		if t == nil && inSubgraph(g, name) {
			return nil, fmt.Errorf("autodiff: trainable %q lives in a subgraph (an If, Loop, Scan or contrib-op body); differentiating subgraphs is not supported", name)
		}
		if t == nil || owner != g {
			return nil, fmt.Errorf("autodiff: trainable %q is not an initializer of the main graph", name)
		}
		dt := graph.DataType(t.GetDataType())
		if !isDifferentiableType(dt) {
			return nil, fmt.Errorf("autodiff: trainable %q has type %s, not a float type", name, dt)
		}
		params = append(params, Param{Name: name, Grad: name + GradSuffix, DType: dt, Dims: slices.Clone(t.Dims)})
		if g.IsUsed(name + GradSuffix) {
			return nil, fmt.Errorf("autodiff: the model already has a value named %q", name+GradSuffix)
		}
	}
	return params, nil
}

func inSubgraph(g *graph.Graph, name string) bool {
	found := false
	g.Walk(func(sg *graph.Graph) {
		if sg == g {
			return
		}
		for _, t := range sg.Proto.Initializer {
			found = found || t.GetName() == name
		}
	})
	return found
}

func pickOutput(g *graph.Graph, ti *typeInfo, want string) (string, error) {
	var floats []string
	for _, o := range g.Proto.Output {
		if o.GetName() == want && want != "" {
			return want, nil
		}
		if isDifferentiableType(ti.elem[o.GetName()]) {
			floats = append(floats, o.GetName())
		}
	}
	var names []string
	for _, o := range g.Proto.Output {
		names = append(names, o.GetName())
	}
	if want != "" {
		return "", fmt.Errorf("autodiff: the model has no output %q (outputs: %s)", want, strings.Join(names, ", "))
	}
	if len(floats) == 1 {
		return floats[0], nil
	}
	if slices.Contains(floats, "logits") {
		return "logits", nil
	}
	return "", fmt.Errorf("autodiff: choose the output the loss reads (float outputs: %s)", strings.Join(floats, ", "))
}

func valueInfo(name string, dt graph.DataType, dims []int64) *onnxpb.ValueInfoProto {
	return tensorValueInfo(name, dt, staticDims(dims))
}

// addParamInputs lists each parameter as a graph input whose default is the
// initializer (IR 4 and later allow that; older IR is raised to 4, which
// changes nothing else a runtime reads).
func addParamInputs(m *graph.Model, g *graph.Graph, params []Param) {
	if m.Proto.GetIrVersion() < 4 {
		// Before IR 4 every initializer was listed as an input; the step
		// graph keeps only the trainable ones as inputs.
		var keep []*onnxpb.ValueInfoProto
		for _, in := range g.Proto.Input {
			if t, _ := g.Initializer(in.GetName()); t == nil || in.GetName() == TrainingModeName {
				keep = append(keep, in)
			}
		}
		g.Proto.Input = keep
		m.Proto.IrVersion = proto.Int64(4)
	}
	for _, p := range params {
		if g.IsGraphInput(p.Name) {
			continue
		}
		g.Proto.Input = append(g.Proto.Input, valueInfo(p.Name, p.DType, p.Dims))
	}
}

// backward walks the forward nodes in reverse and writes their gradients.
type backward struct {
	e        *emitter
	g        *graph.Graph
	ti       *typeInfo
	grads    map[string][]string // value -> gradient contributions
	detached map[string]bool     // values treated as constants
}

func (b *backward) run(forward []*onnxpb.NodeProto, params []Param, loss string) error {
	// Values that depend on a parameter through differentiable edges.
	requires := map[string]bool{}
	for _, p := range params {
		requires[p.Name] = true
	}
	for _, n := range forward {
		r := lookupRule(n)
		if capturesAny(n, requires) {
			return fmt.Errorf("autodiff: node %q (%s): trainable values reach a subgraph; differentiating If/Loop/Scan bodies is not supported", n.GetName(), n.GetOpType())
		}
		hit := false
		for i, in := range n.Input {
			if in != "" && requires[in] && (r == nil || r.differentiable(n, i)) {
				hit = true
			}
		}
		if !hit {
			continue
		}
		for _, out := range n.Output {
			if out != "" && isDifferentiableType(b.ti.elem[out]) && !b.detached[out] {
				requires[out] = true
			}
		}
	}
	if !requires[loss] {
		return errors.New("autodiff: no trainable parameter reaches the loss")
	}
	// Values whose gradient the loss needs.
	needed := map[string]bool{loss: true}
	var active []*onnxpb.NodeProto
	for i := len(forward) - 1; i >= 0; i-- {
		n := forward[i]
		if !slices.ContainsFunc(n.Output, func(o string) bool { return o != "" && needed[o] && requires[o] }) {
			continue
		}
		r := lookupRule(n)
		reached := false
		for j, in := range n.Input {
			if in != "" && requires[in] && (r == nil || r.differentiable(n, j)) {
				needed[in] = true
				reached = true
			}
		}
		if !reached {
			continue
		}
		if r == nil {
			return fmt.Errorf("autodiff: node %q (%s): %w for this op", n.GetName(), opKey(n), ErrNoRule)
		}
		active = append(active, n)
	}
	b.grads[loss] = []string{b.e.constantLike(loss, 1)}
	for _, n := range active {
		if err := b.node(n, requires, needed); err != nil {
			return err
		}
	}
	return nil
}

// capturesAny reports whether a node's subgraphs read any of the values.
func capturesAny(n *onnxpb.NodeProto, values map[string]bool) bool {
	for _, a := range n.Attribute {
		graphs := a.Graphs
		if a.G != nil {
			graphs = append(graphs, a.G)
		}
		for _, sg := range graphs {
			for _, sn := range sg.Node {
				for _, in := range sn.Input {
					if values[in] {
						return true
					}
				}
				if capturesAny(sn, values) {
					return true
				}
			}
		}
	}
	return false
}

func (b *backward) node(n *onnxpb.NodeProto, requires, needed map[string]bool) error {
	r := lookupRule(n)
	c := &ctx{emitter: b.e, n: n, gy: make([]string, len(n.Output)), need: make([]bool, len(n.Input))}
	b.e.scope = "/grad" + scopeOf(n)
	have := false
	for i, out := range n.Output {
		if contributions := b.grads[out]; out != "" && len(contributions) > 0 {
			c.gy[i] = b.sum(contributions)
			have = true
		}
	}
	if !have {
		return nil
	}
	for i, in := range n.Input {
		c.need[i] = in != "" && requires[in] && needed[in] && r.differentiable(n, i)
	}
	c.gx = make([]string, len(n.Input))
	if err := r.grad(c); err != nil {
		return fmt.Errorf("autodiff: node %q (%s): %w", n.GetName(), opKey(n), err)
	}
	for i, gx := range c.gx {
		if gx != "" && c.need[i] {
			b.grads[n.Input[i]] = append(b.grads[n.Input[i]], gx)
		}
	}
	return nil
}

// sum adds up the gradient contributions of one value.
func (b *backward) sum(contributions []string) string {
	if len(contributions) == 1 {
		return contributions[0]
	}
	return b.e.op("Sum", contributions)
}

func scopeOf(n *onnxpb.NodeProto) string {
	name := n.GetName()
	if name == "" {
		name = n.GetOpType() + "_" + strings.Join(n.Output, "_")
	}
	if !strings.HasPrefix(name, "/") {
		name = "/" + name
	}
	return name
}

func opKey(n *onnxpb.NodeProto) string {
	if graph.IsStandardOp(n) {
		return n.GetOpType()
	}
	return n.GetDomain() + "." + n.GetOpType()
}

// constantLike is a constant v broadcastable to x, of x's type.
func (e *emitter) constantLike(x string, v float64) string {
	return e.scalar(e.ti.elem[x], v)
}
