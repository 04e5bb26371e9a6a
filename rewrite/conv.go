package rewrite

import (
	"fmt"
	"slices"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Conv LoRA, as PEFT's lora.Conv1d/Conv2d/Conv3d: lora_A is a convolution
// with the base's kernel, strides and padding from the input channels to r
// channels, lora_B a 1x1 convolution from r to the output channels, and
//
//	y = conv(x, W) + scaling · conv(conv(dropout(x), A), B)
//
// Because B is 1x1, the branch is the convolution with the kernel
// ΔW[o, i, k…] = scaling · Σ_r B[o, r] · A[r, i, k…], which is PEFT's
// get_delta_weight for both its 1x1 and kxk paths: merge folds exactly that
// into W, flattened to [out, in·K] and updated like a Linear weight.

const opConv = "Conv"

// convBaseAttrs are the Conv attributes lora_A copies from the layer so
// its output has the base's spatial shape (dilations too, which PEFT's
// lora_A lacks; see exportConvProblem).
var convBaseAttrs = []string{"auto_pad", "dilations", "kernel_shape", "pads", "strides"}

// convBranch is the branch Inject writes beside a Conv:
//
//	y = base(x) + S * Conv(Conv(dropout(x), A), B)
//
// A is [r, in, k…] and Conv_A has the base's attributes; B is [out, r, 1…]
// and Conv_B has none (stride 1, no padding).
var convBranch = &branchKind{
	Name:    "conv lora",
	BaseOps: []string{opConv},
	Params: []branchParam{
		{Name: "A", Label: "lora_A", Class: paramKernel, Dims: []string{"r", "in"}},
		{Name: "B", Label: "lora_B", Class: paramKernel, Dims: []string{"out", "r"}},
		{Name: "S", Label: "scaling", Class: paramScalar},
		{Name: "ratio", Label: "dropout ratio", Optional: true},
	},
	Nodes: []branchNode{
		{Name: "Dropout", Op: "Dropout", In: []operand{theLayerInput, paramIn("ratio")}, When: whenDropout,
			MoreInputs: true, SpareOutputs: true, Shape: shapeSame},
		{Name: "Conv_A", Op: opConv, In: []operand{nodeOut("Dropout"), paramIn("A")}, BaseAttrs: convBaseAttrs},
		{Name: "Conv_B", Op: opConv, In: []operand{nodeOut("Conv_A"), paramIn("B")}, Shape: shapeLayerOut},
		{Name: "Mul_scaling", Op: "Mul", In: []operand{nodeOut("Conv_B"), paramIn("S")}, Commutes: true, Shape: shapeLayerOut},
		{Name: "Add", Op: "Add", In: []operand{theLayerOutput, nodeOut("Mul_scaling")}, Commutes: true},
	},
}

// convLayerOf returns the Conv node n as a layer, or why it cannot take an
// adapter.
func convLayerOf(g *graph.Graph, n *onnxpb.NodeProto) (*Layer, string) {
	w := g.ResolveWeight(n.Input[1])
	if w == nil {
		if p := g.Producer(n.Input[1]); p != nil && p.GetOpType() == "DequantizeLinear" {
			return nil, "quantized Conv weight (DequantizeLinear)"
		}
		if g.IsOverridableInitializer(n.Input[1]) || g.IsGraphInput(n.Input[1]) {
			return nil, "dynamic weight: " + fmt.Sprintf("%q", n.Input[1]) + " is a graph input"
		}
		return nil, "the Conv's weight is not a constant"
	}
	if isAdapterWeight(w.Name) {
		return nil, "part of a LoRA adapter"
	}
	dims := w.Dims()
	if len(dims) < 3 || w.Transposed {
		return nil, fmt.Sprintf("Conv weight %q is %v, not [out, in, kernel...]", w.Name, dims)
	}
	for _, d := range dims {
		if d <= 0 {
			return nil, fmt.Sprintf("Conv weight %q has shape %v", w.Name, dims)
		}
	}
	l := &Layer{Node: n, Graph: g, Op: opConv, Alpha: 1, Weight: w, DType: w.DataType(), In: dims[1], Out: dims[0], Kernel: slices.Clone(dims[2:])}
	if w.CastTo != graph.Undefined {
		l.DType = w.CastTo
	}
	if !l.DType.IsFloat() || !w.DataType().IsFloat() {
		return nil, fmt.Sprintf("Conv weight %q is %v, not floating point (quantized?)", w.Name, w.DataType())
	}
	if group := graph.AttrInt(n, "group", 1); group != 1 {
		// PEFT injects grouped Conv LoRA (a full lora_A, a grouped lora_B)
		// but refuses to merge it: its delta is a full convolution, which
		// the grouped kernel [out, in/group, k…] cannot hold.
		return nil, fmt.Sprintf("grouped Conv (group=%d): a LoRA delta is a full convolution the grouped kernel cannot hold, so it could never be merged (PEFT refuses too)", group)
	}
	l.place(g, w)
	return l, ""
}

// convFactor returns the shape and initial values of lora_A ([r, in, k…],
// PEFT's kaiming_uniform_(a=√5) over the fan-in in·K, or N(0, 1/r²) for
// gaussian) or lora_B ([out, r, 1…], zero) of a Conv layer.
func convFactor(l *Layer, which string, r int64, cfg InjectConfig) ([]int64, []float64) {
	ones := make([]int64, len(l.Kernel))
	for i := range ones {
		ones[i] = 1
	}
	if which == "B" {
		return append([]int64{l.Out, r}, ones...), make([]float64, l.Out*r)
	}
	// initA draws fan_in·r independent values with bound 1/√fan_in; the
	// layout does not matter for i.i.d. draws.
	return append([]int64{r, l.In}, l.Kernel...), initA(l.Module, l.In*l.KernelSize(), r, cfg)
}

// constantKernel returns the constant float tensor of rank 3 or more (a
// convolution kernel) behind name, or nil.
func constantKernel(g *graph.Graph, name string) *onnxpb.TensorProto {
	t, _, _ := g.ConstantTensor(name)
	if t == nil || !graph.DataType(t.GetDataType()).IsFloat() || len(t.Dims) < 3 {
		return nil
	}
	return t
}

// matrixOf reports whether a tensor of dims holds a [rows, cols] matrix
// row-major: a matrix, or a kernel [rows, c, k…] with c·Πk = cols.
func matrixOf(dims []int64, rows, cols int) bool {
	if len(dims) < 2 || dims[0] != int64(rows) {
		return false
	}
	n := int64(1)
	for _, d := range dims[1:] {
		n *= d
	}
	return n == int64(cols)
}

// checkConvBranch checks what the structural match leaves to the kind: A
// has the layer's kernel, Conv_A the layer's attributes, B is 1x1 and
// Conv_B a plain 1x1 convolution. Anything else would not be ΔW = B·A.
func checkConvBranch(bm *branchMatch) error {
	l := bm.Layer
	ta, tb := bm.Tensors["A"], bm.Tensors["B"]
	r := bm.Dims["r"]
	wantA := append([]int64{r, l.In}, l.Kernel...)
	if !slices.Equal(ta.Dims, wantA) {
		return fmt.Errorf("lora_A %s is %v; the Conv's kernel needs %v", bm.Params["A"], ta.Dims, wantA)
	}
	wantB, _ := convFactor(l, "B", r, InjectConfig{})
	if !slices.Equal(tb.Dims, wantB) {
		return fmt.Errorf("lora_B %s is %v; a 1x1 kernel %v is needed", bm.Params["B"], tb.Dims, wantB)
	}
	ca, cb := bm.node("Conv_A"), bm.node("Conv_B")
	for _, name := range convBaseAttrs {
		if !sameConvAttr(graph.Attr(ca, name), graph.Attr(l.Node, name)) {
			return fmt.Errorf("%s's %s differs from the layer's: it is not the layer's convolution", nodeDisplayName(ca), name)
		}
	}
	if graph.AttrInt(ca, "group", 1) != 1 || graph.AttrInt(cb, "group", 1) != 1 {
		return fmt.Errorf("the branch's convolutions are grouped")
	}
	for _, name := range []string{"strides", "dilations"} {
		for _, v := range graph.AttrInts(cb, name) {
			if v != 1 {
				return fmt.Errorf("%s has %s %v: not a plain 1x1 convolution", nodeDisplayName(cb), name, graph.AttrInts(cb, name))
			}
		}
	}
	for _, v := range graph.AttrInts(cb, "pads") {
		if v != 0 {
			return fmt.Errorf("%s pads its input: not a plain 1x1 convolution", nodeDisplayName(cb))
		}
	}
	if a := graph.Attr(cb, "auto_pad"); a != nil && string(a.S) != "NOTSET" && string(a.S) != "VALID" {
		return fmt.Errorf("%s has auto_pad %s: not a plain 1x1 convolution", nodeDisplayName(cb), a.S)
	}
	return nil
}

// sameConvAttr compares two optional Conv attributes, absent equal to
// absent only.
func sameConvAttr(a, b *onnxpb.AttributeProto) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return sameAttr(a, b)
}

