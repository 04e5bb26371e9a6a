package rewrite

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// sourceOnnxAdapter is MergeReport.Source for ApplyOnnxAdapter.
const sourceOnnxAdapter = "onnx_adapter"

// ApplyOnnxAdapter merges an ONNX Runtime adapter (an .onnx_adapter file's
// parameters, "<module>.lora_A.weight" [in, r] and "<module>.lora_B.weight"
// [r, out] with the scaling in B) into the model's weights, W += A·B, with
// Merge's arithmetic and rounding. The result is what ONNX Runtime computes
// with the adapter active.
//
// On an adapter-input model (inject --adapter-inputs, Olive, GenAI) each
// parameter must be one of the model's adapter inputs, of its element type
// and shape; every adapter-input branch is then removed, merging the
// adapter's factors, or the input's own default where the adapter has
// none (rank 0: nothing), so the result is a plain model. On a model
// without adapter inputs, modules are matched to layers by dotted suffix
// as ApplyPEFT does, and any float type is accepted. opts.Only is not
// supported; AllowPartial applies to the second case.
func ApplyOnnxAdapter(m *graph.Model, a *export.OnnxAdapter, opts MergeOptions) (*MergeReport, error) {
	p, err := planOnnxAdapter(m, a, opts)
	if err != nil {
		return nil, err
	}
	return p.applyInMemory()
}

// ApplyOnnxAdapterFile reads the .onnx_adapter file at adapterPath,
// applies it to the model at src (as ApplyOnnxAdapter does) and saves the
// result to dst, streaming weights like MergeFile.
func ApplyOnnxAdapterFile(src, adapterPath, dst string, opts MergeOptions, save graph.SaveOptions) (*MergeReport, error) {
	a, err := export.ReadOnnxAdapter(adapterPath)
	if err != nil {
		return nil, err
	}
	m, err := graph.LoadLazy(src)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	p, err := planOnnxAdapter(m, a, opts)
	if err != nil {
		return nil, fmt.Errorf("adapter %s: %w", adapterPath, err)
	}
	return p.save(dst, save)
}

func planOnnxAdapter(m *graph.Model, a *export.OnnxAdapter, opts MergeOptions) (*plan, error) {
	if len(opts.Only) > 0 {
		return nil, errors.New("merging only some modules of an .onnx_adapter file is not supported")
	}
	if len(a.Params) == 0 {
		return nil, errors.New("the adapter has no parameters")
	}
	top := m.Graph()
	found, man, _, err := findAdapters(m, top)
	if err != nil {
		return nil, err
	}
	p, err := newPlan(m, top, opts, sourceOnnxAdapter)
	if err != nil {
		return nil, err
	}
	for _, f := range found {
		if f.isInputs() {
			return p, p.onAdapterInputs(a, found, man)
		}
	}
	return p, p.onBase(a)
}

// onAdapterInputs plans the merge of adapter a into an adapter-input model.
func (p *plan) onAdapterInputs(a *export.OnnxAdapter, found []*foundAdapter, man *Manifest) error {
	params := map[string]*export.OnnxAdapterParam{}
	for i := range a.Params {
		params[a.Params[i].Name] = &a.Params[i]
	}
	used := map[string]bool{}
	var inputNames []string
	keep := map[int]bool{}
	for _, f := range found {
		if !f.isInputs() {
			// A branch with constant factors is on in every run: it stays.
			p.report.Kept = append(p.report.Kept, f.Module)
			if f.Manifest >= 0 {
				keep[f.Manifest] = true
			}
			continue
		}
		inputNames = append(inputNames, f.A, f.B)
		pa, pb := params[f.A], params[f.B]
		if pa == nil && pb == nil {
			// Not in the adapter: ORT uses the input's default.
			if err := p.addAdapter(f); err != nil {
				return fmt.Errorf("adapter input %s: %w", f.Module, err)
			}
			continue
		}
		if pa == nil || pb == nil {
			have, miss := f.A, f.B
			if pa == nil {
				have, miss = f.B, f.A
			}
			return fmt.Errorf("the adapter has parameter %q but not %q", have, miss)
		}
		used[f.A], used[f.B] = true, true
		l := f.Layer
		for _, q := range []*export.OnnxAdapterParam{pa, pb} {
			if q.DataType != l.DType {
				return fmt.Errorf("parameter %q is %v, but the model's input is %v", q.Name, q.DataType, l.DType)
			}
		}
		if len(pa.Dims) != 2 || len(pb.Dims) != 2 || pa.Dims[0] != l.In || pb.Dims[1] != l.Out || pa.Dims[1] != pb.Dims[0] {
			return fmt.Errorf("parameters %q %v and %q %v do not fit the model's inputs [%d, r] and [r, %d]", pa.Name, pa.Dims, pb.Name, pb.Dims, l.In, l.Out)
		}
		r := int(pa.Dims[1])
		p.branches = append(p.branches, f.branch)
		if r == 0 {
			continue
		}
		av, err := pa.Float64s()
		if err != nil {
			return err
		}
		bv, err := pb.Float64s()
		if err != nil {
			return err
		}
		rep := &MergedLayer{Module: f.Module, Rank: r, Alpha: float64(r), Scaling: 1}
		if err := p.addUpdate(l, av, bv, r, 1, rep); err != nil {
			return fmt.Errorf("module %s: %w", f.Module, err)
		}
	}
	var unknown []string
	for _, q := range a.Params {
		if !used[q.Name] {
			unknown = append(unknown, fmt.Sprintf("%q", q.Name))
		}
	}
	if len(unknown) > 0 {
		sort.Strings(inputNames)
		return fmt.Errorf("%d parameter(s) are not adapter inputs of the model: %s (its adapter inputs: %s)", len(unknown), listSome(unknown, 3), listSome(inputNames, 4))
	}
	if man != nil {
		rest := *man
		rest.Adapters = nil
		for i, ad := range man.Adapters {
			if keep[i] {
				rest.Adapters = append(rest.Adapters, ad)
			}
		}
		p.manifest, p.setManifest = &rest, true
	}
	return nil
}

