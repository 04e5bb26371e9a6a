package rewrite

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

func quantConfig() InjectConfig {
	return InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc1", "fc2"}, Rank: 4, Alpha: 8}, Seed: 4}
}

func TestFindLayersQuantized(t *testing.T) {
	for _, c := range []struct {
		model, kind string
		ops         []string
	}{
		{"nbits.onnx", QuantNBits, []string{"MatMulNBits", "MatMulNBits"}},
		{"qdq.onnx", QuantQDQ, []string{"MatMul", "Gemm"}},
	} {
		m := loadModel(t, variantsB(c.model))
		layers, skipped := FindLayers(m)
		if len(layers) != 2 || len(skipped) != 0 {
			t.Fatalf("%s: %d layers, skipped %+v", c.model, len(layers), skipped)
		}
		for i, l := range layers {
			want := []string{"fc1", "fc2"}[i]
			in, out := []int64{32, 16}[i], []int64{16, 8}[i]
			if l.Module != want || l.Op != c.ops[i] || l.Quant == nil || l.Quant.Kind != c.kind || l.In != in || l.Out != out {
				t.Errorf("%s layer %d: %s %s %+v [%d, %d]", c.model, i, l.Module, l.Op, l.Quant, l.In, l.Out)
			}
		}
	}
}

// quantInjected injects fc1 and fc2 and loads the fixture's factors.
func quantInjected(t *testing.T, model string, e vbExpected) *graph.Model {
	t.Helper()
	m := loadModel(t, variantsB(model))
	inj, err := Inject(m, quantConfig())
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range inj.Manifest.Adapters {
		setInitializer(t, m, a.LoraA, e.Weights[a.Module+".A"].Data)
		setInitializer(t, m, a.LoraB, e.Weights[a.Module+".B"].Data)
	}
	return m
}

