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
