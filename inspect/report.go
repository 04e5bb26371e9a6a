package inspect

import (
	"fmt"
	"math"
	"os"
	"runtime"
	"sort"
	"strconv"
	"sync"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/rewrite"
)

// SchemaVersion is the version of the JSON report. It changes only when a
// field is removed or changes meaning; new fields may appear at any time.
const SchemaVersion = 1

// Report is everything inspect knows about a model. Its JSON form is the
// output of `onnxlora inspect --json`.
type Report struct {
	SchemaVersion int       `json:"schema_version"`
	Model         ModelInfo `json:"model"`
	// Layers are the adaptable layers in graph order (subgraphs after the
	// node holding them).
	Layers []Layer `json:"layers"`
	Totals Totals  `json:"totals"`
	// Selection is what a selection would adapt; nil when none was asked.
	Selection *Selection `json:"selection"`
	// Adapters are the adapters listed in the model's manifest, or, when
	// it has none (metadata stripped), found by their branch shape; then
	// AdaptersRecognized is set.
	Adapters           []Adapter `json:"adapters"`
	AdaptersRecognized bool      `json:"adapters_recognized,omitempty"`
	// Saved are the layers trained whole beside the adapters (PEFT's
	// modules_to_save), from the manifest.
	Saved []rewrite.SavedModule `json:"modules_to_save,omitempty"`
	// Skipped are MatMul-like nodes that cannot take an adapter.
	Skipped []rewrite.Skipped `json:"skipped"`
}

// ModelInfo is the model's header and storage.
type ModelInfo struct {
	// Path is the file as it was given; FileBytes its size (0 when the model
	// was not loaded from a file).
	Path            string  `json:"path"`
	FileBytes       int64   `json:"file_bytes"`
	IRVersion       int64   `json:"ir_version"`
	ProducerName    string  `json:"producer_name"`
	ProducerVersion string  `json:"producer_version"`
	Domain          string  `json:"domain,omitempty"`
	ModelVersion    int64   `json:"model_version,omitempty"`
	Opsets          []Opset `json:"opsets"`
	// Nodes counts the nodes of the main graph and all its subgraphs;
	// Subgraphs counts the subgraphs.
	Nodes     int `json:"nodes"`
	Subgraphs int `json:"subgraphs"`
	// Initializers counts initializers in all graphs; Params the elements of
	// the floating-point ones (what PEFT calls "all params").
	Initializers int          `json:"initializers"`
	Params       int64        `json:"params"`
	External     ExternalInfo `json:"external_data"`
}

// Opset is one imported operator set. Domain "" is the default ONNX domain
// (ai.onnx).
type Opset struct {
	Domain  string `json:"domain"`
	Version int64  `json:"version"`
}

// ExternalInfo sums up the tensors stored outside the protobuf.
type ExternalInfo struct {
	Tensors int            `json:"tensors"`
	Bytes   int64          `json:"bytes"`
	Files   []ExternalFile `json:"files"`
}

// ExternalFile is one external data file, by its location in the model.
type ExternalFile struct {
	Location string `json:"location"`
	Tensors  int    `json:"tensors"`
	// Bytes is what the model's tensors reference; FileBytes is the file's
	// size on disk (larger with alignment padding or unused data).
	Bytes     int64 `json:"bytes"`
	FileBytes int64 `json:"file_bytes"`
}

// Layer is one adaptable MatMul or Gemm.
type Layer struct {
	Module string `json:"module"`
	Op     string `json:"op"`
	Node   string `json:"node"`
	// Graph names the subgraph holding the node; empty for the main graph.
	Graph string `json:"graph,omitempty"`
	// Weight is the constant the node multiplies by; Via lists the op types
	// between it and the node (Transpose, Cast, Identity), constant first.
	Weight string   `json:"weight"`
	Via    []string `json:"via,omitempty"`
	// In and Out are the features: the weight is [In, Out] as used.
	In  int64 `json:"in"`
	Out int64 `json:"out"`
	// DType is the compute type (after any Cast); StoredDType the weight's
	// type in the file.
	DType       string `json:"dtype"`
	StoredDType string `json:"stored_dtype"`
	Params      int64  `json:"params"`
	// Shared: the weight also feeds other nodes. OutputHead: the layer's
	// output is a graph output ("all-linear" skips it).
	Shared     bool `json:"shared"`
	OutputHead bool `json:"output_head"`
	// Input is the activation x; Output the value the layer produces (the
	// adapter's Add when it has one).
	Input  string `json:"input"`
	Output string `json:"output"`
	// Selected: the selection would adapt this layer. Adapted: it has an
	// adapter in the manifest.
	Selected bool `json:"selected"`
	Adapted  bool `json:"adapted"`
}

