package rewrite

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// brOpts picks the variant of a hand-written LoRA branch.
type brOpts struct {
	gemmTransA bool // base is Gemm(x^T, W) with transA=1
	transpose  bool // branch reads Transpose(x)
	dropout    bool // branch has a Dropout (ratio as input)
}

func brFloat(t *testing.T, name string, dims []int64, vals ...float64) *onnxpb.TensorProto {
	t.Helper()
	n, _ := graph.NumElements(dims)
	for int64(len(vals)) < n {
		vals = append(vals, float64(len(vals))/8)
	}
	tp, err := graph.NewFloatTensor(name, graph.Float, dims, vals)
	if err != nil {
		t.Fatal(err)
	}
	return tp
}

func brNode(name, op string, in, out []string, attrs ...*onnxpb.AttributeProto) *onnxpb.NodeProto {
	return &onnxpb.NodeProto{Name: proto.String(name), OpType: proto.String(op), Input: in, Output: out, Attribute: attrs}
}

func brVI(name string) *onnxpb.ValueInfoProto {
	return &onnxpb.ValueInfoProto{Name: proto.String(name)}
}

// brGraph writes, by hand, the graph of one [4 -> 3] layer with a rank-2
// LoRA branch in the shape Inject writes:
//
//	y = Add(base(x), Mul(MatMul(MatMul(pre(x), A), B), S))
func brGraph(t *testing.T, o brOpts) *onnxpb.GraphProto {
	t.Helper()
	g := &onnxpb.GraphProto{
		Name:   proto.String("g"),
		Input:  []*onnxpb.ValueInfoProto{brVI("x")},
		Output: []*onnxpb.ValueInfoProto{brVI("y")},
		Initializer: []*onnxpb.TensorProto{
			brFloat(t, "W", []int64{4, 3}), brFloat(t, "A", []int64{4, 2}), brFloat(t, "B", []int64{2, 3}),
			brFloat(t, "S", nil, 0.5), brFloat(t, "ratio", nil, 0.1),
		},
	}
	if o.gemmTransA {
		g.Node = append(g.Node, brNode("base", "Gemm", []string{"x", "W"}, []string{"base_out"}, &onnxpb.AttributeProto{Name: proto.String("transA"), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(1)}))
	} else {
		g.Node = append(g.Node, brNode("base", "MatMul", []string{"x", "W"}, []string{"base_out"}))
	}
	in := "x"
	if o.transpose {
		g.Node = append(g.Node, brNode("T", "Transpose", []string{in}, []string{"t_out"}, intsAttr("perm", 1, 0)))
		in = "t_out"
	}
	if o.dropout {
		g.Node = append(g.Node, brNode("D", "Dropout", []string{in, "ratio"}, []string{"d_out"}))
		in = "d_out"
	}
	g.Node = append(g.Node,
		brNode("MA", "MatMul", []string{in, "A"}, []string{"xa"}),
		brNode("MB", "MatMul", []string{"xa", "B"}, []string{"xab"}),
		brNode("MUL", "Mul", []string{"xab", "S"}, []string{"delta"}),
		brNode("ADD", "Add", []string{"base_out", "delta"}, []string{"y"}),
	)
	return g
}

func brFind(g *onnxpb.GraphProto, name string) *onnxpb.NodeProto {
	for _, n := range g.Node {
		if n.GetName() == name {
			return n
		}
	}
	return nil
}

func brNames(ns []*onnxpb.NodeProto) string {
	var s []string
	for _, n := range ns {
		s = append(s, n.GetName())
	}
	return strings.Join(s, ",")
}

