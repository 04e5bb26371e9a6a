package autodiff

import (
	"errors"

	"github.com/onnxlora/onnxlora/graph"
)

// Normalisations. Each is differentiated in the 2-D view [rows, features]
// that Flatten at the normalisation axis gives, so no rank needs to be
// known when the graph is built; the results are reshaped back at run time.

const msDomain = "com.microsoft"

func init() {
	register("LayerNormalization", &rule{inputs: []int{0, 1, 2}, grad: layerNormGrad})
	register("RMSNormalization", &rule{inputs: []int{0, 1}, grad: func(c *ctx) error {
		gx := c.rmsNormGrad(c.x(0), c.gy[0], 1, graph.AttrInt(c.n, "axis", -1), c.need[0])
		c.set(0, gx)
		return nil
	}})
	// ONNX Runtime registers SimplifiedLayerNormalization in the default
	// domain (exporters write it so) and in com.microsoft.
	simplified := &rule{inputs: []int{0, 1}, grad: func(c *ctx) error {
		if len(c.gy) > 1 && c.gy[1] != "" {
			return errors.New("the gradient of the inv_std_var output is not supported")
		}
		c.set(0, c.rmsNormGrad(c.x(0), c.gy[0], 1, graph.AttrInt(c.n, "axis", -1), c.need[0]))
		return nil
	}}
	register("SimplifiedLayerNormalization", simplified)
	register(msDomain+".SimplifiedLayerNormalization", simplified)
	register(msDomain+".SkipSimplifiedLayerNormalization", &rule{inputs: []int{0, 1, 2, 3}, grad: func(c *ctx) error {
		return skipNormGrad(c, 3, func(s string, want bool) string { return c.rmsNormGrad(s, c.gy[0], 2, -1, want) })
	}})
	register(msDomain+".SkipLayerNormalization", &rule{inputs: []int{0, 1, 2, 3, 4}, grad: func(c *ctx) error {
		return skipNormGrad(c, 4, func(s string, want bool) string { return c.lnGrad(s, c.gy[0], 2, 3, -1, "", "", want) })
	}})
}

// rows flattens v to [rows, features] at axis.
func (c *ctx) rows(v string, axis int64) string {
	return c.op("Flatten", []string{v}, intAttr("axis", axis))
}

// layerNormGrad: with x̂ = (x - mean)·inv, y = x̂·scale + bias,
// gx = inv·(g - mean(g) - x̂·mean(g·x̂)) where g = gy·scale, means over the
// features; gscale = Σ_rows gy·x̂, gbias = Σ_rows gy. The forward's Mean
// and InvStdDev outputs are reused (computed again in double for double
// models, whose stash type would round them to float).
func layerNormGrad(c *ctx) error {
	for i := 1; i < len(c.gy); i++ {
		if c.gy[i] != "" {
			return errors.New("the gradient of the Mean and InvStdDev outputs is not supported")
		}
	}
	var mean, inv string
	if stash := graph.DataType(graph.AttrInt(c.n, "stash_type", 1)); c.dt() != graph.Double || stash == graph.Double {
		col := c.ints(-1, 1)
		mean = c.cast(c.reshape(c.output(1, stash), col), c.dt())
		inv = c.cast(c.reshape(c.output(2, stash), col), c.dt())
	}
	c.set(0, c.lnGrad(c.x(0), c.gy[0], 1, 2, graph.AttrInt(c.n, "axis", -1), mean, inv, c.need[0]))
	return nil
}