// addConvAdapter plans the merge of a Conv branch.
func (p *plan) addConvAdapter(f *foundAdapter) error {
	if err := checkConvBranch(f.branchMatch); err != nil {
		return err
	}
	return p.addFactors(f, p.addConvUpdate)
}

// addConvUpdate plans W += scaling·Scale · B·A for a Conv layer, with A
// [r, in·K] and B [out, r] row-major (PEFT's layouts, flattened): the
// kernel [out, in, k…] is the matrix [out, in·K], updated as a Linear
// weight stored [out, in] is.
func (p *plan) addConvUpdate(l *Layer, a, b []float64, r int, scaling float64, rep *MergedLayer) error {
	flat := *l
	flat.In = l.In * l.KernelSize()
	flat.TransB = true // stored [out, in·K], as a transB Gemm's weight
	if int64(len(a)) != flat.In*int64(r) || int64(len(b)) != int64(r)*l.Out {
		return fmt.Errorf("factors of %d and %d values do not fit a Conv of %d->%d channels and kernel %v at rank %d", len(a), len(b), l.In, l.Out, l.Kernel, r)
	}
	// addUpdate takes the factors in x·W orientation: Aᵀ [in·K, r], Bᵀ [r, out].
	return p.addUpdate(&flat, transposeF64(a, r, int(flat.In)), transposeF64(b, int(l.Out), r), r, scaling, rep)
}

