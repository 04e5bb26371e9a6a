package rewrite

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// ResizeOptions says how Resize and ResizePEFT choose each adapter's new
// rank. Exactly one of Rank and Energy is set.
type ResizeOptions struct {
	// Rank is the new rank of every adapter. An adapter whose update has
	// fewer singular values (min(r, in, out)) keeps all of them.
	Rank int
	// Energy, in (0, 1], picks per adapter the smallest rank whose
	// singular values keep this fraction of ‖ΔW‖²_F (Σ σ²).
	Energy float64
	// Alpha, when non-zero, is the new lora_alpha of every resized
	// adapter; the factors absorb the change of scaling. Zero keeps each
	// adapter's scaling (alpha becomes scaling·R, or scaling·sqrt(R) with
	// rsLoRA), so the config stays consistent with the weights.
	Alpha float64
	// Only restricts the resize to these modules; empty means all.
	Only []string
}

func (o ResizeOptions) check() error {
	switch {
	case o.Rank < 0:
		return fmt.Errorf("rank must be positive, got %d", o.Rank)
	case math.IsNaN(o.Energy) || o.Energy < 0 || o.Energy > 1:
		return fmt.Errorf("energy must be in (0, 1], got %v", o.Energy)
	case (o.Rank > 0) == (o.Energy > 0):
		return errors.New("give exactly one of a rank and an energy fraction")
	case math.IsNaN(o.Alpha) || math.IsInf(o.Alpha, 0):
		return fmt.Errorf("alpha must be finite, got %v", o.Alpha)
	}
	return nil
}

// ResizeReport describes a resize.
type ResizeReport struct {
	// Source is "manifest", "recognized" (Resize) or "peft" (ResizePEFT).
	Source string         `json:"source"`
	Layers []ResizedLayer `json:"layers"`
}

// ResizedLayer is one adapter refactored at a new rank.
type ResizedLayer struct {
	Module   string  `json:"module"`
	OldRank  int     `json:"old_rank"`
	NewRank  int     `json:"new_rank"`
	OldAlpha float64 `json:"old_alpha"`
	NewAlpha float64 `json:"new_alpha"`
	// Scaling is the new alpha/R (or alpha/sqrt(R)).
	Scaling float64 `json:"scaling"`
	// Singular are the singular values of ΔW = scaling·A·B before the
	// resize, descending (min(r, in, out) of them).
	Singular []float64 `json:"singular_values"`
	// Norm is ‖ΔW‖_F; Error is ‖ΔW − ΔW_R‖_F = sqrt(Σ of the discarded
	// σ²), and RelError is Error/Norm (0 when Norm is 0); Energy is the
	// fraction of Σ σ² kept.
	Norm     float64 `json:"frobenius_norm"`
	Error    float64 `json:"frobenius_error"`
	RelError float64 `json:"relative_error"`
	Energy   float64 `json:"energy_kept"`
}

// resizeOne refactors one adapter (A in×r, B r×out in the x·W orientation).
func resizeOne(a, b []float64, in, out, r int, scaling, alpha float64, rslora bool, opts ResizeOptions) (na, nb []float64, rep ResizedLayer, err error) {
	d, err := newDeltaSVD(a, b, in, out, r, scaling)
	if err != nil {
		return nil, nil, rep, err
	}
	rank := opts.Rank
	if opts.Energy > 0 {
		rank = rankForEnergy(d.S, opts.Energy)
	}
	rank = max(min(rank, d.k), 1)
	newScaling, newAlpha := scaling, alphaFor(scaling, rank, rslora)
	if opts.Alpha != 0 {
		newAlpha = opts.Alpha
		newScaling = newAlpha / float64(rank)
		if rslora {
			newScaling = newAlpha / math.Sqrt(float64(rank))
		}
	}
	na, nb = d.factors(rank, newScaling)
	norm := tailNorm(d.S, 0)
	rep = ResizedLayer{
		OldRank: r, NewRank: rank, OldAlpha: alpha, NewAlpha: newAlpha, Scaling: newScaling,
		Singular: d.S, Norm: norm, Error: tailNorm(d.S, rank), Energy: 1,
	}
	if norm > 0 {
		rep.RelError = rep.Error / norm
		rep.Energy = 1 - (rep.Error*rep.Error)/(norm*norm)
	}
	return na, nb, rep, nil
}

