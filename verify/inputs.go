package verify

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
)

// Default values of symbolic dims that Options.Dims and the inputs file
// leave unset. See DimDefault for which names get which.
const (
	// DefaultBatch is used for dims whose name contains "batch". Two rows
	// rather than one catch adapters that mix up rows.
	DefaultBatch = 2
	// DefaultSequence is used for sequence-like dims ("seq", "len",
	// "token", "step"): long enough to exercise attention, short enough to
	// stay within the learned positions of small test models.
	DefaultSequence = 8
	// DefaultPast is used for past-length dims ("past"), as in
	// past_sequence_length. 0 means an empty KV cache, the prompt step,
	// which every decoder accepts; set it with --dim to test decoding with
	// a cache.
	DefaultPast = 0
	// DefaultOther is used for any other symbolic dim, unnamed ones
	// included.
	DefaultOther = 1
)

// dimKind classifies a symbolic dim by its name.
type dimKind int

const (
	dimOther dimKind = iota
	dimBatch
	dimSequence
	dimPast
	dimTotal
)

// kindOf guesses what a symbolic dim is from its name. past and total come
// first because their names also contain "seq"; sequence beats batch for
// names like max_seq_len_in_batch.
func kindOf(name string) dimKind {
	n := strings.ToLower(name)
	switch {
	case n == "":
		return dimOther
	case strings.Contains(n, "past"):
		return dimPast
	case strings.Contains(n, "total"):
		return dimTotal
	case strings.Contains(n, "seq") || strings.Contains(n, "len") || strings.Contains(n, "token") || strings.Contains(n, "step"):
		return dimSequence
	case strings.Contains(n, "batch"):
		return dimBatch
	}
	return dimOther
}

// DimDefault returns the value an unset symbolic dim gets, by its name
// (case-insensitive, first rule that matches):
//
//   - contains "past" (past_sequence_length, past_seq_len): DefaultPast (0);
//   - contains "total" (total_sequence_length): past + sequence, the values
//     of the model's first past-like and sequence-like dims;
//   - contains "seq", "len", "token" or "step": DefaultSequence (8);
//   - contains "batch": DefaultBatch (2);
//   - anything else, and unnamed dims: DefaultOther (1).
//
// For a total dim it returns DefaultPast + DefaultSequence; ResolveDims
// adds the values the past and sequence dims actually got.
func DimDefault(name string) int64 {
	switch kindOf(name) {
	case dimPast:
		return DefaultPast
	case dimSequence:
		return DefaultSequence
	case dimBatch:
		return DefaultBatch
	case dimTotal:
		return DefaultPast + DefaultSequence
	}
	return DefaultOther
}

// isPastInput reports whether an input holds a KV cache from earlier steps,
// by its name: past_0, past_key_values.0.key, past.1.value, ...
func isPastInput(name string) bool {
	return strings.HasPrefix(strings.ToLower(name), "past")
}

// dimKinds classifies the symbolic dims of the inputs, returning their
// names in order of first use. A dim is past-like by its name, or when only
// past_* inputs use it and its name says neither batch nor total: GPT-2
// exports call the cache length of past_0 plain "seq_len".
func dimKinds(inputs []ortrun.TensorInfo) (names []string, kinds map[string]dimKind) {
	kinds = map[string]dimKind{}
	onlyPast := map[string]bool{}
	for _, in := range inputs {
		for i, d := range in.Shape {
			name := dimName(in, i)
			if d >= 0 || name == "" {
				continue
			}
			if _, seen := kinds[name]; !seen {
				names = append(names, name)
				kinds[name] = kindOf(name)
				onlyPast[name] = true
			}
			onlyPast[name] = onlyPast[name] && isPastInput(in.Name)
		}
	}
	for _, name := range names {
		if k := kinds[name]; onlyPast[name] && k != dimBatch && k != dimTotal {
			kinds[name] = dimPast
		}
	}
	return names, kinds
}

