package rewrite

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Init names how lora_A is initialized; lora_B always starts at zero so the
// injected model computes exactly what the base model does.
type Init string

const (
	// InitKaiming is PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)), which is
	// kaiming_uniform_ with a = sqrt(5) on A's fan-in.
	InitKaiming Init = "kaiming"
	// InitGaussian is PEFT's init_lora_weights="gaussian": A ~ N(0, (1/r)^2).
	InitGaussian Init = "gaussian"
)

// InjectConfig says which layers get adapters and how.
type InjectConfig struct {
	SelectOptions
	// RSLoRA scales by alpha/sqrt(r) instead of alpha/r (PEFT use_rslora).
	RSLoRA bool
	// Dropout, when positive, puts a Dropout node with this ratio on the
	// branch input (an identity at inference).
	Dropout float64
	// Init chooses lora_A's initialization (default InitKaiming).
	Init Init
	// Seed makes the initialization reproducible. Each adapter draws from
	// its own stream derived from the seed and its module path, so adding a
	// target does not change the others.
	Seed uint64
	// AdapterInputs makes A and B graph inputs of the main graph instead
	// of initializers: <module>.lora_A.weight [in, r] and
	// <module>.lora_B.weight [r, out] with a symbolic r and rank-0
	// initializer defaults ([in, 0], [0, out]), the scaling folded into B
	// and no scaling node, as ONNX Runtime's LoRA adapters, Olive and
	// onnxruntime-genai expect. With no adapter the model computes exactly
	// the base. Rank, alpha, rsLoRA and Init do not apply; a model before
	// IR version 4 is raised to 4 (initializers become overridable inputs
	// only from IR 4).
	AdapterInputs bool
	// DoRA adds PEFT's weight-decomposed branch (use_dora): a trainable
	// magnitude per output feature, initialised to the weight's norm.
	DoRA bool
	// AdapterDType is the type of A, B and the scaling beside float16 and
	// bfloat16 layers: graph.Float puts float32 factors in a branch with a
	// Cast on each side (PEFT keeps adapters in float32, so training
	// updates do not vanish in half precision); Undefined uses the layer's
	// type. Other layers always use their own type.
	AdapterDType graph.DataType
	// AllowLargeRank lets the rank exceed min(in, out) of every selected
	// layer (refused otherwise: an update of rank r > min(in, out) is no
	// more expressive, only larger); the memory it needs is checked either
	// way.
	AllowLargeRank bool
	// Stack lets a layer that already has an adapter take another beside
	// it: y = base(x) + s1·(x·A1)·B1 + s2·(x·A2)·B2 (PEFT's several active
	// adapters). Merge folds them all; a PEFT export holds one per layer.
	Stack bool
	// ModulesToSave names layers to train whole beside the adapters
	// (PEFT's modules_to_save: a name is a module path or its last dotted
	// segments): their weight and bias initializers become trainable and
	// export-adapter writes them in full.
	ModulesToSave []string
	// factors holds the PiSSA/OLoRA starting A and B per module, set by
	// Inject for those inits.
	factors map[string]*initFactors
}

// Injection is the result of Inject: the manifest written into the model
// and the parameter counts PEFT prints.
type Injection struct {
	Manifest  *Manifest
	Layers    []*Layer // the adapted layers, in the manifest's order
	Trainable int64
	All       int64
}

// String renders the counts the way PEFT's print_trainable_parameters does.
func (inj *Injection) String() string { return TrainableLine(inj.Trainable, inj.All) }

// Plan selects the layers Inject would adapt, without changing the model.
func Plan(m *graph.Model, cfg SelectOptions) ([]*Layer, []Selection, error) {
	layers, _ := FindLayers(m)
	sel, err := Select(Candidates(layers), cfg)
	if err != nil {
		return nil, nil, err
	}
	return layers, sel, nil
}