// TestQuantizedInORT, for a MatMulNBits model (4-bit with zero points and
// bias, 8-bit without) and a QDQ one (int8 per column, uint8 per tensor):
// the quantized base computes the torch model of its dequantized weights;
// injected with B = 0 it computes exactly the base; with the fixture's
// factors, the float reference of dequantized W plus ΔW (rel <= 1e-5).
// Merge refuses by default naming both options; --dequantize writes float
// weights equal to torch's W + ΔW with the same outputs; --requantize
// keeps the scheme and reports the error it adds.
func TestQuantizedInORT(t *testing.T) {
	orttest.Require(t)
	for _, c := range []struct{ model, name string }{{"nbits.onnx", "nbits"}, {"qdq.onnx", "qdq"}} {
		t.Run(c.name, func(t *testing.T) {
			e := readVB(t, c.name)
			ins := e.inputs(t)
			dir := t.TempDir()
			base := runModel(t, variantsB(c.model), ins)
			if rel := vtRel(t, base, e.output("base", "y")); rel > 1e-5 {
				t.Fatalf("quantized base vs torch on the dequantized weights: rel %g", rel)
			}
			m0 := loadModel(t, variantsB(c.model))
			if _, err := Inject(m0, quantConfig()); err != nil {
				t.Fatal(err)
			}
			step0 := runModel(t, mgSaveModel(t, m0, filepath.Join(dir, "step0.onnx")), ins)
			for i, v := range step0["y"] {
				if v != base["y"][i] {
					t.Fatalf("injected with B = 0: y[%d] = %v, the base gives %v", i, v, base["y"][i])
				}
			}
			m := quantInjected(t, c.model, e)
			got := runModel(t, mgSaveModel(t, m, filepath.Join(dir, "injected.onnx")), ins)
			if rel := vtRel(t, got, e.output("adapted", "y")); rel > 1e-5 {
				t.Fatalf("injected vs dequantized W + ΔW in float64: rel %g", rel)
			} else {
				t.Logf("injected vs dequantized W + ΔW: rel %.2g", rel)
			}

			_, err := Merge(m, MergeOptions{})
			if err == nil || !strings.Contains(err.Error(), "fc1") || !strings.Contains(err.Error(), "--dequantize") ||
				!strings.Contains(err.Error(), "--requantize") || strings.Contains(err.Error(), "\n") {
				t.Fatalf("default merge: %v", err)
			}

			dq := quantInjected(t, c.model, e)
			if _, err := Merge(dq, MergeOptions{Quantized: QuantDequantize}); err != nil {
				t.Fatal(err)
			}
			for _, n := range dq.Graph().Proto.Node {
				if n.GetOpType() == QuantNBits || n.GetOpType() == "DequantizeLinear" {
					t.Errorf("node %s left after --dequantize", n.GetName())
				}
			}
			merged := runModel(t, mgSaveModel(t, dq, filepath.Join(dir, "dequantized.onnx")), ins)
			if rel := vtRel(t, merged, got); rel > 1e-6 {
				t.Errorf("dequantized merge vs unmerged: rel %g", rel)
			} else {
				t.Logf("dequantized merge vs unmerged: rel %.2g", rel)
			}
			layers, _ := FindLayers(dq)
			for _, l := range layers {
				w, err := weightInOut(dq, l)
				if err != nil {
					t.Fatal(err)
				}
				want := e.Weights[l.Module+".merged"].Data
				if rel := vtRel(t, map[string][]float64{"w": w}, map[string][]float64{"w": want}); rel > 1e-6 {
					t.Errorf("%s dequantized merged weight vs W + ΔW: rel %g", l.Module, rel)
				}
			}

			rq := quantInjected(t, c.model, e)
			rep, err := Merge(rq, MergeOptions{Quantized: QuantRequantize})
			if err != nil {
				t.Fatal(err)
			}
			requant := mgSaveModel(t, rq, filepath.Join(dir, "requantized.onnx"))
			out := runModel(t, requant, ins)
			rel := vtRel(t, out, e.output("adapted", "y"))
			t.Logf("requantized vs float W + ΔW: rel %.3g", rel)
			worst := 0.0
			for _, r := range rep.Merged {
				worst = math.Max(worst, r.RequantRelError)
			}
			// A sanity bound: the outputs move by the order of the weights'
			// relative requantization error, not more.
			if rel > 4*worst {
				t.Errorf("requantized model drifts from W + ΔW by rel %g, its weights by at most %g", rel, worst)
			}
			// The reported error is what the new codes decode to, minus
			// W + ΔW (dequantization is checked against torch above).
			back := loadModel(t, requant)
			bl, _ := FindLayers(back)
			for i, l := range bl {
				if l.Quant == nil || l.Quant.Kind != []string{QuantNBits, QuantQDQ}[map[string]int{"nbits": 0, "qdq": 1}[c.name]] {
					t.Fatalf("%s is no longer quantized the same way: %+v", l.Module, l.Quant)
				}
				w, err := dequantized(back, l)
				if err != nil {
					t.Fatal(err)
				}
				want := e.Weights[l.Module+".merged"].Data
				maxErr := 0.0
				for j := range w {
					maxErr = math.Max(maxErr, math.Abs(w[j]-want[j]))
				}
				r := rep.Merged[i]
				if r.Module != l.Module || r.Quantized != QuantRequantize || math.Abs(r.RequantMaxError-maxErr) > 1e-6*maxErr || maxErr == 0 {
					t.Errorf("%s: reported requant error %g (%s), measured %g", l.Module, r.RequantMaxError, r.Quantized, maxErr)
				} else {
					t.Logf("%s requantized: max error %.3g, relative Frobenius %.3g", l.Module, r.RequantMaxError, r.RequantRelError)
				}
			}
		})
	}
}

// TestVariantsMergeFile: MergeFile (the streaming save the CLI uses, here
// with every tensor in an external data file) merges Conv, DoRA and
// quantized adapters to the same outputs as the live branches.
func TestVariantsMergeFile(t *testing.T) {
	orttest.Require(t)
	dir := t.TempDir()
	ext := graph.SaveOptions{External: graph.ExternalAlways, Threshold: 1}
	for _, c := range []struct {
		name  string
		model *graph.Model
		e     vbExpected
		opts  MergeOptions
	}{
		{"conv", func() *graph.Model { m, _ := convInjected(t); return m }(), readVB(t, "conv"), MergeOptions{}},
		{"dora", doraInjected(t), readVB(t, "dora"), MergeOptions{}},
		{"nbits", quantInjected(t, "nbits.onnx", readVB(t, "nbits")), readVB(t, "nbits"), MergeOptions{Quantized: QuantDequantize}},
		{"qdq-requantize", quantInjected(t, "qdq.onnx", readVB(t, "qdq")), readVB(t, "qdq"), MergeOptions{Quantized: QuantRequantize}},
	} {
		src := filepath.Join(dir, c.name, "injected.onnx")
		if err := c.model.Save(mustMkdir(t, src), ext); err != nil {
			t.Fatal(err)
		}
		ins := c.e.inputs(t)
		live := runModel(t, src, ins)
		dst := filepath.Join(dir, c.name, "merged.onnx")
		if _, err := MergeFile(src, dst, c.opts, ext); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		tol := 1e-6
		if c.opts.Quantized == QuantRequantize {
			tol = 0.05 // the requantization error, measured in TestQuantizedInORT
		}
		if rel := vtRel(t, runModel(t, dst, ins), live); rel > tol {
			t.Errorf("%s: MergeFile vs live branches: rel %g", c.name, rel)
		} else {
			t.Logf("%s: MergeFile vs live branches: rel %.2g", c.name, rel)
		}
	}
}