// TestRecognizeVariants checks what recognition accepts and rejects on
// branches written by hand, independently of Inject.
func TestRecognizeVariants(t *testing.T) {
	cases := []struct {
		name string
		opts brOpts
		edit func(g *onnxpb.GraphProto)
		// want is the branch's nodes, Add first, or "" for no branch; why
		// is a part of the reason given for a rejection.
		want, why string
		ratio     string
	}{
		{name: "plain", want: "ADD,MUL,MB,MA"},
		{name: "add inputs swapped", edit: func(g *onnxpb.GraphProto) {
			a := brFind(g, "ADD")
			a.Input[0], a.Input[1] = a.Input[1], a.Input[0]
		}, want: "ADD,MUL,MB,MA"},
		{name: "mul inputs swapped", edit: func(g *onnxpb.GraphProto) {
			m := brFind(g, "MUL")
			m.Input[0], m.Input[1] = m.Input[1], m.Input[0]
		}, want: "ADD,MUL,MB,MA"},
		{name: "scaling from a Constant node", edit: func(g *onnxpb.GraphProto) {
			c := brNode("C", "Constant", nil, []string{"S2"}, &onnxpb.AttributeProto{Name: proto.String("value_float"), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(2)})
			g.Node = append([]*onnxpb.NodeProto{c}, g.Node...)
			brFind(g, "MUL").Input[1] = "S2"
		}, want: "ADD,MUL,MB,MA"},
		{name: "dropout with ratio input", opts: brOpts{dropout: true}, want: "ADD,MUL,MB,MA,D", ratio: "ratio"},
		{name: "dropout with ratio attribute", opts: brOpts{dropout: true}, edit: func(g *onnxpb.GraphProto) {
			d := brFind(g, "D")
			d.Input = d.Input[:1]
			d.Attribute = append(d.Attribute, &onnxpb.AttributeProto{Name: proto.String("ratio"), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(0.2)})
		}, want: "ADD,MUL,MB,MA,D"},
		{name: "dropout with training_mode", opts: brOpts{dropout: true}, edit: func(g *onnxpb.GraphProto) {
			d := brFind(g, "D")
			d.Input = append(d.Input, "ratio")
		}, want: "ADD,MUL,MB,MA,D", ratio: "ratio"},
		{name: "dropout mask unused", opts: brOpts{dropout: true}, edit: func(g *onnxpb.GraphProto) {
			brFind(g, "D").Output = append(brFind(g, "D").Output, "mask")
		}, want: "ADD,MUL,MB,MA,D", ratio: "ratio"},
		{name: "dropout mask read", opts: brOpts{dropout: true}, edit: func(g *onnxpb.GraphProto) {
			brFind(g, "D").Output = append(brFind(g, "D").Output, "mask")
			g.Output = append(g.Output, brVI("mask"))
		}, why: "is used"},
		{name: "gemm transA with transpose", opts: brOpts{gemmTransA: true, transpose: true}, want: "ADD,MUL,MB,MA,T"},
		{name: "gemm transA, transpose and dropout", opts: brOpts{gemmTransA: true, transpose: true, dropout: true}, want: "ADD,MUL,MB,MA,D,T", ratio: "ratio"},
		{name: "gemm transA without transpose", opts: brOpts{gemmTransA: true}, why: "transA"},
		{name: "transpose without transA", opts: brOpts{transpose: true}, why: "transA"},
		{name: "transpose keeping the axes", opts: brOpts{gemmTransA: true, transpose: true}, edit: func(g *onnxpb.GraphProto) {
			brFind(g, "T").Attribute[0].Ints = []int64{0, 1}
		}, why: "base layer's input"},
		{name: "lora_A a graph input", edit: func(g *onnxpb.GraphProto) {
			g.Input = append(g.Input, brVI("A"))
		}, why: "constant"},
		{name: "scaling not a scalar", edit: func(g *onnxpb.GraphProto) {
			g.Initializer[3] = brFloat(t, "S", []int64{3})
		}, why: "scalar"},
		{name: "ranks disagree", edit: func(g *onnxpb.GraphProto) {
			g.Initializer[2] = brFloat(t, "B", []int64{3, 3})
		}, why: "do not fit"},
		{name: "A does not fit the layer", edit: func(g *onnxpb.GraphProto) {
			g.Initializer[1] = brFloat(t, "A", []int64{3, 2})
		}, why: "do not fit"},
		{name: "intermediate read elsewhere", edit: func(g *onnxpb.GraphProto) {
			g.Node = append(g.Node, brNode("spy", "Relu", []string{"xa"}, []string{"spy_out"}))
			g.Output = append(g.Output, brVI("spy_out"))
		}, why: "readers outside the adapter branch"},
		{name: "base output read elsewhere", edit: func(g *onnxpb.GraphProto) {
			g.Output = append(g.Output, brVI("base_out"))
		}, why: "readers outside the adapter branch"},
		{name: "branch reads another value", edit: func(g *onnxpb.GraphProto) {
			g.Input = append(g.Input, brVI("z"))
			brFind(g, "MA").Input[0] = "z"
		}, why: "base layer's input"},
		{name: "custom-domain Mul", edit: func(g *onnxpb.GraphProto) {
			brFind(g, "MUL").Domain = proto.String("com.example")
		}, why: "Mul"},
		{name: "base weight is lora_A", edit: func(g *onnxpb.GraphProto) {
			g.Initializer[1] = brFloat(t, "A", []int64{4, 3})
			g.Initializer[2] = brFloat(t, "B", []int64{3, 3})
			brFind(g, "base").Input[1] = "A"
		}, why: "factors"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			gp := brGraph(t, c.opts)
			if c.edit != nil {
				c.edit(gp)
			}
			g := graph.NewGraph(gp)
			b, why := recognizeAt(g, brFind(gp, "ADD"))
			found := findBranches(g)
			if c.want == "" {
				if b != nil || len(found) != 0 {
					t.Fatalf("recognized a branch: %s", brNames(b.nodes()))
				}
				if why == "" || !strings.Contains(why, c.why) {
					t.Errorf("reason %q, want one mentioning %q", why, c.why)
				}
				return
			}
			if b == nil {
				t.Fatalf("not recognized: %s", why)
			}
			if len(found) != 1 || found[0].Add != b.Add {
				t.Errorf("findBranches found %d branches", len(found))
			}
			if got := brNames(b.nodes()); got != c.want {
				t.Errorf("nodes %s, want %s", got, c.want)
			}
			if b.Base != brFind(gp, "base") || b.Output != "y" || b.BaseOutput != "base_out" {
				t.Errorf("base %s, output %q, base output %q", b.Base.GetName(), b.Output, b.BaseOutput)
			}
			wantS := "S"
			if strings.Contains(c.name, "Constant") {
				wantS = "S2"
			}
			if b.A != "A" || b.B != "B" || b.S != wantS || b.Rank != 2 || b.Ratio != c.ratio {
				t.Errorf("A %q B %q S %q rank %d ratio %q", b.A, b.B, b.S, b.Rank, b.Ratio)
			}
			if b.TA == nil || b.TB == nil || b.TS == nil || !slices.Equal(b.TA.Dims, []int64{4, 2}) {
				t.Errorf("constants not resolved: %v %v %v", b.TA, b.TB, b.TS)
			}
			if b.Layer == nil || b.Layer.Weight.Name != "W" || b.Layer.In != 4 || b.Layer.Out != 3 {
				t.Errorf("layer %+v", b.Layer)
			}
		})
	}
}

