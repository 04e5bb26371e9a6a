package rewrite

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

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
	ax         *approxState // the certified kernel's state (merge_approx_amd64.go)
	out        []byte       // the merged bytes, in memory mode
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
	peft     *export.PEFTAdapter // an adapter file read lazily, closed by done
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
	// stacking is set while a manifest adapter is planned: a second one
	// on the same weight (inject --stack) joins the first one's update,
	// listed in stacked.
	stacking bool
	stacked  []stackedRep
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
	if !p.planned(f.Layer.Weight.Tensor) {
		return p.addLazy(f)
	}
	return p.addFactors(f, func(l *Layer, a, b []float64, r int, scaling float64, rep *MergedLayer) error {
		n := len(p.updates)
		p.stacking = true
		err := p.addUpdate(l, a, b, r, scaling, rep)
		p.stacking = false
		if err != nil || len(p.updates) == n { // stacked into another update
			return err
		}
		// A and B are decoded again by the job that merges them, so memory
		// does not grow with the number of adapters (update.factors).
		p.updates[n].lazyFrom(tensorFactors(p.m, f.TA, f.TB))
		return nil
	})
}

// done releases what the plan keeps open for its jobs.
func (p *plan) done() {
	if p.peft != nil {
		p.peft.Close()
	}
}

// planned reports whether an update already writes w (a stacked adapter's
// first one).
func (p *plan) planned(w *onnxpb.TensorProto) bool {
	return slices.ContainsFunc(p.updates, func(q *update) bool { return q.dst == w })
}

// addLazy plans f's update from the shapes of A and B alone: the job that
// merges them decodes them (update.factors), so planning reads no factor
// bytes and memory does not grow with the number of adapters.
func (p *plan) addLazy(f *foundAdapter) error {
	na, errA := graph.NumElements(f.TA.GetDims())
	nb, errB := graph.NumElements(f.TB.GetDims())
	if errA != nil || errB != nil {
		return fmt.Errorf("factors %v and %v: %w", f.TA.GetDims(), f.TB.GetDims(), errors.Join(errA, errB))
	}
	rep := &MergedLayer{Module: f.Module, Rank: f.Rank, Alpha: f.Alpha, Scaling: f.Scaling}
	if err := p.addLazyUpdate(f.Layer, na, nb, f.Rank, f.Scaling, rep, tensorFactors(p.m, f.TA, f.TB)); err != nil {
		return err
	}
	p.branches = append(p.branches, f.branch)
	return nil
}

// addLazyUpdate is addUpdate from the factors' sizes alone (na values of
// A, nb of B): load gives A [in, r] and B [r, out] to the job that merges
// them.
func (p *plan) addLazyUpdate(l *Layer, na, nb int64, r int, scaling float64, rep *MergedLayer, load func() (a, b []float64, err error)) error {
	if na != l.In*int64(r) || nb != int64(r)*l.Out {
		return fmt.Errorf("factors of %d and %d values do not fit a [%d, %d] layer at rank %d", na, nb, l.In, l.Out, r)
	}
	n := len(p.updates)
	if err := p.addUpdate(l, nil, nil, r, scaling, rep); err != nil {
		return err
	}
	p.updates[n].lazyFrom(load)
	return nil
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
	lazy := a == nil && b == nil // addLazyUpdate checked the sizes
	if !lazy && (int64(len(a)) != l.In*int64(r) || int64(len(b)) != int64(r)*l.Out) {
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
			if p.stacking && q.scale == nil && q.src == u.src && q.srcT == u.srcT {
				return p.stackInto(q, u, l, a, b, storedT, rep)
			}
			return fmt.Errorf("weight %q would be merged twice (two adapters on one layer?)", w.Name)
		}
	}
	// Normalize to dst[p][q] += coef·Σk U[p][k]·V[k][q]. For a weight stored
	// [out, in], U = Bᵀ and V = Aᵀ: the same products, summed in the same
	// order, so the result is bitwise the same as for the [in, out] layout.
	if storedT {
		u.rows, u.cols = int(l.Out), int(l.In)
		if !lazy {
			u.u, u.v = transposeF64(b, r, int(l.Out)), transposeF64(a, int(l.In), r)
		}
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

// stackInto folds u, a second adapter on q's weight (inject --stack),
// into q: dst = src + Σ coef_i·U_i·V_i becomes one update of rank r1+r2
// with the coefficients in U, so the weight is still rounded once.
func (p *plan) stackInto(q, u *update, l *Layer, a, b []float64, storedT bool, rep *MergedLayer) error {
	if err := q.factors(); err != nil {
		return err
	}
	q.load = nil // combined factors stay decoded
	rows, cols, r := int(l.In), int(l.Out), u.r
	uu, uv := a, b
	if storedT {
		rows, cols = int(l.Out), int(l.In)
		uu, uv = transposeF64(b, r, int(l.Out)), transposeF64(a, int(l.In), r)
	}
	if rows != q.rows || cols != q.cols {
		return fmt.Errorf("weight %q: stacked adapters see it as [%d, %d] and [%d, %d]", l.Weight.Name, q.rows, q.cols, rows, cols)
	}
	n := q.r + r
	nu := make([]float64, rows*n)
	for i := 0; i < rows; i++ {
		for k := 0; k < q.r; k++ {
			nu[i*n+k] = q.coef * q.u[i*q.r+k]
		}
		for k := 0; k < r; k++ {
			nu[i*n+q.r+k] = u.coef * uu[i*r+k]
		}
	}
	q.u, q.v, q.r, q.coef = nu, append(slices.Clone(q.v), uv...), n, 1
	rep.Shape, rep.DType, rep.Transposed = q.rep.Shape, q.rep.DType, storedT
	rep.Factor, rep.Elements = u.coef, q.rep.Elements
	p.stacked = append(p.stacked, stackedRep{rep, q})
	return nil
}

// stackedRep is the report of an adapter folded into another's update.
type stackedRep struct {
	rep  *MergedLayer
	into *update
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
