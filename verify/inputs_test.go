package verify

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
)

// info builds a TensorInfo; dims are int (fixed) or string (symbolic).
func info(name string, dt ortrun.DType, dims ...any) ortrun.TensorInfo {
	in := ortrun.TensorInfo{Name: name, DType: dt, IsTensor: true}
	for _, d := range dims {
		switch v := d.(type) {
		case int:
			in.Shape = append(in.Shape, int64(v))
			in.DimNames = append(in.DimNames, "")
		case string:
			in.Shape = append(in.Shape, -1)
			in.DimNames = append(in.DimNames, v)
		}
	}
	return in
}

// decoderInputs are the inputs of an onnxruntime-genai style decoder.
func decoderInputs() []ortrun.TensorInfo {
	return []ortrun.TensorInfo{
		info("input_ids", ortrun.Int64, "batch_size", "sequence_length"),
		info("attention_mask", ortrun.Int64, "batch_size", "total_sequence_length"),
		info("position_ids", ortrun.Int64, "batch_size", "sequence_length"),
		info("past_key_values.0.key", ortrun.Float16, "batch_size", 2, "past_sequence_length", 16),
		info("past_key_values.0.value", ortrun.Float16, "batch_size", 2, "past_sequence_length", 16),
	}
}

func TestDimDefault(t *testing.T) {
	for name, want := range map[string]int64{
		"batch": 2, "batch_size": 2, "sequence": 8, "sequence_length": 8, "seq_len": 8,
		"max_seq_len_in_batch": 8, "past_sequence_length": 0, "past_seq_len": 0,
		"total_sequence_length": 8, "num_tokens": 8, "": 1, "N": 1, "unk__12": 1,
	} {
		if got := DimDefault(name); got != want {
			t.Errorf("DimDefault(%q) = %d, want %d", name, got, want)
		}
	}
}

func TestResolveDims(t *testing.T) {
	ins := decoderInputs()
	for _, tc := range []struct {
		set  map[string]int64
		want map[string]int64
	}{
		{nil, map[string]int64{"batch_size": 2, "sequence_length": 8, "past_sequence_length": 0, "total_sequence_length": 8}},
		{map[string]int64{"sequence_length": 5}, map[string]int64{"batch_size": 2, "sequence_length": 5, "past_sequence_length": 0, "total_sequence_length": 5}},
		{map[string]int64{"past_sequence_length": 3, "batch_size": 1}, map[string]int64{"batch_size": 1, "sequence_length": 8, "past_sequence_length": 3, "total_sequence_length": 11}},
		{map[string]int64{"total_sequence_length": 20}, map[string]int64{"batch_size": 2, "sequence_length": 8, "past_sequence_length": 0, "total_sequence_length": 20}},
	} {
		got, err := ResolveDims(ins, tc.set)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ResolveDims(%v) = %v, want %v", tc.set, got, tc.want)
		}
	}

	// GPT-2 exports name the cache length plain seq_len; only past_*
	// inputs use it, so it is a past length.
	gpt2 := []ortrun.TensorInfo{
		info("input_ids", ortrun.Int64, "batch_size", 1),
		info("past_0", ortrun.Float32, 2, "batch_size", 2, "seq_len", 2),
	}
	got, err := ResolveDims(gpt2, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]int64{"batch_size": 2, "seq_len": 0}; !reflect.DeepEqual(got, want) {
		t.Errorf("gpt2 dims = %v, want %v", got, want)
	}

	_, err = ResolveDims(ins, map[string]int64{"sequence": 4})
	if err == nil || !strings.Contains(err.Error(), "no input has a symbolic dim named sequence") || !strings.Contains(err.Error(), "sequence_length") {
		t.Errorf("unknown dim: err = %v", err)
	}
	if _, err := ResolveDims(ins, map[string]int64{"batch_size": -1}); err == nil {
		t.Error("negative dim accepted")
	}
}

