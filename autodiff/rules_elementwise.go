package autodiff

import (
	"fmt"
	"math"

	"github.com/onnxlora/onnxlora/graph"
)

// Element-wise ops. Binary ops broadcast multidirectionally, so each input's
// gradient is reduced to that input's shape (setReduced).

func init() {
	register("Add", &rule{grad: func(c *ctx) error {
		if err := c.setReduced(0, c.gy[0]); err != nil {
			return err
		}
		return c.setReduced(1, c.gy[0])
	}})
	register("Sub", &rule{grad: func(c *ctx) error {
		if err := c.setReduced(0, c.gy[0]); err != nil {
			return err
		}
		if !c.need[1] {
			return nil
		}
		return c.setReduced(1, c.neg(c.gy[0]))
	}})
	register("Mul", &rule{grad: func(c *ctx) error {
		gy := c.gy[0]
		if c.need[0] {
			if err := c.setReduced(0, c.mul(gy, c.x(1))); err != nil {
				return err
			}
		}
		if c.need[1] {
			return c.setReduced(1, c.mul(gy, c.x(0)))
		}
		return nil
	}})
	register("Div", &rule{grad: func(c *ctx) error {
		gy, b := c.gy[0], c.x(1)
		if c.need[0] {
			if err := c.setReduced(0, c.div(gy, b)); err != nil {
				return err
			}
		}
		if c.need[1] {
			// d(a/b)/db = -(a/b)/b
			return c.setReduced(1, c.neg(c.div(c.mul(gy, c.y(0)), b)))
		}
		return nil
	}})
	register("Sum", &rule{grad: func(c *ctx) error {
		for i := range c.n.Input {
			if err := c.setReduced(i, c.gy[0]); err != nil {
				return err
			}
		}
		return nil
	}})
	register("Pow", &rule{grad: func(c *ctx) error {
		gy, a, p := c.gy[0], c.x(0), c.x(1)
		pt := c.cast(p, c.dt()) // the exponent may have another type
		if c.need[0] {
			// p * a^(p-1)
			d := c.mul(pt, c.op("Pow", []string{a, c.sub(pt, c.k(1))}))
			if err := c.setReduced(0, c.mul(gy, d)); err != nil {
				return err
			}
		}
		if c.need[1] {
			// a^p * log(a); cast back to the exponent's type
			d := c.mul(c.y(0), c.op("Log", []string{a}))
			g := c.mul(gy, d)
			r, err := c.reduceTo(g, p, c.y(0))
			if err != nil {
				return err
			}
			c.set(1, c.cast(r, c.ti.elem[p]))
		}
		return nil
	}})
	register("Neg", &rule{grad: func(c *ctx) error { c.set(0, c.neg(c.gy[0])); return nil }})
	register("Identity", &rule{grad: func(c *ctx) error { c.set(0, c.gy[0]); return nil }})
	register("Sqrt", &rule{grad: func(c *ctx) error {
		// 0.5 / sqrt(x)
		c.set(0, c.div(c.mul(c.gy[0], c.k(0.5)), c.y(0)))
		return nil
	}})
	register("Reciprocal", &rule{grad: func(c *ctx) error {
		y := c.y(0)
		c.set(0, c.neg(c.mul(c.gy[0], c.mul(y, y))))
		return nil
	}})
	register("Exp", &rule{grad: func(c *ctx) error { c.set(0, c.mul(c.gy[0], c.y(0))); return nil }})
	register("Log", &rule{grad: func(c *ctx) error { c.set(0, c.div(c.gy[0], c.x(0))); return nil }})
	register("Tanh", &rule{grad: func(c *ctx) error {
		y := c.y(0)
		c.set(0, c.mul(c.gy[0], c.sub(c.k(1), c.mul(y, y))))
		return nil
	}})
	register("Sigmoid", &rule{grad: func(c *ctx) error {
		y := c.y(0)
		c.set(0, c.mul(c.gy[0], c.mul(y, c.sub(c.k(1), y))))
		return nil
	}})
	register("Relu", &rule{grad: func(c *ctx) error {
		pos := c.op("Greater", []string{c.x(0), c.k(0)})
		c.set(0, c.where(pos, c.gy[0], c.k(0)))
		return nil
	}})
	register("LeakyRelu", &rule{grad: func(c *ctx) error {
		alpha := float64(graph.AttrFloat(c.n, "alpha", 0.01))
		pos := c.op("Greater", []string{c.x(0), c.k(0)})
		c.set(0, c.where(pos, c.gy[0], c.mul(c.gy[0], c.k(alpha))))
		return nil
	}})
	register("Erf", &rule{grad: func(c *ctx) error {
		x := c.x(0)
		d := c.mul(c.k(2/math.Sqrt(math.Pi)), c.exp(c.neg(c.mul(x, x))))
		c.set(0, c.mul(c.gy[0], d))
		return nil
	}})
	register("Gelu", &rule{grad: geluGrad})
	register("Cast", &rule{grad: func(c *ctx) error {
		from := c.ti.elem[c.x(0)]
		if !isDifferentiableType(from) {
			return nil
		}
		c.set(0, c.cast(c.gy[0], from))
		return nil
	}})
	register("Where", &rule{inputs: []int{1, 2}, grad: func(c *ctx) error {
		cond, gy := c.x(0), c.gy[0]
		zero := c.scalar(c.ti.elem[c.y(0)], 0)
		if c.need[1] {
			if err := c.setReduced(1, c.where(cond, gy, zero)); err != nil {
				return err
			}
		}
		if c.need[2] {
			return c.setReduced(2, c.where(cond, zero, gy))
		}
		return nil
	}})
	register("Dropout", &rule{inputs: []int{0}, grad: dropoutGrad})
	register("Abs", &rule{grad: func(c *ctx) error {
		c.set(0, c.mul(c.gy[0], c.op("Sign", []string{c.x(0)})))
		return nil
	}})
	register("Clip", &rule{inputs: []int{0}, grad: clipGrad})
	// com.microsoft fusions that exporters and ORT's optimizer write.
	register(msDomain+".BiasGelu", &rule{grad: func(c *ctx) error { return biasGeluGrad(c, "none") }})
	register(msDomain+".FastGelu", &rule{grad: func(c *ctx) error { return biasGeluGrad(c, "tanh") }})
}