// Totals counts the layers table.
type Totals struct {
	Layers int `json:"layers"`
	// Params counts the elements of the layers' weights, each distinct
	// weight once.
	Params   int64 `json:"params"`
	Shared   int   `json:"shared"`
	Selected int   `json:"selected"`
	Adapted  int   `json:"adapted"`
	Skipped  int   `json:"skipped"`
}

// Selection is what rewrite.Inject would do with the given SelectOptions.
type Selection struct {
	Targets      []string `json:"targets,omitempty"`
	TargetRegex  string   `json:"target_regex,omitempty"`
	Exclude      []string `json:"exclude,omitempty"`
	ExcludeRegex string   `json:"exclude_regex,omitempty"`
	Layers       []int    `json:"layers,omitempty"`
	Rank         int      `json:"rank"`
	Alpha        float64  `json:"alpha"`
	// Modules are the selected layers with their resolved rank and alpha.
	Modules []SelectedModule `json:"modules"`
	// Unmatched are Targets entries that match no module at all (typos).
	Unmatched []string `json:"unmatched,omitempty"`
	// Trainable, All and TrainablePercent are the counts rewrite.Inject
	// reports after adding the selection (adapters already present count as
	// trainable too); Summary is the print_trainable_parameters line inject
	// prints.
	Trainable        int64   `json:"trainable"`
	All              int64   `json:"all"`
	TrainablePercent float64 `json:"trainable_percent"`
	Summary          string  `json:"summary"`
}

// SelectedModule is one layer the selection adapts.
type SelectedModule struct {
	Module string  `json:"module"`
	Rank   int     `json:"rank"`
	Alpha  float64 `json:"alpha"`
	Params int64   `json:"params"`
	// Adapted is true when the layer already has an adapter: inject would
	// refuse it.
	Adapted bool `json:"adapted,omitempty"`
}

// Adapter is an adapter listed in the model's manifest.
type Adapter struct {
	Module  string  `json:"module"`
	Node    string  `json:"node"`
	Op      string  `json:"op"`
	Rank    int     `json:"rank"`
	Alpha   float64 `json:"alpha"`
	Scaling float64 `json:"scaling"`
	RSLoRA  bool    `json:"use_rslora"`
	In      int64   `json:"in"`
	Out     int64   `json:"out"`
	DType   string  `json:"dtype"`
	Dropout float64 `json:"dropout"`
	LoraA   string  `json:"lora_A"`
	LoraB   string  `json:"lora_B"`
	// Params is rank·(in+out), the adapter's trainable elements.
	Params int64 `json:"params"`
	// Norm is ||scaling·A·B||_F, the Frobenius norm of the adapter's weight
	// update, rounded to 6 significant digits; 0 for a fresh adapter (B=0).
	// It is null when the tensors cannot be read; Error says why.
	Norm  *float64 `json:"delta_norm"`
	Error string   `json:"error,omitempty"`
}

// Options tunes Build.
type Options struct {
	// Select, when set, marks the layers this selection would adapt, with
	// the same matcher and rules as rewrite.Inject. Build fails when it
	// matches nothing, with the matcher's message.
	Select *rewrite.SelectOptions
	// SkipNorms leaves Adapter.Norm unset, so no tensor data is read.
	SkipNorms bool
}