// Inject adds a LoRA branch beside every selected layer:
//
//	y = base(x) + scaling * ((dropout(x) · A) · B)
//
// with A [in, r] and B [r, out] initializers in the layer's compute type,
// named <module>.lora_A.weight and <module>.lora_B.weight. B starts at zero,
// so the model's outputs are unchanged until the adapters are trained. The
// base node keeps its name and inputs; only its output is renamed, and the
// branch's Add takes over the original output name, so everything
// downstream (graph outputs included) is untouched. The manifest goes into
// the model's metadata under ManifestKey.
func Inject(m *graph.Model, cfg InjectConfig) (*Injection, error) {
	if cfg.Init == "" {
		cfg.Init = InitKaiming
	}
	if err := cfg.Init.check(); err != nil {
		return nil, err
	}
	if cfg.Dropout < 0 || cfg.Dropout >= 1 || math.IsNaN(cfg.Dropout) {
		return nil, fmt.Errorf("dropout must be in [0, 1), got %v", cfg.Dropout)
	}
	man, err := ReadManifest(m)
	if err != nil {
		return nil, err
	}
	if man == nil {
		// Metadata stripped: the branches are still there, and a new
		// manifest would leave them out (or stack a second adapter).
		rec, err := RecognizedAdapters(m)
		if err != nil {
			return nil, err
		}
		if len(rec) > 0 {
			return nil, fmt.Errorf("the model has %d LoRA branch(es) (the first on %s) but no manifest, so its metadata was stripped; merge them first (merge finds them by their shape), then inject", len(rec), rec[0].Module)
		}
		man = &Manifest{}
	}
	if cfg.AdapterInputs {
		raiseToIR4(m)
	}
	layers, sel, err := Plan(m, cfg.SelectOptions)
	if err != nil {
		return nil, err
	}
	adapted := map[string]bool{}
	for _, a := range man.Adapters {
		adapted[a.Module] = true
	}
	// Before any branch exists, so the layers are the model's own.
	if err := addModulesToSave(m, cfg.ModulesToSave, man); err != nil {
		return nil, err
	}
	for _, sv := range man.Saved {
		if slices.ContainsFunc(sel, func(s Selection) bool { return layers[s.Index].Module == sv.Module }) {
			return nil, fmt.Errorf("module %s is trained whole (modules_to_save) and selected for an adapter; a layer is one or the other (PEFT's too)", sv.Module)
		}
	}
	inj := &Injection{Manifest: man}
	if err := checkLayerKinds(layers, sel, cfg); err != nil {
		return nil, err
	}
	if !cfg.AdapterInputs {
		if err := checkRanks(layers, sel, cfg.AllowLargeRank); err != nil {
			return nil, err
		}
	}
	// PiSSA/OLoRA: factors from the weights, residuals into the base.
	if cfg.factors, err = baseInit(m, layers, sel, cfg, adapted); err != nil {
		return nil, err
	}
	for _, s := range sel {
		l := layers[s.Index]
		if adapted[l.Module] && cfg.Stack && stackedCount(man, l.Module) >= maxStacked {
			return nil, fmt.Errorf("module %s already has %d adapters, the most a layer can take; merge them first", l.Module, maxStacked)
		}
		if adapted[l.Module] && !cfg.Stack {
			return nil, fmt.Errorf("module %s already has an adapter; merge it first, exclude it, or add another beside it with --stack", l.Module)
		}
		a, err := injectOne(m, l, s.Rank, s.Alpha, cfg)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", l.Module, err)
		}
		if cfg.factors != nil {
			a.Init = string(cfg.Init)
		}
		man.Adapters = append(man.Adapters, *a)
		inj.Layers = append(inj.Layers, l)
	}
	if err := WriteManifest(m, man); err != nil {
		return nil, err
	}
	inj.Trainable, inj.All = CountParams(m, man)
	return inj, nil
}