// Resize refactors the model's adapters in place at a new rank: each
// update ΔW = scaling·A·B is decomposed by SVD (through QR of A and Bᵀ, so
// the in×out matrix is never formed), truncated to the rank opts asks for,
// and split evenly as A' = U·sqrt(Σ/s'), B' = sqrt(Σ/s')·Vᵀ. lora_A and
// lora_B keep their names and type with the new shapes; the scaling tensor,
// the manifest (rank, alpha, scaling) and the declared shape of the
// branch's rank-sized value follow. By Eckart–Young the truncation is the
// best rank-R approximation, and the report gives its Frobenius error,
// sqrt of the sum of the discarded squared singular values.
func Resize(m *graph.Model, opts ResizeOptions) (*ResizeReport, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	found, man, source, err := findAdapters(m, m.Graph())
	if err != nil {
		return nil, err
	}
	if len(found) == 0 {
		return nil, errors.New("the model has no LoRA adapters to resize (no manifest and no branch of the shape inject writes)")
	}
	sel, err := selectModules(found, opts.Only)
	if err != nil {
		return nil, err
	}
	type change struct {
		f      *foundAdapter
		a, b   []float64
		layer  ResizedLayer
		dtypeA graph.DataType
	}
	var changes []change
	for _, f := range found {
		if !sel[f.Module] {
			continue
		}
		if !resizable(f) {
			return nil, fmt.Errorf("adapter %s is a %s branch; resize takes LoRA branches whose A, B and scaling are initializers", f.Module, f.Kind.Name)
		}
		a, b, in, out, err := loraFactors(m, f)
		if err != nil {
			return nil, err
		}
		na, nb, rep, err := resizeOne(a, b, in, out, f.Rank, f.Scaling, f.Alpha, f.RSLoRA, opts)
		if err != nil {
			return nil, fmt.Errorf("adapter %s: %w", f.Module, err)
		}
		rep.Module = f.Module
		changes = append(changes, change{f: f, a: na, b: nb, layer: rep})
	}
	// Everything is computed; now change the model.
	report := &ResizeReport{Source: source}
	for _, c := range changes {
		f, R := c.f, int64(c.layer.NewRank)
		in, out := f.TA.Dims[0], f.TB.Dims[1]
		f.TA.Dims = []int64{in, R}
		f.TB.Dims = []int64{R, out}
		if err := graph.SetFloat64s(f.TA, c.a); err != nil {
			return nil, err
		}
		if err := graph.SetFloat64s(f.TB, c.b); err != nil {
			return nil, err
		}
		if err := graph.SetFloat64s(f.TS, []float64{c.layer.Scaling}); err != nil {
			return nil, err
		}
		if n := f.node("MatMul_A"); n != nil {
			setLastDim(f.Graph, n.Output[0], R)
		}
		if man != nil && f.Manifest >= 0 {
			e := &man.Adapters[f.Manifest]
			e.Rank, e.Alpha, e.Scaling = c.layer.NewRank, c.layer.NewAlpha, c.layer.Scaling
		}
		report.Layers = append(report.Layers, c.layer)
	}
	if man != nil {
		if err := WriteManifest(m, man); err != nil {
			return nil, err
		}
	}
	return report, nil
}

// resizable reports whether an adapter's branch holds A [in, r], B [r, out]
// and a scaling as initializers: plain LoRA, and LoRA with float32 factors
// beside a half-precision layer.
func resizable(f *foundAdapter) bool {
	return f.Kind == loraBranch || f.Kind == castBranchF16 || f.Kind == castBranchBF16
}

// setLastDim changes the last axis of a value's declared shape, when it is
// declared with a fixed size.
func setLastDim(g *graph.Graph, name string, d int64) {
	for _, list := range [][]*onnxpb.ValueInfoProto{g.Proto.ValueInfo, g.Proto.Output} {
		for _, vi := range list {
			if vi.GetName() != name {
				continue
			}
			t := vi.GetType().GetTensorType()
			if t == nil || t.Shape == nil || len(t.Shape.Dim) == 0 {
				continue
			}
			last := t.Shape.Dim[len(t.Shape.Dim)-1]
			if _, ok := last.Value.(*onnxpb.TensorShapeProto_Dimension_DimValue); ok {
				last.Value = &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d}
			}
		}
	}
}

