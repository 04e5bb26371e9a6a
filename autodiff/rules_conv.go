package autodiff

import (
	"errors"
	"fmt"
	"math"

	"github.com/onnxlora/onnxlora/graph"
)

func init() {
	register("Conv", &rule{grad: convGrad})
}

// convGrad differentiates Conv (explicit or VALID padding; grouped Convs
// for their input only, as a frozen depthwise layer needs) for any
// spatial rank, with ops Conv and ConvTranspose themselves:
//   - x: ConvTranspose(gy, W) with the forward's strides, pads and
//     dilations and the largest output_padding (stride - 1), sliced to x's
//     spatial size read at run time (the extra rows are positions no output
//     read);
//   - W: the correlation of x and gy, as a Conv with batch and channels
//     swapped: Conv(xᵀ, gyᵀ) with strides and dilations exchanged, sliced
//     to the kernel size and transposed back to [out, in, k…];
//   - bias: gy summed over batch and space.
func convGrad(c *ctx) error {
	x, w, gy := c.x(0), c.x(1), c.gy[0]
	group := graph.AttrInt(c.n, "group", 1)
	if group != 1 && c.need[1] {
		return fmt.Errorf("the kernel gradient of a grouped Conv (group %d) is not supported (its input's is)", group)
	}
	switch pad := string(graph.Attr(c.n, "auto_pad").GetS()); pad {
	case "", "NOTSET", "VALID":
	default:
		return fmt.Errorf("the gradient of a Conv with auto_pad %s is not supported (explicit pads are)", pad)
	}
	ws, ok := c.ti.shape[w]
	if !ok || len(ws) < 3 {
		return errors.New("the Conv weight's rank is not known")
	}
	r := len(ws) - 2
	kernel := graph.AttrInts(c.n, "kernel_shape")
	if kernel == nil {
		for _, d := range ws[2:] {
			if !d.known() {
				return errors.New("the Conv kernel's size is not known")
			}
			kernel = append(kernel, d.value)
		}
	}
	ones := func(v int64) []int64 {
		s := make([]int64, r)
		for i := range s {
			s[i] = v
		}
		return s
	}
	strides := graph.AttrInts(c.n, "strides")
	if strides == nil {
		strides = ones(1)
	}
	dil := graph.AttrInts(c.n, "dilations")
	if dil == nil {
		dil = ones(1)
	}
	pads := graph.AttrInts(c.n, "pads")
	if pads == nil || string(graph.Attr(c.n, "auto_pad").GetS()) == "VALID" {
		pads = ones(0)
		pads = append(pads, ones(0)...)
	}
	spatial := make([]int64, r)
	for i := range spatial {
		spatial[i] = int64(2 + i)
	}
	if c.need[0] {
		outPad := make([]int64, r)
		for i, s := range strides {
			outPad[i] = s - 1
		}
		// W [out, in/group, k…] is ConvTranspose's [in', out'/group, k…].
		full := c.op("ConvTranspose", []string{gy, w}, intsAttr("strides", strides...), intsAttr("dilations", dil...),
			intsAttr("pads", pads...), intsAttr("output_padding", outPad...), intsAttr("kernel_shape", kernel...),
			intAttr("group", group))
		ends := c.slice1(c.shape(x), c.ints(2), c.ints(math.MaxInt64), 0)
		c.set(0, c.op("Slice", []string{full, c.ints(ones(0)...), ends, c.ints(spatial...)}))
	}
	if c.need[1] {
		perm := append([]int64{1, 0}, spatial...)
		xt := c.transpose(x, perm...)
		gt := c.transpose(gy, perm...)
		corr := c.op("Conv", []string{xt, gt}, intsAttr("strides", dil...), intsAttr("dilations", strides...),
			intsAttr("pads", pads...))
		cut := c.op("Slice", []string{corr, c.ints(ones(0)...), c.ints(kernel...), c.ints(spatial...)})
		c.set(1, c.transpose(cut, perm...))
	}
	if len(c.n.Input) > 2 && c.n.Input[2] != "" && c.need[2] {
		c.set(2, c.reduce("ReduceSum", gy, append([]int64{0}, spatial...), false))
	}
	return nil
}
