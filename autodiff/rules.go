package autodiff

import (
	"sort"
	"strconv"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// A rule is the vector-Jacobian product of one op, written as ONNX nodes:
// given the gradients of the node's outputs it emits the gradients of the
// inputs that need one. Like PyTorch's derivatives.yaml there is one entry
// per op; the table below is the whole list of what can be differentiated.
type rule struct {
	// inputs lists the input positions that carry gradients; nil means
	// every input (non-float inputs never carry one anyway).
	inputs []int
	grad   func(c *ctx) error
}

func (r *rule) differentiable(n *onnxpb.NodeProto, i int) bool {
	if r.inputs == nil {
		return true
	}
	for _, j := range r.inputs {
		if i == j {
			return true
		}
	}
	return false
}

// ctx is what a rule sees of the node it differentiates.
type ctx struct {
	*emitter
	n    *onnxpb.NodeProto
	gy   []string // gradient of each output, "" where none flows
	need []bool   // whether input i needs a gradient
	gx   []string // set by the rule: gradient of input i
}

// x is input i; y is output i.
func (c *ctx) x(i int) string { return input(c.n, i) }
func (c *ctx) y(i int) string {
	if i < len(c.n.Output) {
		return c.n.Output[i]
	}
	return ""
}

// set records g as the gradient of input i if that input needs one.
func (c *ctx) set(i int, g string) {
	if c.need[i] {
		c.gx[i] = g
	}
}

// setReduced records g, computed in the output's broadcast shape, reduced
// to input i's shape.
func (c *ctx) setReduced(i int, g string) error {
	if !c.need[i] {
		return nil
	}
	if c.inputsAlike() {
		c.gx[i] = g // no input was broadcast
		return nil
	}
	r, err := c.reduceTo(g, c.x(i), c.y(0))
	if err != nil {
		return err
	}
	c.gx[i] = r
	return nil
}

// inputsAlike reports whether the node's inputs provably share one shape,
// so an element-wise node broadcast none of them.
func (c *ctx) inputsAlike() bool {
	first, floats := "", 0
	for _, in := range c.n.Input {
		if in == "" || !isDifferentiableType(c.ti.elem[in]) {
			continue
		}
		floats++
		if first == "" {
			first = in
		} else if !c.ti.sameShape(first, in) {
			return false
		}
	}
	return floats >= 2
}

// dt is the element type of input 0, the type most rules compute in.
func (c *ctx) dt() graph.DataType { return c.ti.elem[c.x(0)] }

// k is a scalar constant of the computing type.
func (c *ctx) k(v float64) string { return c.scalar(c.dt(), v) }

// output returns output i of the forward node, adding it (an optional
// output such as Dropout's mask) when the model left it out, so the backward
// reuses what the forward computes instead of computing it again.
func (c *ctx) output(i int, dt graph.DataType) string {
	for len(c.n.Output) <= i {
		c.n.Output = append(c.n.Output, "")
	}
	if c.n.Output[i] == "" {
		name := c.g.UniqueName(c.n.GetName() + "_output_" + strconv.Itoa(i))
		c.g.SetOutput(c.n, i, name)
		c.ti.elem[name] = dt
	}
	return c.n.Output[i]
}

func input(n *onnxpb.NodeProto, i int) string {
	if i < len(n.Input) {
		return n.Input[i]
	}
	return ""
}

// rules maps an op (domain-qualified outside the default domain) to its rule.
var rules = map[string]*rule{}

func register(op string, r *rule) { rules[op] = r }

func lookupRule(n *onnxpb.NodeProto) *rule { return rules[opKey(n)] }

// Ops returns the ops that have a gradient rule, sorted.
func Ops() []string {
	ops := make([]string, 0, len(rules))
	for op := range rules {
		ops = append(ops, op)
	}
	sort.Strings(ops)
	return ops
}
