package verify

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/onnxlora/onnxlora/ortrun"
)

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