// lnGrad is layer normalisation's gradient in the [rows, features] view;
// mean and inv ([rows, 1]) are recomputed from x when "". It sets the
// gradients of the scale and bias inputs and returns x's when wantX.
func (c *ctx) lnGrad(x, gy string, scaleAt, biasAt int, axis int64, mean, inv string, wantX bool) string {
	eps := float64(graph.AttrFloat(c.n, "epsilon", 1e-5))
	x2, g2 := c.rows(x, axis), c.rows(gy, axis)
	if mean == "" {
		mean = c.reduce("ReduceMean", x2, []int64{1}, true)
		d := c.sub(x2, mean)
		inv = c.op("Reciprocal", []string{c.op("Sqrt", []string{c.add(c.reduce("ReduceMean", c.mul(d, d), []int64{1}, true), c.k(eps))})})
	}
	xhat := c.mul(c.sub(x2, mean), inv)
	scale := c.x(scaleAt)
	if c.need[scaleAt] {
		c.set(scaleAt, c.reshape(c.reduce("ReduceSum", c.mul(g2, xhat), []int64{0}, false), c.shape(scale)))
	}
	if biasAt < len(c.n.Input) && c.n.Input[biasAt] != "" && c.need[biasAt] {
		c.set(biasAt, c.reshape(c.reduce("ReduceSum", g2, []int64{0}, false), c.shape(c.x(biasAt))))
	}
	if !wantX {
		return ""
	}
	g := c.mul(g2, c.reshape(scale, c.ints(1, -1)))
	m1 := c.reduce("ReduceMean", g, []int64{1}, true)
	m2 := c.reduce("ReduceMean", c.mul(g, xhat), []int64{1}, true)
	return c.reshape(c.mul(inv, c.sub(c.sub(g, m1), c.mul(xhat, m2))), c.shape(x))
}

// rmsNormGrad: with r = 1/sqrt(mean(x²) + eps), x̂ = x·r, y = x̂·scale,
// gx = r·(g - x̂·mean(g·x̂)) where g = gy·scale; gscale = Σ_rows gy·x̂.
// It sets the scale's gradient (input scaleAt) and returns x's when wantX.
func (c *ctx) rmsNormGrad(x, gy string, scaleAt int, axis int64, wantX bool) string {
	eps := float64(graph.AttrFloat(c.n, "epsilon", 1e-5))
	scale := c.x(scaleAt)
	x2, g2 := c.rows(x, axis), c.rows(gy, axis)
	ms := c.reduce("ReduceMean", c.mul(x2, x2), []int64{1}, true)
	r := c.op("Reciprocal", []string{c.op("Sqrt", []string{c.add(ms, c.k(eps))})})
	xhat := c.mul(x2, r)
	if c.need[scaleAt] {
		c.set(scaleAt, c.reshape(c.reduce("ReduceSum", c.mul(g2, xhat), []int64{0}, false), c.shape(scale)))
	}
	if !wantX {
		return ""
	}
	g := c.mul(g2, c.reshape(scale, c.ints(1, -1)))
	m := c.reduce("ReduceMean", c.mul(g, xhat), []int64{1}, true)
	return c.reshape(c.mul(r, c.sub(g, c.mul(xhat, m))), c.shape(x))
}

// skipNormGrad: s = input + skip (+ bias, input biasAt), output =
// norm(s) with gamma (and beta), and output 3 is s itself. norm writes the
// gamma/beta gradients and returns s's; the gradient of s (from both
// outputs) flows to input, skip and bias, each reduced to its shape.
func skipNormGrad(c *ctx, biasAt int, norm func(s string, wantS bool) string) error {
	for _, i := range []int{1, 2} {
		if i < len(c.gy) && c.gy[i] != "" {
			return errors.New("the gradient of the mean and inv_std_var outputs is not supported")
		}
	}
	s := c.output(3, c.dt())
	needS := c.need[0] || c.need[1] || (biasAt < len(c.need) && c.need[biasAt])
	gs := norm(s, needS)
	if !needS {
		return nil
	}
	if len(c.gy) > 3 && c.gy[3] != "" {
		gs = c.add(gs, c.gy[3])
	}
	for _, i := range []int{0, 1, biasAt} {
		if i < len(c.n.Input) && c.n.Input[i] != "" && c.need[i] {
			r, err := c.reduceTo(gs, c.x(i), s)
			if err != nil {
				return err
			}
			c.gx[i] = r
		}
	}
	return nil
}
