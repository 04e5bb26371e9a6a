package train

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
)

// IgnoreIndex marks label positions the loss skips (PyTorch's and
// transformers' -100).
const IgnoreIndex = -100

// maxLine bounds one JSONL line, so a file without newlines cannot make the
// reader grow without limit.
const maxLine = 256 << 20

// Value is one field of a row: a number or a nested array of numbers,
// flattened in row-major order.
type Value struct {
	Shape []int64
	Data  []float64
}

// Row is one example: the fields of one JSONL line.
type Row struct {
	// Line is the 1-based line number in the file, for error messages.
	Line   int
	Fields map[string]Value
}

// Dataset is the rows of a JSONL file.
type Dataset struct {
	Path string
	Rows []Row
}

// LoadJSONL reads a JSONL file: one JSON object a line, whose keys name
// graph inputs (or "labels") and whose values are numbers or nested arrays
// of numbers. Blank lines are skipped. An empty file is an error, and so is
// any line that is not such an object; errors name the line.
func LoadJSONL(path string) (*Dataset, error) {
	f, err := graph.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d, err := ReadJSONL(f, path)
	if err != nil {
		return nil, err
	}
	return d, nil
}

// ReadJSONL is LoadJSONL on a reader; name is used in errors.
func ReadJSONL(r io.Reader, name string) (*Dataset, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLine)
	d := &Dataset{Path: name}
	line := 0
	for sc.Scan() {
		line++
		b := bytes.TrimSpace(sc.Bytes())
		if len(b) == 0 {
			continue
		}
		row, err := parseRow(b)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", name, line, err)
		}
		row.Line = line
		d.Rows = append(d.Rows, row)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("%s:%d: line longer than %d MiB", name, line+1, maxLine>>20)
		}
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(d.Rows) == 0 {
		return nil, fmt.Errorf("%s: no examples (the file is empty)", name)
	}
	return d, nil
}

func parseRow(b []byte) (Row, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var obj map[string]any
	if err := dec.Decode(&obj); err != nil {
		return Row{}, fmt.Errorf("not a JSON object: %v", err)
	}
	if obj == nil {
		return Row{}, errors.New("not a JSON object: null")
	}
	if dec.More() {
		return Row{}, errors.New("more than one JSON value on the line")
	}
	if len(obj) == 0 {
		return Row{}, errors.New("empty object: no inputs")
	}
	row := Row{Fields: make(map[string]Value, len(obj))}
	for k, v := range obj {
		if k == "text" {
			return Row{}, errors.New(`"text" rows need a tokenizer, which onnxlora does not have yet: give "input_ids" instead`)
		}
		var val Value
		shape, err := flatten(v, 0, &val.Data)
		if err != nil {
			return Row{}, fmt.Errorf("%q: %w", k, err)
		}
		val.Shape = shape
		row.Fields[k] = val
	}
	return row, nil
}

// flatten appends the numbers of a nested array to out and returns its
// shape, refusing ragged arrays and non-numbers.
func flatten(v any, depth int, out *[]float64) ([]int64, error) {
	switch x := v.(type) {
	case json.Number:
		f, err := strconv.ParseFloat(string(x), 64)
		if err != nil || math.IsInf(f, 0) {
			return nil, fmt.Errorf("number %s out of range", x)
		}
		*out = append(*out, f)
		return []int64{}, nil
	case []any:
		if depth > 16 {
			return nil, errors.New("arrays nested more than 16 deep")
		}
		if len(x) == 0 {
			return nil, errors.New("empty array")
		}
		var inner []int64
		for i, e := range x {
			s, err := flatten(e, depth+1, out)
			if err != nil {
				return nil, err
			}
			if i == 0 {
				inner = s
			} else if !slices.Equal(s, inner) {
				return nil, fmt.Errorf("ragged array: element %d has shape %v, element 0 has %v", i, dimsString(s), dimsString(inner))
			}
		}
		return append([]int64{int64(len(x))}, inner...), nil
	}
	return nil, fmt.Errorf("want a number or nested arrays of numbers, got %s", jsonKind(v))
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "a boolean"
	case string:
		return "a string"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}

