package autodiff

import (
	"encoding/binary"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// dim is one static dimension: a known size (value >= 0), a symbolic name,
// or unknown (value -1 and no name).
type dim struct {
	value int64
	param string
}

func (d dim) known() bool { return d.value >= 0 }

// sameAs reports whether two dims are provably equal.
func (d dim) sameAs(o dim) bool {
	if d.known() || o.known() {
		return d.value == o.value
	}
	return d.param != "" && d.param == o.param
}

// typeInfo holds what the graph says statically about its values: element
// types (needed to type the constants a rule writes, and to tell float
// values, which carry gradients, from shape arithmetic, which does not) and
// shapes where declared (used only to skip work, never to fix a dim).
type typeInfo struct {
	elem  map[string]graph.DataType
	shape map[string][]dim // no entry: rank unknown
	// ints holds the values of small int64 constants; values the
	// elements of int64 shape vectors, as dims (shapes.go).
	ints   map[string][]int64
	values map[string][]dim
	nfresh int
}

func newTypeInfo(g *graph.Graph) *typeInfo {
	ti := &typeInfo{elem: map[string]graph.DataType{}, shape: map[string][]dim{},
		ints: map[string][]int64{}, values: map[string][]dim{}}
	p := g.Proto
	for _, t := range p.Initializer {
		ti.addConstant(t.GetName(), t)
	}
	for _, list := range [][]*onnxpb.ValueInfoProto{p.Input, p.ValueInfo, p.Output} {
		for _, vi := range list {
			ti.addValueInfo(vi)
		}
	}
	for _, n := range p.Node {
		if n.GetOpType() == "Constant" && graph.IsStandardOp(n) && len(n.Output) == 1 {
			if t := constantTensor(n); t != nil {
				ti.addConstant(n.Output[0], t)
			}
		}
		ti.inferNode(n)
	}
	return ti
}

// addConstant records a constant's type and dims, and the values of small
// int64 ones (axes, shapes).
func (ti *typeInfo) addConstant(name string, t *onnxpb.TensorProto) {
	dt := graph.DataType(t.GetDataType())
	ti.elem[name] = dt
	ti.shape[name] = staticDims(t.Dims)
	if dt != graph.Int64 || len(t.Dims) > 1 || len(t.GetExternalData()) > 0 {
		return
	}
	vals := t.Int64Data
	if len(vals) == 0 && len(t.RawData) > 0 && len(t.RawData)%8 == 0 && len(t.RawData) <= 8*64 {
		for i := 0; i < len(t.RawData); i += 8 {
			vals = append(vals, int64(binary.LittleEndian.Uint64(t.RawData[i:])))
		}
	}
	if n, err := graph.NumElements(t.Dims); err != nil || int(n) != len(vals) || n > 64 {
		return
	}
	ti.ints[name] = vals
	ti.values[name] = staticDims(vals)
}

func (ti *typeInfo) addValueInfo(vi *onnxpb.ValueInfoProto) {
	tt := vi.GetType().GetTensorType()
	if tt == nil {
		return
	}
	name := vi.GetName()
	if dt := graph.DataType(tt.GetElemType()); dt != graph.Undefined {
		if _, ok := ti.elem[name]; !ok {
			ti.elem[name] = dt
		}
	}
	if tt.Shape == nil {
		return
	}
	if _, ok := ti.shape[name]; ok {
		return
	}
	ds := make([]dim, len(tt.Shape.Dim))
	for i, d := range tt.Shape.Dim {
		switch v := d.GetValue().(type) {
		case *onnxpb.TensorShapeProto_Dimension_DimValue:
			ds[i] = dim{value: v.DimValue}
		default:
			if p := d.GetDimParam(); p != "" {
				ds[i] = dim{value: -1, param: p}
			} else {
				ds[i] = ti.fresh()
			}
		}
	}
	ti.shape[name] = ds
}

// inferNode sets the element types of n's outputs that nothing declared.
func (ti *typeInfo) inferNode(n *onnxpb.NodeProto) {
	in := func(i int) graph.DataType {
		if i < len(n.Input) {
			return ti.elem[n.Input[i]]
		}
		return graph.Undefined
	}
	first := graph.Undefined
	for _, x := range n.Input {
		if dt := ti.elem[x]; x != "" && dt != graph.Undefined {
			first = dt
			break
		}
	}
	for i, out := range n.Output {
		if out == "" {
			continue
		}
		if _, ok := ti.elem[out]; ok {
			continue
		}
		dt := first
		switch n.GetOpType() {
		case "Cast":
			dt = graph.DataType(graph.AttrInt(n, "to", 0))
		case "CastLike":
			dt = in(1)
		case "Shape", "Size", "NonZero", "ArgMax", "ArgMin":
			dt = graph.Int64
		case "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
			"IsNaN", "IsInf":
			dt = graph.Bool
		case "Constant":
			if t := constantTensor(n); t != nil {
				dt = graph.DataType(t.GetDataType())
			}
		case "ConstantOfShape":
			dt = graph.Float
			if a := graph.Attr(n, "value"); a != nil && a.GetT() != nil {
				dt = graph.DataType(a.GetT().GetDataType())
			}
		case "Where":
			dt = in(1)
		case "OneHot":
			dt = in(2)
		case "Dropout":
			if i == 1 {
				dt = graph.Bool
			}
		case "TopK":
			if i == 1 {
				dt = graph.Int64
			}
		case "LayerNormalization":
			if i > 0 {
				dt = graph.DataType(graph.AttrInt(n, "stash_type", int64(graph.Float)))
			}
		case "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization":
			if i == 1 || i == 2 {
				dt = graph.Float
			}
		case "DequantizeLinear":
			dt = in(1)
		case "QuantizeLinear":
			dt = graph.Uint8
			if z := in(2); z != graph.Undefined {
				dt = z
			}
		case "MatMulInteger", "ConvInteger":
			dt = graph.Int32
		}
		if dt != graph.Undefined {
			ti.elem[out] = dt
		}
	}
	ti.inferShapes(n)
}

// rank returns the static rank of v, or -1 when it is not declared.
func (ti *typeInfo) rank(v string) int {
	if s, ok := ti.shape[v]; ok {
		return len(s)
	}
	return -1
}

// sameShape reports whether a and b provably have the same shape.
func (ti *typeInfo) sameShape(a, b string) bool {
	if a == b {
		return true
	}
	sa, okA := ti.shape[a]
	sb, okB := ti.shape[b]
	if !okA || !okB || len(sa) != len(sb) {
		return false
	}
	for i := range sa {
		if !sa[i].sameAs(sb[i]) {
			return false
		}
	}
	return true
}

// isDifferentiableType reports whether values of type dt carry gradients.
func isDifferentiableType(dt graph.DataType) bool {
	return dt == graph.Float || dt == graph.Float16 || dt == graph.BFloat16 || dt == graph.Double
}

func constantTensor(n *onnxpb.NodeProto) *onnxpb.TensorProto {
	if a := graph.Attr(n, "value"); a != nil {
		return a.GetT()
	}
	return nil
}

// tensorValueInfo declares a tensor value; unknown dims get a dim_param made
// from the value's name, so each stays symbolic.
func tensorValueInfo(name string, dt graph.DataType, dims []dim) *onnxpb.ValueInfoProto {
	shape := &onnxpb.TensorShapeProto{Dim: []*onnxpb.TensorShapeProto_Dimension{}}
	for i, d := range dims {
		sd := &onnxpb.TensorShapeProto_Dimension{}
		switch {
		case d.known():
			sd.Value = &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d.value}
		case d.param != "":
			sd.Value = &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: d.param}
		default:
			sd.Value = &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: fmt.Sprintf("%s_dim_%d", name, i)}
		}
		shape.Dim = append(shape.Dim, sd)
	}
	return &onnxpb.ValueInfoProto{Name: proto.String(name), Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{
		TensorType: &onnxpb.TypeProto_Tensor{ElemType: proto.Int32(int32(dt)), Shape: shape}}}}
}

// staticDims turns fixed dims into dims.
func staticDims(dims []int64) []dim {
	ds := make([]dim, len(dims))
	for i, d := range dims {
		ds[i] = dim{value: d}
	}
	return ds
}
