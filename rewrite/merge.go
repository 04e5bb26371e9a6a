package rewrite

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// MergeOptions tunes Merge, MergeFile, ApplyPEFT and ApplyPEFTFile.
type MergeOptions struct {
	// Only restricts the merge to these modules (module paths as in the
	// manifest, or PEFT module names for ApplyPEFT). Adapters of other
	// modules stay live, and stay in the manifest. Empty means all.
	Only []string
	// Scale multiplies every adapter's delta, to merge at another strength
	// (negative values subtract an adapter that was merged before). Zero
	// means 1.
	Scale float64
	// Safe checks every merged weight for NaN and Inf before anything is
	// changed, like PEFT's safe_merge, and fails with the layers at fault,
	// leaving the model untouched (MergeFile: writing nothing).
	Safe bool
	// AllowPartial lets ApplyPEFT skip adapter modules that match no layer
	// of the model (they are listed in MergeReport.Unmatched) instead of
	// failing. Merge ignores it.
	AllowPartial bool
	// Map renames PEFT module paths before ApplyPEFT matches them to
	// layers; Preset picks built-in rules ("" or "auto": by the model's
	// producer_name, "none": no preset, else a MapPresets name), applied
	// after Map. Merge ignores both.
	Map    []MapRule
	Preset string
	// Quantized says how adapters beside quantized weights (MatMulNBits,
	// DequantizeLinear) merge: QuantRefuse (the default) refuses,
	// QuantDequantize writes float weights, QuantRequantize quantizes
	// W + ΔW with the layer's own scheme and reports the added error.
	Quantized string
}

// MergeReport describes what a merge did.
type MergeReport struct {
	// Source is where the adapters came from: "manifest", "recognized"
	// (branches found by their structure, the manifest being absent) or
	// "peft" (ApplyPEFT).
	Source string `json:"source"`
	// Merged lists the folded adapters in graph order.
	Merged []MergedLayer `json:"merged"`
	// Kept lists the modules whose adapters were left live (Only).
	Kept []string `json:"kept,omitempty"`
	// Unmatched lists PEFT modules that matched no layer (AllowPartial).
	Unmatched []string `json:"unmatched,omitempty"`
}

// MergedLayer is one adapter folded into its base weight.
type MergedLayer struct {
	// Module is the layer's module path (the manifest's for Merge).
	Module string `json:"module"`
	// PEFTModule is the adapter module applied (ApplyPEFT only).
	PEFTModule string `json:"peft_module,omitempty"`
	// Node is the adapted MatMul or Gemm node.
	Node string `json:"node"`
	// Weight is the initializer that now holds the merged values. It is the
	// original weight unless that was shared with other layers; then it is
	// a new initializer (Original names the shared one, left unchanged).
	Weight   string `json:"weight"`
	Original string `json:"original,omitempty"`
	// Shape and DType describe Weight as stored; Transposed is true when it
	// is stored [out, in] (Gemm transB=1 or a Transpose on the way).
	Shape      []int64 `json:"shape"`
	DType      string  `json:"dtype"`
	Transposed bool    `json:"transposed,omitempty"`
	// Rank and Alpha are the adapter's r and lora_alpha.
	Rank  int     `json:"rank"`
	Alpha float64 `json:"alpha"`
	// Scaling is the adapter's alpha/r (or alpha/sqrt(r)); Factor is what
	// A·B was multiplied by: Scaling * Scale / Gemm alpha.
	Scaling float64 `json:"scaling"`
	Factor  float64 `json:"factor"`
	// MaxDelta is the largest |ΔW| before rounding to DType; Changed
	// counts the elements whose stored value changed, of Elements.
	MaxDelta float64 `json:"max_abs_delta"`
	Changed  int64   `json:"changed"`
	Elements int64   `json:"elements"`
	// NonFinite counts merged values that are NaN or infinite (Safe
	// refuses them; otherwise they are written and counted here).
	NonFinite int64 `json:"non_finite,omitempty"`
	// Quantized is QuantDequantize or QuantRequantize for a quantized
	// layer; a requantized one reports the largest error quantizing
	// W + ΔW again added, and its Frobenius norm relative to W + ΔW.
	Quantized       string  `json:"quantized,omitempty"`
	RequantMaxError float64 `json:"requant_max_error,omitempty"`
	RequantRelError float64 `json:"requant_rel_error,omitempty"`
}