// adapterParams counts an adapter's trainable elements: A and B, whose
// in side spans the kernel for a Conv layer.
func adapterParams(a *Adapter) int64 {
	k := int64(1)
	for _, d := range a.Kernel {
		k *= d
	}
	n := int64(a.Rank) * (a.InFeatures*k + a.OutFeatures)
	if a.Magnitude != "" {
		n += a.OutFeatures
	}
	return n
}

// checkLayerKinds refuses, naming the layer, the selected layers the
// inject config cannot adapt as asked.
func checkLayerKinds(layers []*Layer, sel []Selection, cfg InjectConfig) error {
	for _, s := range sel {
		l := layers[s.Index]
		if l.Quant != nil {
			if why := quantProblem(l, cfg); why != "" {
				return fmt.Errorf("module %s: %s", l.Module, why)
			}
		}
		if cfg.DoRA {
			if why := doraProblem(l, cfg); why != "" {
				return fmt.Errorf("module %s: %s", l.Module, why)
			}
		}
		if l.Op != opConv {
			continue
		}
		switch {
		case cfg.AdapterInputs:
			return fmt.Errorf("module %s: Conv layers take no adapter-input branch (ONNX Runtime's LoRA adapters hold 2-D factors); exclude it", l.Module)
		case cfg.Init != InitKaiming && cfg.Init != InitGaussian:
			return fmt.Errorf("module %s: --init %s is for Linear layers (PEFT's too); exclude the Conv layer or use kaiming/gaussian", l.Module, cfg.Init)
		}
	}
	return nil
}

// convAssignmentProblem says why a PEFT module and its layer disagree
// about being a convolution, or "".
func convAssignmentProblem(mod *export.PEFTModule, l *Layer) string {
	switch {
	case mod.Magnitude != nil && mod.Embedding:
		return "DoRA on an Embedding layer is not supported"
	case l.Op == opConv && mod.Kernel == nil:
		return fmt.Sprintf("%s %v is a Linear LoRA factor, but layer %s is a Conv with kernel %v", suffixOf(mod.KeyA), mod.ShapeA(), l.Module, l.Kernel)
	case l.Op != opConv && mod.Kernel != nil:
		return fmt.Sprintf("%s %v is a Conv LoRA kernel, but layer %s is a %s", suffixOf(mod.KeyA), mod.ShapeA(), l.Module, l.Op)
	case l.Op == opConv && !slices.Equal(int64s(mod.Kernel), l.Kernel):
		return fmt.Sprintf("%s %v has kernel %v, but layer %s's kernel is %v", suffixOf(mod.KeyA), mod.ShapeA(), mod.Kernel, l.Module, l.Kernel)
	}
	return ""
}