// Build inspects a model. It reads the protobuf and, unless SkipNorms is
// set, the adapters' A and B tensors; base weights are never read.
func Build(m *graph.Model, opts Options) (*Report, error) {
	r := &Report{SchemaVersion: SchemaVersion, Layers: []Layer{}, Adapters: []Adapter{}, Skipped: []rewrite.Skipped{}}
	if err := r.buildModelInfo(m); err != nil {
		return nil, err
	}
	man, err := rewrite.ReadManifest(m)
	if err != nil {
		return nil, err
	}
	if man == nil {
		// Metadata stripped: the adapters are found by their branches.
		if rec, err := rewrite.RecognizedAdapters(m); err == nil && len(rec) > 0 {
			man = &rewrite.Manifest{Adapters: rec}
			r.AdaptersRecognized = true
		}
	}
	adapted := map[string]*rewrite.Adapter{}
	if man != nil {
		r.Saved = man.Saved
		for i := range man.Adapters {
			adapted[man.Adapters[i].Module] = &man.Adapters[i]
		}
	}

	layers, skipped := rewrite.FindLayers(m)
	if skipped != nil {
		r.Skipped = skipped
	}
	seenWeight := map[*onnxpb.TensorProto]bool{}
	for _, l := range layers {
		li := Layer{
			Module: l.Module, Op: l.Op, Node: l.Node.GetName(), Weight: l.Weight.Name,
			In: l.In, Out: l.Out, DType: l.DType.String(), StoredDType: l.Weight.DataType().String(),
			Params: l.In * l.Out * l.KernelSize(), Shared: l.Shared, OutputHead: l.OutputHead,
			Input: l.Node.Input[0], Output: l.Node.Output[0],
		}
		if l.Graph.Parent != nil {
			li.Graph = l.Graph.Proto.GetName()
		}
		for _, n := range l.Weight.Chain {
			li.Via = append(li.Via, n.GetOpType())
		}
		if a := adapted[l.Module]; a != nil {
			li.Adapted = true
			if a.Output != "" {
				li.Output = a.Output
			}
			r.Totals.Adapted++
		}
		if li.Shared {
			r.Totals.Shared++
		}
		if !seenWeight[l.Weight.Tensor] {
			seenWeight[l.Weight.Tensor] = true
			r.Totals.Params += li.Params
		}
		r.Layers = append(r.Layers, li)
	}
	r.Totals.Layers = len(r.Layers)
	r.Totals.Skipped = len(r.Skipped)

	if man != nil {
		g := m.Graph()
		var norms []normResult
		if !opts.SkipNorms {
			norms = deltaNorms(m, g, man.Adapters)
		}
		for i, a := range man.Adapters {
			ai := Adapter{
				Module: a.Module, Node: a.Node, Op: a.Op, Rank: a.Rank, Alpha: a.Alpha,
				Scaling: a.Scaling, RSLoRA: a.RSLoRA, In: a.InFeatures, Out: a.OutFeatures,
				DType: a.DType, Dropout: a.Dropout, LoraA: a.LoraA, LoraB: a.LoraB,
				Params: a.Params(),
			}
			if !opts.SkipNorms {
				if err := norms[i].err; err != nil {
					ai.Error = err.Error()
				} else {
					ai.Norm = &norms[i].norm
				}
			}
			r.Adapters = append(r.Adapters, ai)
		}
	}

	if opts.Select != nil {
		if err := r.buildSelection(layers, adapted, *opts.Select); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func (r *Report) buildModelInfo(m *graph.Model) error {
	mp := m.Proto
	info := &r.Model
	info.Path = m.Path()
	if info.Path != "" {
		if st, err := os.Stat(info.Path); err == nil {
			info.FileBytes = st.Size()
		}
	}
	info.IRVersion = mp.GetIrVersion()
	info.ProducerName = mp.GetProducerName()
	info.ProducerVersion = mp.GetProducerVersion()
	info.Domain = mp.GetDomain()
	info.ModelVersion = mp.GetModelVersion()
	info.Opsets = []Opset{}
	for _, op := range mp.OpsetImport {
		d := op.GetDomain()
		if d == "ai.onnx" {
			d = ""
		}
		info.Opsets = append(info.Opsets, Opset{Domain: d, Version: op.GetVersion()})
	}
	m.Graph().Walk(func(g *graph.Graph) {
		if g.Parent != nil {
			info.Subgraphs++
		}
		info.Nodes += len(g.Proto.Node)
		info.Initializers += len(g.Proto.Initializer)
	})
	man, _ := rewrite.ReadManifest(m)
	_, info.Params = rewrite.CountParams(m, man)

	files := map[string]*ExternalFile{}
	var err error
	info.External.Files = []ExternalFile{}
	m.Tensors(func(t *onnxpb.TensorProto) {
		if err != nil || !graph.IsExternal(t) {
			return
		}
		ref, rerr := m.ExternalRef(t)
		if rerr != nil {
			err = rerr
			return
		}
		f := files[ref.Location]
		if f == nil {
			f = &ExternalFile{Location: ref.Location}
			if st, serr := os.Stat(ref.Path); serr == nil {
				f.FileBytes = st.Size()
			}
			files[ref.Location] = f
		}
		f.Tensors++
		f.Bytes += ref.Length
		info.External.Tensors++
		info.External.Bytes += ref.Length
	})
	if err != nil {
		return err
	}
	for _, f := range files {
		info.External.Files = append(info.External.Files, *f)
	}
	sort.Slice(info.External.Files, func(i, j int) bool {
		return info.External.Files[i].Location < info.External.Files[j].Location
	})
	return nil
}

func (r *Report) buildSelection(layers []*rewrite.Layer, adapted map[string]*rewrite.Adapter, opts rewrite.SelectOptions) error {
	sel, err := rewrite.NewSelector(opts)
	if err != nil {
		return err
	}
	cands := rewrite.Candidates(layers)
	picked, err := sel.Select(cands)
	if err != nil {
		return err
	}
	s := &Selection{
		Targets: opts.Targets, TargetRegex: opts.TargetRegex, Exclude: opts.Exclude,
		ExcludeRegex: opts.ExcludeRegex, Layers: opts.Layers, Rank: opts.Rank, Alpha: opts.Alpha,
		Modules: []SelectedModule{}, Unmatched: sel.Unmatched(cands),
	}
	// The counts follow rewrite.Inject: every adapter adds A and B, and "all
	// params" counts the float initializers (rewrite.CountParams).
	s.All = r.Model.Params
	for _, a := range r.Adapters {
		s.Trainable += a.Params
	}
	for _, p := range picked {
		l := layers[p.Index]
		params := int64(p.Rank) * (l.In + l.Out)
		s.Modules = append(s.Modules, SelectedModule{
			Module: p.Module, Rank: p.Rank, Alpha: p.Alpha, Params: params, Adapted: adapted[p.Module] != nil,
		})
		r.Layers[p.Index].Selected = true
		r.Totals.Selected++
		s.Trainable += params
		s.All += params
	}
	if s.All > 0 {
		s.TrainablePercent = 100 * float64(s.Trainable) / float64(s.All)
	}
	s.Summary = rewrite.TrainableLine(s.Trainable, s.All)
	s.TrainablePercent = round6(s.TrainablePercent)
	r.Selection = s
	return nil
}

// normResult is one adapter's deltaNorm.
type normResult struct {
	norm float64
	err  error
}

// deltaNorms computes deltaNorm for every adapter, on all CPUs.
func deltaNorms(m *graph.Model, g *graph.Graph, adapters []rewrite.Adapter) []normResult {
	out := make([]normResult, len(adapters))
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), len(adapters)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				out[i].norm, out[i].err = deltaNorm(m, g, &adapters[i])
			}
		}()
	}
	for i := range adapters {
		next <- i
	}
	close(next)
	wg.Wait()
	return out
}

