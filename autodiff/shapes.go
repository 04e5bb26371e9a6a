package autodiff

import (
	"strconv"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Static shape inference, best effort and sound: a dim it cannot prove is a
// fresh unknown, equal to nothing else. Its only use is to prove that an
// element-wise node broadcast nothing, so the backward can skip a run-time
// reduction; no dim it finds is ever written into the step graph.
//
// Shape tensors are followed too (Shape, Gather, Concat, Slice, Unsqueeze of
// int64 vectors), so the computed shape of an exporter's Reshape, such as
// Concat(Shape(x)[0], Shape(x)[1], [4, 8]), is known symbolically.

// fresh returns a dim equal to no other.
func (ti *typeInfo) fresh() dim {
	ti.nfresh++
	return dim{value: -1, param: "?" + strconv.Itoa(ti.nfresh)}
}

func (ti *typeInfo) freshDims(n int) []dim {
	ds := make([]dim, n)
	for i := range ds {
		ds[i] = ti.fresh()
	}
	return ds
}

// shapeOf returns v's dims and whether its rank is known.
func (ti *typeInfo) shapeOf(v string) ([]dim, bool) {
	s, ok := ti.shape[v]
	return s, ok
}

// constInts returns the values of a small int64 constant (initializer or
// Constant node output), recorded when the graph is indexed.
func (ti *typeInfo) constInts(v string) ([]int64, bool) {
	vals, ok := ti.ints[v]
	return vals, ok
}

// broadcast applies ONNX's multidirectional broadcasting to dims.
func (ti *typeInfo) broadcast(shapes ...[]dim) []dim {
	r := 0
	for _, s := range shapes {
		r = max(r, len(s))
	}
	out := make([]dim, r)
	for i := 0; i < r; i++ {
		var cands []dim
		for _, s := range shapes {
			j := i - (r - len(s))
			if j < 0 {
				continue
			}
			if d := s[j]; !(d.known() && d.value == 1) {
				cands = append(cands, d)
			}
		}
		switch {
		case len(cands) == 0:
			out[i] = dim{value: 1}
		case allSame(cands):
			out[i] = cands[0]
		default:
			out[i] = ti.fresh()
			for _, d := range cands {
				if d.known() {
					out[i] = d // the others are the same or 1
				}
			}
		}
	}
	return out
}

func allSame(ds []dim) bool {
	for _, d := range ds[1:] {
		if !d.sameAs(ds[0]) {
			return false
		}
	}
	return true
}

func normAxis(a int64, r int) (int, bool) {
	if a < 0 {
		a += int64(r)
	}
	return int(a), a >= 0 && int(a) < r
}

// axesOf returns a node's axes from its attribute or its input at, if known.
func (ti *typeInfo) axesOf(n *onnxpb.NodeProto, at int) ([]int64, bool) {
	if a := graph.Attr(n, "axes"); a != nil {
		return a.Ints, true
	}
	if v := input(n, at); v != "" {
		return ti.constInts(v)
	}
	return nil, false
}

// inferShapes sets the dims of n's outputs that nothing declared.
func (ti *typeInfo) inferShapes(n *onnxpb.NodeProto) {
	if len(n.Output) == 0 {
		return
	}
	set := func(i int, ds []dim) {
		if i < len(n.Output) && n.Output[i] != "" {
			if _, ok := ti.shape[n.Output[i]]; !ok && ds != nil {
				ti.shape[n.Output[i]] = ds
			}
		}
	}
	in := func(i int) ([]dim, bool) {
		if i >= len(n.Input) || n.Input[i] == "" {
			return nil, false
		}
		return ti.shapeOf(n.Input[i])
	}
	x, okX := in(0)
	if !graph.IsStandardOp(n) {
		switch n.GetOpType() {
		case "SimplifiedLayerNormalization", "BiasGelu", "FastGelu", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization":
			if okX {
				set(0, x)
				set(3, x)
			}
		}
		return
	}
	switch op := n.GetOpType(); op {
	case "Relu", "Tanh", "Sigmoid", "Exp", "Log", "Sqrt", "Neg", "Erf", "Abs", "Reciprocal", "Cast", "CastLike",
		"Identity", "Softmax", "LogSoftmax", "Gelu", "LeakyRelu", "Clip", "Sign", "Not", "Floor", "Ceil", "Round",
		"IsNaN", "IsInf", "Elu", "Selu", "Softplus", "HardSigmoid", "Mish", "Sin", "Cos",
		"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "Dropout":
		if okX {
			set(0, x)
			if op == "Dropout" {
				set(1, x)
			}
		}
	case "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "Where", "Equal", "Less", "Greater",
		"LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "PRelu", "Mod":
		var shapes [][]dim
		for i := range n.Input {
			s, ok := in(i)
			if !ok {
				return
			}
			shapes = append(shapes, s)
		}
		set(0, ti.broadcast(shapes...))
	case "MatMul":
		b, okB := in(1)
		if !okX || !okB {
			return
		}
		switch {
		case len(x) == 1 && len(b) == 1:
			set(0, []dim{})
		case len(x) == 1:
			set(0, append(append([]dim{}, b[:len(b)-2]...), b[len(b)-1]))
		case len(b) == 1:
			set(0, append([]dim{}, x[:len(x)-1]...))
		default:
			batch := ti.broadcast(x[:len(x)-2], b[:len(b)-2])
			set(0, append(batch, x[len(x)-2], b[len(b)-1]))
		}
	case "Gemm":
		b, okB := in(1)
		if !okX || !okB || len(x) != 2 || len(b) != 2 {
			return
		}
		m, nn := x[0], b[1]
		if graph.AttrInt(n, "transA", 0) != 0 {
			m = x[1]
		}
		if graph.AttrInt(n, "transB", 0) != 0 {
			nn = b[0]
		}
		set(0, []dim{m, nn})
	case "Transpose":
		if !okX {
			return
		}
		perm := graph.AttrInts(n, "perm")
		out := make([]dim, len(x))
		for i := range out {
			p := len(x) - 1 - i
			if perm != nil {
				p = int(perm[i])
			}
			if p < 0 || p >= len(x) {
				return
			}
			out[i] = x[p]
		}
		set(0, out)
	case "Unsqueeze":
		axes, ok := ti.axesOf(n, 1)
		if !okX || !ok {
			return
		}
		r := len(x) + len(axes)
		out := make([]dim, r)
		mark := make([]bool, r)
		for _, a := range axes {
			i, ok := normAxis(a, r)
			if !ok {
				return
			}
			mark[i] = true
			out[i] = dim{value: 1}
		}
		j := 0
		for i := range out {
			if !mark[i] {
				if j >= len(x) {
					return
				}
				out[i] = x[j]
				j++
			}
		}
		set(0, out)
	case "Squeeze":
		axes, ok := ti.axesOf(n, 1)
		if !okX || !ok {
			return
		}
		drop := map[int]bool{}
		for _, a := range axes {
			i, ok := normAxis(a, len(x))
			if !ok {
				return
			}
			drop[i] = true
		}
		var out []dim
		for i, d := range x {
			if !drop[i] {
				out = append(out, d)
			}
		}
		set(0, append([]dim{}, out...))
	case "Flatten":
		if okX {
			set(0, ti.freshDims(2))
		}
	case "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare":
		axes, ok := ti.axesOf(n, 1)
		if !ok && input(n, 1) == "" {
			axes, ok = nil, true // no axes: all of them
		}
		if !okX || !ok {
			return
		}
		keep := graph.AttrInt(n, "keepdims", 1) != 0
		all := len(axes) == 0
		red := map[int]bool{}
		for _, a := range axes {
			i, ok := normAxis(a, len(x))
			if !ok {
				return
			}
			red[i] = true
		}
		out := []dim{}
		for i, d := range x {
			switch {
			case !all && !red[i]:
				out = append(out, d)
			case keep:
				out = append(out, dim{value: 1})
			}
		}
		set(0, out)
	case "Reshape":
		shape, ok := ti.values[input(n, 1)]
		if !ok {
			if s, ok := in(1); ok && len(s) == 1 && s[0].known() {
				set(0, ti.freshDims(int(s[0].value)))
			}
			return
		}
		set(0, ti.reshaped(x, okX, shape, graph.AttrInt(n, "allowzero", 0) != 0))
	case "Expand":
		shape, ok := ti.values[input(n, 1)]
		if okX && ok {
			set(0, ti.broadcast(x, shape))
		}
	case "ConstantOfShape":
		if shape, ok := ti.values[input(n, 0)]; ok {
			set(0, shape)
		}
	case "Shape", "Size":
		if op == "Size" {
			set(0, []dim{})
		} else if okX {
			set(0, []dim{{value: int64(len(x))}})
		}
	case "Gather":
		idx, okI := in(1)
		if !okX || !okI {
			return
		}
		axis, ok := normAxis(graph.AttrInt(n, "axis", 0), len(x))
		if !ok {
			return
		}
		out := append(append(append([]dim{}, x[:axis]...), idx...), x[axis+1:]...)
		set(0, out)
	case "Split":
		if !okX {
			return
		}
		axis, ok := normAxis(graph.AttrInt(n, "axis", 0), len(x))
		if !ok {
			return
		}
		sizes := graph.AttrInts(n, "split")
		if sizes == nil {
			sizes, _ = ti.constInts(input(n, 1))
		}
		for i := range n.Output {
			d := ti.fresh()
			if len(sizes) == len(n.Output) {
				d = dim{value: sizes[i]}
			}
			out := append([]dim{}, x...)
			out[axis] = d
			set(i, out)
		}
	case "Concat", "Slice":
		if okX {
			set(0, ti.freshDims(len(x))) // sizes along the axis change
		}
	}
	ti.inferValues(n)
}

// reshaped computes Reshape(x, shape) where shape's elements are known
// symbolically; -1 is solved when x and the other dims cancel exactly.
func (ti *typeInfo) reshaped(x []dim, okX bool, shape []dim, allowZero bool) []dim {
	out := make([]dim, len(shape))
	minus := -1
	for i, d := range shape {
		switch {
		case d.known() && d.value == 0 && !allowZero:
			if !okX || i >= len(x) {
				out[i] = ti.fresh()
			} else {
				out[i] = x[i]
			}
		case d.known() && d.value == -1:
			minus = i
		default:
			out[i] = d
		}
	}
	if minus < 0 {
		return out
	}
	out[minus] = ti.fresh()
	if !okX {
		return out
	}
	// x's elements / the other dims' elements, as symbols and a constant.
	num, numK := factor(x)
	others := append(append([]dim{}, out[:minus]...), out[minus+1:]...)
	den, denK := factor(others)
	if numK < 0 || denK <= 0 {
		return out
	}
	for s, c := range den {
		if num[s] < c {
			return out
		}
		num[s] -= c
	}
	var left []string
	for s, c := range num {
		for ; c > 0; c-- {
			left = append(left, s)
		}
	}
	switch {
	case len(left) == 0 && numK%denK == 0:
		out[minus] = dim{value: numK / denK}
	case len(left) == 1 && numK == denK:
		out[minus] = dim{value: -1, param: left[0]}
	}
	return out
}

// factor splits a shape's element count into symbols and a constant
// (constant -1 when some dim is an anonymous unknown).
func factor(ds []dim) (map[string]int, int64) {
	syms := map[string]int{}
	k := int64(1)
	for _, d := range ds {
		switch {
		case d.known():
			k *= d.value
		case d.param != "":
			syms[d.param]++
		default:
			return nil, -1
		}
	}
	return syms, k
}

// inferValues follows the values of int64 shape vectors.
func (ti *typeInfo) inferValues(n *onnxpb.NodeProto) {
	out := n.Output[0]
	if _, ok := ti.values[out]; ok || out == "" {
		return
	}
	val := func(i int) ([]dim, bool) {
		v, ok := ti.values[input(n, i)]
		return v, ok
	}
	switch n.GetOpType() {
	case "Shape":
		x, ok := ti.shapeOf(input(n, 0))
		if !ok || graph.Attr(n, "start") != nil || graph.Attr(n, "end") != nil {
			return
		}
		ti.values[out] = x
	case "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Reshape":
		// A vector or a scalar keeps its elements.
		if v, ok := val(0); ok && (n.GetOpType() != "Cast" || graph.AttrInt(n, "to", 0) == int64(graph.Int64)) {
			ti.values[out] = v
		}
	case "Gather":
		v, ok := val(0)
		idx, okI := ti.constInts(input(n, 1))
		if !ok || !okI || graph.AttrInt(n, "axis", 0) != 0 {
			return
		}
		var picked []dim
		for _, i := range idx {
			j, ok := normAxis(i, len(v))
			if !ok {
				return
			}
			picked = append(picked, v[j])
		}
		ti.values[out] = picked
	case "Concat":
		var all []dim
		for i := range n.Input {
			v, ok := val(i)
			if !ok {
				return
			}
			all = append(all, v...)
		}
		ti.values[out] = all
	case "Add", "Sub", "Mul", "Div":
		// Arithmetic on known sizes (head counts, head sizes).
		a, okA := val(0)
		b, okB := val(1)
		if !okA || !okB || len(a) != len(b) {
			return
		}
		r := make([]dim, len(a))
		for i := range a {
			if !a[i].known() || !b[i].known() {
				return
			}
			x, y := a[i].value, b[i].value
			switch n.GetOpType() {
			case "Add":
				r[i] = dim{value: x + y}
			case "Sub":
				r[i] = dim{value: x - y}
			case "Mul":
				r[i] = dim{value: x * y}
			case "Div":
				if y == 0 || x%y != 0 {
					return
				}
				r[i] = dim{value: x / y}
			}
			if r[i].value < 0 {
				return
			}
		}
		ti.values[out] = r
	case "Slice":
		v, ok := val(0)
		starts, ok1 := ti.constInts(input(n, 1))
		ends, ok2 := ti.constInts(input(n, 2))
		if !ok || !ok1 || !ok2 || len(starts) != 1 || len(ends) != 1 || input(n, 4) != "" {
			return
		}
		s, e := clampIndex(starts[0], len(v)), clampIndex(ends[0], len(v))
		if s <= e {
			ti.values[out] = append([]dim{}, v[s:e]...)
		}
	}
}

func clampIndex(i int64, n int) int {
	if i < 0 {
		i += int64(n)
	}
	return int(min(max(i, 0), int64(n)))
}