func dimsString(d []int64) string {
	parts := make([]string, len(d))
	for i, x := range d {
		parts[i] = strconv.FormatInt(x, 10)
	}
	return "[" + strings.Join(parts, ",") + "]"
}

// InputSpec is a graph input the batches feed: its name, element type and
// dims (-1 where symbolic), batch first.
type InputSpec struct {
	Name  string
	DType ortrun.DType
	Dims  []int64
	// Limit, when > 0, bounds integer values to [0, Limit): the rows of
	// the embedding table a token-id input indexes.
	Limit int64
}

// BatchSpec says how rows become the inputs of a step graph.
type BatchSpec struct {
	// Inputs are the model inputs the step graph needs (not the params).
	Inputs []InputSpec
	// Labels is the step graph's labels input; Limit bounds class labels
	// (the output's last dim) for causal-lm and cross-entropy.
	Labels InputSpec
	// Loss is "causal-lm", "cross-entropy" or "mse".
	Loss string
	// PadID fills input_ids past a row's end.
	PadID int64
}

// fillable are inputs onnxlora can make when the file lacks them.
func fillable(name string) bool { return name == "attention_mask" || name == "position_ids" }

func (s *BatchSpec) input(name string) *InputSpec {
	if name == s.Labels.Name || name == "labels" {
		return &s.Labels
	}
	for i := range s.Inputs {
		if s.Inputs[i].Name == name {
			return &s.Inputs[i]
		}
	}
	return nil
}

func (s *BatchSpec) inputNames() string {
	names := make([]string, 0, len(s.Inputs))
	for _, in := range s.Inputs {
		names = append(names, in.Name)
	}
	return strings.Join(names, ", ")
}

// seqKey is the field whose first axis is each row's sequence: input_ids
// when the model has it.
func (s *BatchSpec) seqKey() string {
	for _, in := range s.Inputs {
		if in.Name == "input_ids" {
			return in.Name
		}
	}
	for _, in := range s.Inputs {
		if !in.DType.IsFloat() && len(in.Dims) == 2 {
			return in.Name
		}
	}
	return ""
}

// Validate checks every row against the spec before training starts, so a
// bad line is reported at once and by number: unknown keys, missing
// inputs, non-integral or out-of-range ids and labels, shapes that do not
// fit the model or differ between rows where no padding applies.
func (d *Dataset) Validate(s *BatchSpec) error {
	seq := s.seqKey()
	first := d.Rows[0]
	for _, r := range d.Rows {
		where := fmt.Sprintf("%s:%d", d.Path, r.Line)
		keys := make([]string, 0, len(r.Fields))
		for k := range r.Fields {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if s.input(k) == nil {
				return fmt.Errorf("%s: %q is not an input of the model (inputs: %s, labels)", where, k, s.inputNames())
			}
		}
		for _, in := range s.Inputs {
			_, ok := r.Fields[in.Name]
			if !ok && !(fillable(in.Name) && seq != "") {
				return fmt.Errorf("%s: the row lacks %q, an input the model needs", where, in.Name)
			}
			if _, firstHas := first.Fields[in.Name]; ok != firstHas {
				return fmt.Errorf("%s: %q is given on some rows and not others (line %d)", where, in.Name, first.Line)
			}
		}
		_, hasLabels := r.Fields["labels"]
		if !hasLabels && s.Loss != "causal-lm" {
			return fmt.Errorf("%s: the row has no \"labels\", which the %s loss needs", where, s.Loss)
		}
		if _, firstHas := first.Fields["labels"]; hasLabels != firstHas {
			return fmt.Errorf("%s: \"labels\" is given on some rows and not others (line %d)", where, first.Line)
		}
		var seqLen int64 = -1
		if v, ok := r.Fields[seq]; ok && len(v.Shape) > 0 {
			seqLen = v.Shape[0]
		}
		for _, k := range keys {
			in := s.input(k)
			v := r.Fields[k]
			if err := checkField(in, k, v, seq, seqLen, s); err != nil {
				return fmt.Errorf("%s: %w", where, err)
			}
			// Only integer sequences are padded; everything else must
			// have the same shape on every row.
			fv := first.Fields[k]
			if padded(in, v) {
				if !slices.Equal(v.Shape[1:], fv.Shape[1:]) {
					return fmt.Errorf("%s: %q has shape %v but line %d has %v", where, k, dimsString(v.Shape), first.Line, dimsString(fv.Shape))
				}
			} else if !slices.Equal(v.Shape, fv.Shape) {
				return fmt.Errorf("%s: %q has shape %v but line %d has %v (only integer sequences are padded)", where, k, dimsString(v.Shape), first.Line, dimsString(fv.Shape))
			}
		}
	}
	return nil
}

