package rewrite

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// variantsB returns a path in testdata/variants-b.
func variantsB(parts ...string) string {
	return filepath.Join(append([]string{testutil.RepoRoot(), "testdata", "variants-b"}, parts...)...)
}

type vbTensor struct {
	Shape []int64   `json:"shape"`
	Data  []float64 `json:"data"`
}

type vbExpected struct {
	Inputs  map[string]vbTensor `json:"inputs"`
	Outputs map[string]vbTensor `json:"outputs"`
	Weights map[string]vbTensor `json:"weights"`
}

// injectedThenMerged checks an injected model against the generator's torch
// forward ("unmerged", which must differ from "base" clearly), merges it in
// place, and checks the merged model against the injected one in ORT. It
// returns the injected model's outputs.
func injectedThenMerged(t *testing.T, m *graph.Model, e vbExpected, ins []ortrun.Tensor, dir, ref string) map[string][]float64 {
	t.Helper()
	injected := mgSaveModel(t, m, filepath.Join(dir, "injected.onnx"))
	got := runModel(t, injected, ins)
	if vtRel(t, e.output("base", "y"), e.output("unmerged", "y")) < 1e-2 {
		t.Fatal("the adapter hardly changes the output; the test would prove nothing")
	}
	if rel := vtRel(t, got, e.output("unmerged", "y")); rel > 1e-5 {
		t.Fatalf("injected vs %s forward: rel %g", ref, rel)
	} else {
		t.Logf("injected vs %s forward: rel %.2g", ref, rel)
	}
	if _, err := Merge(m, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	merged := mgSaveModel(t, m, filepath.Join(dir, "merged.onnx"))
	if rel := vtRel(t, runModel(t, merged, ins), got); rel > 1e-6 {
		t.Errorf("merged vs unmerged: rel %g", rel)
	} else {
		t.Logf("merged vs unmerged: rel %.2g", rel)
	}
	return got
}

func readVB(t *testing.T, c string) vbExpected {
	t.Helper()
	raw, err := os.ReadFile(variantsB(c, "expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var e vbExpected
	if err := json.Unmarshal(raw, &e); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e vbExpected) inputs(t *testing.T) []ortrun.Tensor {
	t.Helper()
	var ins []ortrun.Tensor
	for name, v := range e.Inputs {
		ten, err := ortrun.FromFloat64(name, ortrun.Float32, v.Shape, v.Data)
		if err != nil {
			t.Fatal(err)
		}
		ins = append(ins, ten)
	}
	return ins
}

// output returns one expected output under the model's output name.
func (e vbExpected) output(key, name string) map[string][]float64 {
	return map[string][]float64{name: e.Outputs[key].Data}
}

// setInitializer overwrites an initializer of m with vals.
func setInitializer(t *testing.T, m *graph.Model, name string, vals []float64) {
	t.Helper()
	var tp *onnxpb.TensorProto
	m.Graph().Walk(func(s *graph.Graph) {
		if x, _ := s.Initializer(name); x != nil {
			tp = x
		}
	})
	if tp == nil {
		t.Fatalf("no initializer %s", name)
	}
	if err := graph.SetFloat64s(tp, vals); err != nil {
		t.Fatal(err)
	}
}

// loadPEFTTensors reads every tensor of an adapter dir's safetensors file.
func loadPEFTTensors(t *testing.T, dir string) map[string][]float64 {
	t.Helper()
	f, err := export.OpenSafetensors(filepath.Join(dir, export.PEFTWeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]float64{}
	for _, n := range f.Names() {
		v, err := f.ReadFloat64(n)
		if err != nil {
			t.Fatal(err)
		}
		out[n] = v
	}
	return out
}

func TestFindLayersConv(t *testing.T) {
	m := loadModel(t, variantsB("conv.onnx"))
	layers, skipped := FindLayers(m)
	var got []string
	for _, l := range layers {
		got = append(got, l.Module)
	}
	if !slices.Equal(got, []string{"pw", "body"}) {
		t.Fatalf("layers %v, want [pw body]", got)
	}
	if l := layers[1]; l.In != 8 || l.Out != 6 || !slices.Equal(l.Kernel, []int64{3, 3}) || l.Op != "Conv" {
		t.Errorf("body: in %d out %d kernel %v op %s", l.In, l.Out, l.Kernel, l.Op)
	}
	if len(skipped) != 1 || !strings.Contains(skipped[0].Reason, "group=2") || skipped[0].Op != "Conv" {
		t.Errorf("skipped %+v, want the grouped dw Conv", skipped)
	}
	// all-linear leaves Conv layers out, as PEFT's does.
	if _, err := Inject(m, allLinear(4, 8)); err == nil {
		t.Error("all-linear selected Conv layers")
	}
}

// convInjected injects Conv LoRA on pw and body with the PEFT fixture's
// factors in place of the initial ones.
func convInjected(t *testing.T) (*graph.Model, *Injection) {
	t.Helper()
	m := loadModel(t, variantsB("conv.onnx"))
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"pw", "body"}, Rank: 4, Alpha: 8}, Seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	peft := loadPEFTTensors(t, variantsB("conv", "adapter"))
	for _, a := range inj.Manifest.Adapters {
		setInitializer(t, m, a.LoraA, peft["base_model.model."+a.Module+".lora_A.weight"])
		setInitializer(t, m, a.LoraB, peft["base_model.model."+a.Module+".lora_B.weight"])
	}
	return m, inj
}

func TestInjectConvShapes(t *testing.T) {
	m := loadModel(t, variantsB("conv.onnx"))
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"body"}, Rank: 4, Alpha: 8}, Seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	a := inj.Manifest.Adapters[0]
	ta, _ := m.Graph().Initializer(a.LoraA)
	tb, _ := m.Graph().Initializer(a.LoraB)
	if !slices.Equal(ta.Dims, []int64{4, 8, 3, 3}) || !slices.Equal(tb.Dims, []int64{6, 4, 1, 1}) {
		t.Fatalf("A %v B %v", ta.Dims, tb.Dims)
	}
	// PEFT's kaiming_uniform_(a=√5) on a Conv: bound 1/√(in·kh·kw).
	av, _ := m.Float64s(ta)
	bound := 1 / 8.48528137423857 // √72
	for _, v := range av {
		if v < -bound || v > bound {
			t.Fatalf("A value %v outside ±%v", v, bound)
		}
	}
	if want := int64(4 * (8*9 + 6)); inj.Trainable != want {
		t.Errorf("trainable %d, want %d", inj.Trainable, want)
	}
	// Conv_A carries the layer's stride and padding.
	var convA *onnxpb.NodeProto
	for _, n := range m.Graph().Proto.Node {
		if strings.HasSuffix(n.GetName(), "/lora/Conv_A") {
			convA = n
		}
	}
	if convA == nil || !slices.Equal(graph.AttrInts(convA, "strides"), []int64{2, 2}) || !slices.Equal(graph.AttrInts(convA, "pads"), []int64{1, 1, 1, 1}) {
		t.Fatalf("Conv_A %v", convA)
	}
}

