package train

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/ortrun"
)

func lmSpec() *BatchSpec {
	return &BatchSpec{
		Inputs: []InputSpec{
			{Name: "input_ids", DType: ortrun.Int64, Dims: []int64{-1, -1}, Limit: 64},
			{Name: "attention_mask", DType: ortrun.Int64, Dims: []int64{-1, -1}},
			{Name: "position_ids", DType: ortrun.Int64, Dims: []int64{-1, -1}},
		},
		Labels: InputSpec{Name: "labels", DType: ortrun.Int64, Dims: []int64{-1, -1}, Limit: 64},
		Loss:   "causal-lm",
		PadID:  7,
	}
}

func readString(t *testing.T, s string) (*Dataset, error) {
	t.Helper()
	return ReadJSONL(strings.NewReader(s), "data.jsonl")
}

// lmBatch reads the JSONL rows, validates them against lmSpec and batches
// the first two.
func lmBatch(t *testing.T, rows string) (*Dataset, *Batch) {
	t.Helper()
	d, err := readString(t, rows)
	if err != nil {
		t.Fatal(err)
	}
	s := lmSpec()
	if err := d.Validate(s); err != nil {
		t.Fatal(err)
	}
	b, err := d.MakeBatch([]int{0, 1}, s)
	if err != nil {
		t.Fatal(err)
	}
	return d, b
}

func tensorValues(t *testing.T, b *Batch, name string) ([]int64, []float64) {
	t.Helper()
	for _, x := range b.Inputs {
		if x.Name == name {
			v, err := x.Float64s()
			if err != nil {
				t.Fatal(err)
			}
			return x.Shape, v
		}
	}
	t.Fatalf("batch has no %s", name)
	return nil, nil
}

func TestBatchPadsAndFills(t *testing.T) {
	d, b := lmBatch(t, "{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": [4, 5]}\n")
	want := map[string][]float64{
		"input_ids":      {1, 2, 3, 4, 5, 7},
		"attention_mask": {1, 1, 1, 1, 1, 0},
		"position_ids":   {0, 1, 2, 0, 1, 2},
		"labels":         {1, 2, 3, 4, 5, -100},
	}
	for name, w := range want {
		shape, got := tensorValues(t, b, name)
		if !reflect.DeepEqual(shape, []int64{2, 3}) || !reflect.DeepEqual(got, w) {
			t.Errorf("%s = %v %v, want [2 3] %v", name, shape, got, w)
		}
	}
	// Shifted labels: positions 1.. that are not -100: 2 + 1.
	if b.Counted != 3 || b.Tokens != 5 || b.Rows != 2 {
		t.Errorf("counted %d tokens %d rows %d, want 3 5 2", b.Counted, b.Tokens, b.Rows)
	}
	if d.Rows[1].Line != 3 {
		t.Errorf("second row is line %d, want 3", d.Rows[1].Line)
	}
}

func TestBatchGivenLabelsAndMaskArePadded(t *testing.T) {
	_, b := lmBatch(t, `{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [-100, 2]}
{"input_ids": [4], "attention_mask": [1], "labels": [4]}`)
	if _, v := tensorValues(t, b, "labels"); !reflect.DeepEqual(v, []float64{-100, 2, 4, -100}) {
		t.Errorf("labels %v", v)
	}
	if _, v := tensorValues(t, b, "attention_mask"); !reflect.DeepEqual(v, []float64{1, 1, 1, 0}) {
		t.Errorf("attention_mask %v", v)
	}
	if b.Counted != 1 {
		t.Errorf("counted %d, want 1", b.Counted)
	}
}

func TestClassifierBatch(t *testing.T) {
	s := &BatchSpec{
		Inputs: []InputSpec{{Name: "input", DType: ortrun.Float32, Dims: []int64{-1, 3}}},
		Labels: InputSpec{Name: "labels", DType: ortrun.Int64, Dims: []int64{-1}, Limit: 4},
		Loss:   "cross-entropy",
	}
	d, err := readString(t, "{\"input\": [0.5, 1, 2], \"labels\": 3}\n{\"input\": [1, 1, 1], \"labels\": 0}\n")
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Validate(s); err != nil {
		t.Fatal(err)
	}
	b, err := d.MakeBatch([]int{1, 0}, s)
	if err != nil {
		t.Fatal(err)
	}
	if shape, v := tensorValues(t, b, "labels"); !reflect.DeepEqual(shape, []int64{2}) || !reflect.DeepEqual(v, []float64{0, 3}) {
		t.Errorf("labels %v %v", shape, v)
	}
	if shape, v := tensorValues(t, b, "input"); !reflect.DeepEqual(shape, []int64{2, 3}) || v[0] != 1 || v[3] != 0.5 {
		t.Errorf("input %v %v", shape, v)
	}
}

