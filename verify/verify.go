// Package verify checks that two ONNX models compute the same function by
// running both in ONNX Runtime on the same inputs and comparing every
// output: an injected model against its base (untrained adapters change
// nothing), a merged model against the unmerged one (merging changes
// nothing but speed). It is what `onnxlora verify` runs.
//
// Inputs are random, shaped from the models' graph inputs (see ResolveDims
// and DimDefault for symbolic dims, and InputPlan for the values each kind
// of input gets), or read from a file (ReadInputs). Outputs are compared
// with numpy.allclose's rule, |b - a| <= atol + rtol*|a|, A being the
// reference.
//
// Like package ortrun it needs the ONNX Runtime library at run time
// (scripts/install-ort.sh, or ONNXLORA_ORT_LIB); errors wrap
// ortrun.ErrNoLibrary when it is missing.
package verify

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/onnxlora/onnxlora/ortrun"
)

// Defaults of Options.
const (
	// DefaultWarmup is how many runs of each model precede timing: the
	// first runs allocate buffers and are much slower.
	DefaultWarmup = 2
	// DefaultTimedRuns is the minimum number of timed runs of each model;
	// with fewer samples, inputs are reused to reach it.
	DefaultTimedRuns = 5
)

// Options tunes Compare. The zero value runs one sample with seed 0 and
// per-dtype tolerances.
type Options struct {
	// Samples is how many input sets to run (default 1). Each is drawn
	// afresh; inputs given in a file are the same in every sample.
	Samples int
	// Seed makes the random inputs reproducible.
	Seed uint64
	// RTol and ATol, when not nil, replace the per-dtype defaults of
	// ToleranceFor for every output.
	RTol, ATol *float64
	// Dims gives values to symbolic dims by name, like --dim batch=1.
	Dims map[string]int64
	// InputsFile names a file of fixed inputs (see ReadInputs); inputs it
	// does not give are random. Its shapes also set the symbolic dims they
	// use.
	InputsFile string
	// Inputs are fixed inputs given directly, with the same role as
	// InputsFile (which wins for a name in both).
	Inputs []ortrun.Tensor
	// Warmup is the number of untimed runs of each model before timing:
	// 0 means DefaultWarmup, a negative value none.
	Warmup int
	// TimedRuns is the minimum number of timed runs per model: 0 means
	// DefaultTimedRuns. Latency is the median of max(Samples, TimedRuns)
	// runs.
	TimedRuns int
	// Session configures both ORT sessions (nil means ortrun's defaults:
	// one intra-op thread, all optimizations).
	Session *ortrun.Options
	// Adapter names an .onnx_adapter file made active on every run of
	// model B (ONNX Runtime's RunOptionsAddActiveLoraAdapter), so B, an
	// adapter-input model, is checked with that adapter against A, e.g.
	// the base merged with it. Its parameters must be inputs of B of the
	// same type and a fitting shape.
	Adapter string
}

// DefaultTolerance returns the rtol and atol used for outputs of type d
// when Options leaves them unset. They allow for the rounding of merged
// weights (W + s·A·B rounded once to the weight's type, against
// x·W + s·(x·A)·B computed unmerged) and a different order of operations,
// amplified through the network, and not much more:
//
//	float64            rtol 1e-7  atol 1e-9
//	float32            rtol 1e-3  atol 1e-4
//	float16            rtol 1e-2  atol 1e-2
//	bfloat16           rtol 5e-2  atol 5e-2
//	integers and bool  exact
//
// Most float32 models differ by less than 1e-6 after a merge, but deep or
// poorly conditioned ones reach 2e-4 on outputs of magnitude 30 (a
// one-ulp change of three weights moves them by 4e-5). A merge that is
// wrong, such as a transposed delta, moves outputs by 1e-2 and more.
func DefaultTolerance(d ortrun.DType) (rtol, atol float64) {
	switch d {
	case ortrun.Float64:
		return 1e-7, 1e-9
	case ortrun.Float32:
		return 1e-3, 1e-4
	case ortrun.Float16:
		return 1e-2, 1e-2
	case ortrun.BFloat16:
		return 5e-2, 5e-2
	}
	if d == ortrun.Bool || isPlainInt(d) {
		return 0, 0
	}
	return 1e-1, 1e-1 // float8 and other narrow formats
}

