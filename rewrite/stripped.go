package rewrite

import (
	"github.com/onnxlora/onnxlora/graph"
)

// RecognizedAdapters describes the LoRA branches of a model that has no
// manifest (its metadata was stripped), as manifest entries, so a model
// keeps showing its adapters. It returns nil when the model has a manifest
// (use ReadManifest) or no branch of the shapes inject writes.
func RecognizedAdapters(m *graph.Model) ([]Adapter, error) {
	man, err := ReadManifest(m)
	if err != nil || man != nil {
		return nil, err
	}
	found, err := recognizedAdapters(m, m.Graph())
	if err != nil {
		return nil, err
	}
	out := make([]Adapter, 0, len(found))
	for _, f := range found {
		a := Adapter{
			Module: f.Module, Node: f.Base.GetName(), Op: f.Base.GetOpType(),
			LoraA: f.A, LoraB: f.B, Rank: f.Rank, Alpha: f.Alpha, Scaling: f.Scaling, RSLoRA: f.RSLoRA,
			DType: graph.DataType(f.TA.GetDataType()).String(), Dropout: f.Dropout,
			Output: f.Output, BaseOutput: f.BaseOutput, ScalingTensor: f.S,
		}
		if len(f.TA.Dims) >= 2 && len(f.TB.Dims) >= 2 {
			a.InFeatures, a.OutFeatures = f.TA.Dims[0], f.TB.Dims[len(f.TB.Dims)-1]
		}
		if f.Layer != nil {
			a.Weight = f.Layer.WeightName()
		}
		for _, n := range f.Nodes {
			a.Nodes = append(a.Nodes, n.GetName())
		}
		out = append(out, a)
	}
	return out, nil
}
