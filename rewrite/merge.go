package rewrite

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"

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
	m, err := graph.Load(src)
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
	coef       float64
	out        []byte // the merged bytes, in memory mode
	stats      mergeStats
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

// selectModules resolves Only against the adapters found.
func selectModules(found []*foundAdapter, only []string) (map[string]bool, error) {
	sel := map[string]bool{}
	have := map[string]bool{}
	for _, f := range found {
		have[f.Module] = true
	}
	if len(only) == 0 {
		return have, nil
	}
	var missing []string
	for _, o := range only {
		o = strings.TrimSpace(o)
		if o == "" {
			continue
		}
		if !have[o] {
			missing = append(missing, o)
		}
		sel[o] = true
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
	a, err := tensorFloats(p.m, f.TA)
	if err != nil {
		return err
	}
	b, err := tensorFloats(p.m, f.TB)
	if err != nil {
		return err
	}
	rep := &MergedLayer{Module: f.Module, Rank: f.Rank, Alpha: f.Alpha, Scaling: f.Scaling}
	if err := p.addUpdate(f.Layer, a, b, f.Rank, f.Scaling, rep); err != nil {
		return err
	}
	p.branches = append(p.branches, f.branch)
	return nil
}

// tensorFloats decodes a float tensor like graph.Model.Float64s, with the
// kernel's faster decoder (adapters of a large model add up to megabytes).
func tensorFloats(m *graph.Model, t *onnxpb.TensorProto) ([]float64, error) {
	dt := graph.DataType(t.GetDataType())
	if !dt.IsFloat() {
		return nil, fmt.Errorf("tensor %q: %v is not a floating-point type", t.GetName(), dt)
	}
	raw, err := m.RawData(t)
	if err != nil {
		return nil, err
	}
	out := make([]float64, len(raw)/(dt.BitSize()/8))
	decodeRow(dt, out, raw)
	return out, nil
}

// addUpdate plans W += scaling·Scale/alpha · A·B for a layer, with A
// [In, r] and B [r, Out] in the layer's orientation (x·W). It decides where
// the result goes: in place, or in a private copy when the weight is shared.
func (p *plan) addUpdate(l *Layer, a, b []float64, r int, scaling float64, rep *MergedLayer) error {
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
		p.rewires = append(p.rewires, rewire{l.Graph, l.Node, 1, t.GetName()})
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
			p.rewires = append(p.rewires, rewire{l.Graph, l.Node, 1, t.GetName()})
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
	if len(dd) != 2 || dd[0] != int64(u.rows) || dd[1] != int64(u.cols) {
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
			if sg.Owner == c && !definesLocally(sg, value) {
				n += countReaders(sg, value, skip)
			}
		}
	}
	return n
}