// ToleranceFor returns the default rtol and atol for an output of type
// out of models whose weights are stored in the given types (Undefined for
// unknown): the looser of DefaultTolerance for the output and for the
// narrowest weight type. A model with bfloat16 weights and float32 outputs
// gets bfloat16 tolerances, since merging rounds each weight to bfloat16.
func ToleranceFor(out ortrun.DType, weights ...ortrun.DType) (rtol, atol float64) {
	rtol, atol = DefaultTolerance(out)
	if !out.IsFloat() {
		return rtol, atol
	}
	for _, w := range weights {
		if w.IsFloat() && precision(w) < precision(out) {
			r, a := DefaultTolerance(w)
			rtol, atol = math.Max(rtol, r), math.Max(atol, a)
		}
	}
	return rtol, atol
}

// Report is the result of Compare.
type Report struct {
	// A is the reference model, B the one checked against it.
	A, B string
	// Adapter is the .onnx_adapter file active on B's runs, if any.
	Adapter string
	// Samples is the number of input sets compared; Seed drew them.
	Samples int
	Seed    uint64
	// Dims holds the value of every symbolic input dim.
	Dims map[string]int64
	// Inputs says how each input was filled, in A's input order.
	Inputs []InputPlan
	// Outputs holds one comparison per output, in A's output order.
	Outputs []OutputReport
	// LatencyA and LatencyB are the median run times of the models.
	LatencyA, LatencyB time.Duration
	// TimedRuns is the number of timed runs behind each median.
	TimedRuns int
	// Warnings are things worth knowing that do not fail the comparison,
	// such as NaNs in an output (NaN matches NaN).
	Warnings []string
	// Pass is true when every output of every sample is within tolerance.
	Pass bool
}

// OutputReport compares one output over all samples.
type OutputReport struct {
	// Name and DType are the output's, the same in both models.
	Name  string
	DType ortrun.DType
	// Shape is the output's shape in A for the last sample.
	Shape []int64
	// RTol and ATol are the tolerances applied.
	RTol, ATol float64
	// MaxAbs is the largest |b - a| and MaxRel the largest |b - a|/|a|
	// (over a != 0), both over all samples; +Inf when a NaN meets a number
	// or the shapes differ.
	MaxAbs, MaxRel float64
	// FailedSamples counts the samples in which the output was not within
	// tolerance.
	FailedSamples int
	// Problem is set when the output could not be compared element-wise,
	// e.g. "shape [2,8] in B, [2,9] in A".
	Problem string
	// Pass is true when the output matched in every sample.
	Pass bool
}

// Failed returns the outputs that did not match.
func (r *Report) Failed() []OutputReport {
	var out []OutputReport
	for _, o := range r.Outputs {
		if !o.Pass {
			out = append(out, o)
		}
	}
	return out
}

// jsonFloat encodes NaN and infinities, which JSON numbers cannot hold, as
// the strings "NaN", "+Inf" and "-Inf".
type jsonFloat float64

func (f jsonFloat) MarshalJSON() ([]byte, error) {
	v := float64(f)
	switch {
	case math.IsNaN(v):
		return []byte(`"NaN"`), nil
	case math.IsInf(v, 1):
		return []byte(`"+Inf"`), nil
	case math.IsInf(v, -1):
		return []byte(`"-Inf"`), nil
	}
	return json.Marshal(v)
}

