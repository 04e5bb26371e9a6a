package rewrite

import (
	"encoding/json"
	"fmt"

	"github.com/onnxlora/onnxlora/graph"
)

// ManifestKey is the metadata_props key under which an injected model keeps
// its manifest.
const ManifestKey = "onnxlora.adapters"

// ManifestVersion is the version of the manifest format this package writes.
const ManifestVersion = 1

// Manifest describes the adapters in a model: what inject added and what
// merge and export-adapter read back. It is stored as JSON in the model's
// metadata under ManifestKey.
type Manifest struct {
	Version  int       `json:"version"`
	Adapters []Adapter `json:"adapters"`
	// Trainable lists the initializers to train: every lora_A and lora_B
	// (and DoRA magnitude), then the weights and biases of Saved.
	// It is what ONNX Runtime training's generate_artifacts takes as
	// requires_grad.
	Trainable []string `json:"trainable"`
	// Saved are the layers trained whole (PEFT's modules_to_save).
	Saved []SavedModule `json:"modules_to_save,omitempty"`
}

// Adapter is one LoRA branch: y = base(x) + scaling * ((dropout(x) · A) · B).
type Adapter struct {
	// Module is the PEFT-style module path of the adapted layer.
	Module string `json:"module"`
	// Node is the adapted MatMul or Gemm node; Op its type.
	Node string `json:"node"`
	Op   string `json:"op"`
	// Weight is the base weight's constant (initializer or Constant output).
	Weight string `json:"weight"`
	// LoraA ([in, r]) and LoraB ([r, out]) are the adapter's initializers.
	LoraA string  `json:"lora_A"`
	LoraB string  `json:"lora_B"`
	Rank  int     `json:"rank"`
	Alpha float64 `json:"alpha"`
	// Scaling multiplies the branch: alpha/rank, or alpha/sqrt(rank) with
	// rsLoRA.
	Scaling     float64 `json:"scaling"`
	RSLoRA      bool    `json:"use_rslora,omitempty"`
	InFeatures  int64   `json:"in_features"`
	OutFeatures int64   `json:"out_features"`
	// DType is the element type of A and B (the layer's compute type).
	DType string `json:"dtype"`
	// Dropout is the branch's dropout probability, 0 for none, and
	// DropoutRatio the scalar initializer holding it (opset 12 and later).
	Dropout      float64 `json:"dropout,omitempty"`
	DropoutRatio string  `json:"dropout_ratio,omitempty"`
	// Init is PEFT's init_lora_weights when it changed the base weight
	// (pissa, pissa_niter_N, olora): the weight then holds the residual,
	// and the adapter is a delta on it, not on the original model.
	Init string `json:"init,omitempty"`
	// Graph names the subgraph holding the layer, empty for the main graph.
	Graph string `json:"graph,omitempty"`
	// Output is the value the branch's Add writes: the node's original
	// output. BaseOutput is what the node writes now.
	Output     string `json:"output"`
	BaseOutput string `json:"base_output"`
	// ScalingTensor is the scalar initializer holding Scaling.
	ScalingTensor string `json:"scaling_tensor"`
	// Nodes are the names of the branch's nodes.
	Nodes []string `json:"nodes"`
	// Magnitude is DoRA's magnitude vector (PEFT use_dora), [1, out], one
	// value per output feature; trainable like A and B. Constants are the
	// DoRA branch's fixed helpers (a row of ones, the exponent 2).
	Magnitude string   `json:"lora_magnitude_vector,omitempty"`
	Constants []string `json:"constants,omitempty"`
	// Kernel is a Conv layer's spatial kernel shape: lora_A is then
	// [r, in, kernel…] and lora_B [out, r, 1…] (PEFT's Conv LoRA layout).
	Kernel []int64 `json:"kernel,omitempty"`
	// Mode is how the factors are held: "" for initializers with a
	// scaling node, ModeAdapterInputs for graph inputs with rank-0
	// defaults and the scaling in B (Rank, Alpha then say nothing: the
	// rank comes with each adapter, and Scaling is 1).
	Mode string `json:"mode,omitempty"`
}

// ModeAdapterInputs is Adapter.Mode for an adapter-input branch: A and B
// are graph inputs fed per run (inject --adapter-inputs).
const ModeAdapterInputs = "adapter-inputs"

// ReadManifest returns the model's manifest, or nil when it has none.
func ReadManifest(m *graph.Model) (*Manifest, error) {
	s, ok := m.Metadata(ManifestKey)
	if !ok {
		return nil, nil
	}
	var man Manifest
	if err := json.Unmarshal([]byte(s), &man); err != nil {
		return nil, fmt.Errorf("metadata %s is not a valid manifest: %w", ManifestKey, err)
	}
	if man.Version > ManifestVersion {
		return nil, fmt.Errorf("metadata %s has manifest version %d; this onnxlora reads up to %d", ManifestKey, man.Version, ManifestVersion)
	}
	return &man, nil
}

// WriteManifest stores the manifest in the model's metadata, or removes the
// key when the manifest has no adapters.
func WriteManifest(m *graph.Model, man *Manifest) error {
	if man == nil || len(man.Adapters) == 0 {
		m.DeleteMetadata(ManifestKey)
		return nil
	}
	man.Version = ManifestVersion
	man.Trainable = man.Trainable[:0]
	for _, a := range man.Adapters {
		man.Trainable = append(man.Trainable, a.LoraA, a.LoraB)
		if a.Magnitude != "" {
			man.Trainable = append(man.Trainable, a.Magnitude)
		}
	}
	for _, s := range man.Saved {
		man.Trainable = append(man.Trainable, s.Weight)
		if s.Bias != "" {
			man.Trainable = append(man.Trainable, s.Bias)
		}
	}
	data, err := json.Marshal(man)
	if err != nil {
		return err
	}
	m.SetMetadata(ManifestKey, string(data))
	return nil
}

// MarshalIndent renders the manifest as indented JSON, for --manifest files.
func (man *Manifest) MarshalIndent() ([]byte, error) {
	return json.MarshalIndent(man, "", "  ")
}

// branchNodeNames returns the names of nodes that belong to LoRA branches
// listed in the model's manifest, so they are not taken for layers.
func branchNodeNames(m *graph.Model) map[string]bool {
	names := map[string]bool{}
	man, err := ReadManifest(m)
	if err != nil || man == nil {
		return names
	}
	for _, a := range man.Adapters {
		for _, n := range a.Nodes {
			names[n] = true
		}
	}
	return names
}