// Merge folds the model's LoRA adapters into their base weights:
// W += scaling·A·B for a weight stored [in, out], W += scaling·(A·B)ᵀ for
// one stored [out, in], with the delta divided by a Gemm's alpha (the
// layer computes alpha·x·W). The sum is computed in float64 and rounded
// once, to nearest even, to the weight's type. The branch nodes and the
// adapter's initializers are removed and the base node gets its original
// output name back, so the result has exactly the base model's nodes and
// names. A weight that other layers also read is copied first, so only the
// adapted layer changes: the copy (named <module>.weight) replaces the
// constant on this layer's path, or, when the sharing happens after a
// Transpose/Identity/Cast that others read too, the layer reads its own
// copy in the orientation and type it multiplies by, so no chain node is
// duplicated.
//
// Adapters are taken from the manifest; a model whose metadata was
// stripped is searched for branches of the shape Inject writes. Merged
// weights that lived in external data are held in memory afterwards (Save
// writes them back out); MergeFile streams instead.
func Merge(m *graph.Model, opts MergeOptions) (*MergeReport, error) {
	p, err := planMerge(m, opts)
	if err != nil {
		return nil, err
	}
	return p.applyInMemory()
}

// MergeFile merges the adapters of the model at src (as Merge does) and
// saves the result to dst, streaming: weights are read, merged and written
// to dst's data file piece by piece by a worker per CPU, so memory stays a
// small fraction of the model's size. Models without external data (and
// save.External == graph.ExternalNever) are merged in memory and saved with
// graph.Model.Save. dst must not be src or its data file.
func MergeFile(src, dst string, opts MergeOptions, save graph.SaveOptions) (*MergeReport, error) {
	m, err := graph.LoadLazy(src)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	p, err := planMerge(m, opts)
	if err != nil {
		return nil, err
	}
	return p.save(dst, save)
}

// update is one weight to rewrite: dst = src + coef·U·V, where dst is
// stored [rows, cols], U is [rows, r] and V is [r, cols], both row-major.
type update struct {
	rep        *MergedLayer
	src        *onnxpb.TensorProto // the stored base values
	srcT       bool                // src is dst's transpose (a copy in the node's orientation)
	dst        *onnxpb.TensorProto // src itself, or a new initializer
	rows, cols int
	r          int
	u, v       []float64
	load       func() (u, v []float64, err error) // decodes u and v when they are nil (factors)
	coef       float64
	out        []byte // the merged bytes, in memory mode
	stats      mergeStats
	// scale, when set, multiplies the result per output feature (DoRA's
	// m/‖W+ΔW‖): per row when scaleRows (a weight stored [out, in]), else
	// per column.
	scale     []float64
	scaleRows bool
}

// mergeStats accumulates what the report says about one weight.
type mergeStats struct {
	maxAbs             float64
	changed, nonFinite int64
}

func (s *mergeStats) add(o mergeStats) {
	s.maxAbs = math.Max(s.maxAbs, o.maxAbs)
	s.changed += o.changed
	s.nonFinite += o.nonFinite
}

// rewire is a node input to point at a new initializer.
type rewire struct {
	g     *graph.Graph
	node  *onnxpb.NodeProto
	input int
	value string
}

// newInit is an initializer to add to a graph.
type newInit struct {
	g *graph.Graph
	t *onnxpb.TensorProto
}

// plan is everything a merge will do, worked out without changing the
// model, so that a failure (or Safe) leaves it untouched.
type plan struct {
	m        *graph.Model
	top      *graph.Graph
	opts     MergeOptions
	report   *MergeReport
	updates  []*update
	branches []*branch
	inits    []newInit
	rewires  []rewire
	// manifest is written back after the merge when setManifest is true.
	manifest    *Manifest
	setManifest bool
	// detached are nodes that will stop reading the value they read now
	// (they get their own copy), so they no longer count as sharing it.
	detached map[*onnxpb.NodeProto]bool
	// quant are the merges into quantized layers (quant.go).
	quant []*quantEdit
}

