package autodiff

import (
	"encoding/binary"
	"fmt"
	"math"
	"strconv"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// emitter writes new nodes and constants into the step graph. Every rule
// goes through it, so names, constants and opset-dependent op forms are
// decided in one place.
type emitter struct {
	g     *graph.Graph
	ti    *typeInfo
	opset int64
	scope string // node-name prefix for what is being emitted now

	consts map[string]string // constant key -> initializer name
	shapes map[string]string // value -> its Shape output
}

func newEmitter(g *graph.Graph, ti *typeInfo, opset int64) *emitter {
	return &emitter{g: g, ti: ti, opset: opset, consts: map[string]string{}, shapes: map[string]string{}}
}

// node adds one node and returns its outputs; nOut fresh output names are
// made from the scope.
func (e *emitter) node(op string, inputs []string, nOut int, attrs ...*onnxpb.AttributeProto) []string {
	return e.nodeIn("", op, inputs, nOut, attrs...)
}

func (e *emitter) nodeIn(domain, op string, inputs []string, nOut int, attrs ...*onnxpb.AttributeProto) []string {
	name := e.g.UniqueName(e.scope + "/" + op)
	outs := make([]string, nOut)
	for i := range outs {
		outs[i] = e.g.UniqueName(name + "_output_" + strconv.Itoa(i))
	}
	n := &onnxpb.NodeProto{Name: proto.String(name), OpType: proto.String(op), Input: inputs, Output: outs}
	if domain != "" {
		n.Domain = proto.String(domain)
	}
	for _, a := range attrs {
		if a != nil {
			n.Attribute = append(n.Attribute, a)
		}
	}
	e.g.AddNode(n)
	return outs
}

// op adds a one-output node and returns the output; its element type is
// recorded as dt when dt is given.
func (e *emitter) op(op string, inputs []string, attrs ...*onnxpb.AttributeProto) string {
	out := e.node(op, inputs, 1, attrs...)[0]
	n := e.g.Producer(out)
	e.ti.inferNode(n)
	return out
}

// rename gives v's producer output the name want (used for the `<p>_grad`
// and `loss` outputs), or adds an Identity when v is not a fresh value.
func (e *emitter) rename(v, want string) string {
	if n := e.g.Producer(v); n != nil && len(n.Output) == 1 && len(e.g.Consumers(v)) == 0 &&
		!e.g.IsGraphOutput(v) && !e.g.IsGraphInput(v) {
		if t, _ := e.g.Initializer(v); t == nil {
			e.g.SetOutput(n, 0, want)
			if dt, ok := e.ti.elem[v]; ok {
				e.ti.elem[want] = dt
			}
			return want
		}
	}
	return e.identity(v, want)
}

// identity copies v to a value named want.
func (e *emitter) identity(v, want string) string {
	n := &onnxpb.NodeProto{Name: proto.String(e.g.UniqueName(e.scope + "/Identity")),
		OpType: proto.String("Identity"), Input: []string{v}, Output: []string{want}}
	e.g.AddNode(n)
	e.ti.elem[want] = e.ti.elem[v]
	return want
}

func intAttr(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

func floatAttr(name string, v float32) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(v)}
}

func intsAttr(name string, v ...int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INTS.Enum(), Ints: v}
}

func stringAttr(name, v string) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_STRING.Enum(), S: []byte(v)}
}

func tensorAttr(name string, t *onnxpb.TensorProto) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_TENSOR.Enum(), T: t}
}

// constant returns an initializer holding vals (as dt) with the given dims,
// shared by every rule that asks for the same one.
func (e *emitter) constant(dt graph.DataType, dims []int64, vals ...float64) string {
	key := fmt.Sprint(int32(dt), dims, vals)
	if name, ok := e.consts[key]; ok {
		return name
	}
	t := tensorOf(dt, dims, vals)
	name := e.g.UniqueName("/grad/const_" + dt.String())
	t.Name = proto.String(name)
	e.g.AddInitializer(t)
	e.ti.elem[name] = dt
	e.ti.shape[name] = staticDims(dims)
	e.consts[key] = name
	return name
}

// scalar is a rank-0 constant of type dt.
func (e *emitter) scalar(dt graph.DataType, v float64) string { return e.constant(dt, nil, v) }

// ints is a 1-D int64 constant.
func (e *emitter) ints(vals ...int64) string {
	f := make([]float64, len(vals))
	for i, v := range vals {
		f[i] = float64(v)
	}
	return e.constant(graph.Int64, []int64{int64(len(vals))}, f...)
}