// ResizePEFT resizes a PEFT adapter directory as Resize does a model, and
// writes the result to dst (a directory; not src). PEFT's lora_A [r, in]
// and lora_B [out, r] are the transposes of the x·W factors, so the SVD is
// the same. The config keeps every field but r, lora_alpha, rank_pattern
// and alpha_pattern, which are rebuilt from the new ranks and alphas (the
// most common as r and lora_alpha, the others as patterns keyed by the
// shortest unique module suffix). Modules outside opts.Only are copied.
func ResizePEFT(src, dst string, opts ResizeOptions) (*ResizeReport, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	if sameDir(src, dst) {
		return nil, fmt.Errorf("the output directory %s is the input adapter", dst)
	}
	cfg, mods, err := export.ReadPEFTAdapter(src)
	if err != nil {
		return nil, err
	}
	want := map[string]bool{}
	for _, o := range opts.Only {
		want[o] = true
	}
	var missing []string
	for o := range want {
		found := false
		for _, mod := range mods {
			found = found || mod.Name == o
		}
		if !found {
			missing = append(missing, o)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("peft adapter %s has no module(s) %v", src, missing)
	}
	report := &ResizeReport{Source: "peft"}
	names := make([]string, len(mods))
	for i := range mods {
		names[i] = mods[i].Name
	}
	for i := range mods {
		mod := &mods[i]
		if len(want) > 0 && !want[mod.Name] {
			continue
		}
		r, in, out := mod.Rank, mod.InFeatures, mod.OutFeatures
		a := make([]float64, in*r)
		for k := 0; k < r; k++ {
			for j := 0; j < in; j++ {
				a[j*r+k] = float64(mod.A[k*in+j])
			}
		}
		b := make([]float64, r*out)
		for j := 0; j < out; j++ {
			for k := 0; k < r; k++ {
				b[k*out+j] = float64(mod.B[j*r+k])
			}
		}
		na, nb, rep, err := resizeOne(a, b, in, out, r, mod.Scaling, mod.Alpha, cfg.UseRSLoRA, opts)
		if err != nil {
			return nil, fmt.Errorf("peft module %s: %w", mod.Name, err)
		}
		rep.Module = mod.Name
		R := rep.NewRank
		mod.A = make([]float32, R*in)
		for j := 0; j < in; j++ {
			for k := 0; k < R; k++ {
				mod.A[k*in+j] = float32(na[j*R+k])
			}
		}
		mod.B = make([]float32, out*R)
		for k := 0; k < R; k++ {
			for j := 0; j < out; j++ {
				mod.B[j*R+k] = float32(nb[k*out+j])
			}
		}
		mod.Rank, mod.Alpha, mod.Scaling = R, rep.NewAlpha, rep.Scaling
		report.Layers = append(report.Layers, rep)
	}
	out := rankConfig(cfg, mods, names)
	if err := export.WritePEFTAdapter(dst, out, mods); err != nil {
		return nil, err
	}
	return report, nil
}

// rankConfig returns a copy of cfg whose r, lora_alpha, rank_pattern and
// alpha_pattern describe the modules' ranks and alphas.
func rankConfig(cfg *export.PEFTConfig, mods []export.PEFTModule, names []string) *export.PEFTConfig {
	out := *cfg
	count := map[int]int{}
	acount := map[float64]int{}
	rank, alpha := mods[0].Rank, mods[0].Alpha
	for _, m := range mods {
		count[m.Rank]++
		if count[m.Rank] > count[rank] {
			rank = m.Rank
		}
		acount[m.Alpha]++
		if acount[m.Alpha] > acount[alpha] {
			alpha = m.Alpha
		}
	}
	out.R, out.LoraAlpha = rank, alpha
	out.RankPattern, out.AlphaPattern = nil, nil
	for _, m := range mods {
		if m.Rank != rank {
			out.RankPattern = append(out.RankPattern, export.Pattern[int]{Key: patternKey(m.Name, names), Value: m.Rank})
		}
		if m.Alpha != alpha {
			out.AlphaPattern = append(out.AlphaPattern, export.Pattern[float64]{Key: patternKey(m.Name, names), Value: m.Alpha})
		}
	}
	return &out
}

// sameDir reports whether two paths name the same directory.
func sameDir(a, b string) bool {
	pa, err1 := filepath.Abs(a)
	pb, err2 := filepath.Abs(b)
	return err1 == nil && err2 == nil && filepath.Clean(pa) == filepath.Clean(pb)
}

// AdapterSpectrum is the singular value spectrum of one adapter's update.
type AdapterSpectrum struct {
	Module  string  `json:"module"`
	Rank    int     `json:"rank"`
	In      int     `json:"in_features"`
	Out     int     `json:"out_features"`
	Scaling float64 `json:"scaling"`
	// Singular are the singular values of ΔW = scaling·A·B, descending,
	// min(r, in, out) of them; their root sum of squares is ‖ΔW‖_F.
	Singular []float64 `json:"singular_values"`
}

// Spectra returns the singular values of every adapter's update in the
// model, in graph order (the SVD Resize truncates).
func Spectra(m *graph.Model) ([]AdapterSpectrum, error) {
	found, _, _, err := findAdapters(m, m.Graph())
	if err != nil {
		return nil, err
	}
	out := make([]AdapterSpectrum, 0, len(found))
	for _, f := range found {
		if !resizable(f) && !f.isInputs() {
			return nil, fmt.Errorf("adapter %s is a %s branch; spectra are computed for LoRA branches", f.Module, f.Kind.Name)
		}
		if f.TA == nil || f.TB == nil || f.Rank == 0 {
			// Adapter inputs without trained defaults: nothing to decompose.
			out = append(out, AdapterSpectrum{Module: f.Module, Scaling: f.Scaling, Singular: []float64{}})
			continue
		}
		a, b, in, o, err := loraFactors(m, f)
		if err != nil {
			return nil, err
		}
		d, err := newDeltaSVD(a, b, in, o, f.Rank, f.Scaling)
		if err != nil {
			return nil, fmt.Errorf("adapter %s: %w", f.Module, err)
		}
		out = append(out, AdapterSpectrum{Module: f.Module, Rank: f.Rank, In: in, Out: o, Scaling: f.Scaling, Singular: d.S})
	}
	return out, nil
}

// loraFactors reads an adapter's A [in, r] and B [r, out] as float64s.
func loraFactors(m *graph.Model, f *foundAdapter) (a, b []float64, in, out int, err error) {
	if a, b, err = f.factors(m); err != nil {
		return nil, nil, 0, 0, fmt.Errorf("adapter %s: %w", f.Module, err)
	}
	return a, b, int(f.TA.Dims[0]), int(f.TB.Dims[1]), nil
}
