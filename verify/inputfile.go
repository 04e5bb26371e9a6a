package verify

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
)

// ReadInputs reads fixed model inputs from a file, in one of two formats:
//
//   - JSON (a .json file, or any file starting with '{'): an object mapping
//     input names to tensors,
//
//     {"input_ids": {"shape": [1, 4], "dtype": "int64", "data": [1, 2, 3, 4]},
//     "x": {"data": [[0.5, -1], [2, 0]]}}
//
//     "data" is a flat row-major list or nested lists; a scalar is a bare
//     number with shape []. "shape" may be left out when data is nested
//     lists of equal lengths. "dtype" is a numpy name (float32, float16,
//     bfloat16, int64, bool, ...) or an ONNX one (FLOAT, INT64); without it
//     the values are taken as float64 and converted to the input's type.
//     Numbers may also be the strings "NaN", "Infinity" and "-Infinity";
//     booleans true/false. Integers beyond 2^53 lose precision.
//
//   - safetensors (any other file): every tensor is one input, with its
//     dtype and shape. numpy and torch write these with
//     safetensors.numpy.save_file / safetensors.torch.save_file.
//
// The tensors are returned in name order. Compare converts a tensor whose
// dtype differs from the model's input to the input's type (floats are
// rounded; integers must be whole and in range).
func ReadInputs(path string) ([]ortrun.Tensor, error) {
	isJSON, err := sniff(path)
	if err != nil {
		return nil, err
	}
	if isJSON {
		data, err := graph.ReadFile(path, 0)
		if err != nil {
			return nil, err
		}
		ts, err := parseJSONInputs(data)
		if err != nil {
			return nil, fmt.Errorf("inputs file %s: %w", path, err)
		}
		return ts, nil
	}
	return readSafetensorsInputs(path)
}

// sniff decides the format from the extension or, failing that, the first
// non-blank byte.
func sniff(path string) (isJSON bool, err error) {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".json":
		return true, nil
	case ".safetensors":
		return false, nil
	}
	f, err := graph.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	head := make([]byte, 64)
	n, _ := f.Read(head)
	trimmed := bytes.TrimLeft(head[:n], " \t\r\n")
	return len(trimmed) > 0 && trimmed[0] == '{', nil
}

// jsonTensor is one entry of a JSON inputs file.
type jsonTensor struct {
	Shape *[]int64        `json:"shape"`
	DType string          `json:"dtype"`
	Data  json.RawMessage `json:"data"`
}

func parseJSONInputs(data []byte) ([]ortrun.Tensor, error) {
	var entries map[string]jsonTensor
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&entries); err != nil {
		return nil, fmt.Errorf(`not a JSON object of {"shape", "dtype", "data"} entries: %w`, err)
	}
	names := make([]string, 0, len(entries))
	for name := range entries {
		names = append(names, name)
	}
	sort.Strings(names)
	out := make([]ortrun.Tensor, 0, len(names))
	for _, name := range names {
		e := entries[name]
		if len(e.Data) == 0 {
			return nil, fmt.Errorf("%q has no data", name)
		}
		var raw any
		d := json.NewDecoder(bytes.NewReader(e.Data))
		d.UseNumber()
		if err := d.Decode(&raw); err != nil {
			return nil, fmt.Errorf("%q: data: %w", name, err)
		}
		var vals []float64
		var nested []int64
		if err := flatten(raw, 0, &nested, &vals); err != nil {
			return nil, fmt.Errorf("%q: data: %w", name, err)
		}
		shape := nested
		if e.Shape != nil {
			shape = *e.Shape
			n, err := ortrun.NumElements(shape)
			if err != nil {
				return nil, fmt.Errorf("%q: %w", name, err)
			}
			if n != int64(len(vals)) {
				return nil, fmt.Errorf("%q: shape %v needs %d values, data has %d", name, shape, n, len(vals))
			}
		} else if _, isList := raw.([]any); !isList {
			shape = []int64{}
		}
		dt := ortrun.Float64
		if e.DType != "" {
			var err error
			if dt, err = ParseDType(e.DType); err != nil {
				return nil, fmt.Errorf("%q: %w", name, err)
			}
		}
		t, err := ortrun.FromFloat64(name, dt, shape, vals)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, nil
}

// errRagged reports nested lists whose lengths differ at some depth.
var errRagged = errors.New("nested lists of different lengths; give a flat list and a shape")

// flatten appends the numbers of v (a number, bool, string or nested list)
// to vals, recording the nesting as shape.
func flatten(v any, depth int, shape *[]int64, vals *[]float64) error {
	switch x := v.(type) {
	case []any:
		// The first descent records the shape; everything after must
		// follow it.
		if depth == len(*shape) && len(*vals) == 0 {
			*shape = append(*shape, int64(len(x)))
		} else if depth >= len(*shape) || (*shape)[depth] != int64(len(x)) {
			return errRagged
		}
		for _, e := range x {
			if err := flatten(e, depth+1, shape, vals); err != nil {
				return err
			}
		}
		return nil
	case json.Number:
		f, err := strconv.ParseFloat(string(x), 64)
		if err != nil {
			return fmt.Errorf("%s is not a number", x)
		}
		*vals = append(*vals, f)
	case bool:
		f := 0.0
		if x {
			f = 1
		}
		*vals = append(*vals, f)
	case string:
		switch strings.ToLower(x) {
		case "nan":
			*vals = append(*vals, math.NaN())
		case "inf", "+inf", "infinity", "+infinity":
			*vals = append(*vals, math.Inf(1))
		case "-inf", "-infinity":
			*vals = append(*vals, math.Inf(-1))
		default:
			return fmt.Errorf("%q is not a number", x)
		}
	default:
		return fmt.Errorf("%v is not a number or list", v)
	}
	if depth < len(*shape) {
		return errRagged
	}
	return nil
}

