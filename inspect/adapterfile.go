package inspect

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/onnxlora/onnxlora/export"
)

// AdapterFileReport describes an ONNX Runtime adapter file (.onnx_adapter).
// Its JSON form is the output of `onnxlora inspect X.onnx_adapter --json`.
type AdapterFileReport struct {
	SchemaVersion  int    `json:"schema_version"`
	Path           string `json:"path"`
	FileBytes      int64  `json:"file_bytes"`
	FormatVersion  int32  `json:"format_version"`
	AdapterVersion int32  `json:"adapter_version"`
	ModelVersion   int32  `json:"model_version"`
	// Params are every parameter in file order.
	Params []AdapterFileParam `json:"params"`
	// Modules pair "<module>.lora_A.weight" [in, r] with
	// "<module>.lora_B.weight" [r, out], sorted by module.
	Modules []AdapterFileModule `json:"modules"`
	// Unpaired names the params that are not half of such a pair.
	Unpaired []string `json:"unpaired"`
}

// AdapterFileParam is one parameter of an adapter file.
type AdapterFileParam struct {
	Name  string  `json:"name"`
	DType string  `json:"dtype"`
	Shape []int64 `json:"shape"`
	Bytes int     `json:"bytes"`
	// Norm is the Frobenius norm; null for non-float params and when
	// NonFinite.
	Norm *float64 `json:"norm"`
	// NonFinite is set when the values hold a NaN or an infinity.
	NonFinite bool `json:"non_finite,omitempty"`
}

// AdapterFileModule is one LoRA module of an adapter file.
type AdapterFileModule struct {
	Module string `json:"module"`
	Rank   int    `json:"rank"`
	In     int    `json:"in"`
	Out    int    `json:"out"`
	DType  string `json:"dtype"`
	// DeltaNorm is ‖A·B‖_F, the size of the weight update (the scaling is
	// already in B).
	DeltaNorm float64 `json:"delta_norm"`
	// NonFinite is set when A or B holds a NaN or an infinity (DeltaNorm
	// is then 0).
	NonFinite bool `json:"non_finite,omitempty"`
}

// BuildAdapterFile reads and verifies the adapter file at path.
func BuildAdapterFile(path string) (*AdapterFileReport, error) {
	a, err := export.ReadOnnxAdapter(path)
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	r := &AdapterFileReport{SchemaVersion: SchemaVersion, Path: path, FileBytes: st.Size(),
		FormatVersion: a.FormatVersion, AdapterVersion: a.AdapterVersion, ModelVersion: a.ModelVersion,
		Params: []AdapterFileParam{}, Modules: []AdapterFileModule{}, Unpaired: []string{}}
	values := map[string][]float64{}
	for i := range a.Params {
		p := &a.Params[i]
		fp := AdapterFileParam{Name: p.Name, DType: strings.ToLower(p.DataType.String()), Shape: append([]int64{}, p.Dims...), Bytes: len(p.Data)}
		if p.DataType.IsFloat() {
			v, err := p.Float64s()
			if err != nil {
				return nil, err
			}
			values[p.Name] = v
			if n := round6(frobenius(v)); finite(n) {
				fp.Norm = &n
			} else {
				fp.NonFinite = true
			}
		}
		r.Params = append(r.Params, fp)
	}
	paired := map[string]bool{}
	for i := range a.Params {
		pa := &a.Params[i]
		mod, ok := strings.CutSuffix(pa.Name, export.OnnxAdapterSuffixA)
		if !ok || mod == "" {
			continue
		}
		pb, ok := a.Param(mod + export.OnnxAdapterSuffixB)
		if !ok || len(pa.Dims) != 2 || len(pb.Dims) != 2 || pa.Dims[1] != pb.Dims[0] ||
			values[pa.Name] == nil || values[pb.Name] == nil {
			continue
		}
		in, rank, out := int(pa.Dims[0]), int(pa.Dims[1]), int(pb.Dims[1])
		m := AdapterFileModule{Module: mod, Rank: rank, In: in, Out: out, DType: strings.ToLower(pa.DataType.String()),
			DeltaNorm: round6(productNorm(values[pa.Name], values[pb.Name], in, rank, out))}
		if !finite(m.DeltaNorm) {
			m.DeltaNorm, m.NonFinite = 0, true
		}
		r.Modules = append(r.Modules, m)
		paired[pa.Name], paired[pb.Name] = true, true
	}
	sort.Slice(r.Modules, func(i, j int) bool { return r.Modules[i].Module < r.Modules[j].Module })
	for _, p := range a.Params {
		if !paired[p.Name] {
			r.Unpaired = append(r.Unpaired, p.Name)
		}
	}
	return r, nil
}

