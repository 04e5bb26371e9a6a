package export

import (
	"encoding/binary"
	"math"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
)

func readConvExpected(t *testing.T) map[string][]testutil.PEFTConversion {
	t.Helper()
	want := testutil.PEFTConversions(t)
	if len(want) != 2 {
		t.Fatalf("peft_expected.json has %d dirs", len(want))
	}
	return want
}

func TestOnnxAdapterFromPEFT(t *testing.T) {
	for dir, want := range readConvExpected(t) {
		_, mods, err := ReadPEFTAdapter(filepath.Join(adaptersDir, dir))
		if err != nil {
			t.Fatal(err)
		}
		for _, dt := range []graph.DataType{graph.Float, graph.Float16} {
			a, err := OnnxAdapterFromPEFT(mods, dt)
			if err != nil {
				t.Fatal(err)
			}
			if len(a.Params) != 2*len(want) {
				t.Fatalf("%s: %d params, want %d", dir, len(a.Params), 2*len(want))
			}
			for _, w := range want {
				for _, f := range []struct {
					suffix string
					dims   []int64
					f32    []float64
					f16    []uint16
				}{{".lora_A.weight", w.ADims, w.AF32, w.AF16Bits}, {".lora_B.weight", w.BDims, w.BF32, w.BF16Bits}} {
					p, ok := a.Param(w.Module + f.suffix)
					if !ok {
						t.Fatalf("%s: no %s%s", dir, w.Module, f.suffix)
					}
					if p.DataType != dt || !reflect.DeepEqual(p.Dims, f.dims) {
						t.Fatalf("%s %s: %v %v, want %v %v", dir, p.Name, p.DataType, p.Dims, dt, f.dims)
					}
					// Exact: both sides round the float64 product once.
					for i := range f.f32 {
						if dt == graph.Float {
							got := math.Float32frombits(binary.LittleEndian.Uint32(p.Data[4*i:]))
							if float64(got) != f.f32[i] {
								t.Fatalf("%s %s[%d] = %v, numpy %v", dir, p.Name, i, got, f.f32[i])
							}
						} else if got := binary.LittleEndian.Uint16(p.Data[2*i:]); got != f.f16[i] {
							t.Fatalf("%s %s[%d] = %#04x, numpy %#04x", dir, p.Name, i, got, f.f16[i])
						}
					}
				}
			}
		}
	}
}

// TestPEFTFromOnnxAdapter: an adapter converted to PEFT (scaling 1) and
// back gives the same parameters, and the config resolves every rank.
func TestPEFTFromOnnxAdapter(t *testing.T) {
	_, mods, err := ReadPEFTAdapter(filepath.Join(adaptersDir, "peft-plain"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := OnnxAdapterFromPEFT(mods, graph.Float)
	if err != nil {
		t.Fatal(err)
	}
	cfg, back, err := PEFTFromOnnxAdapter(a, "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.R != 2 && cfg.R != 4 || cfg.LoraAlpha != float64(cfg.R) || cfg.UseRSLoRA {
		t.Errorf("config r %d alpha %v rslora %v", cfg.R, cfg.LoraAlpha, cfg.UseRSLoRA)
	}
	if len(cfg.RankPattern) != 1 || len(cfg.AlphaPattern) != 1 || cfg.AlphaPattern[0].Value != float64(cfg.RankPattern[0].Value) {
		t.Errorf("patterns %v %v", cfg.RankPattern, cfg.AlphaPattern)
	}
	dir := t.TempDir()
	if err := WritePEFTAdapter(dir, cfg, back); err != nil {
		t.Fatal(err)
	}
	cfg2, mods2, err := ReadPEFTAdapter(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mods2 {
		if m.Scaling != 1 {
			t.Errorf("%s: scaling %v after the round trip, want 1", m.Name, m.Scaling)
		}
	}
	if cfg2.R != cfg.R {
		t.Errorf("r %d read back as %d", cfg.R, cfg2.R)
	}
	again, err := OnnxAdapterFromPEFT(mods2, graph.Float)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(again.Params, a.Params) {
		t.Error("onnx adapter -> PEFT -> onnx adapter changed the parameters")
	}
}

func TestPEFTFromOnnxAdapterErrors(t *testing.T) {
	p := func(name string, dt graph.DataType, dims ...int64) OnnxAdapterParam {
		n, _ := graph.NumElements(dims)
		q, err := NewOnnxAdapterParam(name, dt, dims, make([]float64, n))
		if err != nil {
			t.Fatal(err)
		}
		return q
	}
	cases := []struct {
		name   string
		params []OnnxAdapterParam
		want   string
	}{
		{"not lora", []OnnxAdapterParam{p("foo", graph.Float, 2)}, `parameter "foo" is not named`},
		{"only A", []OnnxAdapterParam{p("m.lora_A.weight", graph.Float, 4, 2)}, "module m has only one of"},
		{"rank mismatch", []OnnxAdapterParam{p("m.lora_A.weight", graph.Float, 4, 2), p("m.lora_B.weight", graph.Float, 3, 5)}, "are not [in, r] and [r, out]"},
		{"dtype mismatch", []OnnxAdapterParam{p("m.lora_A.weight", graph.Float, 4, 2), p("m.lora_B.weight", graph.Float16, 2, 5)}, "A is FLOAT and B FLOAT16"},
		{"rank 0", []OnnxAdapterParam{p("m.lora_A.weight", graph.Float, 4, 0), p("m.lora_B.weight", graph.Float, 0, 5)}, "with r > 0"},
		{"empty", nil, "no parameters"},
	}
	for _, c := range cases {
		_, _, err := PEFTFromOnnxAdapter(&OnnxAdapter{Params: c.params}, "")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
	}
	if _, err := OnnxAdapterFromPEFT(nil, graph.Float); err == nil {
		t.Error("no modules converted")
	}
	if _, err := OnnxAdapterFromPEFT([]PEFTModule{{Name: "m", Rank: 1, InFeatures: 1, OutFeatures: 1, A: []float32{1}, B: []float32{1}}}, graph.Int32); err == nil {
		t.Error("INT32 adapter made")
	}
}
