package ortrun_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// valueInfo declares a tensor; dims are int (fixed) or string (symbolic).
func valueInfo(name string, dt ortrun.DType, dims ...any) *onnxpb.ValueInfoProto {
	shape := &onnxpb.TensorShapeProto{Dim: []*onnxpb.TensorShapeProto_Dimension{}}
	for _, d := range dims {
		dim := &onnxpb.TensorShapeProto_Dimension{}
		switch v := d.(type) {
		case int:
			dim.Value = &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: int64(v)}
		case string:
			dim.Value = &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: v}
		default:
			panic("dims are int or string")
		}
		shape.Dim = append(shape.Dim, dim)
	}
	return &onnxpb.ValueInfoProto{
		Name: proto.String(name),
		Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: &onnxpb.TypeProto_Tensor{
			ElemType: proto.Int32(int32(dt)),
			Shape:    shape,
		}}},
	}
}

func node(op string, inputs, outputs []string, attrs ...*onnxpb.AttributeProto) *onnxpb.NodeProto {
	return &onnxpb.NodeProto{
		OpType:    proto.String(op),
		Name:      proto.String(op + "_" + outputs[0]),
		Input:     inputs,
		Output:    outputs,
		Attribute: attrs,
	}
}

func intAttr(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

// initializer stores t in raw_data.
func initializer(t ortrun.Tensor) *onnxpb.TensorProto {
	return &onnxpb.TensorProto{
		Name:     proto.String(t.Name),
		DataType: proto.Int32(int32(t.DType)),
		Dims:     t.Shape,
		RawData:  t.Data,
	}
}

// writeModel saves g as an opset-17 model at dir/name and returns its path.
func writeModel(t *testing.T, dir, name string, g *onnxpb.GraphProto) string {
	t.Helper()
	g.Name = proto.String("test")
	m := &onnxpb.ModelProto{
		IrVersion:    proto.Int64(8),
		ProducerName: proto.String("ortrun_test"),
		OpsetImport:  []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(17)}},
		Graph:        g,
	}
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustTensor(t *testing.T) func(ortrun.Tensor, error) ortrun.Tensor {
	return func(x ortrun.Tensor, err error) ortrun.Tensor {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
}

// Values shared by the MatMul tests: x [2,3] @ W [3,4].
var (
	xVals = []float64{0.5, -1.25, 2, 3, 0.75, -0.5}
	wVals = []float64{1, 2, -1, 0.5, 0.25, -3, 1.5, 2, -0.75, 1, 0, -2}
)

// matmul computes the reference [m,k]@[k,n] in float64.
func matmul(a, b []float64, m, k, n int) []float64 {
	out := make([]float64, m*n)
	for i := range m {
		for j := range n {
			for p := range k {
				out[i*n+j] += a[i*k+p] * b[p*n+j]
			}
		}
	}
	return out
}

// matmulModel writes y = MatMul(x, W) in dtype dt with x [batch,3].
func matmulModel(t *testing.T, dir string, dt ortrun.DType) string {
	w := mustTensor(t)(ortrun.FromFloat64("W", dt, []int64{3, 4}, wVals))
	return writeModel(t, dir, "matmul.onnx", &onnxpb.GraphProto{
		Node:        []*onnxpb.NodeProto{node("MatMul", []string{"x", "W"}, []string{"y"})},
		Initializer: []*onnxpb.TensorProto{initializer(w)},
		Input:       []*onnxpb.ValueInfoProto{valueInfo("x", dt, "batch", 3)},
		Output:      []*onnxpb.ValueInfoProto{valueInfo("y", dt, "batch", 4)},
	})
}

func TestMatMulFloat32(t *testing.T) {
	s := orttest.Open(t, matmulModel(t, t.TempDir(), ortrun.Float32))

	in, out := s.Inputs(), s.Outputs()
	wantIn := []ortrun.TensorInfo{{Name: "x", DType: ortrun.Float32, Shape: []int64{-1, 3}, DimNames: []string{"batch", ""}, IsTensor: true}}
	wantOut := []ortrun.TensorInfo{{Name: "y", DType: ortrun.Float32, Shape: []int64{-1, 4}, DimNames: []string{"batch", ""}, IsTensor: true}}
	if !infosEqual(in, wantIn) || !infosEqual(out, wantOut) {
		t.Fatalf("Inputs() = %+v, Outputs() = %+v; want %+v, %+v", in, out, wantIn, wantOut)
	}

	xs := make([]float32, len(xVals))
	for i, v := range xVals {
		xs[i] = float32(v)
	}
	x := mustTensor(t)(ortrun.NewTensor("x", []int64{2, 3}, xs))
	res, err := s.Run([]ortrun.Tensor{x})
	if err != nil {
		t.Fatal(err)
	}
	y := res[0]
	if y.Name != "y" || y.DType != ortrun.Float32 || !slices.Equal(y.Shape, []int64{2, 4}) {
		t.Fatalf("output %q %v%v, want y float32[2 4]", y.Name, y.DType, y.Shape)
	}
	got, err := y.Float64s()
	if err != nil {
		t.Fatal(err)
	}
	want := matmul(xVals, wVals, 2, 3, 4)
	if maxAbs, maxRel, ok := ortrun.Compare(got, want, 1e-6, 1e-6); !ok {
		t.Fatalf("got %v, want %v (max abs %g, rel %g)", got, want, maxAbs, maxRel)
	}
	// The typed view agrees with the float64 one.
	f32, err := ortrun.Values[float32](y)
	if err != nil || float64(f32[5]) != got[5] {
		t.Fatalf("Values[float32] = %v, %v", f32, err)
	}
}

func infosEqual(a, b []ortrun.TensorInfo) bool {
	return slices.EqualFunc(a, b, func(x, y ortrun.TensorInfo) bool {
		return x.Name == y.Name && x.DType == y.DType && x.IsTensor == y.IsTensor &&
			slices.Equal(x.Shape, y.Shape) && slices.Equal(x.DimNames, y.DimNames)
	})
}

// The fp16 output has a symbolic dim, so ORT allocates it: the case that
// github.com/yalue/onnxruntime_go v1.27.0 fails on.
func TestMatMulFloat16(t *testing.T) {
	s := orttest.Open(t, matmulModel(t, t.TempDir(), ortrun.Float16))
	x := mustTensor(t)(ortrun.FromFloat64("x", ortrun.Float16, []int64{2, 3}, xVals))
	res, err := s.Run([]ortrun.Tensor{x})
	if err != nil {
		t.Fatal(err)
	}
	y := res[0]
	if y.DType != ortrun.Float16 || !slices.Equal(y.Shape, []int64{2, 4}) || len(y.Data) != 16 {
		t.Fatalf("output %v%v with %d bytes, want float16[2 4] with 16", y.DType, y.Shape, len(y.Data))
	}
	got, err := y.Float64s()
	if err != nil {
		t.Fatal(err)
	}
	// Inputs are exact in fp16; the output is rounded to fp16 (rel 2^-11).
	want := matmul(xVals, wVals, 2, 3, 4)
	if maxAbs, maxRel, ok := ortrun.Compare(got, want, 1e-3, 1e-3); !ok {
		t.Fatalf("got %v, want %v (max abs %g, rel %g)", got, want, maxAbs, maxRel)
	}
}

// A KV-cache style graph: an empty fp16 past, a scalar fp16 input and a
// scalar fp16 output.
func TestScalarAndEmptyTensors(t *testing.T) {
	f16 := ortrun.Float16
	path := writeModel(t, t.TempDir(), "kv.onnx", &onnxpb.GraphProto{
		Node: []*onnxpb.NodeProto{
			node("Concat", []string{"past", "x"}, []string{"present"}, intAttr("axis", 1)),
			node("ReduceSum", []string{"present"}, []string{"sum"}, intAttr("keepdims", 0)),
			node("Mul", []string{"sum", "scale"}, []string{"scaled"}),
		},
		Input: []*onnxpb.ValueInfoProto{
			valueInfo("past", f16, 1, "past_len", 2),
			valueInfo("x", f16, 1, "seq", 2),
			valueInfo("scale", f16),
		},
		Output: []*onnxpb.ValueInfoProto{
			valueInfo("present", f16, 1, "total", 2),
			valueInfo("scaled", f16),
		},
	})
	s := orttest.Open(t, path)
	if in := s.Inputs()[2]; in.Name != "scale" || len(in.Shape) != 0 {
		t.Fatalf("scalar input info %+v", in)
	}
	past := mustTensor(t)(ortrun.Zeros("past", f16, []int64{1, 0, 2}))
	x := mustTensor(t)(ortrun.FromFloat64("x", f16, []int64{1, 3, 2}, []float64{1, 2, 3, 4, 5, 6.5}))
	scale := mustTensor(t)(ortrun.FromFloat64("scale", f16, nil, []float64{0.5}))
	// Inputs in another order than the graph's.
	res, err := s.Run([]ortrun.Tensor{scale, x, past})
	if err != nil {
		t.Fatal(err)
	}
	present, scaled := res[0], res[1]
	if !slices.Equal(present.Shape, x.Shape) || !bytes.Equal(present.Data, x.Data) {
		t.Fatalf("present = %v %v, want %v %v", present.Shape, present.Data, x.Shape, x.Data)
	}
	if len(scaled.Shape) != 0 || scaled.DType != f16 {
		t.Fatalf("scaled is %v%v, want a float16 scalar", scaled.DType, scaled.Shape)
	}
	if v, _ := scaled.Float64s(); len(v) != 1 || v[0] != 10.75 {
		t.Fatalf("scaled = %v, want [10.75]", v)
	}

	// An empty output: both inputs empty.
	x0 := mustTensor(t)(ortrun.Zeros("x", f16, []int64{1, 0, 2}))
	res, err = s.RunOutputs([]ortrun.Tensor{past, x0, scale}, []string{"present"})
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 1 || !slices.Equal(res[0].Shape, []int64{1, 0, 2}) || len(res[0].Data) != 0 {
		t.Fatalf("empty present = %+v", res)
	}
}

// Weights in a file beside the model, at an offset, with the process in
// another folder: ORT must resolve the location from the model's folder.
func TestExternalData(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "model dir")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	w := mustTensor(t)(ortrun.FromFloat64("W", ortrun.Float32, []int64{3, 4}, wVals))
	const offset = 64 // a multiple of 64 keeps ORT's mmap path happy too
	blob := append(bytes.Repeat([]byte{0xAB}, offset), w.Data...)
	if err := os.WriteFile(filepath.Join(dir, "weights.bin"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	ext := &onnxpb.TensorProto{
		Name:         proto.String("W"),
		DataType:     proto.Int32(int32(ortrun.Float32)),
		Dims:         w.Shape,
		DataLocation: onnxpb.TensorProto_EXTERNAL.Enum(),
		ExternalData: []*onnxpb.StringStringEntryProto{
			{Key: proto.String("location"), Value: proto.String("weights.bin")},
			{Key: proto.String("offset"), Value: proto.String("64")},
			{Key: proto.String("length"), Value: proto.String("48")},
		},
	}
	path := writeModel(t, dir, "model.onnx", &onnxpb.GraphProto{
		Node:        []*onnxpb.NodeProto{node("MatMul", []string{"x", "W"}, []string{"y"})},
		Initializer: []*onnxpb.TensorProto{ext},
		Input:       []*onnxpb.ValueInfoProto{valueInfo("x", ortrun.Float32, "batch", 3)},
		Output:      []*onnxpb.ValueInfoProto{valueInfo("y", ortrun.Float32, "batch", 4)},
	})
	t.Chdir(t.TempDir())

	s := orttest.Open(t, path)
	x := mustTensor(t)(ortrun.FromFloat64("x", ortrun.Float32, []int64{2, 3}, xVals))
	res, err := s.Run([]ortrun.Tensor{x})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := res[0].Float64s()
	if _, _, ok := ortrun.Compare(got, matmul(xVals, wVals, 2, 3, 4), 1e-6, 1e-6); !ok {
		t.Fatalf("got %v", got)
	}

	// Without the data file the model does not load.
	if err := os.Remove(filepath.Join(dir, "weights.bin")); err != nil {
		t.Fatal(err)
	}
	if s2, err := ortrun.Open(path, nil); err == nil {
		s2.Close()
		t.Fatal("Open succeeded without weights.bin")
	}
}

// Every Go element type passes through Identity bit for bit.
func TestDTypeRoundTrip(t *testing.T) {
	orttest.Require(t)
	vals := []float64{0, 1, -2, 3.5, 100, -0.125}
	ints := []float64{0, 1, 2, 3, 100, 7}
	cases := []ortrun.Tensor{
		mustTensor(t)(ortrun.FromFloat64("f32", ortrun.Float32, []int64{2, 3}, vals)),
		mustTensor(t)(ortrun.FromFloat64("f64", ortrun.Float64, []int64{2, 3}, vals)),
		mustTensor(t)(ortrun.FromFloat64("f16", ortrun.Float16, []int64{2, 3}, vals)),
		mustTensor(t)(ortrun.FromFloat64("bf16", ortrun.BFloat16, []int64{2, 3}, vals)),
		mustTensor(t)(ortrun.NewTensor("i64", []int64{2, 3}, []int64{math.MinInt64, -1, 0, 1, 1 << 40, math.MaxInt64})),
		mustTensor(t)(ortrun.NewTensor("i32", []int64{6}, []int32{math.MinInt32, -1, 0, 1, 7, math.MaxInt32})),
		mustTensor(t)(ortrun.FromFloat64("i16", ortrun.Int16, []int64{6}, []float64{-32768, -1, 0, 1, 2, 32767})),
		mustTensor(t)(ortrun.FromFloat64("i8", ortrun.Int8, []int64{2, 3}, ints)),
		mustTensor(t)(ortrun.FromFloat64("u8", ortrun.Uint8, []int64{2, 3}, ints)),
		mustTensor(t)(ortrun.FromFloat64("u16", ortrun.Uint16, []int64{2, 3}, ints)),
		mustTensor(t)(ortrun.FromFloat64("u32", ortrun.Uint32, []int64{2, 3}, ints)),
		mustTensor(t)(ortrun.FromFloat64("u64", ortrun.Uint64, []int64{2, 3}, ints)),
		mustTensor(t)(ortrun.NewTensor("b", []int64{3}, []bool{true, false, true})),
	}

	g := &onnxpb.GraphProto{}
	for _, c := range cases {
		dims := make([]any, len(c.Shape))
		for i, d := range c.Shape {
			dims[i] = int(d)
		}
		g.Node = append(g.Node, node("Identity", []string{c.Name}, []string{c.Name + "_out"}))
		g.Input = append(g.Input, valueInfo(c.Name, c.DType, dims...))
		g.Output = append(g.Output, valueInfo(c.Name+"_out", c.DType, dims...))
	}
	s, err := ortrun.Open(writeModel(t, t.TempDir(), "identity.onnx", g), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	res, err := s.Run(cases)
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range cases {
		r := res[i]
		if r.Name != c.Name+"_out" || r.DType != c.DType || !slices.Equal(r.Shape, c.Shape) || !bytes.Equal(r.Data, c.Data) {
			t.Errorf("%s: got %v%v %x, want %v%v %x", c.Name, r.DType, r.Shape, r.Data, c.DType, c.Shape, c.Data)
		}
	}
	// Spot-check the typed views on ORT's output.
	if v, err := ortrun.Values[int64](res[4]); err != nil || v[5] != math.MaxInt64 {
		t.Errorf("Values[int64] = %v, %v", v, err)
	}
	if v, err := ortrun.Values[bool](res[12]); err != nil || !slices.Equal(v, []bool{true, false, true}) {
		t.Errorf("Values[bool] = %v, %v", v, err)
	}
	if v, err := res[3].Float64s(); err != nil || !slices.Equal(v, vals) {
		t.Errorf("bf16 Float64s = %v, %v", v, err)
	}
	if binary.LittleEndian.Uint16(res[2].Data[2:]) != 0x3c00 { // f16 1.0
		t.Errorf("f16 bits %x", res[2].Data)
	}
}

func TestRunErrors(t *testing.T) {
	s := orttest.Open(t, matmulModel(t, t.TempDir(), ortrun.Float32))
	good := mustTensor(t)(ortrun.FromFloat64("x", ortrun.Float32, []int64{2, 3}, xVals))
	wrongType := mustTensor(t)(ortrun.FromFloat64("x", ortrun.Float64, []int64{2, 3}, xVals))
	short := good
	short.Data = short.Data[:4]
	badRank := mustTensor(t)(ortrun.FromFloat64("x", ortrun.Float32, []int64{6}, xVals))
	other := good
	other.Name = "nope"

	for _, c := range []struct {
		name   string
		inputs []ortrun.Tensor
		want   string
	}{
		{"unknown input", []ortrun.Tensor{other}, `no input "nope"`},
		{"twice", []ortrun.Tensor{good, good}, "given twice"},
		{"dtype", []ortrun.Tensor{wrongType}, "is float64, model wants float32"},
		{"size", []ortrun.Tensor{short}, "needs 24 bytes, has 4"},
		{"missing", nil, "x"},
		{"rank", []ortrun.Tensor{badRank}, "x"},
	} {
		if _, err := s.Run(c.inputs); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want it to mention %q", c.name, err, c.want)
		}
	}
	if _, err := s.RunOutputs([]ortrun.Tensor{good}, []string{"z"}); err == nil {
		t.Error("RunOutputs with unknown output succeeded")
	}
	// The session still works after the failures.
	if _, err := s.Run([]ortrun.Tensor{good}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s.Close()
	if _, err := s.Run([]ortrun.Tensor{good}); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("Run after Close: %v", err)
	}
	if _, err := ortrun.Open(filepath.Join(t.TempDir(), "missing.onnx"), nil); err == nil {
		t.Fatal("Open of a missing file succeeded")
	}
	if _, err := ortrun.Open(filepath.Join(t.TempDir(), "x.onnx"), &ortrun.Options{Optimization: 42}); err == nil {
		t.Fatal("Open with a bad optimization level succeeded")
	}
}

func TestConcurrentRun(t *testing.T) {
	s := orttest.Open(t, matmulModel(t, t.TempDir(), ortrun.Float32))
	x := mustTensor(t)(ortrun.FromFloat64("x", ortrun.Float32, []int64{2, 3}, xVals))
	first, err := s.Run([]ortrun.Tensor{x})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				res, err := s.Run([]ortrun.Tensor{x})
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(res[0].Data, first[0].Data) {
					errs <- errors.New("results differ between runs")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestOptions(t *testing.T) {
	path := matmulModel(t, t.TempDir(), ortrun.Float32)
	orttest.Require(t)
	for _, o := range []ortrun.Options{{IntraOpThreads: 2}, {Optimization: ortrun.OptDisabled}, {Optimization: ortrun.OptBasic}, {Optimization: ortrun.OptExtended}} {
		s, err := ortrun.Open(path, &o)
		if err != nil {
			t.Fatalf("%+v: %v", o, err)
		}
		x := mustTensor(t)(ortrun.FromFloat64("x", ortrun.Float32, []int64{1, 3}, xVals[:3]))
		if _, err := s.Run([]ortrun.Tensor{x}); err != nil {
			t.Fatalf("%+v: %v", o, err)
		}
		s.Close()
	}
	if v := ortrun.Version(); v != ortrun.ORTVersion && os.Getenv(ortrun.EnvLib) == "" {
		t.Errorf("Version() = %q, want %q", v, ortrun.ORTVersion)
	}
}

func TestLibraryPath(t *testing.T) {
	t.Setenv(ortrun.EnvLib, filepath.Join(t.TempDir(), "nope.so"))
	_, err := ortrun.LibraryPath()
	if !errors.Is(err, ortrun.ErrNoLibrary) || !strings.Contains(err.Error(), "scripts/install-ort.sh") ||
		strings.Contains(err.Error(), "\n") {
		t.Fatalf("err = %v", err)
	}

	cache := t.TempDir()
	t.Setenv(ortrun.EnvLib, "")
	t.Setenv(ortrun.EnvCache, cache)
	want := filepath.Join(cache, "ort-"+ortrun.ORTVersion, "libonnxruntime.so.1")
	if p, err := ortrun.DefaultLibraryPath(); err != nil || p != want {
		t.Fatalf("DefaultLibraryPath() = %q, %v; want %q", p, err, want)
	}
	if _, err := ortrun.LibraryPath(); !errors.Is(err, ortrun.ErrNoLibrary) || !strings.Contains(err.Error(), want) {
		t.Fatalf("LibraryPath() with an empty cache: %v", err)
	}
	if err := os.MkdirAll(filepath.Dir(want), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(want, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if p, err := ortrun.LibraryPath(); err != nil || p != want {
		t.Fatalf("LibraryPath() = %q, %v; want %q", p, err, want)
	}
}