// ParseDType reads a dtype name: numpy's (float32, float16, bfloat16,
// int64, uint8, bool, ...), ONNX's (FLOAT, FLOAT16, INT64, ...), or the
// aliases float, double and half. Case is ignored.
func ParseDType(s string) (ortrun.DType, error) {
	key := strings.ToLower(strings.TrimSpace(s))
	switch key {
	case "float", "fp32", "f32":
		return ortrun.Float32, nil
	case "double", "fp64", "f64":
		return ortrun.Float64, nil
	case "half", "fp16", "f16":
		return ortrun.Float16, nil
	case "bf16":
		return ortrun.BFloat16, nil
	}
	for v := range onnxpb.TensorProto_DataType_name {
		d := ortrun.DType(v)
		if d == ortrun.Undefined {
			continue
		}
		if d.String() == key || strings.ToLower(onnxpb.TensorProto_DataType(v).String()) == key {
			return d, nil
		}
	}
	return 0, fmt.Errorf("unknown dtype %q (want e.g. float32, float16, int64, bool)", s)
}

// safetensorsDTypes maps safetensors dtypes to ONNX ones.
var safetensorsDTypes = map[export.DType]ortrun.DType{
	export.DTypeBool: ortrun.Bool, export.DTypeU8: ortrun.Uint8, export.DTypeI8: ortrun.Int8,
	export.DTypeI16: ortrun.Int16, export.DTypeU16: ortrun.Uint16, export.DTypeF16: ortrun.Float16,
	export.DTypeBF16: ortrun.BFloat16, export.DTypeI32: ortrun.Int32, export.DTypeU32: ortrun.Uint32,
	export.DTypeF32: ortrun.Float32, export.DTypeF64: ortrun.Float64, export.DTypeI64: ortrun.Int64,
	export.DTypeU64:    ortrun.Uint64,
	export.DTypeF8E4M3: ortrun.DType(onnxpb.TensorProto_FLOAT8E4M3FN),
	export.DTypeF8E5M2: ortrun.DType(onnxpb.TensorProto_FLOAT8E5M2),
	export.DTypeC64:    ortrun.DType(onnxpb.TensorProto_COMPLEX64),
}

func readSafetensorsInputs(path string) ([]ortrun.Tensor, error) {
	f, err := export.OpenSafetensors(path)
	if err != nil {
		return nil, fmt.Errorf("inputs file %s is neither JSON nor safetensors: %w", path, err)
	}
	defer f.Close()
	var out []ortrun.Tensor
	for _, name := range f.Names() {
		info, _ := f.Tensor(name)
		dt, ok := safetensorsDTypes[info.DType]
		if !ok {
			return nil, fmt.Errorf("inputs file %s: tensor %q has dtype %s, which ONNX Runtime inputs cannot take", path, name, info.DType)
		}
		raw, err := f.ReadRaw(name)
		if err != nil {
			return nil, err
		}
		shape := make([]int64, len(info.Shape))
		for i, d := range info.Shape {
			shape[i] = int64(d)
		}
		t := ortrun.Tensor{Name: name, DType: dt, Shape: shape, Data: raw}
		if err := t.Validate(); err != nil {
			return nil, fmt.Errorf("inputs file %s: %w", path, err)
		}
		out = append(out, t)
	}
	return out, nil
}

// conform checks a file tensor against the model input it feeds and
// converts it to the input's dtype when they differ.
func conform(t ortrun.Tensor, in ortrun.TensorInfo) (ortrun.Tensor, error) {
	if len(t.Shape) != len(in.Shape) {
		return t, fmt.Errorf("input %q: the file gives shape %v, the model wants rank %d %s", t.Name, t.Shape, len(in.Shape), formatInfoShape(in))
	}
	for i, d := range in.Shape {
		if d >= 0 && t.Shape[i] != d {
			return t, fmt.Errorf("input %q: the file gives shape %v, the model wants %s", t.Name, t.Shape, formatInfoShape(in))
		}
	}
	if t.DType == in.DType {
		return t, nil
	}
	vals, err := t.Float64s()
	if err != nil {
		return t, fmt.Errorf("input %q is %v in the file, %v in the model, and cannot be converted: %w", t.Name, t.DType, in.DType, err)
	}
	c, err := ortrun.FromFloat64(t.Name, in.DType, t.Shape, vals)
	if err != nil {
		return t, fmt.Errorf("input %q is %v in the file, %v in the model, and cannot be converted: %w", t.Name, t.DType, in.DType, err)
	}
	return c, nil
}

// formatInfoShape renders a model input's shape with dim names, as
// [batch,sequence,32].
func formatInfoShape(in ortrun.TensorInfo) string {
	parts := make([]string, len(in.Shape))
	for i, d := range in.Shape {
		switch name := dimName(in, i); {
		case d >= 0:
			parts[i] = strconv.FormatInt(d, 10)
		case name != "":
			parts[i] = name
		default:
			parts[i] = "?"
		}
	}
	return "[" + strings.Join(parts, ",") + "]"
}
