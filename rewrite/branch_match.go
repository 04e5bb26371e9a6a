package rewrite

import (
	"fmt"
	"slices"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// branchMatch is a branch of some kind found in a graph.
type branchMatch struct {
	Kind  *branchKind
	Graph *graph.Graph
	Base  *onnxpb.NodeProto // the layer node
	Layer *Layer            // Base as a layer
	// Nodes are the branch's nodes in the description's order (absent
	// optional nodes left out); Roles their descriptions' Names.
	Nodes []*onnxpb.NodeProto
	Roles []string
	// Params are the values the params were found at ("" for an optional
	// one that is missing); Tensors the constants behind them.
	Params  map[string]string
	Tensors map[string]*onnxpb.TensorProto
	// Dims are the sizes of the params' symbols ("in", "out", "r").
	Dims map[string]int64
	// Output is the root's output, the layer's original output name;
	// BaseOutput is what the layer node writes now.
	Output, BaseOutput string
}

// node returns the matched node called name in the description, or nil.
func (bm *branchMatch) node(name string) *onnxpb.NodeProto {
	if i := slices.Index(bm.Roles, name); i >= 0 {
		return bm.Nodes[i]
	}
	return nil
}

// match checks whether root is the root node of a branch of kind k and
// returns the branch, or why it is not one (for error messages when a
// manifest says it should be). Matching follows the description backwards
// from the root, trying each optional node present and absent and each
// commuting node's inputs in both orders, then checks the branch against
// the layer: presences the layer decides, the params' shapes, and that no
// value between branch nodes has a reader outside the branch.
func (k *branchKind) match(g *graph.Graph, root *onnxpb.NodeProto) (*branchMatch, string) {
	return k.matchStacked(g, root, 0)
}

// matchStacked is match for a branch that depth others are stacked on
// (inject --stack).
func (k *branchKind) matchStacked(g *graph.Graph, root *onnxpb.NodeProto, depth int) (*branchMatch, string) {
	spec := k.root()
	if root.GetOpType() != spec.Op || !graph.IsStandardOp(root) || len(root.Input) != len(spec.In) || len(root.Output) != 1 {
		return nil, fmt.Sprintf("not a %d-input %s", len(spec.In), spec.Op)
	}
	m := &matcher{k: k, g: g, root: root, stacked: depth}
	if m.node(len(k.Nodes)-1, root.Output[0], "", m.final) {
		return m.found, ""
	}
	return nil, m.why
}

// matcher is one match in progress. Bindings are append-only slices, so
// backtracking is truncating them to a saved length.
type matcher struct {
	k       *branchKind
	g       *graph.Graph
	root    *onnxpb.NodeProto
	stacked int // branches stacked on this one (stackedBase)

	base       *onnxpb.NodeProto
	baseOutput string
	roles      []string
	nodes      []*onnxpb.NodeProto
	params     []binding // param name -> value
	// readers are values inside the branch with the one node that may read
	// them; xReads are values read as the layer's input.
	readers []reader
	xReads  []string

	found *branchMatch
	why   string // the reason of the failure that got furthest
	depth int
}

type binding struct{ name, value string }

type reader struct {
	value string
	node  *onnxpb.NodeProto
}

type mark struct {
	base                     *onnxpb.NodeProto
	baseOutput               string
	nodes, params, rd, xread int
}

func (m *matcher) save() mark {
	return mark{m.base, m.baseOutput, len(m.nodes), len(m.params), len(m.readers), len(m.xReads)}
}

func (m *matcher) restore(s mark) {
	m.base, m.baseOutput = s.base, s.baseOutput
	m.roles, m.nodes = m.roles[:s.nodes], m.nodes[:s.nodes]
	m.params, m.readers, m.xReads = m.params[:s.params], m.readers[:s.rd], m.xReads[:s.xread]
}

// try runs one alternative and undoes its bindings if it fails.
func (m *matcher) try(alt func() bool) bool {
	s := m.save()
	if alt() {
		return true
	}
	m.restore(s)
	return false
}

// fail records why an alternative failed, keeping the reason of the one
// that bound the most.
func (m *matcher) fail(format string, args ...any) bool {
	d := len(m.nodes) + len(m.params) + len(m.xReads)
	if m.base != nil {
		d++
	}
	if d > m.depth || m.why == "" {
		m.why, m.depth = fmt.Sprintf(format, args...), d
	}
	return false
}

func (m *matcher) param(name string) (string, bool) {
	for _, b := range m.params {
		if b.name == name {
			return b.value, true
		}
	}
	return "", false
}

// node matches node i of the description against value v, which the
// branch node r (a description Name, "" for none) reads, then runs next.
func (m *matcher) node(i int, v, r string, next func() bool) bool {
	spec := &m.k.Nodes[i]
	if m.try(func() bool { return m.present(i, v, r, next) }) {
		return true
	}
	if spec.When == always {
		return false
	}
	return m.try(func() bool { return m.operand(spec.In[0], v, r, next) })
}

// present matches node i as a node of the graph writing v.
func (m *matcher) present(i int, v, r string, next func() bool) bool {
	spec := &m.k.Nodes[i]
	p := m.g.Producer(v)
	if p == nil || p.GetOpType() != spec.Op || !graph.IsStandardOp(p) || len(p.Output) == 0 || p.Output[0] != v {
		return m.fail("%s reads %q, which is not the output of a %s (%s)", m.label(r), v, spec.Op, spec.Name)
	}
	if len(p.Output) > 1 && !spec.SpareOutputs {
		return m.fail("node %s has %d outputs", nodeDisplayName(p), len(p.Output))
	}
	if slices.Contains(m.nodes, p) {
		return m.fail("node %s would play two parts in the branch", nodeDisplayName(p))
	}
	need := 0
	for _, op := range spec.In {
		if op.Kind != fromParam || !m.k.param(op.Ref).Optional {
			need++
		}
	}
	if len(p.Input) < need || (len(p.Input) > len(spec.In) && !spec.MoreInputs) {
		return m.fail("%s %s has %d inputs", spec.Op, nodeDisplayName(p), len(p.Input))
	}
	for _, a := range spec.Attrs {
		if !sameAttr(graph.Attr(p, a.GetName()), a) {
			return m.fail("%s %s does not have %s %v", spec.Op, nodeDisplayName(p), a.GetName(), attrText(a))
		}
	}
	if r != "" {
		m.readers = append(m.readers, reader{v, m.nodeByRole(r)})
	}
	m.roles, m.nodes = append(m.roles, spec.Name), append(m.nodes, p)
	ins := p.Input
	if len(ins) > len(spec.In) {
		ins = ins[:len(spec.In)]
	}
	if m.try(func() bool { return m.operands(spec, ins, 0, next) }) {
		return true
	}
	if spec.Commutes && len(ins) == 2 && ins[0] != ins[1] {
		return m.operands(spec, []string{ins[1], ins[0]}, 0, next)
	}
	return false
}

func (m *matcher) nodeByRole(role string) *onnxpb.NodeProto {
	return m.nodes[slices.Index(m.roles, role)]
}

func (m *matcher) label(role string) string {
	if role == "" {
		return "the branch"
	}
	return role
}

// operands matches the inputs of spec from the j-th on, then runs next.
func (m *matcher) operands(spec *branchNode, ins []string, j int, next func() bool) bool {
	if j == len(spec.In) {
		return next()
	}
	if j >= len(ins) { // a missing optional param
		return m.operands(spec, ins, j+1, next)
	}
	return m.operand(spec.In[j], ins[j], spec.Name, func() bool { return m.operands(spec, ins, j+1, next) })
}

// operand matches one operand against value v, read by branch node r.
func (m *matcher) operand(op operand, v, r string, next func() bool) bool {
	switch op.Kind {
	case fromNode:
		return m.node(m.k.nodeIndex(op.Ref), v, r, next)
	case layerInput:
		m.xReads = append(m.xReads, v)
		return next()
	case layerOutput:
		p := m.g.Producer(v)
		if inner := stackedBase(m.g, p, v, m.stacked); inner != nil && slices.Contains(m.k.BaseOps, inner.GetOpType()) {
			p = inner // inject --stack: the layer's output passes another branch first
		} else if p == nil || !slices.Contains(m.k.BaseOps, p.GetOpType()) || !isBaseNode(p) || len(p.Output) == 0 || p.Output[0] != v {
			return m.fail("%s reads %q, which is not the output of a %s", m.label(r), v, strings.Join(m.k.BaseOps, " or "))
		}
		if m.base != nil && m.base != p {
			return m.fail("the branch reads two layers' outputs")
		}
		m.base, m.baseOutput = p, v
		if r != "" {
			m.readers = append(m.readers, reader{v, m.nodeByRole(r)})
		}
		return next()
	}
	p := m.k.param(op.Ref)
	if have, ok := m.param(p.Name); ok && have != v {
		return m.fail("%s is read as both %q and %q", p.Label, have, v)
	}
	if !paramFits(m.g, p, v) {
		return m.fail("%s reads %q, which is not %s (%s)", m.label(r), v, p.Class, p.Label)
	}
	m.params = append(m.params, binding{p.Name, v})
	return next()
}

// paramTensor returns the constant behind a param's value when the param's
// class asks for one, or nil.
func paramTensor(g *graph.Graph, p *branchParam, v string) *onnxpb.TensorProto {
	switch p.Class {
	case paramMatrix:
		return constant2D(g, v)
	case paramScalar:
		return scalarConstant(g, v)
	case paramKernel:
		return constantKernel(g, v)
	}
	return nil
}

// paramFits reports whether value v is of p's class.
func paramFits(g *graph.Graph, p *branchParam, v string) bool {
	switch p.Class {
	case paramAny:
		return true
	case paramInput:
		if t, _, _ := g.ConstantTensor(v); t != nil {
			return false // an initializer listed as an input before IR 4
		}
		for s := g; s != nil; s = s.Parent {
			if s.IsGraphInput(v) {
				return true
			}
			if s.DefinesLocally(v) {
				return false
			}
		}
		return false
	}
	return paramTensor(g, p, v) != nil
}

// final checks a structural match against the layer and records it.
func (m *matcher) final() bool {
	g, base := m.g, m.base
	if m.nodeByRole(m.k.root().Name) != m.root {
		return m.fail("another node writes %q too", m.root.Output[0])
	}
	if base == nil {
		return m.fail("the branch does not read a layer's output")
	}
	for _, x := range m.xReads {
		if len(base.Input) == 0 || x != base.Input[0] {
			return m.fail("the adapter path does not read the base layer's input")
		}
	}
	for i := range m.k.Nodes {
		spec := &m.k.Nodes[i]
		if want, decided := spec.When.decided(base); decided && want != slices.Contains(m.roles, spec.Name) {
			return m.fail("the adapter path's %s does not match %s", spec.Op, spec.When)
		}
	}
	l, why := layerOf(g, base)
	if l == nil {
		return m.fail("the base node is not an adaptable layer: %s", why)
	}
	bm := &branchMatch{
		Kind: m.k, Graph: g, Base: base, Layer: l, Output: m.nodeByRole(m.k.root().Name).Output[0], BaseOutput: m.baseOutput,
		Params: map[string]string{}, Tensors: map[string]*onnxpb.TensorProto{}, Dims: map[string]int64{"in": l.In, "out": l.Out},
	}
	for _, b := range m.params {
		bm.Params[b.name] = b.value
		if t := paramTensor(g, m.k.param(b.name), b.value); t != nil {
			bm.Tensors[b.name] = t
		}
		if b.value == l.Weight.Name && !m.k.param(b.name).LayerValue {
			return m.fail("the base weight is one of the adapter's factors")
		}
	}
	if !m.fitDims(bm) {
		var shapes []string
		for _, p := range m.k.Params {
			if t := bm.Tensors[p.Name]; t != nil && len(p.Dims) > 0 {
				shapes = append(shapes, fmt.Sprintf("%s %v", p.Label, t.Dims))
			}
		}
		return m.fail("%s do not fit a [%d, %d] layer", strings.Join(shapes, " and "), l.In, l.Out)
	}
	// Every value between branch nodes must feed only the next one, or
	// removing the branch would break another reader.
	for _, rd := range m.readers {
		cs := g.Consumers(rd.value)
		if g.IsGraphOutput(rd.value) || len(cs) != 1 || cs[0] != rd.node {
			return m.fail("value %q has readers outside the adapter branch", rd.value)
		}
	}
	for i, n := range m.nodes {
		if spec := &m.k.Nodes[m.k.nodeIndex(m.roles[i])]; spec.SpareOutputs {
			for _, extra := range n.Output[1:] {
				if extra != "" && (len(g.Consumers(extra)) > 0 || g.IsGraphOutput(extra)) {
					return m.fail("the %s's output %q is used", spec.Op, extra)
				}
			}
		}
	}
	// Matching went from the root backwards; the description runs forwards.
	for _, spec := range m.k.Nodes {
		if i := slices.Index(m.roles, spec.Name); i >= 0 {
			bm.Nodes, bm.Roles = append(bm.Nodes, m.nodes[i]), append(bm.Roles, spec.Name)
		}
	}
	m.found = bm
	return true
}

// fitDims binds the params' shape symbols, reporting whether they agree
// with the layer and each other, and every size is positive.
func (m *matcher) fitDims(bm *branchMatch) bool {
	for _, p := range m.k.Params {
		t := bm.Tensors[p.Name]
		if len(p.Dims) == 0 || t == nil {
			continue
		}
		if len(t.Dims) != len(p.Dims) && (p.Class != paramKernel || len(t.Dims) < len(p.Dims)) {
			return false
		}
		for j, sym := range p.Dims {
			if have, ok := bm.Dims[sym]; ok && have != t.Dims[j] {
				return false
			}
			if t.Dims[j] <= 0 {
				return false
			}
			bm.Dims[sym] = t.Dims[j]
		}
	}
	return true
}

// sameAttr reports whether a node's attribute has the value want requires.
func sameAttr(have, want *onnxpb.AttributeProto) bool {
	if have == nil {
		return false
	}
	switch want.GetType() {
	case onnxpb.AttributeProto_INTS:
		return slices.Equal(have.Ints, want.Ints)
	case onnxpb.AttributeProto_INT:
		return have.GetI() == want.GetI()
	case onnxpb.AttributeProto_FLOAT:
		return have.GetF() == want.GetF()
	case onnxpb.AttributeProto_STRING:
		return string(have.S) == string(want.S)
	}
	return false
}

func attrText(a *onnxpb.AttributeProto) any {
	switch a.GetType() {
	case onnxpb.AttributeProto_INTS:
		return a.Ints
	case onnxpb.AttributeProto_INT:
		return a.GetI()
	case onnxpb.AttributeProto_FLOAT:
		return a.GetF()
	}
	return string(a.S)
}

// maxStacked is how many adapters one layer may have (inject --stack):
// recognition looks under a branch's root for another branch only this
// deep, so residual chains of Adds cost a bounded number of tries.
const maxStacked = 2

// stackedBase returns the layer node under p when p is the root of another
// branch (inject --stack puts a second branch on the first one's output),
// else nil. depth counts the branches already stacked above p.
func stackedBase(g *graph.Graph, p *onnxpb.NodeProto, v string, depth int) *onnxpb.NodeProto {
	if depth+1 >= maxStacked || p == nil || p.GetOpType() != "Add" || len(p.Output) != 1 || p.Output[0] != v {
		return nil
	}
	b, _ := recognizeAtDepth(g, p, depth+1)
	if b == nil {
		return nil
	}
	return b.Base
}