// brLayerModel is one layer, y = x·W [4 -> 3] (or Gemm(x, W) with
// transA=1 and x [4, 2]), with declared shapes, at the given opset.
func brLayerModel(t *testing.T, opset int64, transA bool) *graph.Model {
	t.Helper()
	typed := func(name string, dims ...int64) *onnxpb.ValueInfoProto {
		var ds []*onnxpb.TensorShapeProto_Dimension
		for _, d := range dims {
			ds = append(ds, &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d}})
		}
		return &onnxpb.ValueInfoProto{Name: proto.String(name), Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{
			TensorType: &onnxpb.TypeProto_Tensor{ElemType: proto.Int32(int32(graph.Float)), Shape: &onnxpb.TensorShapeProto{Dim: ds}}}}}
	}
	g := &onnxpb.GraphProto{
		Name:        proto.String("g"),
		Input:       []*onnxpb.ValueInfoProto{typed("x", 2, 4)},
		Output:      []*onnxpb.ValueInfoProto{typed("y", 2, 3)},
		Initializer: []*onnxpb.TensorProto{brFloat(t, "fc.weight", []int64{4, 3})},
		Node:        []*onnxpb.NodeProto{brNode("/fc/MatMul", "MatMul", []string{"x", "fc.weight"}, []string{"y"})},
	}
	if transA {
		g.Input[0] = typed("x", 4, 2)
		g.Node[0] = brNode("/fc/Gemm", "Gemm", []string{"x", "fc.weight"}, []string{"y"},
			&onnxpb.AttributeProto{Name: proto.String("transA"), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(1)})
	}
	return graph.NewModel(&onnxpb.ModelProto{
		IrVersion:   proto.Int64(8),
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(opset)}},
		Graph:       g,
	}, t.TempDir())
}