func definesLocally(g *graph.Graph, name string) bool {
	if g.IsGraphInput(name) || g.Producer(name) != nil {
		return true
	}
	_, s := g.Initializer(name)
	return s == g
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

// workers is how many weights are merged at once: one per CPU.
func workers(jobs int) int {
	n := runtime.GOMAXPROCS(0)
	if n > jobs {
		n = jobs
	}
	if n < 1 {
		n = 1
	}
	return n
}

// parallel runs fn(i) for i in [0, n) on a bounded set of goroutines and
// returns the first error.
func parallel(n int, fn func(i int) error) error {
	var (
		mu    sync.Mutex
		first error
		wg    sync.WaitGroup
		next  = make(chan int)
	)
	for w := workers(n); w > 0; w-- {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		mu.Lock()
		stop := first != nil
		mu.Unlock()
		if stop {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}

// applyInMemory computes every merged weight, checks them, then changes
// the model: nothing is touched before all results are ready.
func (p *plan) applyInMemory() (*MergeReport, error) {
	err := parallel(len(p.updates), func(i int) error {
		u := p.updates[i]
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
	for _, ni := range p.inits {
		ni.g.AddInitializer(ni.t)
	}
	for _, rw := range p.rewires {
		rw.g.SetInput(rw.node, rw.input, rw.value)
	}
	p.top.Reindex()
	for _, b := range p.branches {
		for _, name := range []string{b.A, b.B, b.S, b.Ratio} {
			if name != "" {
				dropConstant(b.Graph, name)
			}
		}
	}
	if p.setManifest {
		return WriteManifest(p.m, p.manifest)
	}
	return nil
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

func elemSize(t *onnxpb.TensorProto) int {
	return graph.DataType(t.GetDataType()).BitSize() / 8
}

// transposeRaw transposes a [rows, cols] matrix of w-byte elements.
func transposeRaw(raw []byte, w, rows, cols int) []byte {
	out := make([]byte, len(raw))
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			copy(out[(j*rows+i)*w:(j*rows+i+1)*w], raw[(i*cols+j)*w:])
		}
	}
	return out
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

// ---- The merge kernel ----

// mergeRows computes rows [p0, p0+n) of u's result: dst = src + coef·U·V,
// in float64 and rounded once to dst's type. src and dst hold just those
// rows (src in u.src's type, already in dst's layout). scratch needs room
// for 2·cols values.
//
// Columns are done in tiles so that the tile of V (r·tile values) stays in
// the CPU cache while every row of the chunk goes past it; the arithmetic
// is the same as row by row.
func mergeRows(dst, src []byte, u *update, p0, n int, scratch []float64) mergeStats {
	cols, r := u.cols, u.r
	sdt, ddt := graph.DataType(u.src.GetDataType()), graph.DataType(u.dst.GetDataType())
	sw, dw := sdt.BitSize()/8, ddt.BitSize()/8
	var st mergeStats
	for c0 := 0; c0 < cols; c0 += mergeTile {
		c1 := min(c0+mergeTile, cols)
		acc, w := scratch[:c1-c0], scratch[cols:cols+c1-c0]
		for i := 0; i < n; i++ {
			p := p0 + i
			urow := u.u[p*r : (p+1)*r]
			if !useSIMD || !rankProductSIMD(acc, urow, u.v, cols, c0) {
				rankProduct(acc, urow, u.v, cols, c0)
			}
			srow := src[(i*cols+c0)*sw : (i*cols+c1)*sw]
			drow := dst[(i*cols+c0)*dw : (i*cols+c1)*dw]
			if sdt == ddt && useSIMD && fusedRowSIMD(sdt, drow, srow, acc, u.coef, &st) {
				continue
			}
			if sdt == ddt && fusedRow(sdt, drow, srow, acc, u.coef, &st) {
				continue
			}
			decodeRow(sdt, w, srow)
			coef := u.coef
			for q, a := range acc {
				// The conversion keeps the compiler from fusing the multiply
				// into the add, so every platform rounds the same way.
				d := float64(coef * a)
				if ad := math.Abs(d); ad > st.maxAbs {
					st.maxAbs = ad
				}
				if d != 0 {
					st.changed++ // types differ: count what the delta touches
				}
				w[q] += d
			}
			encodeRow(ddt, drow, w)
			st.nonFinite += countNonFinite(ddt, drow)
		}
	}
	return st
}

// mergeTile is the column tile of mergeRows: r·512 float64 of V (64 KiB at
// r=16) fit in any L2 cache.
const mergeTile = 512

// rankProduct sets acc[q] = Σk urow[k]·v[k·stride+off+q], summing over k in
// order (unrolled by eight, then one: the same additions in the same order).
func rankProduct(acc, urow, v []float64, stride, off int) {
	n := len(acc)
	clear(acc)
	r := len(urow)
	k := 0
	for ; k+8 <= r; k += 8 {
		u0, u1, u2, u3 := urow[k], urow[k+1], urow[k+2], urow[k+3]
		u4, u5, u6, u7 := urow[k+4], urow[k+5], urow[k+6], urow[k+7]
		b := k*stride + off
		v0 := v[b : b+n]
		v1 := v[b+stride : b+stride+n]
		v2 := v[b+2*stride : b+2*stride+n]
		v3 := v[b+3*stride : b+3*stride+n]
		v4 := v[b+4*stride : b+4*stride+n]
		v5 := v[b+5*stride : b+5*stride+n]
		v6 := v[b+6*stride : b+6*stride+n]
		v7 := v[b+7*stride : b+7*stride+n]
		for q := range acc {
			a := acc[q]
			a += float64(u0 * v0[q])
			a += float64(u1 * v1[q])
			a += float64(u2 * v2[q])
			a += float64(u3 * v3[q])
			a += float64(u4 * v4[q])
			a += float64(u5 * v5[q])
			a += float64(u6 * v6[q])
			a += float64(u7 * v7[q])
			acc[q] = a
		}
	}
	for ; k < r; k++ {
		uk := urow[k]
		b := k*stride + off
		vk := v[b : b+n]
		for q := range acc {
			acc[q] += float64(uk * vk[q])
		}
	}
}

// fusedRow is mergeRows' inner loop for a weight kept in its own type:
// decode, add coef·acc, round, encode and count in one pass. It returns
// false for types it does not handle.
func fusedRow(dt graph.DataType, drow, srow []byte, acc []float64, coef float64, st *mergeStats) bool {
	maxAbs, changed, nonFinite := st.maxAbs, st.changed, st.nonFinite
	switch dt {
	case graph.Float16:
		tab := float16Table()
		srow, drow = srow[:2*len(acc)], drow[:2*len(acc)]
		for q, a := range acc {
			old := leU16(srow[2*q:])
			// The conversion keeps the compiler from fusing the multiply
			// into the add, so every platform rounds the same way.
			d := float64(coef * a)
			// A normal half widens to float32 by re-biasing the exponent; the
			// table (too big for the cache to keep) is for the rest.
			var wv float64
			if e := old & 0x7c00; e != 0 && e != 0x7c00 {
				wv = float64(math.Float32frombits(uint32(old&0x8000)<<16 | (uint32(old&0x7fff)+(127-15)<<10)<<13))
			} else {
				wv = tab[old]
			}
			// float16Bits, its fast path written out (too big to inline).
			nb := math.Float64bits(wv + d)
			var h uint16
			if ax := nb &^ (1 << 63); ax-f16Lo < f16Hi-f16Lo {
				ax += 1<<41 - 1 + (ax>>42)&1
				h = uint16(nb>>48)&0x8000 | uint16(ax>>42-(1023-15)<<10)
			} else {
				h = float16BitsSlow(math.Float64frombits(nb))
			}
			putU16(drow[2*q:], h)
			if ad := math.Abs(d); ad > maxAbs {
				maxAbs = ad
			}
			changed += int64(neq16(h, old))
			if h&0x7c00 == 0x7c00 {
				nonFinite++
			}
		}
	case graph.BFloat16:
		srow, drow = srow[:2*len(acc)], drow[:2*len(acc)]
		for q, a := range acc {
			old := leU16(srow[2*q:])
			d := float64(coef * a)
			nb := math.Float64bits(float64(math.Float32frombits(uint32(old)<<16)) + d)
			var h uint16
			if ax := nb &^ (1 << 63); ax-bf16Lo < bf16Hi-bf16Lo {
				ax += 1<<44 - 1 + (ax>>45)&1
				h = uint16(nb>>48)&0x8000 | uint16(ax>>45-(1023-127)<<7)
			} else {
				h = bfloat16BitsSlow(math.Float64frombits(nb))
			}
			putU16(drow[2*q:], h)
			if ad := math.Abs(d); ad > maxAbs {
				maxAbs = ad
			}
			changed += int64(neq16(h, old))
			if h&0x7f80 == 0x7f80 {
				nonFinite++
			}
		}
	case graph.Float:
		srow, drow = srow[:4*len(acc)], drow[:4*len(acc)]
		for q, a := range acc {
			old := leU32(srow[4*q:])
			d := float64(coef * a)
			h := math.Float32bits(float32(float64(math.Float32frombits(old)) + d))
			putU32(drow[4*q:], h)
			if ad := math.Abs(d); ad > maxAbs {
				maxAbs = ad
			}
			changed += int64((uint64(h^old) + 0xffffffff) >> 32)
			if h&0x7f800000 == 0x7f800000 {
				nonFinite++
			}
		}
	default:
		return false
	}
	st.maxAbs, st.changed, st.nonFinite = maxAbs, changed, nonFinite
	return true
}

// f16Table decodes every float16 bit pattern (built on first use).
var (
	f16Once  sync.Once
	f16Table *[1 << 16]float64
)

func float16Table() *[1 << 16]float64 {
	f16Once.Do(func() {
		f16Table = new([1 << 16]float64)
		for i := range f16Table {
			f16Table[i] = graph.Float16Value(uint16(i))
		}
	})
	return f16Table
}

// decodeRow decodes little-endian raw elements of dt into out.
func decodeRow(dt graph.DataType, out []float64, raw []byte) {
	switch dt {
	case graph.Float:
		raw = raw[:4*len(out)]
		for q := range out {
			out[q] = float64(math.Float32frombits(leU32(raw[4*q:])))
		}
	case graph.Float16:
		tab := float16Table()
		raw = raw[:2*len(out)]
		for q := range out {
			out[q] = tab[leU16(raw[2*q:])]
		}
	case graph.BFloat16:
		raw = raw[:2*len(out)]
		for q := range out {
			out[q] = float64(math.Float32frombits(uint32(leU16(raw[2*q:])) << 16))
		}
	case graph.Double:
		raw = raw[:8*len(out)]
		for q := range out {
			out[q] = math.Float64frombits(leU64(raw[8*q:]))
		}
	}
}

// encodeRow encodes vals as little-endian elements of dt, each rounded once
// to nearest even (the same results as graph.EncodeFloats, faster).
func encodeRow(dt graph.DataType, raw []byte, vals []float64) {
	switch dt {
	case graph.Float:
		raw = raw[:4*len(vals)]
		for q, v := range vals {
			putU32(raw[4*q:], math.Float32bits(float32(v)))
		}
	case graph.Float16:
		raw = raw[:2*len(vals)]
		for q, v := range vals {
			putU16(raw[2*q:], float16Bits(v))
		}
	case graph.BFloat16:
		raw = raw[:2*len(vals)]
		for q, v := range vals {
			putU16(raw[2*q:], bfloat16Bits(v))
		}
	case graph.Double:
		raw = raw[:8*len(vals)]
		for q, v := range vals {
			putU64(raw[8*q:], math.Float64bits(v))
		}
	}
}

// countNonFinite counts NaN and infinite elements of raw.
func countNonFinite(dt graph.DataType, raw []byte) int64 {
	var n int64
	switch dt {
	case graph.Float:
		for i := 0; i+4 <= len(raw); i += 4 {
			if leU32(raw[i:])&0x7f800000 == 0x7f800000 {
				n++
			}
		}
	case graph.Float16:
		for i := 0; i+2 <= len(raw); i += 2 {
			if leU16(raw[i:])&0x7c00 == 0x7c00 {
				n++
			}
		}
	case graph.BFloat16:
		for i := 0; i+2 <= len(raw); i += 2 {
			if leU16(raw[i:])&0x7f80 == 0x7f80 {
				n++
			}
		}
	case graph.Double:
		for i := 0; i+8 <= len(raw); i += 8 {
			if leU64(raw[i:])&0x7ff0000000000000 == 0x7ff0000000000000 {
				n++
			}
		}
	}
	return n
}

// The float64 bit patterns bounding the fast paths of float16Bits and
// bfloat16Bits: the smallest normal and the first power of two past the
// largest finite value.
const (
	f16Lo  = 0x3f10000000000000 // 2^-14
	f16Hi  = 0x40f0000000000000 // 2^16
	bf16Lo = 0x3810000000000000 // 2^-126
	bf16Hi = 0x47f0000000000000 // 2^128
)

// float16Bits rounds f to IEEE binary16 (nearest even) straight from
// float64, bit for bit like graph.Float16Bits but without math.Frexp.
func float16Bits(f float64) uint16 {
	// Fast path, |f| in [2^-14, 2^16): round the float64 bits to 10
	// mantissa bits, nearest even; a carry out of the mantissa bumps the
	// exponent, and 2^16 comes out as infinity, as it should. Small enough
	// to be inlined into the merge loop.
	b := math.Float64bits(f)
	if ax := b &^ (1 << 63); ax-f16Lo < f16Hi-f16Lo {
		ax += 1<<41 - 1 + (ax>>42)&1
		return uint16(b>>48)&0x8000 | uint16(ax>>42-(1023-15)<<10)
	}
	return float16BitsSlow(f)
}

// float16BitsSlow handles zeros, subnormals, overflow, Inf and NaN.
func float16BitsSlow(f float64) uint16 {
	b := math.Float64bits(f)
	sign := uint16(b>>48) & 0x8000
	exp := int(b>>52) & 0x7ff
	mant := b & (1<<52 - 1)
	if exp == 0x7ff {
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	}
	if exp == 0 { // float64 subnormals are far below half's range
		return sign
	}
	e := exp - 1023
	full := mant | 1<<52
	if e >= -14 { // a normal half, unless rounding overflows
		q := full >> 42
		rem := full & (1<<42 - 1)
		if rem > 1<<41 || (rem == 1<<41 && q&1 == 1) {
			q++
		}
		if q == 2048 {
			q = 1024
			e++
		}
		if e > 15 {
			return sign | 0x7c00
		}
		return sign | uint16(e+15)<<10 | uint16(q-1024)
	}
	// A half subnormal: value = q·2^-24, q = full·2^(e-52+24).
	shift := uint(28 - e)
	if shift > 60 {
		return sign
	}
	q := full >> shift
	rem := full & (1<<shift - 1)
	half := uint64(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return sign | uint16(q) // q = 1024 is the smallest normal, encoded alike
}

// bfloat16Bits rounds f to bfloat16 (nearest even) straight from float64,
// bit for bit like graph.BFloat16Bits.
func bfloat16Bits(f float64) uint16 {
	// Fast path, |f| in [2^-126, 2^128), as in float16Bits.
	b := math.Float64bits(f)
	if ax := b &^ (1 << 63); ax-bf16Lo < bf16Hi-bf16Lo {
		ax += 1<<44 - 1 + (ax>>45)&1
		return uint16(b>>48)&0x8000 | uint16(ax>>45-(1023-127)<<7)
	}
	return bfloat16BitsSlow(f)
}

// bfloat16BitsSlow handles zeros, subnormals, overflow, Inf and NaN.
func bfloat16BitsSlow(f float64) uint16 {
	b := math.Float64bits(f)
	sign := uint16(b>>48) & 0x8000
	exp := int(b>>52) & 0x7ff
	mant := b & (1<<52 - 1)
	if exp == 0x7ff {
		if mant != 0 {
			return sign | 0x7fc0
		}
		return sign | 0x7f80
	}
	if exp == 0 {
		return sign
	}
	e := exp - 1023
	full := mant | 1<<52
	if e >= -126 {
		q := full >> 45
		rem := full & (1<<45 - 1)
		if rem > 1<<44 || (rem == 1<<44 && q&1 == 1) {
			q++
		}
		if q == 256 {
			q = 128
			e++
		}
		if e > 127 {
			return sign | 0x7f80
		}
		return sign | uint16(e+127)<<7 | uint16(q-128)
	}
	// A bfloat16 subnormal: value = q·2^-133, q = full·2^(e-52+133).
	shift := uint(-81 - e)
	if shift > 60 {
		return sign
	}
	q := full >> shift
	rem := full & (1<<shift - 1)
	half := uint64(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return sign | uint16(q)
}

// neq16 is 1 when a != b, else 0, without a branch.
func neq16(a, b uint16) uint32 { return (uint32(a^b) + 0xffff) >> 16 }

func leU16(b []byte) uint16 { return uint16(b[0]) | uint16(b[1])<<8 }
func leU32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
func leU64(b []byte) uint64 { return uint64(leU32(b)) | uint64(leU32(b[4:]))<<32 }
func putU16(b []byte, v uint16) {
	b[0], b[1] = byte(v), byte(v>>8)
}
func putU32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
func putU64(b []byte, v uint64) {
	putU32(b, uint32(v))
	putU32(b[4:], uint32(v>>32))
}

// ---- Streaming save ----

// save carries out the plan and writes the model to path: streaming when
// the output has external data, in memory otherwise.
func (p *plan) save(path string, opts graph.SaveOptions) (*MergeReport, error) {
	external := opts.External == graph.ExternalAlways || (opts.External == graph.ExternalAuto && hasExternal(p.m))
	if !external {
		rep, err := p.applyInMemory()
		if err != nil {
			return nil, err
		}
		if err := p.m.Save(path, opts); err != nil {
			return nil, err
		}
		return rep, nil
	}
	return p.stream(path, opts)
}

func hasExternal(m *graph.Model) bool {
	found := false
	m.Tensors(func(t *onnxpb.TensorProto) { found = found || graph.IsExternal(t) })
	return found
}

// streamJob is one tensor's bytes in the output data file.
type streamJob struct {
	t      *onnxpb.TensorProto
	offset int64
	size   int64
	ext    *graph.ExternalRef // copy these bytes from an input data file
	raw    []byte             // or write these
	upd    *update            // or compute the merge
}

// streamSource is where an update reads its base values from.
type streamSource struct {
	ext *graph.ExternalRef
	raw []byte
}

// stream is graph.Model.Save with external data, except that merged
// weights are computed chunk by chunk straight into the data file, and
// tensors that do not change are copied from the input's data files
// without being decoded. The layout is Save's: every tensor that was
// external or has at least Threshold bytes goes to one data file, each at
// an offset aligned to Align.
func (p *plan) stream(path string, opts graph.SaveOptions) (rep *MergeReport, err error) {
	opts, dataPath, err := opts.WithDefaults(path)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)

	// Where everything is read from, captured before the graph changes.
	refs := map[*onnxpb.TensorProto]*graph.ExternalRef{}
	var rerr error
	p.m.Tensors(func(t *onnxpb.TensorProto) {
		if rerr != nil || !graph.IsExternal(t) {
			return
		}
		ref, err := p.m.ExternalRef(t)
		if err != nil {
			rerr = err
			return
		}
		refs[t] = &ref
	})
	if rerr != nil {
		return nil, rerr
	}
	if err := p.m.CheckOutputs(path, dataPath); err != nil {
		return nil, err
	}
	sources := map[*update]streamSource{}
	for _, u := range p.updates {
		if ref := refs[u.src]; ref != nil {
			sources[u] = streamSource{ext: ref}
			continue
		}
		raw, err := p.m.RawData(u.src)
		if err != nil {
			return nil, err
		}
		sources[u] = streamSource{raw: raw}
	}

	if err := p.commitGraph(); err != nil {
		return nil, err
	}
	byDst := map[*onnxpb.TensorProto]*update{}
	for _, u := range p.updates {
		byDst[u.dst] = u
	}

	// Lay the data file out in model order, as Save does.
	var jobs []*streamJob
	var small []*update // merged weights that stay inline
	var offset int64
	p.m.Tensors(func(t *onnxpb.TensorProto) {
		if rerr != nil {
			return
		}
		dt := graph.DataType(t.GetDataType())
		if dt.BitSize() == 0 || t.Segment != nil {
			return
		}
		size, err := graph.ByteSize(dt, t.Dims)
		if err != nil {
			rerr = fmt.Errorf("tensor %q: %w", t.GetName(), err)
			return
		}
		u := byDst[t]
		ext := refs[t]
		if u != nil {
			ext = sources[u].ext
		}
		if ext == nil && size < opts.Threshold {
			if u != nil {
				small = append(small, u)
			}
			return
		}
		offset = (offset + opts.Align - 1) / opts.Align * opts.Align
		j := &streamJob{t: t, offset: offset, size: size, upd: u}
		switch {
		case u != nil:
		case refs[t] != nil:
			j.ext = refs[t]
		default:
			if j.raw, err = p.m.RawData(t); err != nil {
				rerr = err
				return
			}
		}
		jobs = append(jobs, j)
		offset += size
	})
	if rerr != nil {
		return nil, rerr
	}

	// Small merged weights are computed in memory.
	for _, u := range small {
		src := sources[u].raw
		if u.srcT {
			src = transposeRaw(src, graph.DataType(u.src.GetDataType()).BitSize()/8, u.cols, u.rows)
		}
		u.out = make([]byte, u.rows*u.cols*elemSize(u.dst))
		u.stats = mergeRows(u.out, src, u, 0, u.rows, make([]float64, 2*u.cols))
	}

	tmp, err := os.CreateTemp(dir, "."+filepath.Base(dataPath)+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	defer func() {
		tmp.Close()
		if err != nil {
			os.Remove(tmp.Name())
		}
	}()
	files := &fileSet{files: map[string]*os.File{}}
	defer files.close()
	// The biggest tensors go first, so the workers finish together.
	order := make([]int, len(jobs))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return jobs[order[a]].size > jobs[order[b]].size })
	err = parallel(len(jobs), func(i int) error {
		j := jobs[order[i]]
		if err := p.runJob(j, tmp, files, sources); err != nil {
			return fmt.Errorf("%s: tensor %q: %w", path, j.t.GetName(), err)
		}
		if u := j.upd; u != nil && p.opts.Safe && u.stats.nonFinite > 0 {
			return fmt.Errorf("safe merge: merging would write %d NaN or infinite values in %s (%s); nothing was written", u.stats.nonFinite, u.rep.Weight, u.rep.Module)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err = p.checkSafe(); err != nil {
		return nil, err
	}
	for _, u := range small {
		if err = graph.SetRawData(u.dst, u.out); err != nil {
			return nil, err
		}
	}
	for _, j := range jobs {
		graph.SetExternal(j.t, opts.DataFile, j.offset, j.size)
	}
	if err = tmp.Sync(); err != nil {
		return nil, fmt.Errorf("%s: %w", dataPath, err)
	}
	if size := proto.Size(p.m.Proto); size > math.MaxInt32 {
		return nil, fmt.Errorf("%s: the model's graph alone is %d bytes, more than a protobuf can hold", path, size)
	}
	data, err := proto.Marshal(p.m.Proto)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if err = tmp.Close(); err != nil {
		return nil, fmt.Errorf("%s: %w", dataPath, err)
	}
	if len(jobs) > 0 {
		if err = os.Rename(tmp.Name(), dataPath); err != nil {
			return nil, fmt.Errorf("%s: %w", dataPath, err)
		}
	} else {
		os.Remove(tmp.Name())
	}
	err = graph.WriteFileAtomic(path, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
	if err != nil {
		if len(jobs) > 0 {
			os.Remove(dataPath)
		}
		return nil, err
	}
	return p.finish(), nil
}

// streamChunk is how many bytes of a weight a worker handles at a time.
const streamChunk = 4 << 20

// runJob writes one tensor's bytes into the data file.
func (p *plan) runJob(j *streamJob, out *os.File, files *fileSet, sources map[*update]streamSource) error {
	switch {
	case j.raw != nil:
		_, err := out.WriteAt(j.raw, j.offset)
		return err
	case j.ext != nil:
		return files.copyRange(out, j.offset, j.ext)
	}
	u := j.upd
	src := sources[u]
	sw := graph.DataType(u.src.GetDataType()).BitSize() / 8
	dw := elemSize(u.dst)
	srcRow, dstRow := int64(u.cols*sw), int64(u.cols*dw)
	whole := src.raw
	if u.srcT {
		// A copy in the node's orientation reads the source by columns:
		// rare (a shared Transpose), so it is simply read whole.
		if whole == nil {
			buf := make([]byte, src.ext.Length)
			if err := files.readAt(src.ext, buf, 0); err != nil {
				return err
			}
			whole = buf
		}
		whole = transposeRaw(whole, sw, u.cols, u.rows)
	}
	rows := int(streamChunk / max(srcRow, dstRow))
	if rows < 1 {
		rows = 1
	}
	scratch := make([]float64, 2*u.cols)
	dbuf := make([]byte, int64(rows)*dstRow)
	var sbuf []byte
	if whole == nil {
		sbuf = make([]byte, int64(rows)*srcRow)
	}
	for p0 := 0; p0 < u.rows; p0 += rows {
		n := min(rows, u.rows-p0)
		var s []byte
		if whole != nil {
			s = whole[int64(p0)*srcRow : int64(p0+n)*srcRow]
		} else {
			s = sbuf[:int64(n)*srcRow]
			if err := files.readAt(src.ext, s, int64(p0)*srcRow); err != nil {
				return err
			}
		}
		d := dbuf[:int64(n)*dstRow]
		u.stats.add(mergeRows(d, s, u, p0, n, scratch))
		if _, err := out.WriteAt(d, j.offset+int64(p0)*dstRow); err != nil {
			return err
		}
		if p.opts.Safe && u.stats.nonFinite > 0 {
			return nil // reported by the caller
		}
	}
	return nil
}

// fileSet keeps the input data files open for concurrent reads.
type fileSet struct {
	mu    sync.Mutex
	files map[string]*os.File
}

func (fs *fileSet) open(path string) (*os.File, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if f, ok := fs.files[path]; ok {
		return f, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	fs.files[path] = f
	return f, nil
}

func (fs *fileSet) close() {
	for _, f := range fs.files {
		f.Close()
	}
}

// readAt fills buf from a tensor's external bytes, starting off bytes in.
func (fs *fileSet) readAt(ref *graph.ExternalRef, buf []byte, off int64) error {
	if off+int64(len(buf)) > ref.Length {
		return fmt.Errorf("reading past the end of the tensor's %d bytes in %s", ref.Length, ref.Location)
	}
	f, err := fs.open(ref.Path)
	if err != nil {
		return err
	}
	_, err = f.ReadAt(buf, ref.Offset+off)
	return err
}

// copyRange copies a tensor's external bytes to out at offset, file to file.
func (fs *fileSet) copyRange(out *os.File, offset int64, ref *graph.ExternalRef) error {
	f, err := fs.open(ref.Path)
	if err != nil {
		return err
	}
	return graph.CopyRange(out, offset, f, ref.Offset, ref.Length)
}