// CountParams counts the adapters' elements (trainable) and all
// floating-point initializer elements (all), as PEFT's
// print_trainable_parameters counts parameters: the branches' scaling and
// dropout scalars are constants, not parameters. A modules_to_save layer
// counts in both, twice in all: PEFT trains a copy beside the original.
// man may be nil.
func CountParams(m *graph.Model, man *Manifest) (trainable, all int64) {
	constants := map[string]bool{}
	if man == nil {
		man = &Manifest{}
	}
	for _, a := range man.Adapters {
		trainable += adapterParams(&a)
		for _, c := range a.Constants {
			constants[c] = true
		}
		constants[a.ScalingTensor] = true
		constants[a.DropoutRatio] = true
	}
	for _, s := range man.Saved {
		for _, name := range []string{s.Weight, s.Bias} {
			if t, _ := m.Graph().Initializer(name); name != "" && t != nil {
				n, _ := graph.NumElements(t.Dims)
				trainable += n
				all += n
			}
		}
	}
	m.Graph().Walk(func(g *graph.Graph) {
		for _, t := range g.Proto.Initializer {
			if graph.DataType(t.GetDataType()).IsFloat() && !constants[t.GetName()] {
				n, _ := graph.NumElements(t.Dims)
				all += n
			}
		}
	})
	return trainable, all
}

// injectOne wires one adapter branch into the layer's graph.
func injectOne(m *graph.Model, l *Layer, rank int, alpha float64, cfg InjectConfig) (*Adapter, error) {
	g := l.Graph
	n := l.Node
	scaling := alpha / float64(rank)
	if cfg.RSLoRA {
		scaling = alpha / math.Sqrt(float64(rank))
	}
	a := &Adapter{
		Module: l.Module, Node: n.GetName(), Op: l.Op, Weight: l.Weight.Name,
		Rank: rank, Alpha: alpha, Scaling: scaling, RSLoRA: cfg.RSLoRA,
		InFeatures: l.In, OutFeatures: l.Out, DType: l.DType.String(), Dropout: cfg.Dropout,
		Graph: graphName(g),
	}
	r := int64(rank)
	kind := loraBranch
	if l.Op == opConv {
		kind, a.Kernel = convBranch, l.Kernel
	}
	if cfg.DoRA {
		kind = doraKind(l)
	}
	if l.Op == QuantNBits {
		kind = nbitsBranch
	}
	if cfg.AdapterInputs {
		kind = adapterInputBranch
		a.Mode, a.Rank, a.Alpha, a.Scaling, a.RSLoRA = ModeAdapterInputs, 0, 0, 1, false
	} else if ck := castBranchFor(l.DType); ck != nil && kind == loraBranch && cfg.AdapterDType == graph.Float {
		kind = ck
	}
	pdt := kind.paramDType(l.DType)
	a.DType = pdt.String()
	// The description says what the branch is; this says what its params
	// hold: A drawn from the adapter's stream, B zero, the scaling, and
	// the dropout ratio (an input from opset 12, an attribute before);
	// or, for adapter inputs, A and B as inputs with rank-0 defaults.
	param := func(p *branchParam, seed string) (string, *onnxpb.AttributeProto, error) {
		var t *onnxpb.TensorProto
		var err error
		switch {
		case cfg.AdapterInputs && (p.Name == "A" || p.Name == "B"):
			name, err := addAdapterInput(g, l, p.Name)
			return name, nil, err
		}
		switch p.Name {
		case "A", "B":
			dims, vals := []int64{l.In, r}, loraAValues(l, r, cfg)
			if p.Name == "B" {
				dims, vals = []int64{r, l.Out}, loraBValues(l, r, cfg)
			}
			if l.Op == opConv {
				dims, vals = convFactor(l, p.Name, r, cfg)
			}
			t, err = graph.NewFloatTensor(g.UniqueName(l.Module+".lora_"+p.Name+".weight"), pdt, dims, vals)
		case "S":
			t, err = graph.NewFloatTensor(g.UniqueName(l.Module+".lora_scaling"), pdt, nil, []float64{scaling})
		case "W", "C", "M", "ones", "two":
			var name string
			name, t, err = doraParam(m, l, p.Name)
			if t == nil {
				return name, nil, err
			}
		case "ratio":
			if m.Opset() < 12 {
				return "", &onnxpb.AttributeProto{
					Name: proto.String("ratio"), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(float32(cfg.Dropout)),
				}, nil
			}
			t, err = graph.NewFloatTensor(g.UniqueName(seed+"_dropout_ratio"), graph.Float, nil, []float64{cfg.Dropout})
		default:
			return "", nil, fmt.Errorf("no value for branch param %s", p.Name)
		}
		if err != nil {
			return "", nil, err
		}
		addInitializer(m, g, t)
		return t.GetName(), nil, nil
	}
	built, err := kind.build(branchBuilder{
		G: g, Base: n, Prefix: nodePrefix(n.GetName(), l.Module) + "/lora/", Param: param,
		Has: func(p presence) bool { return p == whenDropout && cfg.Dropout > 0 },
	})
	if err != nil {
		return nil, err
	}
	a.LoraA, a.LoraB, a.ScalingTensor, a.DropoutRatio = built.Params["A"], built.Params["B"], built.Params["S"], built.Params["ratio"]
	if cfg.DoRA {
		a.Magnitude, a.Constants = built.Params["M"], []string{built.Params["ones"], built.Params["two"]}
	}
	// The base node's output moves to a new name; the Add takes the old one.
	a.Output, a.BaseOutput = built.Output, built.BaseOutput
	g.SetOutput(n, 0, a.BaseOutput)
	if err := g.InsertNodesAfter(n, built.Nodes...); err != nil {
		return nil, err
	}
	for _, bn := range built.Nodes {
		a.Nodes = append(a.Nodes, bn.GetName())
	}
	if cfg.AdapterInputs {
		r = -1 // set per run by the adapter
	}
	kind.describe(g, built, n.Input[0], map[string]int64{"r": r}, l.DType)
	return a, nil
}