// MarshalJSON writes the report with snake_case keys, dtypes as names,
// latencies in milliseconds ("latency_ms": {"a": .., "b": ..}) and
// non-finite errors as the strings "NaN", "+Inf", "-Inf".
func (r *Report) MarshalJSON() ([]byte, error) {
	type input struct {
		InputPlan
		DType       string `json:"dtype"`
		Description string `json:"description"`
	}
	type output struct {
		Name          string    `json:"name"`
		DType         string    `json:"dtype"`
		Shape         []int64   `json:"shape"`
		RTol          float64   `json:"rtol"`
		ATol          float64   `json:"atol"`
		MaxAbs        jsonFloat `json:"max_abs"`
		MaxRel        jsonFloat `json:"max_rel"`
		FailedSamples int       `json:"failed_samples"`
		Problem       string    `json:"problem,omitempty"`
		Pass          bool      `json:"pass"`
	}
	ins := make([]input, len(r.Inputs))
	for i, p := range r.Inputs {
		ins[i] = input{InputPlan: p, DType: p.DType.String(), Description: p.Describe()}
	}
	outs := make([]output, len(r.Outputs))
	for i, o := range r.Outputs {
		outs[i] = output{o.Name, o.DType.String(), o.Shape, o.RTol, o.ATol, jsonFloat(o.MaxAbs), jsonFloat(o.MaxRel), o.FailedSamples, o.Problem, o.Pass}
	}
	ms := func(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }
	return json.Marshal(struct {
		A         string             `json:"a"`
		B         string             `json:"b"`
		Adapter   string             `json:"adapter,omitempty"`
		Pass      bool               `json:"pass"`
		Samples   int                `json:"samples"`
		Seed      uint64             `json:"seed"`
		Dims      map[string]int64   `json:"dims"`
		Inputs    []input            `json:"inputs"`
		Outputs   []output           `json:"outputs"`
		Latency   map[string]float64 `json:"latency_ms"`
		TimedRuns int                `json:"timed_runs"`
		Warnings  []string           `json:"warnings"`
	}{r.A, r.B, r.Adapter, r.Pass, r.Samples, r.Seed, r.Dims, ins, outs,
		map[string]float64{"a": ms(r.LatencyA), "b": ms(r.LatencyB)}, r.TimedRuns, nonNil(r.Warnings)})
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// Compare runs the models at paths a (the reference) and b on the same
// inputs and compares every output. The models must have the same inputs
// (names, dtypes, compatible shapes) and outputs (names, dtypes); an error
// says which differ. Differences in values are not errors: they show in
// the report, whose Pass is then false.
func Compare(a, b string, opts Options) (*Report, error) {
	samples := opts.Samples
	if samples <= 0 {
		samples = 1
	}
	warmup := opts.Warmup
	if warmup == 0 {
		warmup = DefaultWarmup
	}
	timed := opts.TimedRuns
	if timed <= 0 {
		timed = DefaultTimedRuns
	}
	timed = max(timed, samples)
	if (opts.RTol != nil && (*opts.RTol < 0 || math.IsNaN(*opts.RTol))) || (opts.ATol != nil && (*opts.ATol < 0 || math.IsNaN(*opts.ATol))) {
		return nil, fmt.Errorf("tolerances must be non-negative numbers")
	}

	// Read the inputs file before loading ORT, so that its errors come
	// first and do not need the library.
	var fileInputs []ortrun.Tensor
	if opts.InputsFile != "" {
		var err error
		if fileInputs, err = ReadInputs(opts.InputsFile); err != nil {
			return nil, err
		}
	}
	if err := ortrun.Init(); err != nil {
		return nil, err
	}
	sa, err := ortrun.Open(a, opts.Session)
	if err != nil {
		return nil, err
	}
	defer sa.Close()
	sb, err := ortrun.Open(b, opts.Session)
	if err != nil {
		return nil, err
	}
	defer sb.Close()
	if err := checkCompatible(a, b, sa, sb); err != nil {
		return nil, err
	}
	var runB ortrun.RunOptions
	if opts.Adapter != "" {
		ad, err := ortrun.LoadAdapter(opts.Adapter)
		if err != nil {
			return nil, err
		}
		defer ad.Close()
		if err := adapterFits(ad, sb); err != nil {
			return nil, err
		}
		runB.Adapters = []*ortrun.Adapter{ad}
	}
	inputs := sa.Inputs()
	for _, in := range inputs {
		if !in.IsTensor {
			return nil, fmt.Errorf("%s: input %q is not a tensor; only tensor inputs can be fed", a, in.Name)
		}
	}

	fixed, dims, err := bindFixed(a, inputs, append(slices.Clone(opts.Inputs), fileInputs...), opts.Dims)
	if err != nil {
		return nil, err
	}
	if dims, err = ResolveDims(inputs, dims); err != nil {
		return nil, err
	}
	// Index bounds come from both graphs, so ids are valid in each.
	fa, fb := readFacts(a), readFacts(b)
	plans, err := planInputs(inputs, dims, mergeBounds(fa.bounds, fb.bounds), fixed)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", a, err)
	}

	rep := &Report{A: a, B: b, Adapter: opts.Adapter, Samples: samples, Seed: opts.Seed, Dims: dims, Inputs: plans, TimedRuns: timed}
	outInfos := sa.Outputs()
	rep.Outputs = make([]OutputReport, len(outInfos))
	for i, o := range outInfos {
		rtol, atol := ToleranceFor(o.DType, fa.weights, fb.weights)
		if opts.RTol != nil {
			rtol = *opts.RTol
		}
		if opts.ATol != nil {
			atol = *opts.ATol
		}
		rep.Outputs[i] = OutputReport{Name: o.Name, DType: o.DType, RTol: rtol, ATol: atol, Pass: true}
	}
	outNames := make([]string, len(outInfos))
	for i, o := range outInfos {
		outNames[i] = o.Name
	}

	var timesA, timesB []time.Duration
	run := func(s *ortrun.Session, ins []ortrun.Tensor, times *[]time.Duration) ([]ortrun.Tensor, error) {
		start := time.Now()
		var outs []ortrun.Tensor
		var err error
		if s == sb {
			outs, err = s.RunWith(ins, outNames, runB)
		} else {
			outs, err = s.RunOutputs(ins, outNames)
		}
		if times != nil {
			*times = append(*times, time.Since(start))
		}
		if err != nil {
			return nil, fmt.Errorf("%w (inputs: %s)", err, describeShapes(ins))
		}
		return outs, nil
	}
	warned := map[string]bool{}
	warn := func(format string, args ...any) {
		w := fmt.Sprintf(format, args...)
		if !warned[w] {
			warned[w] = true
			rep.Warnings = append(rep.Warnings, w)
		}
	}

	var first []ortrun.Tensor
	for i := 0; i < timed; i++ {
		var ins []ortrun.Tensor
		if i < samples {
			if ins, err = generate(plans, opts.Seed, i); err != nil {
				return nil, err
			}
			if i == 0 {
				first = ins
				for w := 0; w < warmup; w++ {
					if _, err := run(sa, ins, nil); err != nil {
						return nil, err
					}
					if _, err := run(sb, ins, nil); err != nil {
						return nil, err
					}
				}
			}
		} else {
			// Extra timed runs only; reuse the first inputs.
			ins = first
		}
		// Alternate which model goes first, so neither always runs on a
		// cache the other warmed.
		var outA, outB []ortrun.Tensor
		if i%2 == 0 {
			if outA, err = run(sa, ins, &timesA); err == nil {
				outB, err = run(sb, ins, &timesB)
			}
		} else {
			if outB, err = run(sb, ins, &timesB); err == nil {
				outA, err = run(sa, ins, &timesA)
			}
		}
		if err != nil {
			return nil, err
		}
		if i >= samples {
			continue
		}
		for j := range rep.Outputs {
			compareOutput(&rep.Outputs[j], outA[j], outB[j], i, warn)
		}
	}
	rep.LatencyA, rep.LatencyB = median(timesA), median(timesB)
	rep.Pass = true
	for _, o := range rep.Outputs {
		rep.Pass = rep.Pass && o.Pass
	}
	return rep, nil
}