func newPlan(m *graph.Model, top *graph.Graph, opts MergeOptions, source string) (*plan, error) {
	if math.IsNaN(opts.Scale) || math.IsInf(opts.Scale, 0) {
		return nil, fmt.Errorf("merge scale must be a finite number, got %v", opts.Scale)
	}
	if opts.Scale == 0 {
		opts.Scale = 1
	}
	return &plan{m: m, top: top, opts: opts, report: &MergeReport{Source: source}, detached: map[*onnxpb.NodeProto]bool{}}, nil
}

// planMerge works out the merge of the model's own adapters.
func planMerge(m *graph.Model, opts MergeOptions) (*plan, error) {
	top := m.Graph()
	found, man, source, err := findAdapters(m, top)
	if err != nil {
		return nil, err
	}
	p, err := newPlan(m, top, opts, source)
	if err != nil {
		return nil, err
	}
	if len(found) == 0 {
		return nil, errors.New("the model has no LoRA adapters to merge (no manifest and no branch of the shape inject writes)")
	}
	selected, err := selectModules(found, opts.Only)
	if err != nil {
		return nil, err
	}
	keep := map[int]bool{}
	for _, f := range found {
		if !selected[f.Module] {
			p.report.Kept = append(p.report.Kept, f.Module)
			if f.Manifest >= 0 {
				keep[f.Manifest] = true
			}
			continue
		}
		if err := p.addAdapter(f); err != nil {
			return nil, fmt.Errorf("adapter %s: %w", f.Module, err)
		}
	}
	if man != nil {
		rest := *man
		rest.Adapters = nil
		for i, a := range man.Adapters {
			if keep[i] {
				rest.Adapters = append(rest.Adapters, a)
			}
		}
		p.manifest, p.setManifest = &rest, true
	}
	return p, nil
}

// selectModules resolves Only against the adapters found: each entry
// selects the adapters whose module path equals it or ends with "." + it
// (the rule of Targets, so "q_proj" selects every q_proj); an entry that
// selects nothing, or is blank, is an error.
func selectModules(found []*foundAdapter, only []string) (map[string]bool, error) {
	sel := map[string]bool{}
	if len(only) == 0 {
		for _, f := range found {
			sel[f.Module] = true
		}
		return sel, nil
	}
	var missing []string
	for _, o := range only {
		o = strings.TrimSpace(o)
		if o == "" {
			return nil, errors.New("an empty module name was given to select")
		}
		hit := false
		for _, f := range found {
			if f.Module == o || strings.HasSuffix(f.Module, "."+o) {
				sel[f.Module], hit = true, true
			}
		}
		if !hit {
			missing = append(missing, o)
		}
	}
	if len(missing) > 0 {
		var mods []string
		for _, f := range found {
			mods = append(mods, f.Module)
		}
		return nil, fmt.Errorf("no adapter for module(s) %s; the model's adapters are: %s", strings.Join(missing, ", "), strings.Join(mods, ", "))
	}
	return sel, nil
}

// addAdapter plans the merge of one branch: its weight update and the
// removal of its nodes.
func (p *plan) addAdapter(f *foundAdapter) error {
	if f.Kind == convBranch {
		return p.addConvAdapter(f)
	}
	if isDoRAKind(f.Kind) {
		return p.addDoRAAdapter(f)
	}
	if f.Layer.Quant != nil {
		return p.addQuantAdapter(f)
	}
	if f.isInputs() && f.Rank == 0 {
		// Rank-0 defaults add nothing: the branch just goes, W untouched.
		p.branches = append(p.branches, f.branch)
		return nil
	}
	return p.addFactors(f, func(l *Layer, a, b []float64, r int, scaling float64, rep *MergedLayer) error {
		if err := p.addUpdate(l, a, b, r, scaling, rep); err != nil {
			return err
		}
		// A and B are decoded again by the job that merges them, so memory
		// does not grow with the number of adapters (update.factors).
		p.updates[len(p.updates)-1].lazyFactors(p.m, f.TA, f.TB)
		return nil
	})
}