// deltaNorm computes ||scaling·A·B||_F. With A [in, r] and B [r, out],
// ||A·B||_F² = Σ_pq (AᵀA)_pq (B·Bᵀ)_pq, so only two r×r matrices are formed.
func deltaNorm(m *graph.Model, g *graph.Graph, a *rewrite.Adapter) (float64, error) {
	tA := findInitializer(g, a.Graph, a.LoraA)
	tB := findInitializer(g, a.Graph, a.LoraB)
	if tA == nil || tB == nil {
		missing := a.LoraA
		if tA != nil {
			missing = a.LoraB
		}
		return 0, fmt.Errorf("initializer %q not found", missing)
	}
	// A Conv adapter (a.Kernel) holds A [r, in, k…] and B [out, r, 1…]:
	// ΔW is B·A on the kernel flattened to [out, in·K].
	conv := len(a.Kernel) > 0 && len(tA.Dims) > 2 && len(tB.Dims) == len(tA.Dims) && tA.Dims[0] == tB.Dims[1]
	if !conv && (len(tA.Dims) != 2 || len(tB.Dims) != 2 || tA.Dims[1] != tB.Dims[0]) {
		return 0, fmt.Errorf("lora_A %v and lora_B %v do not chain", tA.Dims, tB.Dims)
	}
	av, err := m.Float64s(tA)
	if err != nil {
		return 0, err
	}
	bv, err := m.Float64s(tB)
	if err != nil {
		return 0, err
	}
	var in, r, out int
	if conv {
		r, out = int(tA.Dims[0]), int(tB.Dims[0])
		in = len(av) / r
		av, bv = transposed(av, r, in), transposed(bv, out, r)
	} else {
		in, r, out = int(tA.Dims[0]), int(tA.Dims[1]), int(tB.Dims[1])
	}
	scaling := a.Scaling
	if ts := findInitializer(g, a.Graph, a.ScalingTensor); ts != nil && a.ScalingTensor != "" {
		if sv, err := m.Float64s(ts); err == nil && len(sv) == 1 {
			scaling = sv[0]
		}
	}
	// ||A·B||_F² from the upper halves of the two symmetric Gram matrices,
	// each entry a dot product of A's columns or B's rows.
	at := transposed(av, in, r) // A's columns, contiguous
	sum := 0.0
	for p := 0; p < r; p++ {
		ap, bp := at[p*in:(p+1)*in], bv[p*out:(p+1)*out]
		for q := p; q < r; q++ {
			g := dot(ap, at[q*in:(q+1)*in]) * dot(bp, bv[q*out:(q+1)*out])
			if q != p {
				g *= 2
			}
			sum += g
		}
	}
	// Rounding errors can make a tiny sum negative.
	if sum < 0 {
		sum = 0
	}
	return round6(math.Abs(scaling) * math.Sqrt(sum)), nil
}

