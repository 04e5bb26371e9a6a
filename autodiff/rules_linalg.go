package autodiff

import (
	"errors"
	"fmt"

	"github.com/onnxlora/onnxlora/graph"
)

// Products, reductions, softmax and the cross-entropy loss op.

func init() {
	register("MatMul", &rule{grad: matmulGrad})
	register("Gemm", &rule{grad: gemmGrad})
	register("Softmax", &rule{grad: func(c *ctx) error { return softmaxGrad(c, false) }})
	register("LogSoftmax", &rule{grad: func(c *ctx) error { return softmaxGrad(c, true) }})
	register("ReduceSum", &rule{inputs: []int{0}, grad: func(c *ctx) error { return reduceGrad(c, false) }})
	register("ReduceMean", &rule{inputs: []int{0}, grad: func(c *ctx) error { return reduceGrad(c, true) }})
	register("SoftmaxCrossEntropyLoss", &rule{inputs: []int{0}, grad: softmaxCrossEntropyGrad})
}

// matmulGrad differentiates numpy-style MatMul: gA = gy·Bᵀ, gB = Aᵀ·gy,
// batch dims reduced back to each input's shape, 1-D inputs promoted as
// MatMul promotes them. A rank the graph does not declare is taken as >= 2.
func matmulGrad(c *ctx) error {
	a, b, gy := c.x(0), c.x(1), c.gy[0]
	ra, rb := c.ti.rank(a), c.ti.rank(b)
	switch {
	case ra == 1 && rb == 1: // a dot product: gy is a scalar
		c.set(0, c.mul(gy, b))
		c.set(1, c.mul(gy, a))
		return nil
	case ra == 1: // y[..., n] = a[k] · b[..., k, n]
		g := c.unsqueeze(gy, -2)
		if c.need[0] {
			if err := c.setReducedTo(0, c.matmul(g, c.swapLast2(b))); err != nil {
				return err
			}
		}
		if c.need[1] {
			return c.setReducedTo(1, c.matmul(c.unsqueeze(a, -1), g))
		}
		return nil
	case rb == 1: // y[..., m] = a[..., m, k] · b[k]
		g := c.unsqueeze(gy, -1)
		if c.need[0] {
			if err := c.setReducedTo(0, c.matmul(g, c.unsqueeze(b, 0))); err != nil {
				return err
			}
		}
		if c.need[1] {
			return c.setReducedTo(1, c.squeeze(c.matmul(c.swapLast2(a), g), -1))
		}
		return nil
	}
	if c.need[0] {
		switch {
		case rb == 2:
			// b is not broadcast: gy·bᵀ has a's shape already.
			c.set(0, c.matmul(gy, c.transpose(b, 1, 0)))
		case c.sameBatch(a, c.y(0)):
			c.set(0, c.matmul(gy, c.swapLast2(b)))
		default:
			if err := c.setReducedTo(0, c.matmul(gy, c.swapLast2(b))); err != nil {
				return err
			}
		}
	}
	if !c.need[1] {
		return nil
	}
	if ra == 2 && rb == 2 {
		c.set(1, c.matmul(c.transpose(a, 1, 0), gy))
		return nil
	}
	if rb == 2 {
		// A weight against batched activations: fold the batch dims into
		// rows, one 2-D product instead of a batched one and a reduction.
		k := c.slice1(c.shape(b), c.ints(0), c.ints(1), 0)
		n := c.slice1(c.shape(b), c.ints(1), c.ints(2), 0)
		a2 := c.reshape(a, c.op("Concat", []string{c.ints(-1), k}, intAttr("axis", 0)))
		g2 := c.reshape(gy, c.op("Concat", []string{c.ints(-1), n}, intAttr("axis", 0)))
		c.set(1, c.matmul(c.transpose(a2, 1, 0), g2))
		return nil
	}
	if c.sameBatch(b, c.y(0)) {
		c.set(1, c.matmul(c.swapLast2(a), gy))
		return nil
	}
	return c.setReducedTo(1, c.matmul(c.swapLast2(a), gy))
}

// sameBatch reports whether operand v of a batched MatMul provably has the
// output's batch dims, so its gradient needs no reduction.
func (c *ctx) sameBatch(v, y string) bool {
	sv, okV := c.ti.shape[v]
	sy, okY := c.ti.shape[y]
	if !okV || !okY || len(sv) != len(sy) || len(sv) < 2 {
		return false
	}
	for i := 0; i < len(sv)-2; i++ {
		if !sv[i].sameAs(sy[i]) {
			return false
		}
	}
	return true
}

// setReducedTo reduces g, of whatever broadcast shape, to input i's shape.
func (c *ctx) setReducedTo(i int, g string) error {
	r, err := c.reduceTo(g, c.x(i), "")
	if err != nil {
		return err
	}
	c.set(i, r)
	return nil
}