// onBase plans the merge of adapter a into a model without adapter inputs:
// modules matched to layers by dotted suffix.
func (p *plan) onBase(a *export.OnnxAdapter) error {
	mods, err := adapterModules(a)
	if err != nil {
		return err
	}
	layers, _ := FindLayers(p.m)
	if len(layers) == 0 {
		return errors.New("the model has no MatMul or Gemm layer with a constant weight to apply an adapter to")
	}
	var unmatched []string
	for _, mod := range mods {
		best, idx := 0, []int(nil)
		for i, l := range layers {
			switch s := sharedSuffix(mod.name, l.Module); {
			case s > best:
				best, idx = s, []int{i}
			case s == best && s > 0:
				idx = append(idx, i)
			}
		}
		switch {
		case len(idx) == 0:
			unmatched = append(unmatched, mod.name)
			continue
		case len(idx) > 1:
			var names []string
			for _, i := range idx {
				names = append(names, layers[i].Module)
			}
			return fmt.Errorf("module %s matches %d layers equally: %s", mod.name, len(idx), listSome(names, 4))
		}
		l := layers[idx[0]]
		if mod.in != l.In || mod.out != l.Out {
			return fmt.Errorf("module %s: A %v and B %v make a delta for %d inputs and %d outputs, but layer %s has %d inputs and %d outputs",
				mod.name, mod.a.Dims, mod.b.Dims, mod.in, mod.out, l.Module, l.In, l.Out)
		}
		av, err := mod.a.Float64s()
		if err != nil {
			return err
		}
		bv, err := mod.b.Float64s()
		if err != nil {
			return err
		}
		rep := &MergedLayer{Module: l.Module, PEFTModule: mod.name, Rank: mod.r, Alpha: float64(mod.r), Scaling: 1}
		if err := p.addUpdate(l, av, bv, mod.r, 1, rep); err != nil {
			return fmt.Errorf("module %s -> layer %s: %w", mod.name, l.Module, err)
		}
	}
	if len(unmatched) > 0 && !p.opts.AllowPartial {
		return fmt.Errorf("%d of %d modules match no layer of the model: %s (set AllowPartial to apply the rest)", len(unmatched), len(mods), listSome(unmatched, 3))
	}
	if len(unmatched) == len(mods) {
		return fmt.Errorf("none of the adapter's %d modules matches a layer of the model", len(mods))
	}
	p.report.Unmatched = unmatched
	return nil
}

// adapterModule is one module's pair of parameters in an adapter.
type adapterModule struct {
	name    string
	a, b    *export.OnnxAdapterParam
	in, out int64
	r       int
}

// adapterModules pairs an adapter's parameters by module, checking names
// and shapes: A [in, r], B [r, out], r > 0.
func adapterModules(a *export.OnnxAdapter) ([]*adapterModule, error) {
	byName := map[string]*adapterModule{}
	var order []string
	for i := range a.Params {
		q := &a.Params[i]
		name, isA := strings.CutSuffix(q.Name, export.OnnxAdapterSuffixA)
		if !isA {
			var isB bool
			if name, isB = strings.CutSuffix(q.Name, export.OnnxAdapterSuffixB); !isB || name == "" {
				return nil, fmt.Errorf("parameter %q is not named <module>%s or <module>%s", q.Name, export.OnnxAdapterSuffixA, export.OnnxAdapterSuffixB)
			}
		}
		if name == "" {
			return nil, fmt.Errorf("parameter %q has no module name", q.Name)
		}
		mod := byName[name]
		if mod == nil {
			mod = &adapterModule{name: name}
			byName[name] = mod
			order = append(order, name)
		}
		if isA {
			mod.a = q
		} else {
			mod.b = q
		}
	}
	mods := make([]*adapterModule, 0, len(order))
	for _, name := range order {
		mod := byName[name]
		if mod.a == nil || mod.b == nil {
			return nil, fmt.Errorf("module %s has only one of %s and %s", name, export.OnnxAdapterSuffixA, export.OnnxAdapterSuffixB)
		}
		da, db := mod.a.Dims, mod.b.Dims
		if len(da) != 2 || len(db) != 2 || da[1] != db[0] || da[1] <= 0 || da[0] <= 0 || db[1] <= 0 {
			return nil, fmt.Errorf("module %s: A %v and B %v are not [in, r] and [r, out] with r > 0", name, da, db)
		}
		mod.in, mod.out, mod.r = da[0], db[1], int(da[1])
		mods = append(mods, mod)
	}
	return mods, nil
}

// listSome joins up to n items, saying how many more there are.
func listSome(items []string, n int) string {
	if len(items) <= n {
		return strings.Join(items, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(items[:n], ", "), len(items)-n)
}

// sharedSuffix returns how many dotted segments a and b share when one is
// a dotted suffix of the other ("model.layers.0.q" and "layers.0.q": 3),
// else 0.
func sharedSuffix(a, b string) int {
	short, long := a, b
	if len(short) > len(long) {
		short, long = long, short
	}
	if long == short || strings.HasSuffix(long, "."+short) {
		return strings.Count(short, ".") + 1
	}
	return 0
}
