package rewrite

import (
	"fmt"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// ExportOnnxAdapter returns the model's (trained) adapters as an ONNX
// Runtime adapter, ready for export.WriteOnnxAdapter: for each module
// "<module>.lora_A.weight" = A [in, r] and "<module>.lora_B.weight" =
// scaling·B [r, out], computed in float64 and rounded once to the
// factors' type, so it serves on an adapter-input model of the same base
// (inject --adapter-inputs) and merges into the base with the same result
// Merge gives on this model. For an adapter-input model the parameters are
// named after its inputs and hold their defaults, which must have been
// trained (rank > 0). opts.Only restricts the modules; BaseModel and
// TaskType do not apply.
func ExportOnnxAdapter(m *graph.Model, opts ExportOptions) (*export.OnnxAdapter, *ExportReport, error) {
	if err := refuseSaved(m, "an .onnx_adapter file (ONNX Runtime's LoRA parameters)"); err != nil {
		return nil, nil, err
	}
	chosen, source, err := exportable(m, opts.Only)
	if err != nil {
		return nil, nil, err
	}
	out := &export.OnnxAdapter{FormatVersion: export.OnnxAdapterFormatVersion}
	rep := &ExportReport{Source: source}
	for _, f := range chosen {
		if f.isInputs() && f.Rank == 0 {
			return nil, nil, fmt.Errorf("adapter %s: inputs %s and %s hold rank-0 defaults, so there is nothing to export; adapters for an adapter-input model come from convert-adapter or from exporting a trained model", f.Module, f.A, f.B)
		}
		if f.Kind == convBranch || isDoRAKind(f.Kind) {
			return nil, nil, fmt.Errorf("adapter %s: a %s adapter does not fit ONNX Runtime's .onnx_adapter (2-D A and B per MatMul); export it as a PEFT dir", f.Module, f.Kind.Name)
		}
		dt := graph.DataType(f.TA.GetDataType())
		if !dt.IsFloat() || f.TB.GetDataType() != f.TA.GetDataType() {
			return nil, nil, fmt.Errorf("adapter %s: lora_A is %v and lora_B %v; both must be one float type", f.Module, dt, graph.DataType(f.TB.GetDataType()))
		}
		a, err := m.Float64s(f.TA)
		if err != nil {
			return nil, nil, err
		}
		b, err := m.Float64s(f.TB)
		if err != nil {
			return nil, nil, err
		}
		nameA, nameB := f.Module+export.OnnxAdapterSuffixA, f.Module+export.OnnxAdapterSuffixB
		if f.isInputs() {
			nameA, nameB = f.A, f.B // what ONNX Runtime feeds
		} else {
			for i := range b {
				b[i] *= f.Scaling
			}
		}
		in, r, o := f.TA.Dims[0], int64(f.Rank), f.TB.Dims[1]
		pa, err := export.NewOnnxAdapterParam(nameA, dt, []int64{in, r}, a)
		if err != nil {
			return nil, nil, err
		}
		pb, err := export.NewOnnxAdapterParam(nameB, dt, []int64{r, o}, b)
		if err != nil {
			return nil, nil, err
		}
		out.Params = append(out.Params, pa, pb)
		rep.Modules = append(rep.Modules, f.Module)
	}
	if _, err := out.Marshal(); err != nil { // duplicate names, size
		return nil, nil, err
	}
	return out, rep, nil
}