func tensorOf(dt graph.DataType, dims []int64, vals []float64) *onnxpb.TensorProto {
	t := &onnxpb.TensorProto{Dims: dims, DataType: proto.Int32(int32(dt))}
	size := dt.BitSize() / 8
	raw := make([]byte, len(vals)*size)
	for i, v := range vals {
		b := raw[i*size:]
		switch dt {
		case graph.Float:
			binary.LittleEndian.PutUint32(b, math.Float32bits(float32(v)))
		case graph.Double:
			binary.LittleEndian.PutUint64(b, math.Float64bits(v))
		case graph.Float16:
			binary.LittleEndian.PutUint16(b, graph.Float16Bits(v))
		case graph.BFloat16:
			binary.LittleEndian.PutUint16(b, graph.BFloat16Bits(v))
		case graph.Int64:
			i := int64(math.MaxInt64) // float64(MaxInt64) rounds up to 2^63
			if v < math.Ldexp(1, 63) {
				i = int64(v)
			}
			binary.LittleEndian.PutUint64(b, uint64(i))
		case graph.Int32:
			binary.LittleEndian.PutUint32(b, uint32(int32(v)))
		case graph.Bool:
			if v != 0 {
				b[0] = 1
			}
		default:
			panic("autodiff: constant of type " + dt.String())
		}
	}
	t.RawData = raw
	return t
}

// Shorthands for the ops rules are written in.

func (e *emitter) add(a, b string) string { return e.op("Add", []string{a, b}) }
func (e *emitter) sub(a, b string) string { return e.op("Sub", []string{a, b}) }
func (e *emitter) mul(a, b string) string { return e.op("Mul", []string{a, b}) }
func (e *emitter) div(a, b string) string { return e.op("Div", []string{a, b}) }
func (e *emitter) neg(a string) string    { return e.op("Neg", []string{a}) }
func (e *emitter) exp(a string) string    { return e.op("Exp", []string{a}) }
func (e *emitter) matmul(a, b string) string {
	return e.op("MatMul", []string{a, b})
}
func (e *emitter) cast(a string, to graph.DataType) string {
	if e.ti.elem[a] == to {
		return a
	}
	return e.op("Cast", []string{a}, intAttr("to", int64(to)))
}
func (e *emitter) where(c, a, b string) string { return e.op("Where", []string{c, a, b}) }

// shape returns Shape(v), once per value.
func (e *emitter) shape(v string) string {
	if s, ok := e.shapes[v]; ok {
		return s
	}
	s := e.op("Shape", []string{v})
	e.shapes[v] = s
	return s
}

func (e *emitter) reshape(v, shape string) string { return e.op("Reshape", []string{v, shape}) }

// reshapeLike reshapes v to the shape of like (skipped when provably equal).
func (e *emitter) reshapeLike(v, like string) string {
	if e.ti.sameShape(v, like) {
		return v
	}
	return e.reshape(v, e.shape(like))
}

func (e *emitter) transpose(v string, perm ...int64) string {
	if perm == nil {
		return e.op("Transpose", []string{v})
	}
	return e.op("Transpose", []string{v}, intsAttr("perm", perm...))
}

// swapLast2 transposes the last two axes of v, whatever its rank.
func (e *emitter) swapLast2(v string) string {
	if r := e.ti.rank(v); r >= 2 {
		perm := make([]int64, r)
		for i := range perm {
			perm[i] = int64(i)
		}
		perm[r-1], perm[r-2] = perm[r-2], perm[r-1]
		return e.transpose(v, perm...)
	}
	return e.op("Einsum", []string{v}, stringAttr("equation", "...ij->...ji"))
}

// reduce writes ReduceSum/ReduceMean over static axes (nil: all axes) in
// the form the opset has: axes as an input from opset 13 (ReduceSum) or 18
// (the others), as an attribute before.
func (e *emitter) reduce(op, v string, axes []int64, keepdims bool) string {
	keep := int64(0)
	if keepdims {
		keep = 1
	}
	inputAxes := e.opset >= 18 || (op == "ReduceSum" && e.opset >= 13)
	if axes == nil {
		out := e.op(op, []string{v}, intAttr("keepdims", keep))
		if !keepdims {
			e.ti.shape[out] = []dim{} // a scalar
		}
		return out
	}
	if inputAxes {
		return e.op(op, []string{v, e.ints(axes...)}, intAttr("keepdims", keep))
	}
	return e.op(op, []string{v}, intsAttr("axes", axes...), intAttr("keepdims", keep))
}

func (e *emitter) unsqueeze(v string, axes ...int64) string {
	if e.opset >= 13 {
		return e.op("Unsqueeze", []string{v, e.ints(axes...)})
	}
	return e.op("Unsqueeze", []string{v}, intsAttr("axes", axes...))
}