// addFactors reads f's A and B, plans their update of f's layer with add
// (addUpdate or its Conv or quantized variant) and drops the branch.
func (p *plan) addFactors(f *foundAdapter, add func(l *Layer, a, b []float64, r int, scaling float64, rep *MergedLayer) error) error {
	a, b, err := f.factors(p.m)
	if err != nil {
		return err
	}
	rep := &MergedLayer{Module: f.Module, Rank: f.Rank, Alpha: f.Alpha, Scaling: f.Scaling}
	if err := add(f.Layer, a, b, f.Rank, f.Scaling, rep); err != nil {
		return err
	}
	p.branches = append(p.branches, f.branch)
	return nil
}

// addUpdate plans W += scaling·Scale/alpha · A·B for a layer, with A
// [In, r] and B [r, Out] in the layer's orientation (x·W). It decides where
// the result goes: in place, or in a private copy when the weight is shared.
func (p *plan) addUpdate(l *Layer, a, b []float64, r int, scaling float64, rep *MergedLayer) error {
	if l.Quant != nil {
		return p.addQuantUpdate(l, a, b, r, scaling, rep)
	}
	w := l.Weight
	if l.Alpha == 0 || math.IsNaN(l.Alpha) || math.IsInf(l.Alpha, 0) {
		return fmt.Errorf("the Gemm's alpha is %v: no weight change can reproduce the adapter", l.Alpha)
	}
	if w.Constant != nil && graph.Attr(w.Constant, "value") == nil {
		return fmt.Errorf("weight %q is a Constant node without a tensor value", w.Name)
	}
	if int64(len(a)) != l.In*int64(r) || int64(len(b)) != int64(r)*l.Out {
		return fmt.Errorf("factors of %d and %d values do not fit a [%d, %d] layer at rank %d", len(a), len(b), l.In, l.Out, r)
	}
	u := &update{rep: rep, src: w.Tensor, dst: w.Tensor, r: r, coef: scaling * p.opts.Scale / l.Alpha}
	storedT := l.StoredTransposed()
	rep.Node = l.Node.GetName()
	rep.Weight = w.Name

	// Who else reads the weight? First the constant itself, then each
	// value along the Identity/Transpose/Cast chain.
	next := l.Node
	if len(w.Chain) > 0 {
		next = w.Chain[0]
	}
	constShared := p.hasOtherReaders(w.Scope, w.Name, next)
	chainShared := false
	for k, c := range w.Chain {
		nx := l.Node
		if k+1 < len(w.Chain) {
			nx = w.Chain[k+1]
		}
		if g := graphOf(p.top, c); g != nil && p.hasOtherReaders(g, c.Output[0], nx) {
			chainShared = true
		}
	}
	switch {
	case chainShared:
		// The node reaches the weight through a Transpose/Identity/Cast
		// node that others read too. Rather than duplicating that chain,
		// the node gets its own copy of the weight in the orientation and
		// type it multiplies by, and reads it directly.
		dims := w.Dims()
		t := &onnxpb.TensorProto{
			Name:     proto.String(l.Graph.UniqueName(l.Module + ".weight")),
			DataType: proto.Int32(int32(l.DType)),
			Dims:     dims,
		}
		u.dst, u.srcT = t, w.Transposed
		storedT = l.TransB
		p.inits = append(p.inits, newInit{l.Graph, t})
		p.rewires = append(p.rewires, rewire{l.Graph, l.Node, l.weightInput(), t.GetName()})
		p.detached[l.Node] = true
		rep.Original, rep.Weight = w.Name, t.GetName()
	case constShared:
		// The constant feeds other nodes: copy it (same layout and type)
		// and point this path at the copy.
		t := &onnxpb.TensorProto{
			Name:     proto.String(w.Scope.UniqueName(l.Module + ".weight")),
			DataType: w.Tensor.DataType,
			Dims:     append([]int64(nil), w.Tensor.Dims...),
		}
		u.dst = t
		p.inits = append(p.inits, newInit{w.Scope, t})
		if len(w.Chain) > 0 {
			p.rewires = append(p.rewires, rewire{graphOf(p.top, w.Chain[0]), w.Chain[0], 0, t.GetName()})
		} else {
			p.rewires = append(p.rewires, rewire{l.Graph, l.Node, l.weightInput(), t.GetName()})
		}
		p.detached[next] = true
		rep.Original, rep.Weight = w.Name, t.GetName()
	}
	for _, q := range p.updates {
		if q.dst == u.dst {
			return fmt.Errorf("weight %q would be merged twice (two adapters on one layer?)", w.Name)
		}
	}
	// Normalize to dst[p][q] += coef·Σk U[p][k]·V[k][q]. For a weight stored
	// [out, in], U = Bᵀ and V = Aᵀ: the same products, summed in the same
	// order, so the result is bitwise the same as for the [in, out] layout.
	if storedT {
		u.rows, u.cols = int(l.Out), int(l.In)
		u.u, u.v = transposeF64(b, r, int(l.Out)), transposeF64(a, int(l.In), r)
	} else {
		u.rows, u.cols = int(l.In), int(l.Out)
		u.u, u.v = a, b
	}
	dd := u.dst.Dims
	if !matrixOf(dd, u.rows, u.cols) {
		return fmt.Errorf("weight %q is %v, expected [%d, %d]", u.dst.GetName(), dd, u.rows, u.cols)
	}
	rep.Shape = append([]int64(nil), dd...)
	rep.DType = graph.DataType(u.dst.GetDataType()).String()
	rep.Transposed = storedT
	rep.Factor = u.coef
	rep.Elements = int64(u.rows) * int64(u.cols)
	p.updates = append(p.updates, u)
	return nil
}