// adapterFits checks every parameter of adapter ad against the inputs of
// the model of session s (overridable initializers included): present,
// same element type, a shape the input accepts.
func adapterFits(ad *ortrun.Adapter, s *ortrun.Session) error {
	infos := map[string]ortrun.TensorInfo{}
	var names []string
	for _, in := range append(s.Inputs(), s.OverridableInitializers()...) {
		infos[in.Name] = in
		if strings.Contains(in.Name, "lora_") {
			names = append(names, in.Name)
		}
	}
	sort.Strings(names)
	for _, p := range ad.Params() {
		in, ok := infos[p.Name]
		switch {
		case !ok:
			hint := "it has no LoRA inputs: make one with 'onnxlora inject --adapter-inputs'"
			if len(names) > 0 {
				hint = "its LoRA inputs: " + strings.Join(names[:min(len(names), 4)], ", ")
				if len(names) > 4 {
					hint += fmt.Sprintf(" and %d more", len(names)-4)
				}
			}
			return fmt.Errorf("adapter %s: parameter %q is not an input of %s (%s)", ad.Name(), p.Name, s.Path(), hint)
		case in.DType != p.DType:
			return fmt.Errorf("adapter %s: parameter %q is %v, but input %q of %s is %v", ad.Name(), p.Name, p.DType, p.Name, s.Path(), in.DType)
		case !shapesAgree(p.Shape, in.Shape):
			return fmt.Errorf("adapter %s: parameter %q has shape %s, but input %q of %s is %s", ad.Name(), p.Name, formatShape(p.Shape), p.Name, s.Path(), formatInfoShape(in))
		}
	}
	return nil
}