// dot is x·y with four partial sums, so the additions overlap.
func dot(x, y []float64) float64 {
	y = y[:len(x)]
	var s0, s1, s2, s3 float64
	i := 0
	for ; i+4 <= len(x); i += 4 {
		s0 += x[i] * y[i]
		s1 += x[i+1] * y[i+1]
		s2 += x[i+2] * y[i+2]
		s3 += x[i+3] * y[i+3]
	}
	for ; i < len(x); i++ {
		s0 += x[i] * y[i]
	}
	return (s0 + s1) + (s2 + s3)
}

// findInitializer looks name up in the graph called graphName (the main
// graph for ""), then anywhere in the model.
func findInitializer(root *graph.Graph, graphName, name string) *onnxpb.TensorProto {
	if name == "" {
		return nil
	}
	var found, anywhere *onnxpb.TensorProto
	root.Walk(func(g *graph.Graph) {
		for _, t := range g.Proto.Initializer {
			if t.GetName() != name {
				continue
			}
			if anywhere == nil {
				anywhere = t
			}
			if found == nil && ((g.Parent == nil && graphName == "") || (g.Parent != nil && g.Proto.GetName() == graphName)) {
				found = t
			}
		}
	})
	if found != nil {
		return found
	}
	return anywhere
}

// round6 rounds to 6 significant digits, so reports do not depend on the
// last bits of floating-point sums (which differ between CPUs with and
// without fused multiply-add).
func round6(v float64) float64 {
	if v == 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return v
	}
	f, _ := strconv.ParseFloat(strconv.FormatFloat(v, 'g', 6, 64), 64)
	return f
}

// transposed returns the [cols, rows] transpose of x [rows, cols].
func transposed(x []float64, rows, cols int) []float64 {
	t := make([]float64, len(x))
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			t[j*rows+i] = x[i*cols+j]
		}
	}
	return t
}