func TestBadData(t *testing.T) {
	clf := &BatchSpec{
		Inputs: []InputSpec{{Name: "input", DType: ortrun.Float32, Dims: []int64{-1, 3}}},
		Labels: InputSpec{Name: "labels", DType: ortrun.Int64, Dims: []int64{-1}, Limit: 4},
		Loss:   "cross-entropy",
	}
	for _, c := range []struct {
		name, data string
		spec       *BatchSpec
		want       string
	}{
		{"not json", "{\"input_ids\": [1]}\n{input_ids: 2}\n", lmSpec(), "data.jsonl:2: not a JSON object"},
		{"array line", "[1, 2]\n", lmSpec(), "data.jsonl:1: not a JSON object"},
		{"two values", "{\"input_ids\": [1]} {}\n", lmSpec(), "data.jsonl:1: more than one JSON value"},
		{"empty", "\n\n", lmSpec(), "no examples"},
		{"ragged", "{\"input_ids\": [[1, 2], [3]]}\n", lmSpec(), "data.jsonl:1: \"input_ids\": ragged array"},
		{"string", "{\"input_ids\": [\"a\"]}\n", lmSpec(), "got a string"},
		{"text", "{\"text\": \"hello\"}\n", lmSpec(), "tokenizer"},
		{"unknown key", "{\"input_ids\": [1], \"foo\": 1}\n", lmSpec(), "data.jsonl:1: \"foo\" is not an input of the model"},
		{"missing input", "{\"input\": [1, 2, 3], \"labels\": 1}\n{\"labels\": 2}\n", clf, "data.jsonl:2: the row lacks \"input\""},
		{"missing labels", "{\"input\": [1, 2, 3]}\n", clf, "no \"labels\""},
		{"id out of range", "{\"input_ids\": [1, 2]}\n{\"input_ids\": [3, 64]}\n", lmSpec(), "data.jsonl:2: \"input_ids\"[1] = 64: token id outside [0, 64)"},
		{"negative id", "{\"input_ids\": [-1]}\n", lmSpec(), "token id outside"},
		{"label out of range", "{\"input\": [1, 2, 3], \"labels\": 4}\n", clf, "label outside [0, 4)"},
		{"fractional id", "{\"input_ids\": [1.5]}\n", lmSpec(), "not an integer"},
		{"wrong width", "{\"input\": [1, 2], \"labels\": 1}\n", clf, "data.jsonl:1: \"input\" has shape [2] per row, but the model's input is [?,3]"},
		{"wrong rank", "{\"input_ids\": 3}\n", lmSpec(), "want 1 dims per row"},
		{"mask length", "{\"input_ids\": [1, 2], \"attention_mask\": [1]}\n", lmSpec(), "\"attention_mask\" has length 1 but \"input_ids\" has 2"},
		{"float shapes differ", "{\"x\": [1, 2], \"labels\": [1]}\n{\"x\": [1, 2, 3], \"labels\": [1]}\n",
			&BatchSpec{Inputs: []InputSpec{{Name: "x", DType: ortrun.Float32, Dims: []int64{-1, -1}}},
				Labels: InputSpec{Name: "labels", DType: ortrun.Float32, Dims: []int64{-1, 1}}, Loss: "mse"},
			"data.jsonl:2: \"x\" has shape [3] but line 1 has [2]"},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, err := readString(t, c.data)
			if err == nil {
				err = d.Validate(c.spec)
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error spans lines: %q", err)
			}
		})
	}
}

func TestLoadJSONLFileAndOrder(t *testing.T) {
	p := filepath.Join(t.TempDir(), "d.jsonl")
	var sb strings.Builder
	for i := 0; i < 10; i++ {
		sb.WriteString("{\"input_ids\": [1]}\n")
	}
	if err := os.WriteFile(p, []byte(sb.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := LoadJSONL(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Rows) != 10 || d.NumBatches(4) != 3 || d.NumBatches(5) != 2 {
		t.Fatalf("rows %d batches %d %d", len(d.Rows), d.NumBatches(4), d.NumBatches(5))
	}
	if o := d.Order(0, false, 1); !reflect.DeepEqual(o, []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}) {
		t.Fatalf("file order %v", o)
	}
	a, b := d.Order(0, true, 1), d.Order(1, true, 1)
	if reflect.DeepEqual(a, b) || !reflect.DeepEqual(a, d.Order(0, true, 1)) {
		t.Fatalf("shuffle not per-epoch deterministic: %v %v", a, b)
	}
	if _, err := LoadJSONL(filepath.Join(t.TempDir(), "missing.jsonl")); err == nil {
		t.Fatal("missing file accepted")
	}
}