// hasOtherReaders reports whether value (defined in scope) is read by any
// node but next and the detached ones, or is a graph output.
func (p *plan) hasOtherReaders(scope *graph.Graph, value string, next *onnxpb.NodeProto) bool {
	return countReaders(scope, value, func(c *onnxpb.NodeProto) bool { return c == next || p.detached[c] }) > 0
}

// countReaders counts the readers of value in g and the subgraphs that
// capture it, skipping some nodes. A node that holds a subgraph counts
// only through the readers inside it.
func countReaders(g *graph.Graph, value string, skip func(*onnxpb.NodeProto) bool) int {
	n := 0
	if g.IsGraphOutput(value) {
		n++
	}
	for _, c := range g.Consumers(value) {
		if skip(c) {
			continue
		}
		if slices.Contains(c.Input, value) {
			n++
			continue
		}
		for _, sg := range g.Subgraphs {
			if sg.Owner == c && !sg.DefinesLocally(value) {
				n += countReaders(sg, value, skip)
			}
		}
	}
	return n
}

// graphOf returns the graph (top or nested) holding node n.
func graphOf(top *graph.Graph, n *onnxpb.NodeProto) *graph.Graph {
	var found *graph.Graph
	top.Walk(func(g *graph.Graph) {
		if found != nil {
			return
		}
		for _, o := range n.Output {
			if o != "" && g.Producer(o) == n {
				found = g
				return
			}
		}
	})
	return found
}

// transposeF64 returns the [cols, rows] transpose of a row-major matrix.
func transposeF64(x []float64, rows, cols int) []float64 {
	t := make([]float64, len(x))
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			t[j*rows+i] = x[i*cols+j]
		}
	}
	return t
}