func int64s(v []int) []int64 {
	out := make([]int64, len(v))
	for i, x := range v {
		out[i] = int64(x)
	}
	return out
}

// addPEFTConv plans a PEFT Conv LoRA module's delta: its A [r, in, k…] and
// B [out, r, 1…] are already the flattened factors addConvUpdate takes.
func (p *plan) addPEFTConv(as *PEFTAssignment) error {
	l, mod := as.layer, as.mod
	a := make([]float64, len(mod.A))
	for i, v := range mod.A {
		a[i] = float64(v)
	}
	b := make([]float64, len(mod.B))
	for i, v := range mod.B {
		b[i] = float64(v)
	}
	rep := &MergedLayer{Module: l.Module, PEFTModule: mod.Name, Rank: mod.Rank, Alpha: mod.Alpha, Scaling: mod.Scaling}
	if mod.Magnitude != nil {
		// DoRA takes the factors in x·W orientation, A [in·K, r], B [r, out].
		at, bt := transposeF64(a, mod.Rank, len(a)/mod.Rank), transposeF64(b, mod.OutFeatures, mod.Rank)
		return p.addPEFTDoRA(l, mod, at, bt, rep)
	}
	return p.addConvUpdate(l, a, b, mod.Rank, mod.Scaling, rep)
}

// peftConvModule converts a Conv branch to PEFT's Conv LoRA module: A and
// B are stored in PEFT's layouts already. PEFT's lora_A takes the base's
// kernel, stride and (symmetric) padding but no dilation, so a branch PEFT
// could not rebuild is refused.
func peftConvModule(m *graph.Model, f *foundAdapter, dt export.DType) (export.PEFTModule, error) {
	if err := checkConvBranch(f.branchMatch); err != nil {
		return export.PEFTModule{}, err
	}
	l := f.Layer
	for _, d := range graph.AttrInts(l.Node, "dilations") {
		if d != 1 {
			return export.PEFTModule{}, fmt.Errorf("Conv %s has dilations %v; PEFT's lora_A has none, so PEFT could not load this adapter", l.Module, graph.AttrInts(l.Node, "dilations"))
		}
	}
	if pads := graph.AttrInts(l.Node, "pads"); len(pads) > 0 && !slices.Equal(pads[:len(pads)/2], pads[len(pads)/2:]) {
		return export.PEFTModule{}, fmt.Errorf("Conv %s pads %v unevenly; PEFT's lora_A pads both sides alike", l.Module, pads)
	}
	if a := graph.Attr(l.Node, "auto_pad"); a != nil && string(a.S) != "NOTSET" && string(a.S) != "VALID" {
		return export.PEFTModule{}, fmt.Errorf("Conv %s has auto_pad %s, which PEFT's lora_A cannot take", l.Module, a.S)
	}
	a, b, err := f.factors(m)
	if err != nil {
		return export.PEFTModule{}, err
	}
	mod := export.PEFTModule{
		Name: f.Module, DType: dt, Rank: f.Rank, InFeatures: int(l.In), OutFeatures: int(l.Out),
		Alpha: f.Alpha, Scaling: f.Scaling, Kernel: make([]int, len(l.Kernel)),
		A: make([]float32, len(a)), B: make([]float32, len(b)),
	}
	for i, k := range l.Kernel {
		mod.Kernel[i] = int(k)
	}
	for i, v := range a {
		mod.A[i] = float32(v)
	}
	for i, v := range b {
		mod.B[i] = float32(v)
	}
	return mod, attachMagnitude(m, f, &mod)
}

// Params counts the adapter's trainable elements as PEFT does: A and B
// (whose in side spans a Conv's kernel) and a DoRA magnitude.
func (a *Adapter) Params() int64 { return adapterParams(a) }