// brRender writes a graph's nodes, initializers and value_info one a line.
func brRender(g *onnxpb.GraphProto) string {
	var b strings.Builder
	for _, n := range g.Node {
		b.WriteString(n.GetName() + " " + n.GetOpType() + "(" + strings.Join(n.Input, ", ") + ") -> " + strings.Join(n.Output, ", "))
		for _, a := range n.Attribute {
			b.WriteString(" " + a.GetName() + "=" + strings.Trim(strings.ReplaceAll(fmtAttr(a), " ", ","), "[]"))
		}
		b.WriteString("\n")
	}
	for _, t := range g.Initializer {
		b.WriteString("init " + t.GetName() + "\n")
	}
	for _, vi := range g.ValueInfo {
		var dims []string
		for _, d := range vi.GetType().GetTensorType().GetShape().GetDim() {
			dims = append(dims, strconv.FormatInt(d.GetDimValue(), 10))
		}
		b.WriteString("info " + vi.GetName() + " [" + strings.Join(dims, ",") + "]\n")
	}
	return b.String()
}

func fmtAttr(a *onnxpb.AttributeProto) string {
	switch a.GetType() {
	case onnxpb.AttributeProto_INTS:
		return fmt.Sprint(a.Ints)
	case onnxpb.AttributeProto_INT:
		return fmt.Sprint(a.GetI())
	}
	return fmt.Sprint(a.GetF())
}