// clipGrad passes gy where min <= x <= max (torch's convention at the
// bounds); min and max are inputs from opset 11, attributes before.
func clipGrad(c *ctx) error {
	x, g := c.x(0), c.gy[0]
	zero := c.k(0)
	bound := func(i int, attr string) string {
		if v := input(c.n, i); v != "" {
			return v
		}
		if a := graph.Attr(c.n, attr); a != nil && c.opset < 11 {
			return c.k(float64(a.GetF()))
		}
		return ""
	}
	if lo := bound(1, "min"); lo != "" {
		g = c.where(c.op("Less", []string{x, lo}), zero, g)
	}
	if hi := bound(2, "max"); hi != "" {
		g = c.where(c.op("Greater", []string{x, hi}), zero, g)
	}
	c.set(0, g)
	return nil
}

// biasGeluGrad differentiates y = gelu(x + bias) (BiasGelu: exact;
// FastGelu: the tanh approximation, bias optional).
func biasGeluGrad(c *ctx, approx string) error {
	x, gy := c.x(0), c.gy[0]
	if b := input(c.n, 1); b != "" {
		x = c.add(x, b)
	}
	d := geluDerivative(c, x, approx)
	g := c.mul(gy, d)
	c.set(0, g)
	if len(c.n.Input) > 1 && c.need[1] {
		r, err := c.reduceTo(g, c.x(1), c.y(0))
		if err != nil {
			return err
		}
		c.gx[1] = r
	}
	return nil
}

// geluGrad differentiates Gelu (opset 20): exact, x·Φ(x), or the tanh
// approximation 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))).
func geluGrad(c *ctx) error {
	approx := string(graph.Attr(c.n, "approximate").GetS())
	if approx == "" {
		approx = "none"
	}
	if approx != "none" && approx != "tanh" {
		return fmt.Errorf("unknown approximate %q", approx)
	}
	c.set(0, c.mul(c.gy[0], geluDerivative(c, c.x(0), approx)))
	return nil
}

// geluDerivative is d gelu(x)/dx: Φ(x) + x·φ(x), or for the tanh form
// 0.5(1 + t) + 0.5x(1 - t²)·√(2/π)(1 + 3·0.044715x²).
func geluDerivative(c *ctx, x, approx string) string {
	if approx == "none" {
		cdf := c.mul(c.k(0.5), c.add(c.k(1), c.op("Erf", []string{c.mul(x, c.k(1/math.Sqrt2))})))
		pdf := c.mul(c.k(1/math.Sqrt(2*math.Pi)), c.exp(c.mul(c.k(-0.5), c.mul(x, x))))
		return c.add(cdf, c.mul(x, pdf))
	}
	s := math.Sqrt(2 / math.Pi)
	x2 := c.mul(x, x)
	u := c.mul(c.k(s), c.add(x, c.mul(c.k(0.044715), c.mul(x2, x))))
	t := c.op("Tanh", []string{u})
	du := c.mul(c.k(s), c.add(c.k(1), c.mul(c.k(3*0.044715), x2)))
	left := c.mul(c.k(0.5), c.add(c.k(1), t))
	right := c.mul(c.mul(c.k(0.5), x), c.mul(c.sub(c.k(1), c.mul(t, t)), du))
	return c.add(left, right)
}

// dropoutGrad reuses the forward mask: in training mode the output is
// x·mask/(1-ratio), so the gradient is gy·mask/(1-ratio); otherwise
// Dropout is the identity. training_mode and ratio may be run-time inputs
// (opset 12), so the choice is made at run time with Where.
func dropoutGrad(c *ctx) error {
	gy := c.gy[0]
	training := input(c.n, 2)
	if training == "" {
		c.set(0, gy) // no training_mode input: inference, an identity
		return nil
	}
	mask := c.output(1, graph.Bool)
	ratio := input(c.n, 1)
	if ratio == "" {
		ratio = c.k(0.5)
	} else {
		ratio = c.cast(ratio, c.dt())
	}
	scale := c.div(c.k(1), c.sub(c.k(1), ratio))
	dropped := c.mul(c.mul(gy, c.cast(mask, c.dt())), scale)
	c.set(0, c.where(training, dropped, gy))
	return nil
}