// compareOutput folds one sample's comparison of an output into o.
func compareOutput(o *OutputReport, a, b ortrun.Tensor, sample int, warn func(string, ...any)) {
	o.Shape = a.Shape
	if nonFinite(a) {
		warn("output %s of A has NaN or infinite values (sample %d); they match only the same values in B", o.Name, sample)
	}
	if a.DType != b.DType {
		o.Problem = fmt.Sprintf("dtype %v in B, %v in A", b.DType, a.DType)
	}
	maxAbs, maxRel, ok, err := ortrun.CompareTensors(b, a, o.RTol, o.ATol)
	if err != nil {
		if !slices.Equal(a.Shape, b.Shape) {
			o.Problem = fmt.Sprintf("shape %s in B, %s in A", formatShape(b.Shape), formatShape(a.Shape))
		} else {
			o.Problem = err.Error()
		}
		maxAbs, maxRel, ok = math.Inf(1), math.Inf(1), false
	} else if math.IsInf(maxAbs, 1) && o.Problem == "" {
		// An infinite difference is a NaN or infinity on one side only:
		// say which, rather than "max abs inf".
		o.Problem = nonFiniteMismatch(a, b)
	}
	o.MaxAbs = math.Max(o.MaxAbs, maxAbs)
	o.MaxRel = math.Max(o.MaxRel, maxRel)
	if !ok {
		o.FailedSamples++
		o.Pass = false
	}
}

// nonFiniteMismatch describes where A and B disagree on NaN or infinity,
// e.g. "NaN in B where A is finite (3 values)".
func nonFiniteMismatch(a, b ortrun.Tensor) string {
	av, err1 := a.Float64s()
	bv, err2 := b.Float64s()
	if err1 != nil || err2 != nil || len(av) != len(bv) {
		return ""
	}
	kind := func(v float64) string {
		switch {
		case math.IsNaN(v):
			return "NaN"
		case math.IsInf(v, 1):
			return "+Inf"
		case math.IsInf(v, -1):
			return "-Inf"
		}
		return "finite"
	}
	counts := map[[2]string]int{}
	var order [][2]string
	for i := range av {
		ka, kb := kind(av[i]), kind(bv[i])
		if ka == kb {
			continue
		}
		k := [2]string{kb, ka}
		if counts[k] == 0 {
			order = append(order, k)
		}
		counts[k]++
	}
	var parts []string
	for _, k := range order {
		n := fmt.Sprintf("%d values", counts[k])
		if counts[k] == 1 {
			n = "1 value"
		}
		parts = append(parts, fmt.Sprintf("%s in B where A is %s (%s)", k[0], k[1], n))
	}
	return strings.Join(parts, ", ")
}