func mustMkdir(t *testing.T, path string) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestQuantizedMalformed: quantized weights whose parts disagree are
// skipped with the reason, never read out of bounds.
func TestQuantizedMalformed(t *testing.T) {
	m := loadModel(t, variantsB("qdq.onnx"))
	zp, _ := m.Graph().Initializer("fc1.weight_zero_point")
	zp.Dims = []int64{4}
	if err := graph.SetRawData(zp, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	layers, skipped := FindLayers(m)
	if len(layers) != 1 || len(skipped) != 1 || !strings.Contains(skipped[0].Reason, "does not fit its scales") {
		t.Errorf("layers %d, skipped %+v", len(layers), skipped)
	}
	n := loadModel(t, variantsB("nbits.onnx"))
	sc, _ := n.Graph().Initializer("fc1.weight_scales")
	sc.Dims = []int64{3}
	if err := graph.SetFloat64s(sc, []float64{1, 1, 1}); err != nil {
		t.Fatal(err)
	}
	layers, skipped = FindLayers(n)
	if len(layers) != 1 || len(skipped) != 1 || !strings.Contains(skipped[0].Reason, "scales") {
		t.Errorf("layers %d, skipped %+v", len(layers), skipped)
	}
}

// TestQuantizedApplyPEFT: a PEFT LoRA dir on a quantized model is refused
// by default naming the options, and with Dequantize gives the float
// W + ΔW of the fixture.
func TestQuantizedApplyPEFT(t *testing.T) {
	e := readVB(t, "nbits")
	dir := t.TempDir()
	var mods []export.PEFTModule
	for _, c := range []struct {
		name    string
		in, out int
	}{{"fc1", 32, 16}, {"fc2", 16, 8}} {
		a, b := e.Weights[c.name+".A"].Data, e.Weights[c.name+".B"].Data // [in, r], [r, out]
		mod := export.PEFTModule{Name: c.name, Rank: 4, InFeatures: c.in, OutFeatures: c.out, Alpha: 8}
		for _, v := range transposeF64(a, c.in, 4) {
			mod.A = append(mod.A, float32(v))
		}
		for _, v := range transposeF64(b, 4, c.out) {
			mod.B = append(mod.B, float32(v))
		}
		mods = append(mods, mod)
	}
	if err := export.WritePEFTAdapter(dir, export.NewPEFTConfig(4, 8, "fc1", "fc2"), mods); err != nil {
		t.Fatal(err)
	}
	_, err := ApplyPEFT(loadModel(t, variantsB("nbits.onnx")), dir, MergeOptions{})
	if err == nil || !strings.Contains(err.Error(), "--dequantize") || !strings.Contains(err.Error(), "fc1") {
		t.Fatalf("default: %v", err)
	}
	m := loadModel(t, variantsB("nbits.onnx"))
	if _, err := ApplyPEFT(m, dir, MergeOptions{Quantized: QuantDequantize}); err != nil {
		t.Fatal(err)
	}
	layers, _ := FindLayers(m)
	for _, l := range layers {
		w, err := weightInOut(m, l)
		if err != nil {
			t.Fatal(err)
		}
		if rel := vtRel(t, map[string][]float64{"w": w}, map[string][]float64{"w": e.Weights[l.Module+".merged"].Data}); rel > 1e-6 {
			t.Errorf("%s: rel %g", l.Module, rel)
		}
	}
}