// TestConvLoRAInORT: the injected Conv LoRA computes PEFT's forward
// (torch, float64) within 1e-5; merging gives the same outputs within 1e-6
// and torch's merged kernels; the PEFT dir applied with ApplyPEFT equals
// torch's merge; the recognized branch (manifest stripped) merges the same.
func TestConvLoRAInORT(t *testing.T) {
	orttest.Require(t)
	e := readVB(t, "conv")
	ins := e.inputs(t)
	dir := t.TempDir()
	m, _ := convInjected(t)
	got := injectedThenMerged(t, m, e, ins, dir, "torch PEFT")
	for name, w := range e.Weights {
		tp, _ := m.Graph().Initializer(name)
		if tp == nil {
			t.Fatalf("merged model has no %s", name)
		}
		v, _ := m.Float64s(tp)
		if rel := vtRel(t, map[string][]float64{name: v}, map[string][]float64{name: w.Data}); rel > 1e-6 {
			t.Errorf("%s vs torch's merge: rel %g", name, rel)
		}
	}

	// Recognition: the same branch with the manifest gone merges the same.
	m2, _ := convInjected(t)
	m2.DeleteMetadata(ManifestKey)
	rep, err := Merge(m2, MergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 2 {
		t.Fatalf("recognized %d adapters, want 2", len(rep.Merged))
	}
	rec := mgSaveModel(t, m2, filepath.Join(dir, "recognized.onnx"))
	if rel := vtRel(t, runModel(t, rec, ins), got); rel > 1e-6 {
		t.Errorf("merge of the recognized branches vs unmerged: rel %g", rel)
	}
}

// TestConvPEFTDirs: PEFT's Conv LoRA dir applied with ApplyPEFT gives
// torch's merged kernels and outputs; the injected model exported with
// ExportPEFT writes PEFT's keys and shapes with the same values, which
// apply back to the same model.
func TestConvPEFTDirs(t *testing.T) {
	e := readVB(t, "conv")
	m := loadModel(t, variantsB("conv.onnx"))
	rep, err := ApplyPEFT(m, variantsB("conv", "adapter"), MergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 2 {
		t.Fatalf("merged %d modules, want 2", len(rep.Merged))
	}
	for name, w := range e.Weights {
		tp, _ := m.Graph().Initializer(name)
		v, _ := m.Float64s(tp)
		if rel := vtRel(t, map[string][]float64{name: v}, map[string][]float64{name: w.Data}); rel > 1e-6 {
			t.Errorf("%s applied vs torch's merge: rel %g", name, rel)
		}
	}
	dir := t.TempDir()
	t.Run("ort", func(t *testing.T) {
		orttest.Require(t)
		applied := mgSaveModel(t, m, filepath.Join(dir, "applied.onnx"))
		if rel := vtRel(t, runModel(t, applied, e.inputs(t)), e.output("merged", "y")); rel > 1e-5 {
			t.Errorf("applied PEFT dir vs torch merged model: rel %g", rel)
		} else {
			t.Logf("applied PEFT dir vs torch merged: rel %.2g", rel)
		}
	})

	inj, _ := convInjected(t)
	out := filepath.Join(dir, "exported")
	if _, err := ExportPEFT(inj, out, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	want := loadPEFTTensors(t, variantsB("conv", "adapter"))
	got := loadPEFTTensors(t, out)
	if len(got) != len(want) {
		t.Fatalf("exported keys %d, want %d", len(got), len(want))
	}
	f, err := export.OpenSafetensors(filepath.Join(out, export.PEFTWeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ref, err := export.OpenSafetensors(variantsB("conv", "adapter", export.PEFTWeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	for k, w := range want {
		gi, ok := f.Tensor(k)
		ri, _ := ref.Tensor(k)
		if !ok || !slices.Equal(gi.Shape, ri.Shape) {
			t.Fatalf("exported %s: %v, want shape %v", k, gi.Shape, ri.Shape)
		}
		if !slices.Equal(got[k], w) {
			t.Errorf("exported %s differs from the fixture", k)
		}
	}
	back := loadModel(t, variantsB("conv.onnx"))
	if _, err := ApplyPEFT(back, out, MergeOptions{}); err != nil {
		t.Fatalf("the exported dir does not apply: %v", err)
	}
}

// TestConvRefusals: each refused Conv case is one line naming the layer.
func TestConvRefusals(t *testing.T) {
	m := loadModel(t, variantsB("conv.onnx"))
	for _, c := range []struct {
		name string
		cfg  InjectConfig
		want string
	}{
		{"grouped", InjectConfig{SelectOptions: SelectOptions{Targets: []string{"dw"}, Rank: 2, Alpha: 2}}, "dw"},
		{"adapter inputs", InjectConfig{SelectOptions: SelectOptions{Targets: []string{"pw"}, Rank: 2, Alpha: 2}, AdapterInputs: true}, "module pw"},
		{"pissa", InjectConfig{SelectOptions: SelectOptions{Targets: []string{"body"}, Rank: 2, Alpha: 2}, Init: InitPiSSA}, "module body"},
	} {
		_, err := Inject(m, c.cfg)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error %v, want one line naming %s", c.name, err, c.want)
		}
	}
	// A Linear PEFT module aimed at a Conv layer is refused, naming it.
	dir := t.TempDir()
	cfg := export.NewPEFTConfig(2, 4, "pw")
	mods := []export.PEFTModule{{Name: "pw", Rank: 2, InFeatures: 4, OutFeatures: 8, A: make([]float32, 8), B: make([]float32, 16)}}
	if err := export.WritePEFTAdapter(dir, cfg, mods); err != nil {
		t.Fatal(err)
	}
	_, err := ApplyPEFT(loadModel(t, variantsB("conv.onnx")), dir, MergeOptions{})
	if err == nil || !strings.Contains(err.Error(), "layer pw is a Conv") || strings.Contains(err.Error(), "\n") {
		t.Errorf("Linear module on a Conv: %v", err)
	}
}

// TestConvNdInORT: Conv1d and Conv3d LoRA as Conv2d: the injected branch
// computes PEFT's forward, merge and the PEFT dir give torch's kernel.
func TestConvNdInORT(t *testing.T) {
	orttest.Require(t)
	for _, c := range []string{"conv1d", "conv3d"} {
		t.Run(c, func(t *testing.T) {
			e := readVB(t, c)
			ins := e.inputs(t)
			dir := t.TempDir()
			m := loadModel(t, variantsB(c+".onnx"))
			inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"c"}, Rank: 4, Alpha: 8}, AllowLargeRank: true}) // conv3d has 3 output channels
			if err != nil {
				t.Fatal(err)
			}
			peft := loadPEFTTensors(t, variantsB(c, "adapter"))
			a := inj.Manifest.Adapters[0]
			setInitializer(t, m, a.LoraA, peft["base_model.model.c.lora_A.weight"])
			setInitializer(t, m, a.LoraB, peft["base_model.model.c.lora_B.weight"])
			got := runModel(t, mgSaveModel(t, m, filepath.Join(dir, "injected.onnx")), ins)
			if rel := vtRel(t, got, e.output("unmerged", "y")); rel > 1e-5 {
				t.Fatalf("injected vs torch: rel %g", rel)
			}
			if _, err := Merge(m, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			if rel := vtRel(t, runModel(t, mgSaveModel(t, m, filepath.Join(dir, "merged.onnx")), ins), got); rel > 1e-6 {
				t.Errorf("merged vs unmerged: rel %g", rel)
			}
			applied := loadModel(t, variantsB(c+".onnx"))
			if _, err := ApplyPEFT(applied, variantsB(c, "adapter"), MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			for _, mm := range []*graph.Model{m, applied} {
				tp, _ := mm.Graph().Initializer("c.weight")
				v, _ := mm.Float64s(tp)
				if rel := vtRel(t, map[string][]float64{"w": v}, map[string][]float64{"w": e.Weights["c.weight"].Data}); rel > 1e-6 {
					t.Errorf("merged kernel vs torch: rel %g", rel)
				}
			}
		})
	}
}