// ResolveDims gives every symbolic dim name of the inputs a value: set
// first (from --dim and the inputs file), then the defaults of DimDefault,
// where a dim used only by past_* inputs counts as a past length whatever
// its name. A name in set that no input uses is an error, since it is most
// likely a typo. Unnamed symbolic dims are not in the map; they get
// DefaultOther.
func ResolveDims(inputs []ortrun.TensorInfo, set map[string]int64) (map[string]int64, error) {
	names, kinds := dimKinds(inputs)
	var unknown []string
	for name, v := range set {
		if _, ok := kinds[name]; !ok {
			unknown = append(unknown, name)
		}
		if v < 0 {
			return nil, fmt.Errorf("dim %s=%d: a dim cannot be negative", name, v)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		known := "none"
		if len(names) > 0 {
			known = strings.Join(names, ", ")
		}
		return nil, fmt.Errorf("no input has a symbolic dim named %s (the inputs' symbolic dims: %s)", strings.Join(unknown, ", "), known)
	}

	dims := map[string]int64{}
	var past, seq *int64
	for _, name := range names {
		k := kinds[name]
		v, ok := set[name]
		if !ok {
			switch k {
			case dimTotal:
				continue // resolved below, from past and sequence
			case dimPast:
				v = DefaultPast
			default:
				v = DimDefault(name)
			}
		}
		dims[name] = v
		switch k {
		case dimPast:
			if past == nil {
				past = &v
			}
		case dimSequence:
			if seq == nil {
				seq = &v
			}
		}
	}
	for _, name := range names {
		if _, ok := dims[name]; ok {
			continue
		}
		total := int64(0)
		if past != nil {
			total += *past
		}
		if seq != nil {
			total += *seq
		} else {
			total += DefaultSequence
		}
		dims[name] = total
	}
	return dims, nil
}

// dimName returns the symbolic name of dim i of in, or "".
func dimName(in ortrun.TensorInfo, i int) string {
	if i < len(in.DimNames) {
		return in.DimNames[i]
	}
	return ""
}

// shapeFor fills in the symbolic dims of an input's shape.
func shapeFor(in ortrun.TensorInfo, dims map[string]int64) []int64 {
	shape := make([]int64, len(in.Shape))
	for i, d := range in.Shape {
		if d >= 0 {
			shape[i] = d
			continue
		}
		if v, ok := dims[dimName(in, i)]; ok {
			shape[i] = v
		} else {
			shape[i] = DefaultOther
		}
	}
	return shape
}

// pastLength is the first past-like dim's value, the offset of position ids.
func pastLength(inputs []ortrun.TensorInfo, dims map[string]int64) int64 {
	names, kinds := dimKinds(inputs)
	for _, name := range names {
		if kinds[name] == dimPast {
			return dims[name]
		}
	}
	return 0
}

// How an input's values are made.
const (
	genFile      = "file"
	genNormal    = "normal"
	genIndex     = "index"
	genMask      = "mask"
	genPositions = "positions"
	genBool      = "bool"
)

// InputPlan says how one graph input is filled.
type InputPlan struct {
	// Name, DType and Shape are those of the tensor fed to both models,
	// with symbolic dims resolved.
	Name  string       `json:"name"`
	DType ortrun.DType `json:"-"`
	Shape []int64      `json:"shape"`
	// Source describes the values: "file", "normal" (N(0,1) floats),
	// "index" (integers in [0, High)), "mask" (0/1), "positions" (0, 1, ...
	// along the last axis, offset by the past length) or "bool".
	Source string `json:"source"`
	// High is the exclusive upper bound of "index" values.
	High int64 `json:"high,omitempty"`
	// Why explains the choice, e.g. the embedding a bound comes from.
	Why string `json:"why,omitempty"`

	offset int64         // first position id
	fixed  ortrun.Tensor // the file's tensor, for Source "file"
}

// Describe is a one-line description such as "random integers in [0, 64)
// (rows of embed.weight [64 32])".
func (p InputPlan) Describe() string {
	var s string
	switch p.Source {
	case genFile:
		s = "from the inputs file"
	case genNormal:
		s = "random N(0,1)"
	case genIndex:
		s = fmt.Sprintf("random integers in [0, %d)", p.High)
	case genMask:
		s = "random 0/1 mask, first and last position of each row 1"
	case genPositions:
		s = fmt.Sprintf("positions %d, %d, ... along the last axis", p.offset, p.offset+1)
	case genBool:
		s = "random true/false"
	default:
		s = p.Source
	}
	if p.Why != "" {
		s += " (" + p.Why + ")"
	}
	return s
}

// planInputs decides how every input is filled. bounds holds index ranges
// inferred from the graph (IndexBounds); fixed holds the inputs file's
// tensors, already converted to the inputs' dtypes.
func planInputs(inputs []ortrun.TensorInfo, dims map[string]int64, bounds map[string]Bound, fixed map[string]ortrun.Tensor) ([]InputPlan, error) {
	past := pastLength(inputs, dims)
	plans := make([]InputPlan, 0, len(inputs))
	var total int64 // bytes of the random inputs so far
	for _, in := range inputs {
		p := InputPlan{Name: in.Name, DType: in.DType, Shape: shapeFor(in, dims)}
		lower := strings.ToLower(in.Name)
		integer := !in.DType.IsFloat() && in.DType != ortrun.Bool
		if t, ok := fixed[in.Name]; ok {
			p.Source, p.fixed, p.Shape = genFile, t, t.Shape
			plans = append(plans, p)
			continue
		}
		if in.DType == ortrun.String || in.DType.Bits() == 0 || (integer && !isPlainInt(in.DType)) {
			return nil, fmt.Errorf("cannot make random values for input %q of type %v; give it in an inputs file", in.Name, in.DType)
		}
		b, hasBound := bounds[in.Name]
		switch {
		case integer && strings.Contains(lower, "position"):
			// Before bounds: a position table bounds these too, but
			// random positions are not what a model is ever fed.
			p.Source, p.offset = genPositions, past
			if past > 0 {
				p.Why = fmt.Sprintf("after %d past positions", past)
			}
		case integer && hasBound:
			p.Source, p.High, p.Why = genIndex, b.High, b.Why
		case strings.Contains(lower, "mask"):
			p.Source = genMask
		case integer:
			p.Source, p.High = genIndex, 4
			p.Why = "no embedding found for this input"
		case in.DType == ortrun.Bool:
			p.Source = genBool
		default:
			p.Source = genNormal
		}
		plans = append(plans, p)
		// Generated inputs take float64 values and then their own type's
		// bytes; refuse dims that cannot fit rather than die out of memory.
		n, err := ortrun.NumElements(p.Shape)
		if err != nil || n > math.MaxInt64/32-total {
			return nil, fmt.Errorf("input %q %v holds too many elements; give smaller dims with --dim NAME=VALUE", in.Name, p.Shape)
		}
		total += n * (8 + int64(max(in.DType.Bits(), 8)/8))
		if err := graph.CheckAlloc(total, fmt.Sprintf("input %q %v", in.Name, p.Shape)); err != nil {
			return nil, fmt.Errorf("%w; give smaller dims with --dim NAME=VALUE", err)
		}
	}
	return plans, nil
}

// isPlainInt reports whether d is an integer type FromFloat64 can build.
func isPlainInt(d ortrun.DType) bool {
	switch d {
	case ortrun.Int8, ortrun.Uint8, ortrun.Int16, ortrun.Uint16, ortrun.Int32, ortrun.Uint32, ortrun.Int64, ortrun.Uint64:
		return true
	}
	return false
}

// generate makes one set of inputs. Each input draws from its own stream
// seeded by (seed, sample, input index), so the values of one input do not
// depend on the others.
func generate(plans []InputPlan, seed uint64, sample int) ([]ortrun.Tensor, error) {
	out := make([]ortrun.Tensor, 0, len(plans))
	for i, p := range plans {
		if p.Source == genFile {
			out = append(out, p.fixed)
			continue
		}
		rng := rand.New(rand.NewPCG(seed, uint64(sample)<<32|uint64(i)))
		n, err := ortrun.NumElements(p.Shape)
		if err != nil {
			return nil, fmt.Errorf("input %q: %w", p.Name, err)
		}
		vals := make([]float64, n)
		last := int64(1)
		if len(p.Shape) > 0 {
			last = p.Shape[len(p.Shape)-1]
		}
		for j := range vals {
			col := int64(j)
			if last > 0 {
				col %= last
			}
			switch p.Source {
			case genNormal:
				vals[j] = rng.NormFloat64()
			case genIndex:
				vals[j] = float64(rng.Int64N(max(p.High, 1)))
			case genMask:
				// First and last kept at 1 so no row is fully masked: a
				// fully masked softmax is NaN in some kernels, and NaN
				// matches NaN, which would hide every difference.
				if col == 0 || col == last-1 {
					vals[j] = 1
				} else {
					vals[j] = float64(rng.IntN(2))
				}
			case genPositions:
				vals[j] = float64(p.offset + col)
			case genBool:
				vals[j] = float64(rng.IntN(2))
			}
		}
		t, err := ortrun.FromFloat64(p.Name, p.DType, p.Shape, vals)
		if err != nil {
			return nil, fmt.Errorf("input %q: %w", p.Name, err)
		}
		out = append(out, t)
	}
	return out, nil
}

// Bound is an exclusive upper bound for an integer input's values, found
// in the graph.
type Bound struct {
	// High is the table's size along the gathered axis.
	High int64
	// Why names the table, e.g. "rows of embed_tokens.weight [64 32]".
	Why string
}

// passThrough lists ops that carry index values unchanged (or reshaped) to
// where they are used, so a bound is still found behind them.
var passThrough = map[string]bool{
	"Cast": true, "Identity": true, "Reshape": true, "Unsqueeze": true,
	"Squeeze": true, "Flatten": true, "Expand": true, "Slice": true, "Transpose": true,
}

// IndexBounds finds, for the graph inputs of the model at path that are
// used as indices into a constant table, the table's size along the
// gathered axis: the vocabulary of input_ids, the number of token types,
// the number of learned positions. It follows the input through Cast,
// Reshape and similar ops to a Gather on a constant (the data input, through
// Identity/Cast/Transpose) or to com.microsoft EmbedLayerNormalization. An
// input used by several tables gets the smallest bound. The model's weights
// are not read.
func IndexBounds(path string) (map[string]Bound, error) {
	m, err := graph.Load(path)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	return indexBounds(m), nil
}

func indexBounds(m *graph.Model) map[string]Bound {
	g := m.Graph()
	bounds := map[string]Bound{}
	add := func(input string, high int64, why string) {
		if high <= 0 {
			return
		}
		if b, ok := bounds[input]; !ok || high < b.High {
			bounds[input] = Bound{High: high, Why: why}
		}
	}
	for _, vi := range m.Proto.Graph.Input {
		input := vi.GetName()
		if t, _ := g.Initializer(input); t != nil {
			continue // an overridable initializer, not a real input
		}
		frontier := []string{input}
		seen := map[string]bool{input: true}
		for depth := 0; depth < 6 && len(frontier) > 0; depth++ {
			var next []string
			for _, v := range frontier {
				for _, n := range g.Consumers(v) {
					op := n.GetOpType()
					dom := n.GetDomain()
					switch {
					case (dom == "" || dom == "ai.onnx") && op == "Gather" && len(n.Input) >= 2 && n.Input[1] == v:
						var d []int64
						var table string
						if w := g.ResolveWeight(n.Input[0]); w != nil {
							d, table = w.Dims(), w.Name
						} else if t, _ := g.Initializer(n.Input[0]); t != nil {
							// An initializer that is also a graph input:
							// its default size is the best guess.
							d, table = t.Dims, t.GetName()
						} else {
							continue
						}
						axis := graph.AttrInt(n, "axis", 0)
						if axis < 0 {
							axis += int64(len(d))
						}
						if axis >= 0 && axis < int64(len(d)) {
							add(input, d[axis], fmt.Sprintf("rows of %s %v", table, d))
						}
					case dom == "com.microsoft" && op == "EmbedLayerNormalization":
						// inputs: input_ids, segment_ids, word_embedding,
						// position_embedding, segment_embedding, ...
						for slot, table := range map[int]int{0: 2, 1: 4} {
							if slot < len(n.Input) && n.Input[slot] == v && table < len(n.Input) {
								if w := g.ResolveWeight(n.Input[table]); w != nil && len(w.Dims()) > 0 {
									add(input, w.Dims()[0], fmt.Sprintf("rows of %s %v", w.Name, w.Dims()))
								}
							}
						}
					case (dom == "" || dom == "ai.onnx") && passThrough[op] && len(n.Input) > 0 && n.Input[0] == v:
						for _, o := range n.Output {
							if o != "" && !seen[o] {
								seen[o] = true
								next = append(next, o)
							}
						}
					}
				}
			}
			frontier = next
		}
	}
	return bounds
}

// weightDType returns the narrowest float type among the model's weight
// matrices (float tensors of rank 2 or more), or Undefined when it has none.
// A merge rounds W + s·A·B to this type, so outputs can differ from the
// unmerged model by about its precision even when they are float32.
func weightDType(m *graph.Model) ortrun.DType {
	narrowest := ortrun.Undefined
	m.Tensors(func(t *onnxpb.TensorProto) {
		d := ortrun.DType(t.GetDataType())
		if len(t.Dims) < 2 || !d.IsFloat() {
			return
		}
		if narrowest == ortrun.Undefined || precision(d) < precision(narrowest) {
			narrowest = d
		}
	})
	return narrowest
}

// precision orders the float types by their significand bits.
func precision(d ortrun.DType) int {
	switch d {
	case ortrun.BFloat16:
		return 8
	case ortrun.Float16:
		return 11
	case ortrun.Float32:
		return 24
	case ortrun.Float64:
		return 53
	}
	return 0
}

// graphFacts is what Compare learns from a model's graph: index bounds of
// its inputs and the type its weights are stored in.
type graphFacts struct {
	bounds  map[string]Bound
	weights ortrun.DType
}

// readFacts reads the graph facts of the model at path. A model the graph
// package cannot read still runs in ORT; it just gets no facts.
func readFacts(path string) graphFacts {
	m, err := graph.Load(path)
	if err != nil {
		return graphFacts{}
	}
	defer m.Close()
	return graphFacts{bounds: indexBounds(m), weights: weightDType(m)}
}

// mergeBounds keeps, per input, the smaller bound of a and b, so values are
// valid in both models.
func mergeBounds(a, b map[string]Bound) map[string]Bound {
	out := map[string]Bound{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if o, ok := out[k]; !ok || v.High < o.High {
			out[k] = v
		}
	}
	return out
}

// nonFinite reports whether a float tensor holds a NaN or an infinity.
func nonFinite(t ortrun.Tensor) bool {
	if !t.DType.IsFloat() {
		return false
	}
	vals, err := t.Float64s()
	if err != nil {
		return false
	}
	return slices.ContainsFunc(vals, func(v float64) bool { return math.IsNaN(v) || math.IsInf(v, 0) })
}
