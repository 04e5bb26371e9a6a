package rewrite

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// branchBuilder is what build needs besides the description: where the
// branch goes and the values only the caller knows.
type branchBuilder struct {
	G    *graph.Graph
	Base *onnxpb.NodeProto // the layer node
	// Prefix goes before every node name ("<scope>/lora/").
	Prefix string
	// Has decides the presences the layer node does not (whenDropout).
	Has func(presence) bool
	// Param makes a param's value (adding its initializer) and returns its
	// name. A node may take a param as an attribute instead (a Dropout's
	// ratio before opset 12): Param then returns "" and the attribute.
	// Seed is the reading node's first input, for naming.
	Param func(p *branchParam, seed string) (string, *onnxpb.AttributeProto, error)
}

// builtBranch is a branch build made, not yet in the graph.
type builtBranch struct {
	Nodes []*onnxpb.NodeProto // from the input side, the root last
	Specs []int               // the description's index of each node
	// Params are the params' values, "" for one written as an attribute.
	Params map[string]string
	// Output is the root's output: the layer's output name, which the
	// caller moves off the layer node to BaseOutput.
	Output, BaseOutput string
}

// present reports whether a node with presence p is part of the branch
// beside base, asking has for what base does not decide.
func (p presence) present(base *onnxpb.NodeProto, has func(presence) bool) bool {
	if on, decided := p.decided(base); decided {
		return on
	}
	return has != nil && has(p)
}

// decided reports whether the layer node alone decides the presence, and
// how.
func (p presence) decided(base *onnxpb.NodeProto) (present, decided bool) {
	switch p {
	case always:
		return true, true
	case whenTransA:
		return base.GetOpType() == "Gemm" && graph.AttrInt(base, "transA", 0) != 0, true
	case whenTransB:
		return base.GetOpType() == "Gemm" && graph.AttrInt(base, "transB", 0) != 0, true
	}
	return false, false
}

func (p presence) String() string {
	switch p {
	case whenTransA:
		return "the Gemm's transA"
	case whenTransB:
		return "the Gemm's transB"
	case whenDropout:
		return "the dropout setting"
	}
	return "always"
}

// build makes the nodes of a branch of kind k beside bb.Base, with fresh
// names: node <Prefix><Name>, output <node name>_output_0, and the root
// writing the layer's output while the layer's own output becomes
// <Prefix>base_output_0. Required params are made first, in order.
func (k *branchKind) build(bb branchBuilder) (*builtBranch, error) {
	g := bb.G
	out := &builtBranch{Params: map[string]string{}, Output: bb.Base.Output[0]}
	for i := range k.Params {
		p := &k.Params[i]
		if p.Optional {
			continue
		}
		v, attr, err := bb.Param(p, "")
		if err != nil {
			return nil, err
		}
		if attr != nil {
			return nil, fmt.Errorf("param %s cannot be an attribute", p.Name)
		}
		out.Params[p.Name] = v
	}
	values := map[string]string{} // node Name -> its output (or pass-through)
	resolve := func(op operand) string {
		switch op.Kind {
		case fromNode:
			return values[op.Ref]
		case layerInput:
			return bb.Base.Input[0]
		case layerOutput:
			if out.BaseOutput == "" {
				out.BaseOutput = g.UniqueName(bb.Prefix + "base_output_0")
			}
			return out.BaseOutput
		}
		return out.Params[op.Ref]
	}
	for i := range k.Nodes {
		spec := &k.Nodes[i]
		if !spec.When.present(bb.Base, bb.Has) {
			values[spec.Name] = resolve(spec.In[0])
			continue
		}
		var inputs []string
		var attrs []*onnxpb.AttributeProto
		for _, a := range spec.Attrs {
			attrs = append(attrs, proto.Clone(a).(*onnxpb.AttributeProto))
		}
		for _, name := range spec.BaseAttrs {
			if a := graph.Attr(bb.Base, name); a != nil {
				attrs = append(attrs, proto.Clone(a).(*onnxpb.AttributeProto))
			}
		}
		for _, op := range spec.In {
			if op.Kind == fromParam {
				if _, made := out.Params[op.Ref]; !made {
					seed := ""
					if len(inputs) > 0 {
						seed = inputs[0]
					}
					v, attr, err := bb.Param(k.param(op.Ref), seed)
					if err != nil {
						return nil, err
					}
					out.Params[op.Ref] = v
					if attr != nil {
						attrs = append(attrs, attr)
					}
				}
				if out.Params[op.Ref] == "" {
					continue // an attribute, or a missing optional input
				}
			}
			inputs = append(inputs, resolve(op))
		}
		name := g.UniqueName(bb.Prefix + spec.Name)
		o := out.Output
		if i < len(k.Nodes)-1 {
			o = g.UniqueName(name + "_output_0")
		}
		values[spec.Name] = o
		out.Specs = append(out.Specs, i)
		node := &onnxpb.NodeProto{
			Name: proto.String(name), OpType: proto.String(spec.Op),
			Input: inputs, Output: []string{o}, Attribute: attrs,
		}
		if spec.Doc != "" {
			node.DocString = proto.String(spec.Doc)
		}
		out.Nodes = append(out.Nodes, node)
	}
	return out, nil
}

// describe adds value_info for a built branch's values when the layer's
// input and output types are known, following each node's shape rule, so
// Netron shows shapes on the new edges and shape inference has less to do.
// dims gives the symbols' sizes ("r"); every value gets element type dt.
func (k *branchKind) describe(g *graph.Graph, bb *builtBranch, x string, dims map[string]int64, dt graph.DataType) {
	yType := tensorType(g, bb.Output)
	types := map[string]*onnxpb.TypeProto_Tensor{x: tensorType(g, x)}
	add := func(name string, t *onnxpb.TypeProto_Tensor) {
		if t == nil {
			return
		}
		t = proto.Clone(t).(*onnxpb.TypeProto_Tensor)
		t.ElemType = proto.Int32(int32(dt))
		g.Proto.ValueInfo = append(g.Proto.ValueInfo, &onnxpb.ValueInfoProto{
			Name: proto.String(name), Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: t}},
		})
	}
	for j, n := range bb.Nodes {
		spec := &k.Nodes[bb.Specs[j]]
		var in *onnxpb.TypeProto_Tensor
		if len(n.Input) > 0 {
			in = types[n.Input[0]]
		}
		var t *onnxpb.TypeProto_Tensor
		switch spec.Shape {
		case shapeNone:
			continue
		case shapeSame:
			t = in
		case shapeSwapped:
			if in != nil && in.Shape != nil && len(in.Shape.Dim) == 2 {
				t = proto.Clone(in).(*onnxpb.TypeProto_Tensor)
				d := t.Shape.Dim
				d[0], d[1] = d[1], d[0]
			}
		case shapeLastRank:
			t = withLastDim(in, dims["r"])
		case shapeLayerOut:
			t = yType
		}
		types[n.Output[0]] = t
		add(n.Output[0], t)
	}
	add(bb.BaseOutput, yType)
}