// applyInMemory computes every merged weight, checks them, then changes
// the model: nothing is touched before all results are ready.
func (p *plan) applyInMemory() (*MergeReport, error) {
	err := parallel(len(p.updates), func(i int) error {
		u := p.updates[i]
		if err := u.factors(); err != nil {
			return err
		}
		defer u.release()
		src, err := p.m.RawData(u.src)
		if err != nil {
			return err
		}
		if u.srcT {
			src = transposeRaw(src, graph.DataType(u.src.GetDataType()).BitSize()/8, u.cols, u.rows)
		}
		u.out = make([]byte, u.rows*u.cols*elemSize(u.dst))
		u.stats = mergeRows(u.out, src, u, 0, u.rows, make([]float64, 2*u.cols))
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := p.checkSafe(); err != nil {
		return nil, err
	}
	for _, u := range p.updates {
		if err := graph.SetRawData(u.dst, u.out); err != nil {
			return nil, err
		}
		u.out = nil
	}
	if err := p.commitGraph(); err != nil {
		return nil, err
	}
	return p.finish(), nil
}

// checkSafe fills the report's statistics and, with Safe, refuses NaN/Inf.
func (p *plan) checkSafe() error {
	var bad []string
	for _, u := range p.updates {
		u.rep.MaxDelta, u.rep.Changed, u.rep.NonFinite = u.stats.maxAbs, u.stats.changed, u.stats.nonFinite
		if u.stats.nonFinite > 0 {
			bad = append(bad, fmt.Sprintf("%s (%d of %d values of %s)", u.rep.Module, u.stats.nonFinite, u.rep.Elements, u.rep.Weight))
		}
	}
	if p.opts.Safe && len(bad) > 0 {
		return fmt.Errorf("safe merge: merging would write NaN or infinite weights in %s; the model was not changed", strings.Join(bad, ", "))
	}
	return nil
}

func (p *plan) finish() *MergeReport {
	for _, u := range p.updates {
		p.report.Merged = append(p.report.Merged, *u.rep)
	}
	return p.report
}

// commitGraph makes the planned graph edits: branch nodes out, base outputs
// renamed back, copies of shared weights in, unused adapter constants and
// the manifest entries of merged adapters out.
func (p *plan) commitGraph() error {
	for _, b := range p.branches {
		gone := map[string]bool{b.BaseOutput: true}
		for _, n := range b.nodes() {
			if err := b.Graph.RemoveNode(n); err != nil {
				return err
			}
			for _, o := range n.Output {
				if o != b.Output {
					gone[o] = true
				}
			}
		}
		b.Graph.SetOutput(b.Base, 0, b.Output)
		vis := b.Graph.Proto.ValueInfo[:0]
		for _, vi := range b.Graph.Proto.ValueInfo {
			if !gone[vi.GetName()] {
				vis = append(vis, vi)
			}
		}
		b.Graph.Proto.ValueInfo = vis
	}
	if err := p.commitQuant(); err != nil {
		return err
	}
	for _, ni := range p.inits {
		ni.g.AddInitializer(ni.t)
	}
	for _, rw := range p.rewires {
		rw.g.SetInput(rw.node, rw.input, rw.value)
	}
	p.top.Reindex()
	for _, b := range p.branches {
		for _, name := range []string{b.A, b.B, b.S, b.Ratio} {
			if name == "" {
				continue
			}
			if b.isInputs() && (name == b.A || name == b.B) {
				dropInput(b.Graph, name)
				continue
			}
			dropConstant(b.Graph, name)
		}
	}
	if p.setManifest {
		return WriteManifest(p.m, p.manifest)
	}
	return nil
}

// dropInput removes a graph input nobody reads any more (an adapter input
// of a merged branch) with its initializer default.
func dropInput(g *graph.Graph, name string) {
	for s := g; s != nil; s = s.Parent {
		if s.IsGraphInput(name) {
			if countReaders(s, name, func(*onnxpb.NodeProto) bool { return false }) == 0 {
				s.RemoveInitializer(name)
			}
			return
		}
	}
}

// dropConstant removes an initializer or Constant node nobody reads.
func dropConstant(g *graph.Graph, name string) {
	t, c, scope := g.ConstantTensor(name)
	if t == nil || countReaders(scope, name, func(*onnxpb.NodeProto) bool { return false }) > 0 {
		return
	}
	if c != nil {
		scope.RemoveNode(c)
		return
	}
	scope.RemoveInitializer(name)
}

// sortedKeys returns a map's keys in order, for stable messages.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