// gemmGrad differentiates Y = alpha·A'·B' + beta·C with A' = Aᵀ if transA
// (likewise B'), all 2-D.
func gemmGrad(c *ctx) error {
	a, b, gy := c.x(0), c.x(1), c.gy[0]
	transA := graph.AttrInt(c.n, "transA", 0) != 0
	transB := graph.AttrInt(c.n, "transB", 0) != 0
	alpha := float64(graph.AttrFloat(c.n, "alpha", 1))
	beta := float64(graph.AttrFloat(c.n, "beta", 1))
	t := func(v string) string { return c.transpose(v, 1, 0) }
	maybeT := func(v string, on bool) string {
		if on {
			return t(v)
		}
		return v
	}
	scaled := func(v string, s float64) string {
		if s == 1 {
			return v
		}
		return c.mul(v, c.k(s))
	}
	if c.need[0] {
		var g string
		if !transA {
			g = c.matmul(gy, maybeT(b, !transB)) // gy · B'ᵀ
		} else {
			g = c.matmul(maybeT(b, transB), t(gy)) // B' · gyᵀ
		}
		c.set(0, scaled(g, alpha))
	}
	if c.need[1] {
		var g string
		if !transB {
			g = c.matmul(maybeT(a, !transA), gy) // A'ᵀ · gy
		} else {
			g = c.matmul(t(gy), maybeT(a, transA)) // gyᵀ · A'
		}
		c.set(1, scaled(g, alpha))
	}
	if len(c.n.Input) > 2 && c.need[2] {
		return c.setReduced(2, scaled(gy, beta))
	}
	return nil
}

// softmaxGrad: for y = softmax(x), gx = y·(gy - Σ gy·y); for y =
// logsoftmax(x), gx = gy - exp(y)·Σ gy; sums along the softmax axis. Before
// opset 13 the op normalises the input flattened to 2-D at axis, so the
// gradient is taken in that 2-D view.
func softmaxGrad(c *ctx, logSoftmax bool) error {
	y, gy := c.y(0), c.gy[0]
	if c.opset >= 13 {
		axis := graph.AttrInt(c.n, "axis", -1)
		c.set(0, c.softmaxVJP(y, gy, []int64{axis}, logSoftmax))
		return nil
	}
	axis := graph.AttrInt(c.n, "axis", 1)
	y2 := c.op("Flatten", []string{y}, intAttr("axis", axis))
	g2 := c.op("Flatten", []string{gy}, intAttr("axis", axis))
	c.set(0, c.reshape(c.softmaxVJP(y2, g2, []int64{1}, logSoftmax), c.shape(c.x(0))))
	return nil
}

func (c *ctx) softmaxVJP(y, gy string, axes []int64, logSoftmax bool) string {
	if logSoftmax {
		return c.sub(gy, c.mul(c.exp(y), c.reduce("ReduceSum", gy, axes, true)))
	}
	return c.mul(y, c.sub(gy, c.reduce("ReduceSum", c.mul(gy, y), axes, true)))
}

// reduceGrad spreads gy back over the reduced axes (divided by the count for
// a mean). Axes come from the attribute or, in newer opsets, an input that
// may be computed at run time.
func reduceGrad(c *ctx, mean bool) error {
	x, y, gy := c.x(0), c.y(0), c.gy[0]
	keep := graph.AttrInt(c.n, "keepdims", 1) != 0
	axesAttr := graph.AttrInts(c.n, "axes")
	axesInput := input(c.n, 1)
	all := axesAttr == nil && axesInput == ""
	if all && graph.AttrInt(c.n, "noop_with_empty_axes", 0) != 0 {
		c.set(0, gy) // no axes and noop: the identity
		return nil
	}
	g := gy
	if !keep && !all {
		if axesInput != "" {
			g = c.op("Unsqueeze", []string{gy, axesInput})
		} else {
			g = c.unsqueeze(gy, axesAttr...)
		}
	}
	g = c.op("Expand", []string{g, c.shape(x)})
	if mean {
		count := c.div(c.cast(c.op("Size", []string{x}), c.dt()), c.cast(c.op("Size", []string{y}), c.dt()))
		g = c.div(g, count)
	}
	c.set(0, g)
	return nil
}

// softmaxCrossEntropyGrad: the gradient of the loss with respect to the
// scores [N, C] is (softmax(scores) - onehot(labels)) times each row's
// weight in the reduction (1/count of counted rows for "mean", 1 for
// "sum", gy for "none"), zero on ignored rows. softmax comes from the
// node's log_prob output.
func softmaxCrossEntropyGrad(c *ctx) error {
	if input(c.n, 2) != "" {
		return errors.New("class weights are not supported")
	}
	if r := c.ti.rank(c.x(0)); r >= 0 && r != 2 {
		return fmt.Errorf("scores of rank %d: only [N, C] is supported", r)
	}
	scores, labels := c.x(0), c.x(1)
	dt, lt := c.dt(), c.ti.elem[labels]
	logp := c.output(1, dt)
	depth := c.op("Gather", []string{c.shape(scores), c.scalar(graph.Int64, 1)})
	safe := labels
	valid := c.op("Expand", []string{c.k(1), c.shape(labels)})
	if a := graph.Attr(c.n, "ignore_index"); a != nil {
		ignored := c.op("Equal", []string{labels, c.scalar(lt, float64(a.GetI()))})
		safe = c.where(ignored, c.scalar(lt, 0), labels)
		valid = c.cast(c.op("Not", []string{ignored}), dt)
	}
	onehot := c.oneHot(safe, depth, dt, -1)
	diff := c.sub(c.exp(logp), onehot)
	gy := c.gy[0]
	var w string
	switch red := string(graph.Attr(c.n, "reduction").GetS()); red {
	case "", "mean":
		w = c.mul(c.div(valid, c.reduce("ReduceSum", valid, nil, false)), gy)
	case "sum":
		w = c.mul(valid, gy)
	case "none":
		w = c.mul(valid, gy)
	default:
		return fmt.Errorf("unknown reduction %q", red)
	}
	c.set(0, c.mul(diff, c.unsqueeze(w, -1)))
	return nil
}
