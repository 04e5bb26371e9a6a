package autodiff

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// errNeedsOpset13 is returned by the backward when a gradient needs a
// reduction over axes known only at run time, which ReduceSum takes as an
// input from opset 13 on.
var errNeedsOpset13 = errors.New("needs opset 13")

// upgradeToOpset13 rewrites a model of opset 9..12 into opset 13 form, so
// the backward can use run-time reduction axes. It changes the form of the
// ops whose signature changed by 13, not what any of them computes:
//   - Squeeze, Unsqueeze, ReduceSum, Split: axes/split attributes become
//     int64 constant inputs;
//   - Softmax, LogSoftmax, Hardmax: before 13 they normalise the input
//     flattened to 2-D at axis; that is written out as Flatten, the op on
//     axis 1 and a Reshape back (or just the axis, when it is the last);
//   - Dropout's ratio attribute, Clip's min/max, Slice's and Pad's and
//     TopK's attributes become inputs.
//
// Ops whose semantics changed in ways this does not rewrite (Upsample,
// Resize before 11, Scatter) are refused.
func upgradeToOpset13(m *graph.Model) error {
	from := m.Opset()
	if from >= 13 {
		return nil
	}
	if from < 9 {
		return fmt.Errorf("the model's opset %d is too old to raise to 13 (9 or later can be)", from)
	}
	var err error
	walkGraphs(m.Proto.GetGraph(), func(gp *onnxpb.GraphProto) {
		if err == nil {
			err = upgradeGraph(gp, from)
		}
	})
	if err != nil {
		return err
	}
	for _, op := range m.Proto.OpsetImport {
		if op.GetDomain() == "" || op.GetDomain() == "ai.onnx" {
			op.Version = proto.Int64(13)
		}
	}
	return nil
}

func walkGraphs(g *onnxpb.GraphProto, fn func(*onnxpb.GraphProto)) {
	if g == nil {
		return
	}
	fn(g)
	for _, n := range g.Node {
		for _, a := range n.Attribute {
			walkGraphs(a.G, fn)
			for _, sg := range a.Graphs {
				walkGraphs(sg, fn)
			}
		}
	}
}

func upgradeGraph(gp *onnxpb.GraphProto, from int64) error {
	gr := graph.NewGraph(gp)
	ti := newTypeInfo(gr)
	e := newEmitter(gr, ti, 13)
	e.scope = "/opset13"
	var out []*onnxpb.NodeProto
	// New nodes are appended by the emitter; collect them per node so the
	// graph stays in order.
	for _, n := range append([]*onnxpb.NodeProto(nil), gp.Node...) {
		before := len(gp.Node)
		var pre, post []*onnxpb.NodeProto
		if graph.IsStandardOp(n) {
			if err := upgradeNode(e, n, from); err != nil {
				return fmt.Errorf("raising node %q (%s) to opset 13: %w", n.GetName(), n.GetOpType(), err)
			}
			// Nodes the upgrade made read the node's inputs (pre) or its
			// output (post, marked by reading a name the node writes).
			for _, nn := range gp.Node[before:] {
				if readsAny(nn, n.Output) {
					post = append(post, nn)
				} else {
					pre = append(pre, nn)
				}
			}
		}
		out = append(out, pre...)
		out = append(out, n)
		out = append(out, post...)
	}
	gp.Node = out
	return nil
}

func readsAny(n *onnxpb.NodeProto, names []string) bool {
	for _, in := range n.Input {
		for _, x := range names {
			if in != "" && in == x {
				return true
			}
		}
	}
	return false
}

func removeAttr(n *onnxpb.NodeProto, name string) *onnxpb.AttributeProto {
	for i, a := range n.Attribute {
		if a.GetName() == name {
			n.Attribute = append(n.Attribute[:i], n.Attribute[i+1:]...)
			return a
		}
	}
	return nil
}