// padded reports whether a field is right-padded along its first axis in
// a batch: integer sequences (ids, masks, positions, token labels).
func padded(in *InputSpec, v Value) bool {
	return !in.DType.IsFloat() && len(v.Shape) >= 1
}

func checkField(in *InputSpec, k string, v Value, seq string, seqLen int64, s *BatchSpec) error {
	if len(v.Shape)+1 != len(in.Dims) {
		return fmt.Errorf("%q has shape %v per row, but the model's %s is %s (batch first): want %d dims per row", k, dimsString(v.Shape), in.Name, shapeString(in.Dims), len(in.Dims)-1)
	}
	for i, d := range in.Dims[1:] {
		if d > 0 && v.Shape[i] != d {
			return fmt.Errorf("%q has shape %v per row, but the model's %s is %s", k, dimsString(v.Shape), in.Name, shapeString(in.Dims))
		}
	}
	isLabel := in == &s.Labels
	if (k == "attention_mask" || k == "position_ids" || (isLabel && s.Loss == "causal-lm")) && seqLen >= 0 && v.Shape[0] != seqLen {
		return fmt.Errorf("%q has length %d but %q has %d", k, v.Shape[0], seq, seqLen)
	}
	if in.DType.IsFloat() {
		return nil
	}
	for i, x := range v.Data {
		if x != math.Trunc(x) {
			return fmt.Errorf("%q[%d] = %v is not an integer", k, i, x)
		}
		if isLabel && x == IgnoreIndex {
			continue
		}
		if in.Limit > 0 && (x < 0 || x >= float64(in.Limit)) {
			what := "token id"
			if isLabel {
				what = "label"
			}
			return fmt.Errorf("%q[%d] = %v: %s outside [0, %d)", k, i, x, what, in.Limit)
		}
	}
	return nil
}

func shapeString(d []int64) string {
	parts := make([]string, len(d))
	for i, x := range d {
		if x < 0 {
			parts[i] = "?"
		} else {
			parts[i] = strconv.FormatInt(x, 10)
		}
	}
	return "[" + strings.Join(parts, ",") + "]"
}

// Batch is the step graph's inputs for some rows.
type Batch struct {
	Inputs []ortrun.Tensor
	// Rows is the number of examples.
	Rows int
	// Counted is what the mean loss divides by: label positions that are
	// not IgnoreIndex (after the shift, for causal-lm), or label elements
	// for mse. Eval weights batches by it.
	Counted int64
	// Tokens is the number of non-pad sequence positions, for throughput.
	Tokens int64
}