func (e *emitter) squeeze(v string, axes ...int64) string {
	if e.opset >= 13 {
		return e.op("Squeeze", []string{v, e.ints(axes...)})
	}
	return e.op("Squeeze", []string{v}, intsAttr("axes", axes...))
}

// slice1 takes [start, end) of v along axis (inputs form, opset >= 10).
func (e *emitter) slice1(v, start, end string, axis int64) string {
	return e.op("Slice", []string{v, start, end, e.ints(axis)})
}

// zerosLike is a tensor of zeros with v's shape and type.
func (e *emitter) zerosLike(v string) string {
	dt := e.ti.elem[v]
	out := e.op("ConstantOfShape", []string{e.shape(v)}, tensorAttr("value", tensorOf(dt, []int64{1}, []float64{0})))
	e.ti.elem[out] = dt
	return out
}

// reduceTo sums g (the gradient of a value broadcast from x to out's shape)
// back to x's shape, as ONNX's multidirectional broadcasting requires:
// over the leading axes x lacks and the axes where x has size 1. The axes
// are found at run time from the two shapes, so no dim is fixed when the
// graph is built; where out and x provably have one shape, g is x's
// gradient as it is.
func (e *emitter) reduceTo(g, x, out string) (string, error) {
	if e.ti.sameShape(x, out) {
		return g, nil
	}
	if r := e.ti.rank(x); r == 0 {
		return e.reduce("ReduceSum", g, nil, false), nil
	}
	if axes, ok := e.staticBroadcastAxes(x, out); ok {
		if len(axes) == 0 {
			return e.reshapeLike(g, x), nil
		}
		return e.reshapeLike(e.reduce("ReduceSum", g, axes, true), x), nil
	}
	if e.noUnitDims(x) {
		// x was only broadcast over leading axes: sum the rows of g seen
		// as [-1, size of x] (a fixed axis, so any opset has it).
		n := e.op("Size", []string{x})
		rows := e.reshape(g, e.op("Concat", []string{e.ints(-1), e.unsqueeze(n, 0)}, intAttr("axis", 0)))
		return e.reshape(e.reduce("ReduceSum", rows, []int64{0}, false), e.shape(x)), nil
	}
	if e.opset < 13 {
		return "", fmt.Errorf("reducing the gradient of %q broadcast to %q over axes known only at run time %w (the model has %d)", x, out, errNeedsOpset13, e.opset)
	}
	sx := e.shape(x)
	padded := sx
	if rx, rg := e.ti.rank(x), e.ti.rank(out); rx < 0 || rx != rg {
		// Pad x's shape with leading ones to g's rank.
		extra := e.op("Sub", []string{e.shape(e.shape(g)), e.shape(sx)})
		ones := e.op("ConstantOfShape", []string{extra}, tensorAttr("value", tensorOf(graph.Int64, []int64{1}, []float64{1})))
		padded = e.op("Concat", []string{ones, sx}, intAttr("axis", 0))
	}
	isOne := e.op("Equal", []string{padded, e.ints(1)})
	axes := e.reshape(e.op("NonZero", []string{isOne}), e.ints(-1))
	sum := e.op("ReduceSum", []string{g, axes}, intAttr("keepdims", 1), intAttr("noop_with_empty_axes", 1))
	return e.reshape(sum, sx), nil
}

// staticBroadcastAxes finds the axes to sum from declared shapes alone.
func (e *emitter) staticBroadcastAxes(x, out string) ([]int64, bool) {
	sx, okX := e.ti.shape[x]
	so, okO := e.ti.shape[out]
	if !okX || !okO || len(sx) > len(so) {
		return nil, false
	}
	lead := len(so) - len(sx)
	var axes []int64
	for i := range so {
		if i < lead {
			axes = append(axes, int64(i))
			continue
		}
		dx, do := sx[i-lead], so[i]
		switch {
		case dx.known() && dx.value == 1:
			if !(do.known() && do.value == 1) {
				axes = append(axes, int64(i))
			}
		case dx.sameAs(do):
		default:
			return nil, false
		}
	}
	return axes, true
}

// oneHot encodes int64 indices along axis as 0/1 of type dt. ONNX Runtime
// implements OneHot for float values, so other types are cast from float.
func (e *emitter) oneHot(indices, depth string, dt graph.DataType, axis int64) string {
	values := e.constant(graph.Float, []int64{2}, 0, 1)
	out := e.op("OneHot", []string{e.cast(indices, graph.Int64), depth, values}, intAttr("axis", axis))
	return e.cast(out, dt)
}

// noUnitDims reports whether x's shape is declared with no dim of size 1.
func (e *emitter) noUnitDims(x string) bool {
	s, ok := e.ti.shape[x]
	if !ok {
		return false
	}
	for _, d := range s {
		if !d.known() || d.value == 1 {
			return false
		}
	}
	return true
}