func setInputs(n *onnxpb.NodeProto, at int, values ...string) {
	for len(n.Input) < at {
		n.Input = append(n.Input, "")
	}
	n.Input = append(n.Input[:at], values...)
	for len(n.Input) > 0 && n.Input[len(n.Input)-1] == "" {
		n.Input = n.Input[:len(n.Input)-1]
	}
}

func upgradeNode(e *emitter, n *onnxpb.NodeProto, from int64) error {
	switch n.GetOpType() {
	case "Squeeze", "Unsqueeze", "ReduceSum":
		if a := removeAttr(n, "axes"); a != nil {
			setInputs(n, 1, e.ints(a.Ints...))
		}
	case "Split":
		if a := removeAttr(n, "split"); a != nil {
			setInputs(n, 1, e.ints(a.Ints...))
		}
	case "Softmax", "LogSoftmax", "Hardmax":
		axis := graph.AttrInt(n, "axis", 1)
		removeAttr(n, "axis")
		r := e.ti.rank(n.Input[0])
		if axis == -1 || (r >= 0 && axis == int64(r-1)) {
			n.Attribute = append(n.Attribute, intAttr("axis", -1))
			return nil
		}
		// Flatten to 2-D at axis, normalise rows, reshape back.
		x, y := n.Input[0], n.Output[0]
		flat := e.op("Flatten", []string{x}, intAttr("axis", axis))
		shape := e.shape(x)
		mid := e.g.UniqueName(y + "_2d")
		n.Input[0], n.Output[0] = flat, mid
		n.Attribute = append(n.Attribute, intAttr("axis", 1))
		e.nodeOut("Reshape", []string{mid, shape}, y)
	case "Dropout":
		if a := removeAttr(n, "ratio"); a != nil && from < 12 {
			setInputs(n, 1, e.scalar(graph.Float, float64(a.GetF())))
		}
		removeAttr(n, "is_test")
	case "Clip":
		if from < 11 {
			lo, hi := removeAttr(n, "min"), removeAttr(n, "max")
			dt := e.ti.elem[n.Input[0]]
			ins := []string{"", ""}
			if lo != nil {
				ins[0] = e.scalar(dt, float64(lo.GetF()))
			}
			if hi != nil {
				ins[1] = e.scalar(dt, float64(hi.GetF()))
			}
			setInputs(n, 1, ins...)
		}
	case "Slice":
		if from < 10 {
			starts, ends, axes := removeAttr(n, "starts"), removeAttr(n, "ends"), removeAttr(n, "axes")
			ins := []string{e.ints(starts.GetInts()...), e.ints(ends.GetInts()...)}
			if axes != nil {
				ins = append(ins, e.ints(axes.Ints...))
			}
			setInputs(n, 1, ins...)
		}
	case "Pad":
		if from < 11 {
			pads, value := removeAttr(n, "pads"), removeAttr(n, "value")
			ins := []string{e.ints(pads.GetInts()...)}
			if value != nil {
				ins = append(ins, e.scalar(e.ti.elem[n.Input[0]], float64(value.GetF())))
			}
			setInputs(n, 1, ins...)
		}
	case "TopK":
		if from < 10 {
			k := removeAttr(n, "k")
			setInputs(n, 1, e.ints(k.GetI()))
		}
	case "Upsample", "Scatter":
		return errors.New("deprecated op; re-export the model at opset 13 or later")
	case "Resize":
		if from < 11 {
			return errors.New("Resize before opset 11 differs from later versions; re-export the model at opset 13 or later")
		}
	}
	return nil
}

// nodeOut adds a node writing the given output name.
func (e *emitter) nodeOut(op string, inputs []string, out string, attrs ...*onnxpb.AttributeProto) {
	n := &onnxpb.NodeProto{Name: proto.String(e.g.UniqueName(e.scope + "/" + op)), OpType: proto.String(op),
		Input: inputs, Output: []string{out}, Attribute: attrs}
	e.g.AddNode(n)
}