func TestPlanAndGenerate(t *testing.T) {
	ins := append(decoderInputs(),
		info("pixel_values", ortrun.BFloat16, "batch_size", 3),
		info("use_cache", ortrun.Bool, 4),
		info("step", ortrun.Int32),
	)
	dims, err := ResolveDims(ins, map[string]int64{"past_sequence_length": 3, "sequence_length": 5})
	if err != nil {
		t.Fatal(err)
	}
	bounds := map[string]Bound{"input_ids": {High: 64, Why: "rows of embed"}, "position_ids": {High: 32}}
	plans, err := planInputs(ins, dims, bounds, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantPlans := []struct {
		source string
		shape  []int64
	}{
		{genIndex, []int64{2, 5}}, {genMask, []int64{2, 8}}, {genPositions, []int64{2, 5}},
		{genNormal, []int64{2, 2, 3, 16}}, {genNormal, []int64{2, 2, 3, 16}},
		{genNormal, []int64{2, 3}}, {genBool, []int64{4}}, {genIndex, []int64{}},
	}
	for i, p := range plans {
		if p.Source != wantPlans[i].source || !slices.Equal(p.Shape, wantPlans[i].shape) {
			t.Errorf("plan %s = %s %v, want %s %v", p.Name, p.Source, p.Shape, wantPlans[i].source, wantPlans[i].shape)
		}
		if p.Describe() == "" {
			t.Errorf("plan %s has no description", p.Name)
		}
	}
	if plans[0].High != 64 || plans[7].High != 4 {
		t.Errorf("bounds: input_ids %d, step %d", plans[0].High, plans[7].High)
	}

	set0, err := generate(plans, 7, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i, ten := range set0 {
		if ten.Name != plans[i].Name || ten.DType != plans[i].DType || !slices.Equal(ten.Shape, plans[i].Shape) {
			t.Fatalf("tensor %d is %s %v%v, plan %s %v%v", i, ten.Name, ten.DType, ten.Shape, plans[i].Name, plans[i].DType, plans[i].Shape)
		}
		if err := ten.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	vals := func(ten ortrun.Tensor) []float64 {
		v, err := ten.Float64s()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	ids := vals(set0[0])
	if slices.Min(ids) < 0 || slices.Max(ids) >= 64 || slices.Min(ids) == slices.Max(ids) {
		t.Errorf("input_ids not random in [0,64): %v", ids)
	}
	mask := vals(set0[1])
	for r := 0; r < 2; r++ {
		row := mask[r*8 : r*8+8]
		if row[0] != 1 || row[7] != 1 {
			t.Errorf("mask row %d = %v: first and last must be 1", r, row)
		}
		for _, v := range row {
			if v != 0 && v != 1 {
				t.Errorf("mask value %v", v)
			}
		}
	}
	if pos := vals(set0[2]); !slices.Equal(pos, []float64{3, 4, 5, 6, 7, 3, 4, 5, 6, 7}) {
		t.Errorf("position_ids = %v, want 3..7 per row (after 3 past positions)", pos)
	}
	normal := vals(set0[3])
	mean, sq := 0.0, 0.0
	for _, v := range normal {
		mean += v
		sq += v * v
	}
	mean /= float64(len(normal))
	if std := math.Sqrt(sq/float64(len(normal)) - mean*mean); math.Abs(mean) > 0.3 || std < 0.7 || std > 1.3 {
		t.Errorf("float16 N(0,1) values: mean %g std %g", mean, std)
	}
	if set0[5].DType != ortrun.BFloat16 || len(set0[5].Data) != 2*2*3 {
		t.Errorf("bfloat16 input: %v %d bytes", set0[5].DType, len(set0[5].Data))
	}
	if v := vals(set0[7]); len(v) != 1 || v[0] < 0 || v[0] >= 4 {
		t.Errorf("scalar int input = %v", v)
	}

	again, _ := generate(plans, 7, 0)
	other, _ := generate(plans, 7, 1)
	otherSeed, _ := generate(plans, 8, 0)
	if !reflect.DeepEqual(set0, again) {
		t.Error("same seed and sample gave different inputs")
	}
	if reflect.DeepEqual(set0[3], other[3]) || reflect.DeepEqual(set0[3], otherSeed[3]) {
		t.Error("another sample or seed gave the same inputs")
	}

	if _, err := planInputs([]ortrun.TensorInfo{info("text", ortrun.String, 1)}, nil, nil, nil); err == nil || !strings.Contains(err.Error(), "inputs file") {
		t.Errorf("string input: err = %v", err)
	}
}

func TestIndexBounds(t *testing.T) {
	for _, tc := range []struct {
		model string
		want  map[string]int64
	}{
		{"tiny-gpt.onnx", map[string]int64{"input_ids": 64}},
		{"tiny-gpt-extdata/model.onnx", map[string]int64{"input_ids": 64}},
		{"tiny-bert.onnx", map[string]int64{"input_ids": 64}},
		{"mlp-gemm-transb.onnx", map[string]int64{}},
	} {
		b, err := IndexBounds(testutil.TestModel(tc.model))
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]int64{}
		for k, v := range b {
			got[k] = v.High
			if !strings.Contains(v.Why, "rows of") {
				t.Errorf("%s: %s bound has no reason: %q", tc.model, k, v.Why)
			}
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: bounds %v, want %v", tc.model, got, tc.want)
		}
	}

	// Through a Cast, and the smallest of two tables.
	path := embedModel(t, t.TempDir(), "embed.onnx", 10)
	b, err := IndexBounds(path)
	if err != nil {
		t.Fatal(err)
	}
	if b["ids"].High != 7 {
		t.Errorf("embed model: bound %+v, want 7 (the smaller table, behind a Cast)", b["ids"])
	}
}

func TestReadInputsJSON(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	p := write("in.json", `{
		"x": {"shape": [2, 2], "dtype": "float16", "data": [0.5, -1, "NaN", "-Infinity"]},
		"ids": {"data": [[1, 2, 3], [4, 5, 6]], "dtype": "INT64"},
		"flag": {"data": true, "dtype": "bool"},
		"empty": {"shape": [0, 3], "dtype": "float32", "data": []},
		"plain": {"data": [1.25, 2]}
	}`)
	ts, err := ReadInputs(p)
	if err != nil {
		t.Fatal(err)
	}
	names := []string{}
	for _, ten := range ts {
		names = append(names, ten.Name)
	}
	if !slices.Equal(names, []string{"empty", "flag", "ids", "plain", "x"}) {
		t.Fatalf("names %v", names)
	}
	byName := map[string]ortrun.Tensor{}
	for _, ten := range ts {
		byName[ten.Name] = ten
	}
	check := func(name string, dt ortrun.DType, shape []int64, want []float64) {
		t.Helper()
		ten := byName[name]
		got, err := ten.Float64s()
		if err != nil {
			t.Fatal(err)
		}
		if ten.DType != dt || !slices.Equal(ten.Shape, shape) || !slices.EqualFunc(got, want, func(a, b float64) bool { return a == b || math.IsNaN(a) && math.IsNaN(b) }) {
			t.Errorf("%s = %v%v %v, want %v%v %v", name, ten.DType, ten.Shape, got, dt, shape, want)
		}
	}
	check("x", ortrun.Float16, []int64{2, 2}, []float64{0.5, -1, math.NaN(), math.Inf(-1)})
	check("ids", ortrun.Int64, []int64{2, 3}, []float64{1, 2, 3, 4, 5, 6})
	check("flag", ortrun.Bool, []int64{}, []float64{1})
	check("empty", ortrun.Float32, []int64{0, 3}, []float64{})
	check("plain", ortrun.Float64, []int64{2}, []float64{1.25, 2})

	// The file format needs no .json extension.
	if _, err := ReadInputs(write("in.txt", ` {"a": {"data": [1]}}`)); err != nil {
		t.Errorf("JSON without .json extension: %v", err)
	}

	for text, want := range map[string]string{
		`{"x": {"shape": [3], "data": [1, 2]}}`:     "needs 3 values",
		`{"x": {"data": [[1, 2], [3]]}}`:            "different lengths",
		`{"x": {"data": [[1, 2], [[3], [4]]]}}`:     "different lengths",
		`{"x": {"data": [1, [2]]}}`:                 "different lengths",
		`{"x": {"data": [1], "dtype": "float128"}}`: "unknown dtype",
		`{"x": {"data": [1.5], "dtype": "int32"}}`:  "not a int32",
		`{"x": {"data": ["one"]}}`:                  "not a number",
		`{"x": {"shape": [1]}}`:                     "no data",
		`{"x": {"data": [1], "dtypes": "float32"}}`: "unknown field",
		`[1, 2]`:                              "not a JSON object",
		`{"x": {"data": [1], "shape": [-1]}}`: "negative",
		`{"x": {"data": {"a": 1}}}`:           "not a number or list",
		`{"x": {"data": [1, 2], "shape": [2], "dtype": 3}}`: "not a JSON object",
	} {
		_, err := ReadInputs(write("bad.json", text))
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "bad.json") {
			t.Errorf("%s: err = %v, want %q naming the file", text, err, want)
		}
	}
}

func TestReadInputsSafetensors(t *testing.T) {
	dir := t.TempDir()
	x, err := export.NewFloat32Tensor("x", export.DTypeF32, []int{2, 3}, []float32{1, 2, 3, 4, 5, 6})
	if err != nil {
		t.Fatal(err)
	}
	ids := export.TensorData{Name: "input_ids", DType: export.DTypeI64, Shape: []int{1, 2}, Data: []byte{3, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0}}
	p := filepath.Join(dir, "in.safetensors")
	if err := export.WriteSafetensors(p, []export.TensorData{x, ids}, nil); err != nil {
		t.Fatal(err)
	}
	ts, err := ReadInputs(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(ts) != 2 || ts[0].Name != "input_ids" || ts[1].Name != "x" {
		t.Fatalf("tensors %+v", ts)
	}
	if v, _ := ortrun.Values[int64](ts[0]); !slices.Equal(v, []int64{3, 9}) || !slices.Equal(ts[0].Shape, []int64{1, 2}) {
		t.Errorf("input_ids = %v %v", v, ts[0].Shape)
	}
	if v, _ := ortrun.Values[float32](ts[1]); !slices.Equal(v, []float32{1, 2, 3, 4, 5, 6}) || ts[1].DType != ortrun.Float32 {
		t.Errorf("x = %v", v)
	}

	// Without the extension the format is sniffed.
	data, _ := os.ReadFile(p)
	q := filepath.Join(dir, "inputs.bin")
	os.WriteFile(q, data, 0o644)
	if _, err := ReadInputs(q); err != nil {
		t.Errorf("sniffed safetensors: %v", err)
	}
	junk := filepath.Join(dir, "junk.bin")
	os.WriteFile(junk, []byte("not a tensor file at all"), 0o644)
	if _, err := ReadInputs(junk); err == nil || !strings.Contains(err.Error(), "neither JSON nor safetensors") {
		t.Errorf("junk file: err = %v", err)
	}
	if _, err := ReadInputs(filepath.Join(dir, "missing.json")); err == nil {
		t.Error("missing file accepted")
	}
}

func TestConformAndBind(t *testing.T) {
	ins := []ortrun.TensorInfo{
		info("input_ids", ortrun.Int64, "batch", "sequence"),
		info("x", ortrun.Float16, "batch", 4),
	}
	ids, _ := ortrun.FromFloat64("input_ids", ortrun.Float64, []int64{3, 5}, make([]float64, 15))
	fixed, dims, err := bindFixed("m.onnx", ins, []ortrun.Tensor{ids}, map[string]int64{"batch": 3})
	if err != nil {
		t.Fatal(err)
	}
	if got := fixed["input_ids"]; got.DType != ortrun.Int64 || !slices.Equal(got.Shape, []int64{3, 5}) {
		t.Errorf("converted input: %v%v", got.DType, got.Shape)
	}
	if !reflect.DeepEqual(dims, map[string]int64{"batch": 3, "sequence": 5}) {
		t.Errorf("dims %v", dims)
	}

	frac, _ := ortrun.FromFloat64("input_ids", ortrun.Float32, []int64{1, 1}, []float64{0.5})
	x3, _ := ortrun.FromFloat64("x", ortrun.Float32, []int64{2, 3}, make([]float64, 6))
	x2, _ := ortrun.FromFloat64("x", ortrun.Float32, []int64{2, 4}, make([]float64, 8))
	ids1 := ids
	ids1.Shape = []int64{15}
	for _, tc := range []struct {
		ts   []ortrun.Tensor
		dims map[string]int64
		want string
	}{
		{[]ortrun.Tensor{ids}, map[string]int64{"batch": 2}, "dim batch is 3 in input \"input_ids\" but 2 in --dim"},
		{[]ortrun.Tensor{ids, x2}, nil, "dim batch is 2 in input \"x\" but 3 in input input_ids"},
		{[]ortrun.Tensor{frac}, nil, "cannot be converted"},
		{[]ortrun.Tensor{x3}, nil, "the model wants [batch,4]"},
		{[]ortrun.Tensor{ids1}, nil, "rank 2"},
		{[]ortrun.Tensor{{Name: "nope", DType: ortrun.Float32, Shape: []int64{}, Data: make([]byte, 4)}}, nil, "not an input of m.onnx (its inputs: input_ids, x)"},
	} {
		_, _, err := bindFixed("m.onnx", ins, tc.ts, tc.dims)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("err = %v, want %q", err, tc.want)
		}
	}
}

func TestParseDType(t *testing.T) {
	for s, want := range map[string]ortrun.DType{
		"float32": ortrun.Float32, "FLOAT": ortrun.Float32, "float": ortrun.Float32, "float16": ortrun.Float16,
		"half": ortrun.Float16, "bfloat16": ortrun.BFloat16, "BF16": ortrun.BFloat16, "int64": ortrun.Int64,
		"INT32": ortrun.Int32, "bool": ortrun.Bool, "double": ortrun.Float64, "uint8": ortrun.Uint8,
	} {
		if got, err := ParseDType(s); err != nil || got != want {
			t.Errorf("ParseDType(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	if _, err := ParseDType("undefined"); err == nil {
		t.Error("undefined accepted")
	}
}

func TestTolerances(t *testing.T) {
	for _, tc := range []struct {
		out        ortrun.DType
		weights    []ortrun.DType
		rtol, atol float64
	}{
		{ortrun.Float32, nil, 1e-3, 1e-4},
		{ortrun.Float32, []ortrun.DType{ortrun.Float32, ortrun.Undefined}, 1e-3, 1e-4},
		{ortrun.Float32, []ortrun.DType{ortrun.BFloat16}, 5e-2, 5e-2},
		{ortrun.Float16, []ortrun.DType{ortrun.Float32}, 1e-2, 1e-2},
		{ortrun.Float64, nil, 1e-7, 1e-9},
		{ortrun.Int64, []ortrun.DType{ortrun.Float16}, 0, 0},
		{ortrun.Bool, nil, 0, 0},
	} {
		r, a := ToleranceFor(tc.out, tc.weights...)
		if r != tc.rtol || a != tc.atol {
			t.Errorf("ToleranceFor(%v, %v) = %g, %g; want %g, %g", tc.out, tc.weights, r, a, tc.rtol, tc.atol)
		}
	}
}

func TestReportJSON(t *testing.T) {
	rep := &Report{A: "a.onnx", B: "b.onnx", Samples: 1, Dims: map[string]int64{"batch": 2},
		Inputs:   []InputPlan{{Name: "x", DType: ortrun.Float32, Shape: []int64{2, 3}, Source: genNormal}},
		Outputs:  []OutputReport{{Name: "y", DType: ortrun.Float16, Shape: []int64{2}, MaxAbs: math.Inf(1), MaxRel: math.NaN(), FailedSamples: 1}},
		LatencyA: 1500000, LatencyB: 2250000}
	data, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	out := got["outputs"].([]any)[0].(map[string]any)
	in := got["inputs"].([]any)[0].(map[string]any)
	lat := got["latency_ms"].(map[string]any)
	if out["max_abs"] != "+Inf" || out["max_rel"] != "NaN" || out["dtype"] != "float16" || out["pass"] != false ||
		in["dtype"] != "float32" || in["source"] != "normal" || in["description"] != "random N(0,1)" ||
		lat["a"] != 1.5 || lat["b"] != 2.25 || got["pass"] != false {
		t.Errorf("JSON report: %s", data)
	}
}