// TestInjectBranchExactly pins, node for node, the graph Inject writes for
// each variant of the branch, written out by hand, and checks that
// recognition finds exactly the nodes and params Inject recorded.
func TestInjectBranchExactly(t *testing.T) {
	// Every variant ends the same way: the two MatMuls, the scaling and
	// the Add, and the declared shapes of their values.
	core := `/fc/lora/MatMul_B MatMul(/fc/lora/MatMul_A_output_0, fc.lora_B.weight) -> /fc/lora/MatMul_B_output_0
/fc/lora/Mul_scaling Mul(/fc/lora/MatMul_B_output_0, fc.lora_scaling) -> /fc/lora/Mul_scaling_output_0
/fc/lora/Add Add(/fc/lora/base_output_0, /fc/lora/Mul_scaling_output_0) -> y
init fc.weight
init fc.lora_A.weight
init fc.lora_B.weight
init fc.lora_scaling
`
	infos := `info /fc/lora/MatMul_A_output_0 [2,2]
info /fc/lora/MatMul_B_output_0 [2,3]
info /fc/lora/Mul_scaling_output_0 [2,3]
info /fc/lora/base_output_0 [2,3]
`
	cases := []struct {
		name    string
		opset   int64
		transA  bool
		dropout float64
		want    string
	}{
		{"matmul", 17, false, 0, `/fc/MatMul MatMul(x, fc.weight) -> /fc/lora/base_output_0
/fc/lora/MatMul_A MatMul(x, fc.lora_A.weight) -> /fc/lora/MatMul_A_output_0
` + core + infos},
		{"dropout as input", 17, false, 0.25, `/fc/MatMul MatMul(x, fc.weight) -> /fc/lora/base_output_0
/fc/lora/Dropout Dropout(x, x_dropout_ratio) -> /fc/lora/Dropout_output_0
/fc/lora/MatMul_A MatMul(/fc/lora/Dropout_output_0, fc.lora_A.weight) -> /fc/lora/MatMul_A_output_0
` + core + `init x_dropout_ratio
info /fc/lora/Dropout_output_0 [2,4]
` + infos},
		{"dropout as attribute", 9, false, 0.25, `/fc/MatMul MatMul(x, fc.weight) -> /fc/lora/base_output_0
/fc/lora/Dropout Dropout(x) -> /fc/lora/Dropout_output_0 ratio=0.25
/fc/lora/MatMul_A MatMul(/fc/lora/Dropout_output_0, fc.lora_A.weight) -> /fc/lora/MatMul_A_output_0
` + core + `info /fc/lora/Dropout_output_0 [2,4]
` + infos},
		{"gemm transA with dropout", 17, true, 0.25, `/fc/Gemm Gemm(x, fc.weight) -> /fc/lora/base_output_0 transA=1
/fc/lora/Transpose_A Transpose(x) -> /fc/lora/Transpose_A_output_0 perm=1,0
/fc/lora/Dropout Dropout(/fc/lora/Transpose_A_output_0, /fc/lora/Transpose_A_output_0_dropout_ratio) -> /fc/lora/Dropout_output_0
/fc/lora/MatMul_A MatMul(/fc/lora/Dropout_output_0, fc.lora_A.weight) -> /fc/lora/MatMul_A_output_0
` + core + `init /fc/lora/Transpose_A_output_0_dropout_ratio
info /fc/lora/Transpose_A_output_0 [2,4]
info /fc/lora/Dropout_output_0 [2,4]
` + infos},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := brLayerModel(t, c.opset, c.transA)
			inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: 2, Alpha: 4}, Dropout: c.dropout})
			if err != nil {
				t.Fatal(err)
			}
			if got := brRender(m.Proto.Graph); got != c.want {
				t.Errorf("Inject wrote\n%s\nwant\n%s", got, c.want)
			}
			a := inj.Manifest.Adapters[0]
			g := m.Graph()
			b, why := recognizeAt(g, g.Producer(a.Output))
			if b == nil {
				t.Fatalf("Inject's branch is not recognized: %s", why)
			}
			var names []string
			for _, n := range b.nodes() { // Add first
				names = append([]string{n.GetName()}, names...)
			}
			if !slices.Equal(names, a.Nodes) || b.A != a.LoraA || b.B != a.LoraB || b.S != a.ScalingTensor ||
				b.Ratio != a.DropoutRatio || b.BaseOutput != a.BaseOutput || b.Rank != 2 || b.Base.GetName() != a.Node {
				t.Errorf("recognized %v A %q B %q S %q ratio %q base %q, manifest %+v", names, b.A, b.B, b.S, b.Ratio, b.BaseOutput, a)
			}
			if c.dropout > 0 && b.Dropout == nil || c.dropout == 0 && b.Dropout != nil {
				t.Errorf("Dropout %v for dropout %v", b.Dropout, c.dropout)
			}
		})
	}
}

