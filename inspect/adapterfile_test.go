package inspect

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

var adaptersDir = filepath.Join("..", "testdata", "adapters")

// pyParams returns the params of one file as generate.py decoded them.
func pyParams(t *testing.T, file string) map[string]struct {
	Dims []int64
	Vals []float64
} {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(adaptersDir, "adapters_expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var all map[string]struct {
		Params []struct {
			Name     string  `json:"name"`
			DataType int     `json:"data_type"`
			Dims     []int64 `json:"dims"`
			Data     string  `json:"data"`
		} `json:"params"`
	}
	if err := json.Unmarshal(raw, &all); err != nil {
		t.Fatal(err)
	}
	out := map[string]struct {
		Dims []int64
		Vals []float64
	}{}
	for _, p := range all[file].Params {
		b, _ := hex.DecodeString(p.Data)
		if p.DataType != 1 {
			t.Fatalf("%s is not float32", p.Name)
		}
		v := make([]float64, len(b)/4)
		for i := range v {
			v[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:])))
		}
		out[p.Name] = struct {
			Dims []int64
			Vals []float64
		}{p.Dims, v}
	}
	return out
}

func TestAdapterFileReport(t *testing.T) {
	path := filepath.Join(adaptersDir, "adapter2.onnx_adapter")
	r, err := BuildAdapterFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := pyParams(t, "adapter2.onnx_adapter")
	if len(r.Params) != 4 || len(r.Modules) != 2 || len(r.Unpaired) != 0 {
		t.Fatalf("%d params, %d modules, unpaired %v", len(r.Params), len(r.Modules), r.Unpaired)
	}
	for _, p := range r.Params {
		var s float64
		for _, v := range want[p.Name].Vals {
			s += v * v
		}
		if p.Norm == nil || math.Abs(*p.Norm-math.Sqrt(s)) > 1e-5*math.Sqrt(s) {
			t.Errorf("%s: norm %v, want %v", p.Name, p.Norm, math.Sqrt(s))
		}
	}
	for i, m := range r.Modules {
		name := []string{"layers.0.proj", "layers.1.proj"}[i]
		a, b := want[name+".lora_A.weight"], want[name+".lora_B.weight"]
		in, rank, out := int(a.Dims[0]), int(a.Dims[1]), int(b.Dims[1])
		if m.Module != name || m.Rank != rank || m.In != in || m.Out != out || m.DType != "float" {
			t.Errorf("module %+v", m)
		}
		// The plain product, element by element.
		var s float64
		for x := 0; x < in; x++ {
			for y := 0; y < out; y++ {
				var d float64
				for k := 0; k < rank; k++ {
					d += a.Vals[x*rank+k] * b.Vals[k*out+y]
				}
				s += d * d
			}
		}
		if want := math.Sqrt(s); math.Abs(m.DeltaNorm-want) > 1e-5*want {
			t.Errorf("%s: ‖A·B‖ %v, want %v", name, m.DeltaNorm, want)
		}
	}
	var text, js bytes.Buffer
	if err := WriteAdapterFileText(&text, r); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"layers.1.proj  3     6   5    float", "layers.0.proj.lora_A.weight  float  [8 2]"} {
		if !strings.Contains(text.String(), s) {
			t.Errorf("text lacks %q:\n%s", s, text.String())
		}
	}
	if err := WriteAdapterFileJSON(&js, r); err != nil {
		t.Fatal(err)
	}
	var back AdapterFileReport
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.Modules) != 2 {
		t.Errorf("JSON does not read back: %v", err)
	}
}

func TestAdapterFileReportMixed(t *testing.T) {
	r, err := BuildAdapterFile(filepath.Join(adaptersDir, "mixed.onnx_adapter"))
	if err != nil {
		t.Fatal(err)
	}
	if r.AdapterVersion != 7 || r.ModelVersion != 3 || len(r.Modules) != 0 || len(r.Unpaired) != 6 {
		t.Errorf("report %+v", r)
	}
	for _, p := range r.Params {
		if (p.Norm == nil) != (p.Name == "one" || p.Name == "bytes") {
			t.Errorf("%s: norm %v", p.Name, p.Norm)
		}
		if p.Name == "double" && math.Abs(*p.Norm-1e300) > 1e295 {
			t.Errorf("double norm %v", *p.Norm)
		}
	}
	// NaN values still give a report that encodes as JSON.
	p := filepath.Join(t.TempDir(), "nan.onnx_adapter")
	nan := export.OnnxAdapter{Params: []export.OnnxAdapterParam{}}
	for _, n := range []string{"m.lora_A.weight", "m.lora_B.weight"} {
		q, err := export.NewOnnxAdapterParam(n, graph.Float, []int64{1, 1}, []float64{math.NaN()})
		if err != nil {
			t.Fatal(err)
		}
		nan.Params = append(nan.Params, q)
	}
	if err := export.WriteOnnxAdapter(p, &nan); err != nil {
		t.Fatal(err)
	}
	rn, err := BuildAdapterFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !rn.Params[0].NonFinite || !rn.Modules[0].NonFinite {
		t.Errorf("NaN not flagged: %+v", rn)
	}
	if err := WriteAdapterFileJSON(io.Discard, rn); err != nil {
		t.Errorf("JSON of a NaN adapter: %v", err)
	}
	if _, err := BuildAdapterFile(filepath.Join(adaptersDir, "generate.py")); err == nil {
		t.Error("a Python file read as an adapter")
	}
}