// addAdapterInput adds factor A or B of layer l as an input of the main
// graph, [in, r] or [r, out] with r symbolic, whose initializer default
// has r = 0, and returns its name. A layer in a subgraph reads it from
// the outer scope.
func addAdapterInput(g *graph.Graph, l *Layer, which string) (string, error) {
	top := g
	for top.Parent != nil {
		top = top.Parent
	}
	sym := l.Module + ".lora_rank"
	rank := &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: sym}}
	in := &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: l.In}}
	out := &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: l.Out}}
	name := top.UniqueName(l.Module + ".lora_" + which + ".weight")
	dims, shape := []int64{l.In, 0}, []*onnxpb.TensorShapeProto_Dimension{in, rank}
	if which == "B" {
		dims, shape = []int64{0, l.Out}, []*onnxpb.TensorShapeProto_Dimension{rank, out}
	}
	t, err := graph.NewFloatTensor(name, l.DType, dims, nil)
	if err != nil {
		return "", err
	}
	top.AddInitializer(t)
	top.Proto.Input = append(top.Proto.Input, &onnxpb.ValueInfoProto{
		Name: proto.String(name),
		Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: &onnxpb.TypeProto_Tensor{
			ElemType: proto.Int32(int32(l.DType)), Shape: &onnxpb.TensorShapeProto{Dim: shape},
		}}},
	})
	return name, nil
}

// raiseToIR4 makes a model before IR version 4 an IR 4 one, so that new
// initializers listed as inputs are overridable. Before IR 4 every
// initializer is listed as an input and is still a constant, so those
// listings are dropped: the weights stay constants.
func raiseToIR4(m *graph.Model) {
	if m.Proto.GetIrVersion() >= 4 {
		return
	}
	m.Graph().Walk(func(g *graph.Graph) {
		ins := g.Proto.Input[:0]
		for _, vi := range g.Proto.Input {
			if t, _ := g.Initializer(vi.GetName()); t == nil {
				ins = append(ins, vi)
			}
		}
		g.Proto.Input = ins
	})
	m.Proto.IrVersion = proto.Int64(4)
}

