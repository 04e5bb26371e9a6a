package rewrite

import (
	"errors"
	"fmt"
	"math"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// DoRA, as PEFT's use_dora (peft/tuners/lora/dora.py): a magnitude m per
// output feature, and with V = W + scaling·ΔW (ΔW = A·B in x·W terms) and
// its per-output-feature norm ‖V‖,
//
//	y = base(x) + (m/‖V‖ − 1)·(x·W) + (m/‖V‖)·scaling·((x·A)·B)
//	  = (m/‖V‖) · (x·W + scaling·(x·A)·B)  (+ the layer's bias)
//
// which is what the branch computes, from the current W, A and B. m starts
// at ‖W‖ (B is zero), so the injected model computes the base exactly.
// Merge writes W' = (m/‖W + scaling·ΔW‖) · (W + scaling·ΔW) per output
// feature, as PEFT's DoRA merge does; the bias is unchanged.
//
// PEFT detaches ‖V‖ from the gradient (DoRA paper §4.3): the Sqrt_norm
// node carries doraDetach as its doc_string, which autodiff treats as
// torch's detach().

// doraDetach is autodiff.DetachMarker (rewrite cannot import autodiff,
// whose tests import rewrite; a test checks they agree).
const doraDetach = "onnxlora:detach"

// doraNodes builds one DoRA description: bias for a Gemm with C (the
// branch takes C off the base's output and adds it back), transB for a
// weight read [out, in].
func doraNodes(bias, transB bool) []branchNode {
	var nodes []branchNode
	if transB {
		// V = W + S·(A·B)ᵀ, [out, in]; ‖V‖ over in, as a [1, out] row.
		nodes = append(nodes,
			branchNode{Name: "Gemm_AB", Op: "Gemm", In: []operand{paramIn("B"), paramIn("A")},
				Attrs: []*onnxpb.AttributeProto{doraIntAttr("transA", 1), doraIntAttr("transB", 1)}},
			branchNode{Name: "Mul_AB_scaling", Op: "Mul", In: []operand{nodeOut("Gemm_AB"), paramIn("S")}, Commutes: true},
			branchNode{Name: "Add_V", Op: "Add", In: []operand{paramIn("W"), nodeOut("Mul_AB_scaling")}, Commutes: true},
			branchNode{Name: "Pow_V", Op: "Pow", In: []operand{nodeOut("Add_V"), paramIn("two")}},
			branchNode{Name: "MatMul_norm2", Op: "MatMul", In: []operand{nodeOut("Pow_V"), paramIn("ones")}},
			branchNode{Name: "Transpose_norm2", Op: "Transpose", In: []operand{nodeOut("MatMul_norm2")},
				Attrs: []*onnxpb.AttributeProto{intsAttr("perm", 1, 0)}},
			branchNode{Name: "Sqrt_norm", Op: "Sqrt", In: []operand{nodeOut("Transpose_norm2")}, Doc: doraDetach},
		)
	} else {
		// V = W + S·A·B, [in, out]; ‖V‖ over in, as a [1, out] row.
		nodes = append(nodes,
			branchNode{Name: "MatMul_AB", Op: "MatMul", In: []operand{paramIn("A"), paramIn("B")}},
			branchNode{Name: "Mul_AB_scaling", Op: "Mul", In: []operand{nodeOut("MatMul_AB"), paramIn("S")}, Commutes: true},
			branchNode{Name: "Add_V", Op: "Add", In: []operand{paramIn("W"), nodeOut("Mul_AB_scaling")}, Commutes: true},
			branchNode{Name: "Pow_V", Op: "Pow", In: []operand{nodeOut("Add_V"), paramIn("two")}},
			branchNode{Name: "MatMul_norm2", Op: "MatMul", In: []operand{paramIn("ones"), nodeOut("Pow_V")}},
			branchNode{Name: "Sqrt_norm", Op: "Sqrt", In: []operand{nodeOut("MatMul_norm2")}, Doc: doraDetach},
		)
	}
	nodes = append(nodes,
		branchNode{Name: "Div_magnitude", Op: "Div", In: []operand{paramIn("M"), nodeOut("Sqrt_norm")}},
		branchNode{Name: "MatMul_A", Op: "MatMul", In: []operand{theLayerInput, paramIn("A")}, Shape: shapeLastRank},
		branchNode{Name: "MatMul_B", Op: "MatMul", In: []operand{nodeOut("MatMul_A"), paramIn("B")}, Shape: shapeLayerOut},
		branchNode{Name: "Mul_scaling", Op: "Mul", In: []operand{nodeOut("MatMul_B"), paramIn("S")}, Commutes: true, Shape: shapeLayerOut},
	)
	base := theLayerOutput
	if bias {
		nodes = append(nodes, branchNode{Name: "Sub_bias", Op: "Sub", In: []operand{theLayerOutput, paramIn("C")}, Shape: shapeLayerOut})
		base = nodeOut("Sub_bias")
	}
	nodes = append(nodes,
		branchNode{Name: "Add_lora", Op: "Add", In: []operand{base, nodeOut("Mul_scaling")}, Commutes: true, Shape: shapeLayerOut},
		branchNode{Name: "Mul_dora", Op: "Mul", In: []operand{nodeOut("Add_lora"), nodeOut("Div_magnitude")}, Commutes: true},
	)
	if bias {
		nodes[len(nodes)-1].Shape = shapeLayerOut
		nodes = append(nodes, branchNode{Name: "Add_bias", Op: "Add", In: []operand{nodeOut("Mul_dora"), paramIn("C")}, Commutes: true})
	}
	return nodes
}

func doraKindOf(bias, transB bool) *branchKind {
	ones := []string{"one", "in"}
	if transB {
		ones = []string{"in", "one"}
	}
	name := "dora"
	if bias {
		name += " with bias"
	}
	if transB {
		name += " (transB)"
	}
	params := []branchParam{
		{Name: "A", Label: "lora_A", Class: paramMatrix, Dims: []string{"in", "r"}},
		{Name: "B", Label: "lora_B", Class: paramMatrix, Dims: []string{"r", "out"}},
		{Name: "S", Label: "scaling", Class: paramScalar},
		{Name: "M", Label: "lora_magnitude_vector", Class: paramMatrix, Dims: []string{"one", "out"}},
		{Name: "ones", Label: "DoRA ones", Class: paramMatrix, Dims: ones},
		{Name: "two", Label: "DoRA exponent", Class: paramScalar},
		{Name: "W", Label: "the layer's weight", LayerValue: true},
	}
	if bias {
		params = append(params, branchParam{Name: "C", Label: "the layer's bias", LayerValue: true})
	}
	return &branchKind{Name: name, BaseOps: []string{"MatMul", "Gemm"}, Params: params, Nodes: doraNodes(bias, transB)}
}

// The DoRA kinds: MatMul or Gemm, transB or not, with the Gemm's C or not.
var (
	doraBranch           = doraKindOf(false, false)
	doraBranchTransB     = doraKindOf(false, true)
	doraBiasBranch       = doraKindOf(true, false)
	doraBiasBranchTransB = doraKindOf(true, true)
	doraKinds            = []*branchKind{doraBranch, doraBranchTransB, doraBiasBranch, doraBiasBranchTransB}
)

func isDoRAKind(k *branchKind) bool {
	for _, d := range append(doraKinds[:len(doraKinds):len(doraKinds)], doraConvKinds...) {
		if k == d {
			return true
		}
	}
	return false
}

// hasBias reports whether a Gemm layer adds a C input.
func hasBias(l *Layer) bool {
	return (l.Op == "Gemm" || l.Op == opConv) && len(l.Node.Input) > 2 && l.Node.Input[2] != ""
}

// doraKind returns the DoRA description for a layer.
func doraKind(l *Layer) *branchKind {
	if l.Op == opConv {
		return doraConvKind(l)
	}
	return doraKindOf(hasBias(l), l.TransB)
}

// doraProblem says why a layer cannot take a DoRA branch, or "".
func doraProblem(l *Layer, cfg InjectConfig) string {
	switch {
	case l.Op == opConv && doraConvKind(l) == nil:
		return fmt.Sprintf("DoRA on a Conv with %d spatial axes is not supported", len(l.Kernel))
	case l.Op == opConv:
	case l.Op != "MatMul" && l.Op != "Gemm":
		return "DoRA needs a MatMul or Gemm"
	case l.TransA || l.Alpha != 1:
		return "DoRA needs a Gemm with transA=0 and alpha=1"
	case hasBias(l) && graph.AttrFloat(l.Node, "beta", 1) != 1:
		return "DoRA needs a Gemm with beta=1"
	case cfg.Dropout > 0:
		return "DoRA with dropout is not supported (PEFT applies the dropout inside the magnitude term); inject without --dropout"
	case cfg.AdapterInputs:
		return "DoRA cannot be an adapter-input branch"
	case cfg.Init != InitKaiming && cfg.Init != InitGaussian:
		return fmt.Sprintf("DoRA with --init %s is not supported", cfg.Init)
	}
	return ""
}

func doraIntAttr(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

// weightInOut returns the layer's weight as x·W uses it, [in, out]
// row-major, in float64.
func weightInOut(m *graph.Model, l *Layer) ([]float64, error) {
	w, err := m.Float64s(l.Weight.Tensor)
	if err != nil {
		return nil, err
	}
	switch {
	case l.Op == opConv: // [out, in, k…] = [out, in·K]
		w = transposeF64(w, int(l.Out), int(l.In*l.KernelSize()))
	case l.StoredTransposed():
		w = transposeF64(w, int(l.Out), int(l.In))
	}
	return w, nil
}

// doraNorms returns ‖W + scaling·A·B‖ per output feature, with W [in,
// out], A [in, r] and B [r, out]; a nil A means B = 0.
func doraNorms(w, a, b []float64, in, out, r int, scaling float64) []float64 {
	n := make([]float64, out)
	row := make([]float64, out)
	for i := 0; i < in; i++ {
		copy(row, w[i*out:(i+1)*out])
		if a != nil {
			for k := 0; k < r; k++ {
				c := scaling * a[i*r+k]
				if c == 0 {
					continue
				}
				for j := range row {
					row[j] += c * b[k*out+j]
				}
			}
		}
		for j, v := range row {
			n[j] += v * v
		}
	}
	for j := range n {
		n[j] = math.Sqrt(n[j])
	}
	return n
}

// doraParam makes DoRA's params for inject: W and C are the layer's own
// inputs (no tensor), M the norms of W (B starts at zero), ones a row of
// ones and two the exponent.
func doraParam(m *graph.Model, l *Layer, name string) (string, *onnxpb.TensorProto, error) {
	g := l.Graph
	switch name {
	case "W":
		return l.Node.Input[1], nil, nil
	case "C":
		return l.Node.Input[2], nil, nil
	case "M":
		w, err := weightInOut(m, l)
		if err != nil {
			return "", nil, err
		}
		norms := doraNorms(w, nil, nil, int(l.In*l.KernelSize()), int(l.Out), 0, 0)
		for j, v := range norms {
			if v == 0 {
				return "", nil, fmt.Errorf("output feature %d of weight %q is all zeros: DoRA's m/‖W‖ is undefined", j, l.Weight.Name)
			}
		}
		dims := []int64{1, l.Out}
		for range l.Kernel {
			dims = append(dims, 1)
		}
		t, err := graph.NewFloatTensor(g.UniqueName(l.Module+".lora_magnitude_vector"), l.DType, dims, norms)
		return "", t, err
	case "ones":
		dims := []int64{1, l.In}
		if l.TransB {
			dims = []int64{l.In, 1}
		}
		dims = append(dims, l.Kernel...)
		vals := make([]float64, l.In*l.KernelSize())
		for i := range vals {
			vals[i] = 1
		}
		t, err := graph.NewFloatTensor(g.UniqueName(l.Module+".lora_dora_ones"), l.DType, dims, vals)
		return "", t, err
	case "two":
		t, err := graph.NewFloatTensor(g.UniqueName(l.Module+".lora_dora_two"), l.DType, nil, []float64{2})
		return "", t, err
	}
	return "", nil, fmt.Errorf("no value for DoRA param %s", name)
}

// checkDoRABranch checks what the structural match leaves to the kind:
// the branch reads the layer's own weight (and bias), the kind fits the
// layer, the ones are ones and the exponent two.
func checkDoRABranch(m *graph.Model, bm *branchMatch) error {
	l := bm.Layer
	if want := doraKind(l); want.Name != bm.Kind.Name {
		return fmt.Errorf("the DoRA branch is of kind %s but the layer needs %s", bm.Kind.Name, want.Name)
	}
	if bm.Params["W"] != l.Node.Input[1] {
		return fmt.Errorf("the DoRA norm reads %q, not the layer's weight %q", bm.Params["W"], l.Node.Input[1])
	}
	if bm.Kind.param("C") != nil && bm.Params["C"] != l.Node.Input[2] {
		return fmt.Errorf("the DoRA branch adds back %q, not the layer's bias %q", bm.Params["C"], l.Node.Input[2])
	}
	if l.Op == opConv {
		if err := checkConvBranch(bm); err != nil {
			return err
		}
		for _, role := range []string{"Conv_W", "Conv_W_bias"} {
			if n := bm.node(role); n != nil {
				for _, name := range convBaseAttrs {
					if !sameConvAttr(graph.Attr(n, name), graph.Attr(l.Node, name)) {
						return fmt.Errorf("%s's %s differs from the layer's", nodeDisplayName(n), name)
					}
				}
			}
		}
	}
	if bm.Dims["one"] != 1 {
		return fmt.Errorf("lora_magnitude_vector %s is %v, not [1, %d]", bm.Params["M"], bm.Tensors["M"].Dims, l.Out)
	}
	ones, err := m.Float64s(bm.Tensors["ones"])
	if err != nil {
		return err
	}
	for _, v := range ones {
		if v != 1 {
			return fmt.Errorf("DoRA ones %s holds %v", bm.Params["ones"], v)
		}
	}
	two, err := m.Float64s(bm.Tensors["two"])
	if err != nil {
		return err
	}
	if two[0] != 2 {
		return fmt.Errorf("DoRA exponent %s is %v, not 2", bm.Params["two"], two[0])
	}
	return nil
}

// addDoRAAdapter plans the merge of a DoRA branch.
func (p *plan) addDoRAAdapter(f *foundAdapter) error {
	if err := checkDoRABranch(p.m, f.branchMatch); err != nil {
		return err
	}
	a, b, err := f.factors(p.m)
	if err != nil {
		return err
	}
	mag, err := p.m.Float64s(f.Tensors["M"])
	if err != nil {
		return err
	}
	if l := f.Layer; l.Op == opConv { // A [r, in·K], B [out, r] -> x·W's
		a, b = transposeF64(a, f.Rank, len(a)/max(f.Rank, 1)), transposeF64(b, int(l.Out), f.Rank)
	}
	rep := &MergedLayer{Module: f.Module, Rank: f.Rank, Alpha: f.Alpha, Scaling: f.Scaling}
	if err := p.addDoRAUpdate(f.Layer, f.branchMatch, a, b, mag, f.Rank, f.Scaling, rep); err != nil {
		return err
	}
	p.branches = append(p.branches, f.branch)
	return nil
}

// addDoRAUpdate plans W' = (m/‖W + scaling·A·B‖)·(W + scaling·A·B) per
// output feature, with A [in, r] and B [r, out] in x·W orientation.
// br is the branch being merged, nil for a PEFT module.
func (p *plan) addDoRAUpdate(l *Layer, br *branchMatch, a, b, mag []float64, r int, scaling float64, rep *MergedLayer) error {
	if p.opts.Scale != 1 {
		return fmt.Errorf("DoRA adapters merge at scale 1 only (the magnitude is absolute), not %v", p.opts.Scale)
	}
	if len(mag) != int(l.Out) {
		return fmt.Errorf("the DoRA magnitude has %d values for %d output features", len(mag), l.Out)
	}
	in := l.In * l.KernelSize()
	if int64(len(a)) != in*int64(r) || int64(len(b)) != int64(r)*l.Out {
		return fmt.Errorf("factors of %d and %d values do not fit a [%d, %d] layer at rank %d", len(a), len(b), in, l.Out, r)
	}
	w, err := weightInOut(p.m, l)
	if err != nil {
		return err
	}
	norms := doraNorms(w, a, b, int(in), int(l.Out), r, scaling)
	scale := make([]float64, len(norms))
	for j, n := range norms {
		if n == 0 || math.IsNaN(n) || math.IsInf(n, 0) {
			return fmt.Errorf("‖W + ΔW‖ of output feature %d is %v: DoRA's m/‖W + ΔW‖ is undefined", j, n)
		}
		scale[j] = mag[j] / n
	}
	if br != nil {
		// The branch reads W (and C) too, but it goes with the merge:
		// its nodes do not make the weight shared.
		for _, n := range br.Nodes {
			p.detached[n] = true
		}
	}
	if l.Op == opConv {
		err = p.addConvUpdate(l, transposeF64(a, int(in), r), transposeF64(b, r, int(l.Out)), r, scaling, rep)
	} else {
		err = p.addUpdate(l, a, b, r, scaling, rep)
	}
	if err != nil {
		return err
	}
	u := p.updates[len(p.updates)-1]
	u.scale, u.scaleRows = scale, rep.Transposed
	return nil
}

// scaledRow is mergeRows' path for an update with a per-output scale:
// dst = scale·(src + coef·acc) for one tile of row p from column c0, with
// w as scratch for the decoded source.
func scaledRow(drow, srow []byte, acc, w []float64, u *update, p, c0 int, st *mergeStats) {
	sdt, ddt := graph.DataType(u.src.GetDataType()), graph.DataType(u.dst.GetDataType())
	graph.DecodeFloatsInto(sdt, w, srow)
	for q, v := range acc {
		var s float64
		if u.scaleRows {
			s = u.scale[p]
		} else {
			s = u.scale[c0+q]
		}
		nv := s * (w[q] + float64(u.coef*v))
		if d := math.Abs(nv - w[q]); d > st.maxAbs {
			st.maxAbs = d
		}
		if nv != w[q] {
			st.changed++
		}
		w[q] = nv
	}
	graph.EncodeFloatsInto(ddt, drow, w)
	st.nonFinite += countNonFinite(ddt, drow)
}

// addPEFTDoRA plans a PEFT DoRA module's merge, A and B already in x·W
// orientation.
func (p *plan) addPEFTDoRA(l *Layer, mod *export.PEFTModule, a, b []float64, rep *MergedLayer) error {
	if why := doraProblem(l, InjectConfig{Init: InitKaiming}); why != "" {
		return errors.New(why)
	}
	mag := make([]float64, len(mod.Magnitude))
	for i, v := range mod.Magnitude {
		mag[i] = float64(v)
	}
	return p.addDoRAUpdate(l, nil, a, b, mag, mod.Rank, mod.Scaling, rep)
}

// attachMagnitude gives an exported DoRA module its magnitude vector.
func attachMagnitude(m *graph.Model, f *foundAdapter, mod *export.PEFTModule) error {
	if !isDoRAKind(f.Kind) {
		return nil
	}
	if err := checkDoRABranch(m, f.branchMatch); err != nil {
		return err
	}
	v, err := m.Float64s(f.Tensors["M"])
	if err != nil {
		return err
	}
	mod.Magnitude = make([]float32, len(v))
	for i, x := range v {
		mod.Magnitude[i] = float32(x)
	}
	return nil
}

// allDoRA reports whether the exported adapters are DoRA ones; PEFT's
// use_dora is one setting for a whole adapter, so a mix is refused.
func allDoRA(found []*foundAdapter) (bool, error) {
	n := 0
	for _, f := range found {
		if isDoRAKind(f.Kind) {
			n++
		}
	}
	if n > 0 && n < len(found) {
		return false, fmt.Errorf("%d of the %d adapters are DoRA: PEFT's use_dora is one setting per adapter dir, so export them apart (--only)", n, len(found))
	}
	return n > 0, nil
}

// sharedBeyond reports whether l's weight, or a value on its chain, has
// readers other than l's node, its chain and the named branch nodes.
func sharedBeyond(l *Layer, branch map[string]bool) bool {
	w := l.Weight
	skip := func(c *onnxpb.NodeProto) bool {
		if c == l.Node || (c.GetName() != "" && branch[c.GetName()]) {
			return true
		}
		for _, ch := range w.Chain {
			if c == ch {
				return true
			}
		}
		return false
	}
	if w.Scope != nil && countReaders(w.Scope, w.Name, skip) > 0 {
		return true
	}
	for _, ch := range w.Chain {
		if len(ch.Output) > 0 && countReaders(l.Graph, ch.Output[0], skip) > 0 {
			return true
		}
	}
	return false
}