func finite(x float64) bool { return !math.IsNaN(x) && !math.IsInf(x, 0) }

// frobenius returns sqrt(Σ x²), scaled by the largest |x| so that large
// float64 values do not overflow.
func frobenius(v []float64) float64 {
	var m float64
	for _, x := range v {
		m = math.Max(m, math.Abs(x))
	}
	if m == 0 || math.IsInf(m, 0) || math.IsNaN(m) {
		return m
	}
	var s float64
	for _, x := range v {
		s += (x / m) * (x / m)
	}
	return m * math.Sqrt(s)
}

// productNorm returns ‖A·B‖_F for A [in, r] and B [r, out] through the r×r
// Gram matrices, ‖AB‖² = Σ_kl (AᵀA)_kl (BBᵀ)_kl, without forming A·B.
func productNorm(a, b []float64, in, r, out int) float64 {
	ga, gb := make([]float64, r*r), make([]float64, r*r)
	for i := 0; i < in; i++ {
		row := a[i*r : (i+1)*r]
		for k := 0; k < r; k++ {
			for l := 0; l < r; l++ {
				ga[k*r+l] += row[k] * row[l]
			}
		}
	}
	for k := 0; k < r; k++ {
		for l := 0; l < r; l++ {
			var s float64
			for j := 0; j < out; j++ {
				s += b[k*out+j] * b[l*out+j]
			}
			gb[k*r+l] = s
		}
	}
	var s float64
	for i := range ga {
		s += ga[i] * gb[i]
	}
	return math.Sqrt(math.Max(s, 0))
}

// WriteAdapterFileJSON writes the report as indented JSON.
func WriteAdapterFileJSON(w io.Writer, r *AdapterFileReport) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(data, '\n'))
	return err
}

// WriteAdapterFileText writes the report as plain-text tables.
func WriteAdapterFileText(w io.Writer, r *AdapterFileReport) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "ONNX Runtime adapter %s (%d bytes)\n", r.Path, r.FileBytes)
	fmt.Fprintf(tw, "format_version %d, adapter_version %d, model_version %d, %d parameter(s)\n\n",
		r.FormatVersion, r.AdapterVersion, r.ModelVersion, len(r.Params))
	if len(r.Modules) > 0 {
		fmt.Fprintf(tw, "LoRA modules (%d):\n", len(r.Modules))
		fmt.Fprintf(tw, "  MODULE\tRANK\tIN\tOUT\tDTYPE\t‖A·B‖\n")
		for _, m := range r.Modules {
			norm := fmt.Sprintf("%g", m.DeltaNorm)
			if m.NonFinite {
				norm = "non-finite"
			}
			fmt.Fprintf(tw, "  %s\t%d\t%d\t%d\t%s\t%s\n", m.Module, m.Rank, m.In, m.Out, m.DType, norm)
		}
		fmt.Fprintln(tw)
	}
	fmt.Fprintf(tw, "Parameters:\n")
	fmt.Fprintf(tw, "  NAME\tDTYPE\tSHAPE\tBYTES\tNORM\n")
	for _, p := range r.Params {
		norm := "-"
		if p.Norm != nil {
			norm = fmt.Sprintf("%g", *p.Norm)
		} else if p.NonFinite {
			norm = "non-finite"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%v\t%d\t%s\n", p.Name, p.DType, p.Shape, p.Bytes, norm)
	}
	if len(r.Unpaired) > 0 && len(r.Modules) > 0 {
		fmt.Fprintf(tw, "\n%d parameter(s) are not lora_A/lora_B pairs: %s\n", len(r.Unpaired), strings.Join(r.Unpaired, ", "))
	}
	return tw.Flush()
}