// withLastDim returns t with its last axis of size d, or nil when t has
// no known shape.
func withLastDim(t *onnxpb.TypeProto_Tensor, d int64) *onnxpb.TypeProto_Tensor {
	if t == nil || t.Shape == nil || len(t.Shape.Dim) == 0 {
		return nil
	}
	t = proto.Clone(t).(*onnxpb.TypeProto_Tensor)
	last := &onnxpb.TensorShapeProto_Dimension{} // d < 0: unknown, set per run
	if d >= 0 {
		last.Value = &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d}
	}
	t.Shape.Dim[len(t.Shape.Dim)-1] = last
	return t
}

// tensorType returns the declared tensor type of a value of g (value_info,
// graph input or output), or nil.
func tensorType(g *graph.Graph, name string) *onnxpb.TypeProto_Tensor {
	for _, list := range [][]*onnxpb.ValueInfoProto{g.Proto.ValueInfo, g.Proto.Input, g.Proto.Output} {
		for _, vi := range list {
			if vi.GetName() == name {
				return vi.GetType().GetTensorType()
			}
		}
	}
	return nil
}

// addInitializer adds a tensor to the graph. Before IR version 4 every
// initializer had to be declared as a graph input too.
func addInitializer(m *graph.Model, g *graph.Graph, t *onnxpb.TensorProto) {
	g.AddInitializer(t)
	if m.Proto.GetIrVersion() >= 4 {
		return
	}
	var dims []*onnxpb.TensorShapeProto_Dimension
	for _, d := range t.Dims {
		dims = append(dims, &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d}})
	}
	g.Proto.Input = append(g.Proto.Input, &onnxpb.ValueInfoProto{
		Name: proto.String(t.GetName()),
		Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: &onnxpb.TypeProto_Tensor{
			ElemType: proto.Int32(t.GetDataType()), Shape: &onnxpb.TensorShapeProto{Dim: dims},
		}}},
	})
}

// nodePrefix is the name scope the branch's nodes go under, so Netron
// groups them with the layer: the layer node's own scope when it has a
// torch-style name, else the module path written as a scope
// ("model.layers.0.q_proj" -> "/model/layers.0/q_proj").
func nodePrefix(nodeName, module string) string {
	if strings.HasPrefix(nodeName, "/") {
		if i := strings.LastIndex(nodeName, "/"); i > 0 {
			return nodeName[:i]
		}
	}
	var b strings.Builder
	for i, seg := range strings.Split(module, ".") {
		if i > 0 && isDigits(seg) {
			b.WriteString("." + seg)
			continue
		}
		b.WriteString("/" + seg)
	}
	return b.String()
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func graphName(g *graph.Graph) string {
	if g.Parent == nil {
		return ""
	}
	return g.Proto.GetName()
}

// initA draws lora_A [in, r] from the adapter's own random stream.
func initA(module string, in, r int64, cfg InjectConfig) []float64 {
	h := fnv.New64a()
	h.Write([]byte(module))
	rng := rand.New(rand.NewPCG(cfg.Seed, h.Sum64()))
	vals := make([]float64, in*r)
	switch cfg.Init {
	case InitGaussian:
		std := 1 / float64(r)
		for i := range vals {
			vals[i] = rng.NormFloat64() * std
		}
	default:
		bound := 1 / math.Sqrt(float64(in))
		for i := range vals {
			vals[i] = (2*rng.Float64() - 1) * bound
		}
	}
	return vals
}

// stackedCount counts the manifest's adapters on module.
func stackedCount(man *Manifest, module string) int {
	n := 0
	for _, a := range man.Adapters {
		if a.Module == module {
			n++
		}
	}
	return n
}
