package graph

import (
	"fmt"
	"slices"
	"strconv"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Graph indexes a GraphProto: who produces and who consumes each value, the
// initializers and Constant nodes by name, and the subgraphs in node
// attributes. Nested graphs see the names of the graphs around them, as ONNX
// scoping rules say.
//
// The index is a snapshot: after editing Proto directly, call Reindex on the
// outermost graph. The edit methods on Graph keep the index up to date.
type Graph struct {
	Proto *onnxpb.GraphProto
	// Parent is the graph whose node holds this one, or nil at the top.
	Parent *Graph
	// Owner is the node whose attribute holds this graph, or nil at the top.
	Owner *onnxpb.NodeProto
	// Subgraphs are the graphs held in this graph's node attributes.
	Subgraphs []*Graph

	producer     map[string]*onnxpb.NodeProto
	consumers    map[string][]*onnxpb.NodeProto
	initializers map[string]*onnxpb.TensorProto
	sparse       map[string]bool // names of sparse initializers
	inputs       map[string]*onnxpb.ValueInfoProto
	outputs      map[string]*onnxpb.ValueInfoProto
	names        *nameSet // shared by a whole tree of graphs
	// positions finds a node's index in Proto.Node without a scan: each
	// node's index when recorded, corrected by the shifts logged since.
	positions map[*onnxpb.NodeProto]nodePos
	shifts    []shift
	rescans   int // lookups the shift log could not answer (tests read it)
	// legacyInputs is set for IR versions before 4, which list every
	// initializer as a graph input too: those are constants, not inputs.
	legacyInputs bool
}

// nameSet records every value and node name used anywhere in a model, so new
// names are unique across all scopes.
type nameSet struct {
	used map[string]bool
}

// NewGraph indexes g and, recursively, its subgraphs.
func NewGraph(g *onnxpb.GraphProto) *Graph {
	gr := &Graph{Proto: g}
	gr.Reindex()
	return gr
}

// Graph returns the index of the model's main graph.
func (m *Model) Graph() *Graph {
	gr := &Graph{Proto: m.Proto.Graph, legacyInputs: m.Proto.GetIrVersion() < 4}
	gr.Reindex()
	return gr
}

// Reindex rebuilds the index of this graph and everything below it after
// direct edits to the protobuf.
// Names once seen stay reserved, so UniqueName never hands out a name that
// an older index of the same model still knows.
func (g *Graph) Reindex() {
	if g.names == nil {
		g.names = &nameSet{used: map[string]bool{}}
	}
	g.index(g.names)
}

func (g *Graph) index(names *nameSet) {
	g.names = names
	g.producer = map[string]*onnxpb.NodeProto{}
	g.consumers = map[string][]*onnxpb.NodeProto{}
	g.initializers = map[string]*onnxpb.TensorProto{}
	g.sparse = map[string]bool{}
	g.inputs = map[string]*onnxpb.ValueInfoProto{}
	g.outputs = map[string]*onnxpb.ValueInfoProto{}
	g.Subgraphs = nil
	g.renumber()
	p := g.Proto
	for _, t := range p.Initializer {
		g.initializers[t.GetName()] = t
		names.used[t.GetName()] = true
	}
	for _, st := range p.SparseInitializer {
		if st.Values != nil {
			g.sparse[st.Values.GetName()] = true
			names.used[st.Values.GetName()] = true
		}
	}
	for _, vi := range p.Input {
		g.inputs[vi.GetName()] = vi
		names.used[vi.GetName()] = true
	}
	for _, vi := range p.Output {
		g.outputs[vi.GetName()] = vi
	}
	for _, n := range p.Node {
		g.indexNode(n)
	}
}

func appendOnce(nodes []*onnxpb.NodeProto, n *onnxpb.NodeProto) []*onnxpb.NodeProto {
	for _, have := range nodes {
		if have == n {
			return nodes
		}
	}
	return append(nodes, n)
}

// outerReads returns the names this graph (and its subgraphs) read without
// defining them: values captured from enclosing scopes.
func (g *Graph) outerReads() map[string]bool {
	reads := map[string]bool{}
	for name, nodes := range g.consumers {
		if len(nodes) > 0 && !g.DefinesLocally(name) {
			reads[name] = true
		}
	}
	// A subgraph may also return an outer value as one of its outputs.
	for name := range g.outputs {
		if name != "" && !g.DefinesLocally(name) {
			reads[name] = true
		}
	}
	return reads
}

// DefinesLocally reports whether this graph itself defines name (an
// initializer, sparse initializer, input or node output) rather than
// reading it from an enclosing graph.
func (g *Graph) DefinesLocally(name string) bool {
	_, isInit := g.initializers[name]
	_, isInput := g.inputs[name]
	_, isProduced := g.producer[name]
	return isInit || isInput || isProduced || g.sparse[name]
}

// Walk calls fn for g and every graph nested in it, outermost first.
func (g *Graph) Walk(fn func(*Graph)) {
	fn(g)
	for _, sg := range g.Subgraphs {
		sg.Walk(fn)
	}
}

// Producer returns the node in this graph that outputs name, or nil.
func (g *Graph) Producer(name string) *onnxpb.NodeProto { return g.producer[name] }

// Consumers returns the nodes in this graph that read name, directly or
// through a subgraph they hold.
func (g *Graph) Consumers(name string) []*onnxpb.NodeProto { return g.consumers[name] }

// Initializer returns the initializer called name, looking in enclosing
// graphs too, and the graph that holds it.
func (g *Graph) Initializer(name string) (*onnxpb.TensorProto, *Graph) {
	for s := g; s != nil; s = s.Parent {
		if _, shadowed := s.producer[name]; shadowed {
			return nil, nil
		}
		if t, ok := s.initializers[name]; ok {
			return t, s
		}
		if _, isInput := s.inputs[name]; isInput && s.Parent != nil {
			return nil, nil // a subgraph input shadows outer names
		}
	}
	return nil, nil
}

// IsGraphInput reports whether name is an input of this graph.
func (g *Graph) IsGraphInput(name string) bool { _, ok := g.inputs[name]; return ok }

// IsGraphOutput reports whether name is an output of this graph.
func (g *Graph) IsGraphOutput(name string) bool { _, ok := g.outputs[name]; return ok }

// IsOverridableInitializer reports whether name is an initializer that is
// also a graph input, so a caller may feed another value at run time: it is
// not a constant.
func (g *Graph) IsOverridableInitializer(name string) bool {
	_, isInit := g.initializers[name]
	_, isInput := g.inputs[name]
	return isInit && isInput && !g.legacyInputs
}

// ConstantTensor returns the constant tensor behind name: an initializer
// (not overridable as a graph input) or the value of a Constant node, in this
// graph or an enclosing one. The node is the Constant node, if any.
func (g *Graph) ConstantTensor(name string) (*onnxpb.TensorProto, *onnxpb.NodeProto, *Graph) {
	for s := g; s != nil; s = s.Parent {
		if n, ok := s.producer[name]; ok {
			if n.GetOpType() == "Constant" && isDefaultDomain(n.GetDomain()) {
				if t := constantValue(n); t != nil {
					return t, n, s
				}
			}
			return nil, nil, nil
		}
		if t, ok := s.initializers[name]; ok {
			if s.IsOverridableInitializer(name) {
				return nil, nil, nil
			}
			return t, nil, s
		}
		if s.IsGraphInput(name) {
			return nil, nil, nil
		}
	}
	return nil, nil, nil
}

// IsUsed reports whether a value or node name is taken anywhere in the
// model this graph belongs to.
func (g *Graph) IsUsed(name string) bool { return g.names.used[name] }

// UniqueName returns base if no value or node anywhere in the model uses it,
// else base with the smallest suffix "_N" that is free, and reserves it.
func (g *Graph) UniqueName(base string) string {
	name := base
	for i := 1; g.names.used[name]; i++ {
		name = base + "_" + strconv.Itoa(i)
	}
	g.names.used[name] = true
	return name
}

// AddNode appends a node to the graph and indexes it. Call Toposort when the
// order matters.
func (g *Graph) AddNode(n *onnxpb.NodeProto) {
	g.positions[n] = nodePos{at: len(g.Proto.Node), epoch: len(g.shifts)}
	g.Proto.Node = append(g.Proto.Node, n)
	g.indexNode(n)
}

// InsertNodesAfter inserts nodes right after the node at, in order, so a
// sorted graph stays sorted when the new nodes only read values available
// at that point.
func (g *Graph) InsertNodesAfter(at *onnxpb.NodeProto, nodes ...*onnxpb.NodeProto) error {
	i := g.nodeIndex(at)
	if i < 0 {
		return fmt.Errorf("node %q is not in graph %q", at.GetName(), g.Proto.GetName())
	}
	g.Proto.Node = slices.Insert(g.Proto.Node, i+1, nodes...)
	g.logShift(i, len(nodes))
	for k, n := range nodes {
		g.positions[n] = nodePos{at: i + 1 + k, epoch: len(g.shifts)}
		g.indexNode(n)
	}
	return nil
}

// nodePos is where a node was when recorded: its index in Proto.Node
// after the first epoch entries of Graph.shifts.
type nodePos struct{ at, epoch int }

// shift records an edit of Proto.Node: every node then at an index above at
// moved by d (k for k nodes inserted after at, -1 for the node at removed).
type shift struct{ at, d int }

// renumber records every node's exact index and clears the shift log.
func (g *Graph) renumber() {
	g.positions = make(map[*onnxpb.NodeProto]nodePos, len(g.Proto.Node))
	for i, n := range g.Proto.Node {
		g.positions[n] = nodePos{at: i}
	}
	g.shifts = g.shifts[:0]
}

// logShift records an edit, renumbering instead once the log is long
// enough that replaying it costs about as much: a lookup then costs
// O(sqrt(nodes)) amortized instead of a scan of the node list.
func (g *Graph) logShift(at, d int) {
	if n := len(g.shifts) + 1; n*n > len(g.Proto.Node) && n > 16 {
		g.renumber()
		return
	}
	g.shifts = append(g.shifts, shift{at, d})
}

// nodeIndex returns n's index in Proto.Node, or -1 if n is not there.
func (g *Graph) nodeIndex(n *onnxpb.NodeProto) int {
	if np, ok := g.positions[n]; ok {
		i := np.at
		for _, s := range g.shifts[np.epoch:] {
			if i > s.at {
				i += s.d
			}
		}
		if i >= 0 && i < len(g.Proto.Node) && g.Proto.Node[i] == n {
			return i
		}
	} else if len(g.positions) == len(g.Proto.Node) {
		return -1
	}
	// Proto.Node was edited without going through the index (the doc asks
	// for Reindex then); one renumbering settles where n is.
	g.rescans++
	g.renumber()
	if np, ok := g.positions[n]; ok {
		return np.at
	}
	return -1
}

// hasNode reports whether n is one of this graph's own nodes.
func (g *Graph) hasNode(n *onnxpb.NodeProto) bool { return g.nodeIndex(n) >= 0 }

// indexNode adds a node of this graph to the index, with the subgraphs it
// holds.
func (g *Graph) indexNode(n *onnxpb.NodeProto) {
	if n.GetName() != "" {
		g.names.used[n.GetName()] = true
	}
	for _, out := range n.Output {
		if out != "" {
			g.producer[out] = n
			g.names.used[out] = true
		}
	}
	for _, in := range n.Input {
		if in != "" {
			g.consumers[in] = appendOnce(g.consumers[in], n)
		}
	}
	for _, sub := range nodeSubgraphs(n) {
		sg := &Graph{Proto: sub, Parent: g, Owner: n, legacyInputs: g.legacyInputs}
		sg.index(g.names)
		g.Subgraphs = append(g.Subgraphs, sg)
		// A subgraph reading an outer value makes its owner node a
		// consumer of that value here.
		for name := range sg.outerReads() {
			g.consumers[name] = appendOnce(g.consumers[name], n)
		}
	}
}

// RemoveNode deletes a node from the graph. Values it produced lose their
// producer; their consumers are not changed.
func (g *Graph) RemoveNode(n *onnxpb.NodeProto) error {
	i := g.nodeIndex(n)
	if i < 0 {
		return fmt.Errorf("node %q is not in graph %q", n.GetName(), g.Proto.GetName())
	}
	reads := g.nodeReads(n)
	g.Proto.Node = slices.Delete(g.Proto.Node, i, i+1)
	delete(g.positions, n)
	g.logShift(i, -1)
	for _, out := range n.Output {
		if g.producer[out] == n {
			delete(g.producer, out)
		}
	}
	for _, in := range reads {
		g.consumers[in] = removeNode(g.consumers[in], n)
	}
	subs := g.Subgraphs[:0]
	for _, sg := range g.Subgraphs {
		if sg.Owner != n {
			subs = append(subs, sg)
		}
	}
	g.Subgraphs = subs
	return nil
}

func removeNode(nodes []*onnxpb.NodeProto, n *onnxpb.NodeProto) []*onnxpb.NodeProto {
	out := nodes[:0]
	for _, have := range nodes {
		if have != n {
			out = append(out, have)
		}
	}
	return out
}

// SetInput changes input i of node n to value, keeping the index current.
func (g *Graph) SetInput(n *onnxpb.NodeProto, i int, value string) {
	old := n.Input[i]
	n.Input[i] = value
	if !contains(g.nodeReads(n), old) {
		g.consumers[old] = removeNode(g.consumers[old], n)
	}
	if value != "" {
		g.consumers[value] = appendOnce(g.consumers[value], n)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// SetOutput renames output i of node n, keeping the index current. Readers
// of the old name are not changed.
func (g *Graph) SetOutput(n *onnxpb.NodeProto, i int, value string) {
	old := n.Output[i]
	if g.producer[old] == n {
		delete(g.producer, old)
	}
	n.Output[i] = value
	if value != "" {
		g.producer[value] = n
		g.names.used[value] = true
	}
}

// ReplaceUses makes every consumer of old in this graph read replacement
// instead, except the nodes listed in keep. Graph outputs named old are
// renamed too unless keepOutputs is set. Uses inside subgraphs are
// rewritten as well.
func (g *Graph) ReplaceUses(old, replacement string, keepOutputs bool, keep ...*onnxpb.NodeProto) {
	skip := map[*onnxpb.NodeProto]bool{}
	for _, n := range keep {
		skip[n] = true
	}
	for _, n := range append([]*onnxpb.NodeProto(nil), g.consumers[old]...) {
		if !skip[n] {
			g.renameReads(n, old, replacement)
		}
	}
	if !keepOutputs {
		for _, vi := range g.Proto.Output {
			if vi.GetName() == old {
				vi.Name = proto.String(replacement)
				delete(g.outputs, old)
				g.outputs[replacement] = vi
			}
		}
	}
}

// renameReads makes node n of this graph read replacement where it read old,
// in its inputs and in what its subgraphs capture.
func (g *Graph) renameReads(n *onnxpb.NodeProto, old, replacement string) {
	for i, in := range n.Input {
		if in == old {
			n.Input[i] = replacement
		}
	}
	for _, sg := range g.Subgraphs {
		if sg.Owner == n {
			sg.replaceCaptured(old, replacement)
		}
	}
	g.consumers[old] = removeNode(g.consumers[old], n)
	if replacement != "" {
		g.consumers[replacement] = appendOnce(g.consumers[replacement], n)
	}
}

// replaceCaptured renames a value captured from an outer scope.
func (g *Graph) replaceCaptured(old, replacement string) {
	if g.DefinesLocally(old) {
		return
	}
	for _, n := range append([]*onnxpb.NodeProto(nil), g.consumers[old]...) {
		g.renameReads(n, old, replacement)
	}
	for _, vi := range g.Proto.Output {
		if vi.GetName() == old {
			vi.Name = proto.String(replacement)
			delete(g.outputs, old)
			g.outputs[replacement] = vi
		}
	}
}

// AddInitializer adds a tensor to the graph's initializers.
func (g *Graph) AddInitializer(t *onnxpb.TensorProto) {
	g.Proto.Initializer = append(g.Proto.Initializer, t)
	g.initializers[t.GetName()] = t
	g.names.used[t.GetName()] = true
}

// RemoveInitializer deletes an initializer, and a graph input of the same
// name if there is one (older exporters list initializers as inputs).
func (g *Graph) RemoveInitializer(name string) bool {
	found := false
	inits := g.Proto.Initializer[:0]
	for _, t := range g.Proto.Initializer {
		if t.GetName() == name {
			found = true
			continue
		}
		inits = append(inits, t)
	}
	g.Proto.Initializer = inits
	delete(g.initializers, name)
	if _, ok := g.inputs[name]; ok {
		ins := g.Proto.Input[:0]
		for _, vi := range g.Proto.Input {
			if vi.GetName() != name {
				ins = append(ins, vi)
			}
		}
		g.Proto.Input = ins
		delete(g.inputs, name)
	}
	return found
}

// Cleanup removes nodes whose outputs nobody reads (not consumers, graph
// outputs, or subgraph captures) and initializers nobody reads, repeatedly,
// like onnx-graphsurgeon's cleanup. Graph inputs are kept.
func (g *Graph) Cleanup() {
	for changed := true; changed; {
		changed = false
		for _, n := range append([]*onnxpb.NodeProto(nil), g.Proto.Node...) {
			if g.isDead(n) {
				g.RemoveNode(n)
				changed = true
			}
		}
	}
	for _, t := range append([]*onnxpb.TensorProto(nil), g.Proto.Initializer...) {
		name := t.GetName()
		if len(g.consumers[name]) == 0 && !g.IsGraphOutput(name) && !g.IsGraphInput(name) {
			g.RemoveInitializer(name)
		}
	}
}

func (g *Graph) isDead(n *onnxpb.NodeProto) bool {
	for _, out := range n.Output {
		if out != "" && (len(g.consumers[out]) > 0 || g.IsGraphOutput(out)) {
			return false
		}
	}
	return len(n.Output) > 0
}
