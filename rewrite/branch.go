package rewrite

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// A branchKind describes one kind of adapter branch as data: the nodes it
// adds beside a layer, what each reads and which may be missing. Inject
// builds branches from it (build) and merge, when the manifest is gone,
// finds them by the same description (match), in the spirit of
// onnxscript's rewrite patterns and Go's SSA rules: a new kind of branch
// is a new value of this type, not new building and matching code.
type branchKind struct {
	Name string
	// BaseOps are the op types of the layer node the branch adapts.
	BaseOps []string
	// Params are the values the branch reads besides the layer's own:
	// build creates the required ones first, in this order, and the
	// optional ones when a node first reads them.
	Params []branchParam
	// Nodes run from the input side to the root, the last node, whose
	// output takes over the layer's output name.
	Nodes []branchNode
}

// branchParam is a value a branch reads: a factor, a scale, a ratio.
type branchParam struct {
	Name  string // key in a match and for the builder ("A")
	Label string // in messages ("lora_A")
	Class paramClass
	// Dims is a matrix's shape in symbols: "in" and "out" are the layer's
	// features, any other symbol (the rank "r") must agree wherever used.
	Dims []string
	// Optional params may be missing from the node that reads them.
	Optional bool
	// LayerValue params are the layer's own inputs (DoRA reads the
	// weight and the bias), so they may be the base weight.
	LayerValue bool
}

// paramClass says what a param's value must be.
type paramClass int

const (
	paramAny    paramClass = iota // any value
	paramMatrix                   // a constant 2-D float tensor
	paramScalar                   // a constant float tensor of one element
	// paramInput is a graph input, fed at run time (as ONNX Runtime's LoRA
	// adapters feed A and B to an adapter-input model).
	paramInput
	// paramKernel is a constant float tensor of rank 3 or more (a Conv
	// kernel); its Dims name the leading axes only.
	paramKernel
)

func (c paramClass) String() string {
	switch c {
	case paramMatrix:
		return "a constant 2-D float tensor"
	case paramScalar:
		return "a constant float scalar"
	case paramInput:
		return "a graph input"
	case paramKernel:
		return "a constant float convolution kernel"
	}
	return "a value"
}

// branchNode is one node of a branch.
type branchNode struct {
	// Name is the node's role in a match and its name under the layer's
	// scope: "<scope>/lora/<Name>".
	Name string
	Op   string
	In   []operand
	// Commutes says a match may find the two inputs in either order.
	Commutes bool
	// MoreInputs lets a match accept inputs past In (Dropout's
	// training_mode); SpareOutputs, outputs past the first that nothing
	// reads (Dropout's mask).
	MoreInputs, SpareOutputs bool
	// Attrs are written by build and required by match.
	Attrs []*onnxpb.AttributeProto
	// BaseAttrs are attributes build copies from the layer node when it
	// has them (a Conv's strides and pads); the kind checks them on a match.
	BaseAttrs []string
	// Doc is the node's doc_string (doraDetach: no gradient through it).
	Doc string
	// When says whether the node is there; when it is not, its output is
	// its first input.
	When presence
	// Shape is the output's declared type (value_info), from the inputs'.
	Shape shapeRule
}

// operand is what a node input is: another branch node's output, the
// layer's input or output, or a param.
type operand struct {
	Kind operandKind
	Ref  string // the node's or the param's Name
}

type operandKind int

const (
	fromNode    operandKind = iota // Ref's output
	fromParam                      // the param Ref
	layerInput                     // the layer node's first input (x)
	layerOutput                    // what the layer node writes (base(x))
)

func nodeOut(name string) operand { return operand{Kind: fromNode, Ref: name} }
func paramIn(name string) operand { return operand{Kind: fromParam, Ref: name} }

var (
	theLayerInput  = operand{Kind: layerInput}
	theLayerOutput = operand{Kind: layerOutput}
)

// presence says when an optional node is part of a branch.
type presence int

const (
	always presence = iota
	// whenTransA: exactly when the layer is a Gemm with transA=1, so the
	// branch reads x transposed as the layer does.
	whenTransA
	// whenDropout: when the inject config asks for dropout; a match takes
	// the branch with or without it.
	whenDropout
	// whenTransB: exactly when the layer is a Gemm with transB=1, so the
	// branch reads the weight as [in, out] (DoRA's norm).
	whenTransB
)

// shapeRule derives a node output's declared type.
type shapeRule int

const (
	shapeNone     shapeRule = iota // not declared
	shapeSame                      // the first input's
	shapeSwapped                   // the first input's, a matrix transposed
	shapeLastRank                  // the first input's, last axis the rank "r"
	shapeLayerOut                  // the layer output's
)

// loraParams are the parameters of a branch with initializer factors:
// A [in, r], B [r, out], the scaling S and an optional dropout ratio.
func loraParams() []branchParam {
	return []branchParam{
		{Name: "A", Label: "lora_A", Class: paramMatrix, Dims: []string{"in", "r"}},
		{Name: "B", Label: "lora_B", Class: paramMatrix, Dims: []string{"r", "out"}},
		{Name: "S", Label: "scaling", Class: paramScalar},
		{Name: "ratio", Label: "dropout ratio", Optional: true},
	}
}

