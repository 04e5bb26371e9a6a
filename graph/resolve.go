package graph

import (
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Weight is a constant tensor that reaches a node input, possibly through a
// chain of Identity, Transpose and Cast nodes (as exporters write tied or
// transposed weights).
type Weight struct {
	// Name is the name of the constant value: an initializer's name or a
	// Constant node's output.
	Name string
	// Tensor holds the data, in the orientation it is stored in.
	Tensor *onnxpb.TensorProto
	// Constant is the Constant node producing the value, or nil for an
	// initializer.
	Constant *onnxpb.NodeProto
	// Scope is the graph that defines the constant (an enclosing graph for a
	// weight captured by a subgraph).
	Scope *Graph
	// Chain lists the Identity/Transpose/Cast nodes from the constant to the
	// consumer, constant side first. Each node may live in any scope from
	// Scope down to the consumer's graph.
	Chain []*onnxpb.NodeProto
	// Transposed is true when the chain swaps the two axes of a 2-D weight
	// an odd number of times.
	Transposed bool
	// CastTo is the element type a Cast in the chain converts to, or
	// Undefined when there is no Cast.
	CastTo DataType
}

// DataType returns the stored weight's element type.
func (w *Weight) DataType() DataType { return DataType(w.Tensor.GetDataType()) }

// Dims returns the weight's shape as the consumer sees it (after the chain's
// transposes).
func (w *Weight) Dims() []int64 {
	d := append([]int64(nil), w.Tensor.Dims...)
	if w.Transposed && len(d) == 2 {
		d[0], d[1] = d[1], d[0]
	}
	return d
}

// ResolveWeight follows value back through Identity, Transpose and Cast nodes
// to a constant. It returns nil when the value is computed from anything
// else (an activation, a graph input, an initializer that is also an input,
// a transpose that is not a plain 2-D swap).
func (g *Graph) ResolveWeight(value string) *Weight {
	var chain []*onnxpb.NodeProto
	transposed, anyTranspose := false, false
	castTo := Undefined
	name := value
	seen := map[*onnxpb.NodeProto]bool{}
	for scope := g; ; {
		if t, c, s := scope.ConstantTensor(name); t != nil {
			if anyTranspose && len(t.Dims) != 2 {
				return nil // not a plain 2-D swap
			}
			for i, j := 0, len(chain)-1; i < j; i, j = i+1, j-1 {
				chain[i], chain[j] = chain[j], chain[i]
			}
			return &Weight{Name: name, Tensor: t, Constant: c, Scope: s, Chain: chain, Transposed: transposed, CastTo: castTo}
		}
		n, s := scope.producerInScope(name)
		if n == nil || !isDefaultDomain(n.GetDomain()) || len(n.Input) == 0 || seen[n] {
			return nil // not a constant, or a cycle in a malformed graph
		}
		seen[n] = true
		switch n.GetOpType() {
		case "Identity":
		case "Cast":
			if castTo == Undefined {
				castTo = DataType(AttrInt(n, "to", 0))
			}
		case "Transpose":
			perm := AttrInts(n, "perm")
			if len(perm) != 0 && !(len(perm) == 2 && perm[0] == 1 && perm[1] == 0) {
				return nil
			}
			transposed = !transposed
			anyTranspose = true
		default:
			return nil
		}
		chain = append(chain, n)
		name = n.Input[0]
		scope = s
	}
}

// producerInScope finds the node producing name in g or an enclosing graph.
func (g *Graph) producerInScope(name string) (*onnxpb.NodeProto, *Graph) {
	for s := g; s != nil; s = s.Parent {
		if n, ok := s.producer[name]; ok {
			return n, s
		}
		if s.DefinesLocally(name) {
			return nil, nil
		}
	}
	return nil, nil
}

// IsShared reports whether the weight also feeds other consumers than the
// given node: the constant itself or any value along its chain has another
// reader. Changing a shared weight in place would change those readers too.
func (g *Graph) IsShared(w *Weight, consumer *onnxpb.NodeProto) bool {
	values := []string{w.Name}
	for _, n := range w.Chain {
		values = append(values, n.Output[0])
	}
	for i, v := range values {
		next := consumer
		if i+1 < len(values) {
			next = w.Chain[i]
		}
		readers := 0
		w.Scope.Walk(func(s *Graph) {
			for _, c := range s.consumers[v] {
				if c != next && !ownsGraphWith(s, c, next) {
					readers++
				}
			}
			if s.IsGraphOutput(v) {
				readers++
			}
		})
		if readers > 0 {
			return true
		}
	}
	return false
}

// ownsGraphWith reports whether node c of graph s holds (at any depth) the
// subgraph in which node target lives: c then counts as a consumer only on
// target's behalf.
func ownsGraphWith(s *Graph, c, target *onnxpb.NodeProto) bool {
	found := false
	for _, sg := range s.Subgraphs {
		if sg.Owner != c {
			continue
		}
		sg.Walk(func(inner *Graph) {
			if inner.hasNode(target) {
				found = true
			}
		})
	}
	return found
}
