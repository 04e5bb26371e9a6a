package autodiff

import (
	"fmt"
	"math"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Ops that move or select elements. Their gradients put gy back where the
// elements came from; shapes are read at run time with Shape.

func init() {
	// Ops that only change the shape: the gradient is gy in x's shape.
	for _, op := range []string{"Reshape", "Flatten", "Squeeze", "Unsqueeze"} {
		register(op, &rule{inputs: []int{0}, grad: func(c *ctx) error {
			c.set(0, c.reshapeLike(c.gy[0], c.x(0)))
			return nil
		}})
	}
	register("Transpose", &rule{grad: func(c *ctx) error {
		perm := graph.AttrInts(c.n, "perm")
		if perm == nil {
			c.set(0, c.transpose(c.gy[0])) // reversed axes are their own inverse
			return nil
		}
		inv := make([]int64, len(perm))
		for i, p := range perm {
			inv[p] = int64(i)
		}
		c.set(0, c.transpose(c.gy[0], inv...))
		return nil
	}})
	register("Expand", &rule{inputs: []int{0}, grad: func(c *ctx) error { return c.setReduced(0, c.gy[0]) }})
	register("Concat", &rule{grad: concatGrad})
	register("Split", &rule{inputs: []int{0}, grad: splitGrad})
	register("Slice", &rule{inputs: []int{0}, grad: sliceGrad})
	register("Gather", &rule{inputs: []int{0}, grad: gatherGrad})
}

// concatGrad slices gy back into the inputs, at offsets read from the
// inputs' shapes at run time.
func concatGrad(c *ctx) error {
	axis := graph.AttrInt(c.n, "axis", 0)
	start := c.ints(0)
	for i, in := range c.n.Input {
		size := c.op("Gather", []string{c.shape(in), c.ints(axis)})
		end := c.add(start, size)
		if c.need[i] {
			c.set(i, c.slice1(c.gy[0], start, end, axis))
		}
		start = end
	}
	return nil
}

// splitGrad concatenates the outputs' gradients, with zeros for outputs
// that got none.
func splitGrad(c *ctx) error {
	axis := graph.AttrInt(c.n, "axis", 0)
	parts := make([]string, len(c.n.Output))
	for i, out := range c.n.Output {
		switch {
		case c.gy[i] != "":
			parts[i] = c.gy[i]
		case out == "":
			return fmt.Errorf("output %d is unnamed and its size unknown", i)
		default:
			parts[i] = c.zerosLike(out)
		}
	}
	c.set(0, c.op("Concat", parts, intAttr("axis", axis)))
	return nil
}

// sliceGrad scatters gy into zeros of x's shape. Slice picks each element
// at most once, so the positions it picked are found by slicing a tensor of
// flat indices with the same starts, ends, axes and steps (any sign,
// clamped as Slice clamps), and gy is scattered there.
func sliceGrad(c *ctx) error {
	x := c.x(0)
	sx := c.shape(x)
	n := c.op("ReduceProd", []string{sx}, intAttr("keepdims", 0))
	flat := c.op("Range", []string{c.scalar(graph.Int64, 0), n, c.scalar(graph.Int64, 1)})
	idx := c.reshape(flat, sx)
	sliced := c.sliceAsForward(idx)
	zeros := c.reshape(c.zerosLike(x), c.ints(-1))
	scattered := c.op("ScatterElements", []string{zeros, c.reshape(sliced, c.ints(-1)), c.reshape(c.gy[0], c.ints(-1))},
		intAttr("axis", 0))
	c.set(0, c.reshape(scattered, sx))
	return nil
}

// sliceAsForward applies the forward Slice's parameters to v.
func (c *ctx) sliceAsForward(v string) string {
	if c.opset < 10 { // starts, ends and axes are attributes
		n := c.op("Slice", []string{v})
		p := c.g.Producer(n)
		for _, a := range c.n.Attribute {
			p.Attribute = append(p.Attribute, proto.Clone(a).(*onnxpb.AttributeProto))
		}
		return n
	}
	ins := append([]string{v}, c.n.Input[1:]...)
	return c.op("Slice", ins)
}

// gatherGrad accumulates gy into the gathered rows: ScatterND with
// reduction "add" (opset 16) or, before that, a one-hot product. Only the
// data input (e.g. an embedding table) gets a gradient.
func gatherGrad(c *ctx) error {
	axis := graph.AttrInt(c.n, "axis", 0)
	if axis != 0 {
		if r := c.ti.rank(c.x(0)); r < 0 || axis != int64(-r) {
			return fmt.Errorf("gradient of Gather on axis %d is not supported (axis 0 is)", axis)
		}
	}
	data, indices, gy := c.x(0), c.x(1), c.gy[0]
	sd := c.shape(data)
	if c.opset >= 16 {
		zeros := c.zerosLike(data)
		idx := c.unsqueeze(c.cast(indices, graph.Int64), -1)
		c.set(0, c.op("ScatterND", []string{zeros, idx, gy}, stringAttr("reduction", "add")))
		return nil
	}
	// rows: [N] indices, [N, rest] gradients; grad = onehot(rows)[V, N] · g.
	rows := c.reshape(c.cast(indices, graph.Int64), c.ints(-1))
	depth := c.op("Gather", []string{sd, c.scalar(graph.Int64, 0)})
	onehot := c.oneHot(rows, depth, c.dt(), 0) // [V, N]
	var g2 string
	if r := c.ti.rank(indices); r >= 0 {
		g2 = c.op("Flatten", []string{gy}, intAttr("axis", int64(r)))
	} else {
		rest := c.op("ReduceProd", []string{c.slice1(sd, c.ints(1), c.ints(math.MaxInt64), 0)}, intAttr("keepdims", 1))
		g2 = c.reshape(gy, c.op("Concat", []string{c.ints(-1), rest}, intAttr("axis", 0)))
	}
	c.set(0, c.reshape(c.matmul(onehot, g2), sd))
	return nil
}