// factorNodes are how the MatMul/Gemm branches start: x, transposed for
// Gemm transA=1 and through Dropout when asked for, times A then B. Each
// call returns a fresh slice, so branches can append their own tail.
func factorNodes() []branchNode {
	return []branchNode{
		{Name: "Transpose_A", Op: "Transpose", In: []operand{theLayerInput}, When: whenTransA, Shape: shapeSwapped,
			Attrs: []*onnxpb.AttributeProto{intsAttr("perm", 1, 0)}},
		{Name: "Dropout", Op: "Dropout", In: []operand{nodeOut("Transpose_A"), paramIn("ratio")}, When: whenDropout,
			MoreInputs: true, SpareOutputs: true, Shape: shapeSame},
		{Name: "MatMul_A", Op: "MatMul", In: []operand{nodeOut("Dropout"), paramIn("A")}, Shape: shapeLastRank},
		{Name: "MatMul_B", Op: "MatMul", In: []operand{nodeOut("MatMul_A"), paramIn("B")}, Shape: shapeLayerOut},
	}
}

// loraBranch is the branch Inject writes beside a MatMul or Gemm:
//
//	y = base(x) + S * ((dropout(transpose(x)) · A) · B)
//
// with the Transpose only for Gemm transA=1 and the Dropout only when
// asked for. A is [in, r], B [r, out], S the scaling.
var loraBranch = &branchKind{
	Name:    "lora",
	BaseOps: []string{"MatMul", "Gemm"},
	Params:  loraParams(),
	Nodes: append(factorNodes(),
		branchNode{Name: "Mul_scaling", Op: "Mul", In: []operand{nodeOut("MatMul_B"), paramIn("S")}, Commutes: true, Shape: shapeLayerOut},
		branchNode{Name: "Add", Op: "Add", In: []operand{theLayerOutput, nodeOut("Mul_scaling")}, Commutes: true},
	),
}

// adapterInputBranch is the branch of an adapter-input model, as inject
// --adapter-inputs, Olive's ExtractAdapters and onnxruntime-genai write it:
//
//	y = base(x) + (dropout(transpose(x)) · A) · B
//
// where A [in, r] and B [r, out] are graph inputs (ONNX Runtime's LoRA
// adapters feed them per run) whose initializer defaults usually have
// r = 0, and B holds the scaling.
var adapterInputBranch = &branchKind{
	Name:    "adapter inputs",
	BaseOps: []string{"MatMul", "Gemm"},
	Params: []branchParam{
		{Name: "A", Label: "lora_A", Class: paramInput, Dims: []string{"in", "r"}},
		{Name: "B", Label: "lora_B", Class: paramInput, Dims: []string{"r", "out"}},
		{Name: "ratio", Label: "dropout ratio", Optional: true},
	},
	Nodes: append(factorNodes(),
		branchNode{Name: "Add", Op: "Add", In: []operand{theLayerOutput, nodeOut("MatMul_B")}, Commutes: true},
	),
}

// root returns the node whose output replaces the layer's.
func (k *branchKind) root() *branchNode { return &k.Nodes[len(k.Nodes)-1] }

// nodeIndex returns the index of the node called name, or -1.
func (k *branchKind) nodeIndex(name string) int {
	for i := range k.Nodes {
		if k.Nodes[i].Name == name {
			return i
		}
	}
	return -1
}

// param returns the param called name, or nil.
func (k *branchKind) param(name string) *branchParam {
	for i := range k.Params {
		if k.Params[i].Name == name {
			return &k.Params[i]
		}
	}
	return nil
}

// check reports what is wrong with a description: a node reading a node
// that does not come before it or a param that is not declared, an
// optional root, or an optional node with nothing to pass through.
func (k *branchKind) check() error {
	if len(k.Nodes) == 0 || k.root().When != always {
		return fmt.Errorf("branch %s: the root must be its last node and always there", k.Name)
	}
	for i, n := range k.Nodes {
		if n.When != always && (len(n.In) == 0 || n.In[0].Kind == fromParam) {
			return fmt.Errorf("branch %s: optional node %s passes no value through", k.Name, n.Name)
		}
		for _, op := range n.In {
			switch {
			case op.Kind == fromNode && (k.nodeIndex(op.Ref) < 0 || k.nodeIndex(op.Ref) >= i):
				return fmt.Errorf("branch %s: node %s reads %s, which is not an earlier node", k.Name, n.Name, op.Ref)
			case op.Kind == fromParam && k.param(op.Ref) == nil:
				return fmt.Errorf("branch %s: node %s reads undeclared param %s", k.Name, n.Name, op.Ref)
			}
		}
	}
	return nil
}

func intsAttr(name string, vals ...int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INTS.Enum(), Ints: vals}
}