// TestNewBranchKind checks that a branch kind is data: a description the
// code has never seen (adapter inputs, A and B fed as graph inputs and the
// scaling folded into B) builds and matches with no new code, and neither
// it nor the LoRA kind takes the other's branch.
func TestNewBranchKind(t *testing.T) {
	adapterInputs := &branchKind{
		Name:    "adapter inputs",
		BaseOps: []string{"MatMul"},
		Params: []branchParam{
			{Name: "A", Label: "lora_A", Class: paramInput},
			{Name: "B", Label: "lora_B", Class: paramInput},
		},
		Nodes: []branchNode{
			{Name: "MatMul_A", Op: "MatMul", In: []operand{theLayerInput, paramIn("A")}, Shape: shapeLastRank},
			{Name: "MatMul_B", Op: "MatMul", In: []operand{nodeOut("MatMul_A"), paramIn("B")}, Shape: shapeLayerOut},
			{Name: "Add", Op: "Add", In: []operand{theLayerOutput, nodeOut("MatMul_B")}, Commutes: true},
		},
	}
	for _, k := range []*branchKind{loraBranch, adapterInputs} {
		if err := k.check(); err != nil {
			t.Error(err)
		}
	}
	bad := *adapterInputs
	bad.Nodes = slices.Clone(bad.Nodes)
	bad.Nodes[0].In = []operand{nodeOut("MatMul_B"), paramIn("A")}
	if err := bad.check(); err == nil || !strings.Contains(err.Error(), "earlier node") {
		t.Errorf("a node reading a later one: %v", err)
	}
	m := brLayerModel(t, 17, false)
	g := m.Graph()
	base := g.Proto.Node[0]
	built, err := adapterInputs.build(branchBuilder{
		G: g, Base: base, Prefix: "/fc/lora/",
		Param: func(p *branchParam, seed string) (string, *onnxpb.AttributeProto, error) {
			name := "fc.lora_" + p.Name + ".weight"
			g.Proto.Input = append(g.Proto.Input, brVI(name))
			return name, nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	g.SetOutput(base, 0, built.BaseOutput)
	if err := g.InsertNodesAfter(base, built.Nodes...); err != nil {
		t.Fatal(err)
	}
	g.Reindex() // the new graph inputs
	want := `/fc/MatMul MatMul(x, fc.weight) -> /fc/lora/base_output_0
/fc/lora/MatMul_A MatMul(x, fc.lora_A.weight) -> /fc/lora/MatMul_A_output_0
/fc/lora/MatMul_B MatMul(/fc/lora/MatMul_A_output_0, fc.lora_B.weight) -> /fc/lora/MatMul_B_output_0
/fc/lora/Add Add(/fc/lora/base_output_0, /fc/lora/MatMul_B_output_0) -> y
init fc.weight
`
	if got := brRender(g.Proto); got != want {
		t.Fatalf("built\n%s\nwant\n%s", got, want)
	}
	add := g.Producer("y")
	bm, why := adapterInputs.match(g, add)
	if bm == nil {
		t.Fatalf("not matched: %s", why)
	}
	if brNames(bm.Nodes) != "/fc/lora/MatMul_A,/fc/lora/MatMul_B,/fc/lora/Add" || bm.Base != base ||
		bm.Params["A"] != "fc.lora_A.weight" || bm.Params["B"] != "fc.lora_B.weight" || bm.BaseOutput != "/fc/lora/base_output_0" {
		t.Errorf("matched %s, base %s, params %v", brNames(bm.Nodes), bm.Base.GetName(), bm.Params)
	}
	if bm, _ := loraBranch.match(g, add); bm != nil {
		t.Error("the LoRA kind took an adapter-input branch")
	}
	// Recognition knows the kind inject --adapter-inputs writes.
	if b, why := recognizeAt(g, add); b == nil || !b.isInputs() || b.A != "fc.lora_A.weight" {
		t.Errorf("recognition of adapter inputs: %v, %s", b != nil, why)
	}
	lora := graph.NewGraph(brGraph(t, brOpts{}))
	if bm, _ := adapterInputs.match(lora, lora.Producer("y")); bm != nil {
		t.Error("the adapter-input kind took a LoRA branch")
	}
	// A factor that is a constant is not an adapter input.
	g.Proto.Initializer = append(g.Proto.Initializer, brFloat(t, "fc.lora_B.weight", []int64{2, 3}))
	g.Proto.Input = g.Proto.Input[:len(g.Proto.Input)-1]
	g.Reindex()
	if bm, why := adapterInputs.match(g, add); bm != nil || !strings.Contains(why, "graph input") {
		t.Errorf("constant B: matched %v, reason %q", bm != nil, why)
	}
}
