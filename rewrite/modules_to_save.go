package rewrite

import (
	"fmt"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// SavedModule is a layer trained whole beside the adapters, as PEFT's
// modules_to_save (a sequence classifier's "classifier" or "score"): its
// weight and bias initializers are trainable and export-adapter writes
// them in full.
type SavedModule struct {
	// Module is the layer's module path; Node and Op its node.
	Module string `json:"module"`
	Node   string `json:"node"`
	Op     string `json:"op"`
	// Weight and Bias are the trainable initializers; Bias is empty for a
	// layer without a constant bias.
	Weight string `json:"weight"`
	Bias   string `json:"bias,omitempty"`
}

// moduleNameMatches is PEFT's modules_to_save test: the name is the whole
// module path or its last dotted segments.
func moduleNameMatches(path, name string) bool {
	return path == name || strings.HasSuffix(path, "."+name)
}

// addModulesToSave records the layers named by cfg.ModulesToSave in man,
// refusing names that match no layer, layers that also have an adapter,
// and weights that cannot be trained in place (shared, quantized,
// Constant nodes, subgraphs).
func addModulesToSave(m *graph.Model, names []string, man *Manifest) error {
	if len(names) == 0 {
		return nil
	}
	layers, _ := FindLayers(m)
	layers = append(layers, findEmbeddings(m)...)
	taken := map[string]bool{}
	for _, a := range man.Adapters {
		taken[a.Module] = true
	}
	saved := map[string]bool{}
	for _, s := range man.Saved {
		saved[s.Module] = true
	}
	for _, name := range names {
		found := false
		for _, l := range layers {
			if !moduleNameMatches(l.Module, name) {
				continue
			}
			found = true
			if saved[l.Module] {
				continue
			}
			if taken[l.Module] {
				return fmt.Errorf("module %s already has an adapter; a layer is trained whole (modules_to_save) or adapted, not both (PEFT's too)", l.Module)
			}
			s, err := savedModuleOf(m, l)
			if err != nil {
				return fmt.Errorf("modules_to_save %s: %w", l.Module, err)
			}
			man.Saved = append(man.Saved, *s)
			saved[l.Module] = true
		}
		if !found {
			return fmt.Errorf("modules_to_save %q matches no MatMul, Gemm or Gather layer (see onnxlora inspect)", name)
		}
	}
	return nil
}

// savedModuleOf checks that a layer's weight (and bias) can be trained in
// place and describes it.
func savedModuleOf(m *graph.Model, l *Layer) (*SavedModule, error) {
	switch {
	case l.Op == opConv:
		return nil, fmt.Errorf("Conv layers are not supported")
	case l.Quant != nil:
		return nil, fmt.Errorf("the weight is quantized; training it needs a float weight")
	case l.Shared:
		return nil, fmt.Errorf("weight %s also feeds other nodes (tied weights?); training it would change them too", l.Weight.Name)
	}
	if err := ownInitializer(m, l.Weight); err != nil {
		return nil, fmt.Errorf("weight %s: %w", l.Weight.Name, err)
	}
	s := &SavedModule{Module: l.Module, Node: l.Node.GetName(), Op: l.Op, Weight: l.Weight.Name}
	if l.Op == opGather {
		return s, nil
	}
	bias, beta, reader := layerBias(l)
	if bias == nil {
		return s, nil
	}
	if beta == 0 {
		return nil, fmt.Errorf("the Gemm's beta is 0, so its bias is not used")
	}
	if l.Graph.IsShared(bias, reader) {
		return nil, fmt.Errorf("bias %s also feeds other nodes", bias.Name)
	}
	if err := ownInitializer(m, bias); err != nil {
		return nil, fmt.Errorf("bias %s: %w", bias.Name, err)
	}
	s.Bias = bias.Name
	return s, nil
}

// ownInitializer checks that w is a float initializer of the main graph,
// which training can update.
func ownInitializer(m *graph.Model, w *graph.Weight) error {
	if w.Constant != nil {
		return fmt.Errorf("it is a Constant node's output, not an initializer")
	}
	if t, _ := m.Graph().Initializer(w.Name); t == nil {
		return fmt.Errorf("it is not an initializer of the main graph")
	}
	if !w.DataType().IsFloat() {
		return fmt.Errorf("it is %v, not a float type", w.DataType())
	}
	return nil
}

// savedLayer finds the layer a manifest's SavedModule describes.
func savedLayer(m *graph.Model, s *SavedModule) (*Layer, error) {
	layers, _ := FindLayers(m)
	layers = append(layers, findEmbeddings(m)...)
	for _, l := range layers {
		if l.Module == s.Module && l.Weight.Name == s.Weight {
			return l, nil
		}
	}
	return nil, fmt.Errorf("modules_to_save %s: no layer reads its weight %s any more", s.Module, s.Weight)
}

// peftSaved converts the manifest's saved modules to PEFT's tensors, in
// the layout the torch module stores: nn.Linear [out, in], GPT-2's Conv1D
// [in, out], nn.Embedding [vocab, dim]; Gemm's alpha and beta are folded
// in, as the node computes alpha·W and beta·C.
func peftSaved(m *graph.Model, man *Manifest) ([]export.PEFTSaved, error) {
	var out []export.PEFTSaved
	for i := range man.Saved {
		s := &man.Saved[i]
		l, err := savedLayer(m, s)
		if err != nil {
			return nil, err
		}
		dt, ok := peftDType[l.Weight.DataType()]
		if !ok {
			return nil, fmt.Errorf("modules_to_save %s: weight type %v has no safetensors dtype", s.Module, l.Weight.DataType())
		}
		w, err := m.Float64s(l.Weight.Tensor)
		if err != nil {
			return nil, err
		}
		in, outF := int(l.In), int(l.Out)
		sv := export.PEFTSaved{Module: s.Module, Param: "weight", DType: dt}
		if l.Op == opGather || isConv1D(l) {
			sv.Shape = []int{in, outF}
		} else {
			sv.Shape = []int{outF, in}
		}
		sv.Values = make([]float32, in*outF)
		// The stored tensor is [in, out] unless the chain or transB swaps
		// it (as addSaved reads it).
		storedOutIn := l.Op != opGather && l.Weight.Transposed != l.TransB
		for i := 0; i < in; i++ {
			for j := 0; j < outF; j++ {
				v := w[i*outF+j]
				if storedOutIn {
					v = w[j*in+i]
				}
				v *= l.Alpha
				if sv.Shape[0] == in {
					sv.Values[i*outF+j] = float32(v)
				} else {
					sv.Values[j*in+i] = float32(v)
				}
			}
		}
		out = append(out, sv)
		if s.Bias == "" {
			continue
		}
		bias, beta, _ := layerBias(l)
		if bias == nil || bias.Name != s.Bias {
			return nil, fmt.Errorf("modules_to_save %s: its bias %s is no longer the layer's", s.Module, s.Bias)
		}
		b, err := m.Float64s(bias.Tensor)
		if err != nil {
			return nil, err
		}
		if len(b) != outF {
			return nil, fmt.Errorf("modules_to_save %s: bias %s has %d values for %d outputs", s.Module, s.Bias, len(b), outF)
		}
		bdt, ok := peftDType[bias.DataType()]
		if !ok {
			return nil, fmt.Errorf("modules_to_save %s: bias type %v has no safetensors dtype", s.Module, bias.DataType())
		}
		sb := export.PEFTSaved{Module: s.Module, Param: "bias", DType: bdt, Shape: []int{outF}, Values: make([]float32, outF)}
		for j, v := range b {
			sb.Values[j] = float32(beta * v)
		}
		out = append(out, sb)
	}
	return out, nil
}

// peftDType maps ONNX float types to safetensors dtypes.
var peftDType = map[graph.DataType]export.DType{
	graph.Float: export.DTypeF32, graph.Float16: export.DTypeF16,
	graph.BFloat16: export.DTypeBF16, graph.Double: export.DTypeF64,
}

// refuseSaved fails when the model has modules_to_save layers, for
// exports that cannot carry whole weights (what says which).
func refuseSaved(m *graph.Model, what string) error {
	man, err := ReadManifest(m)
	if err != nil || man == nil || len(man.Saved) == 0 {
		return err
	}
	return fmt.Errorf("%s cannot hold the modules_to_save layer %s (a whole trained weight); export a PEFT directory instead", what, man.Saved[0].Module)
}