// checkCompatible requires the same input and output names and dtypes, and
// input shapes that do not contradict each other.
func checkCompatible(a, b string, sa, sb *ortrun.Session) error {
	var problems []string
	diff := func(kind string, xs, ys []ortrun.TensorInfo, shapes bool) {
		byName := map[string]ortrun.TensorInfo{}
		for _, y := range ys {
			byName[y.Name] = y
		}
		for _, x := range xs {
			y, ok := byName[x.Name]
			if !ok {
				problems = append(problems, fmt.Sprintf("%s %q of A is not in B", kind, x.Name))
				continue
			}
			delete(byName, x.Name)
			if x.DType != y.DType {
				problems = append(problems, fmt.Sprintf("%s %q is %v in A, %v in B", kind, x.Name, x.DType, y.DType))
				continue
			}
			if shapes && !shapesAgree(x.Shape, y.Shape) {
				problems = append(problems, fmt.Sprintf("%s %q is %s in A, %s in B", kind, x.Name, formatInfoShape(x), formatInfoShape(y)))
			}
		}
		var extra []string
		for name := range byName {
			extra = append(extra, name)
		}
		sort.Strings(extra)
		for _, name := range extra {
			problems = append(problems, fmt.Sprintf("%s %q of B is not in A", kind, name))
		}
	}
	diff("input", sa.Inputs(), sb.Inputs(), true)
	diff("output", sa.Outputs(), sb.Outputs(), false)
	if len(problems) == 0 {
		return nil
	}
	if len(problems) > 3 {
		problems = append(problems[:3], fmt.Sprintf("and %d more", len(problems)-3))
	}
	return fmt.Errorf("models differ in their interface, so they cannot be compared (A = %s, B = %s): %s", a, b, strings.Join(problems, "; "))
}

// shapesAgree reports whether two declared shapes can hold the same tensor.
func shapesAgree(x, y []int64) bool {
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		if x[i] >= 0 && y[i] >= 0 && x[i] != y[i] {
			return false
		}
	}
	return true
}

// bindFixed matches fixed inputs to the model's inputs, converts them to
// the inputs' dtypes and returns them with the dims they set, merged with
// the user's dims.
func bindFixed(model string, inputs []ortrun.TensorInfo, tensors []ortrun.Tensor, userDims map[string]int64) (map[string]ortrun.Tensor, map[string]int64, error) {
	dims := map[string]int64{}
	for k, v := range userDims {
		dims[k] = v
	}
	byName := map[string]ortrun.TensorInfo{}
	var names []string
	for _, in := range inputs {
		byName[in.Name] = in
		names = append(names, in.Name)
	}
	fixed := map[string]ortrun.Tensor{}
	from := map[string]string{} // dim name -> the input that set it
	for _, t := range tensors {
		in, ok := byName[t.Name]
		if !ok {
			return nil, nil, fmt.Errorf("fixed input %q is not an input of %s (its inputs: %s)", t.Name, model, strings.Join(names, ", "))
		}
		c, err := conform(t, in)
		if err != nil {
			return nil, nil, err
		}
		fixed[t.Name] = c
		for i, d := range in.Shape {
			name := dimName(in, i)
			if d >= 0 || name == "" {
				continue
			}
			v := c.Shape[i]
			if old, ok := dims[name]; ok && old != v {
				src := "--dim"
				if from[name] != "" {
					src = "input " + from[name]
				}
				return nil, nil, fmt.Errorf("dim %s is %d in input %q but %d in %s", name, v, t.Name, old, src)
			}
			dims[name] = v
			if from[name] == "" {
				if _, user := userDims[name]; !user {
					from[name] = t.Name
				}
			}
		}
	}
	return fixed, dims, nil
}

// median returns the middle value (the mean of the two middle ones for an
// even count), or 0 for none.
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// formatShape renders a shape as [2,8,64].
func formatShape(shape []int64) string {
	parts := make([]string, len(shape))
	for i, d := range shape {
		parts[i] = fmt.Sprint(d)
	}
	return "[" + strings.Join(parts, ",") + "]"
}

// describeShapes lists inputs as name:dtype[shape], for run errors.
func describeShapes(ins []ortrun.Tensor) string {
	parts := make([]string, len(ins))
	for i, t := range ins {
		parts[i] = fmt.Sprintf("%s %v%s", t.Name, t.DType, formatShape(t.Shape))
	}
	return strings.Join(parts, ", ")
}