// MakeBatch stacks rows into a batch: fields are right-padded along their
// first axis to the longest row (input_ids with PadID, labels with
// IgnoreIndex, other integer inputs with 0); a missing attention_mask is
// ones on each row's tokens and 0 on pads, missing position_ids are
// 0..t-1, and missing causal-lm labels are input_ids with IgnoreIndex at
// pads. Rows are assumed Validated.
func (d *Dataset) MakeBatch(idx []int, s *BatchSpec) (*Batch, error) {
	rows := make([]Row, len(idx))
	for i, j := range idx {
		rows[i] = d.Rows[j]
	}
	b := &Batch{Rows: len(rows)}
	seq := s.seqKey()
	lens := make([]int64, len(rows))
	var T int64
	for i, r := range rows {
		if v, ok := r.Fields[seq]; ok {
			lens[i] = v.Shape[0]
		}
		T = max(T, lens[i])
		b.Tokens += lens[i]
	}
	for _, in := range append(append([]InputSpec{}, s.Inputs...), s.Labels) {
		field := in.Name
		if in.Name == s.Labels.Name {
			field = "labels"
		}
		var shape []int64
		var data []float64
		if _, ok := rows[0].Fields[field]; ok {
			shape, data = stack(rows, field, padValue(field, s))
		} else {
			shape = []int64{int64(len(rows)), T}
			data = make([]float64, int64(len(rows))*T)
			for i := range rows {
				for t := int64(0); t < T; t++ {
					v := &data[int64(i)*T+t]
					switch field {
					case "attention_mask":
						if t < lens[i] {
							*v = 1
						}
					case "position_ids":
						*v = float64(t)
					case "labels":
						*v = IgnoreIndex
						if t < lens[i] {
							*v = rows[i].Fields[seq].Data[t]
						}
					}
				}
			}
		}
		if field == "labels" {
			b.Counted = countLabels(s.Loss, shape, data)
		}
		t, err := ortrun.FromFloat64(in.Name, in.DType, shape, data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", in.Name, err)
		}
		b.Inputs = append(b.Inputs, t)
	}
	return b, nil
}

func padValue(field string, s *BatchSpec) float64 {
	switch field {
	case "input_ids":
		return float64(s.PadID)
	case "labels":
		return IgnoreIndex
	}
	return 0
}

// stack stacks a field of rows into [b, ...], right-padding the first axis.
func stack(rows []Row, field string, pad float64) ([]int64, []float64) {
	first := rows[0].Fields[field]
	if len(first.Shape) == 0 {
		data := make([]float64, len(rows))
		for i, r := range rows {
			data[i] = r.Fields[field].Data[0]
		}
		return []int64{int64(len(rows))}, data
	}
	var T int64
	for _, r := range rows {
		T = max(T, r.Fields[field].Shape[0])
	}
	inner := int64(1)
	for _, d := range first.Shape[1:] {
		inner *= d
	}
	shape := append([]int64{int64(len(rows)), T}, first.Shape[1:]...)
	data := make([]float64, int64(len(rows))*T*inner)
	for i, r := range rows {
		v := r.Fields[field]
		out := data[int64(i)*T*inner : int64(i+1)*T*inner]
		n := copy(out, v.Data)
		for j := n; j < len(out); j++ {
			out[j] = pad
		}
	}
	return shape, data
}

func countLabels(loss string, shape []int64, data []float64) int64 {
	if loss == "mse" {
		return int64(len(data))
	}
	var n int64
	if loss == "causal-lm" && len(shape) == 2 {
		T := shape[1]
		for i, x := range data {
			if int64(i)%T != 0 && x != IgnoreIndex {
				n++
			}
		}
		return n
	}
	for _, x := range data {
		if x != IgnoreIndex {
			n++
		}
	}
	return n
}

// Order returns the row order of an epoch: file order, or with shuffle a
// permutation drawn from (seed, epoch), so a resumed run sees the same
// order. (The permutation is Go's, not torch's RandomSampler.)
func (d *Dataset) Order(epoch int64, shuffle bool, seed uint64) []int {
	n := len(d.Rows)
	if !shuffle {
		idx := make([]int, n)
		for i := range idx {
			idx[i] = i
		}
		return idx
	}
	return rand.New(rand.NewPCG(seed, uint64(epoch))).Perm(n)
}

// NumBatches is the number of batches of size b in one epoch, the last one
// possibly smaller.
func (d *Dataset) NumBatches(b int) int { return (len(d.Rows) + b - 1) / b }
