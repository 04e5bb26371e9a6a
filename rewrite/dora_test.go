package rewrite

import (
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/autodiff"
	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

func doraConfig() InjectConfig {
	return InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc1", "fc2"}, Rank: 4, Alpha: 8}, DoRA: true, Seed: 9}
}

// TestInjectDoRA: the magnitude starts at the weight's norm per output
// feature (computed here from the stored [out, in] weight, PEFT's axis),
// it is trainable, and the counts include it.
func TestInjectDoRA(t *testing.T) {
	m := loadModel(t, variantsB("mlp.onnx"))
	inj, err := Inject(m, doraConfig())
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range inj.Manifest.Adapters {
		if a.Magnitude == "" || !slices.Contains(inj.Manifest.Trainable, a.Magnitude) {
			t.Fatalf("%s: magnitude %q not in trainable %v", a.Module, a.Magnitude, inj.Manifest.Trainable)
		}
		tm, _ := m.Graph().Initializer(a.Magnitude)
		mag, _ := m.Float64s(tm)
		tw, _ := m.Graph().Initializer(a.Module + ".weight")
		w, _ := m.Float64s(tw) // [out, in] as torch stores it
		in := int(tw.Dims[1])
		for o := range mag {
			s := 0.0
			for i := 0; i < in; i++ {
				s += w[o*in+i] * w[o*in+i]
			}
			if math.Abs(mag[o]-math.Sqrt(s)) > 1e-6*math.Sqrt(s) {
				t.Fatalf("%s magnitude[%d] = %v, want ||W[%d, :]|| = %v", a.Module, o, mag[o], o, math.Sqrt(s))
			}
		}
	}
	// The DoRA branch reads the weight, but that does not make it shared.
	layers, _ := FindLayers(m)
	for _, l := range layers {
		if l.Shared {
			t.Errorf("%s counted as shared after inject --dora", l.Module)
		}
	}
	// fc1 16x12, fc2 8x16 at r=4: A, B and the magnitude.
	if want := int64(4*(12+16) + 16 + 4*(16+8) + 8); inj.Trainable != want {
		t.Errorf("trainable %d, want %d", inj.Trainable, want)
	}
	for _, c := range []struct {
		name string
		cfg  InjectConfig
		want string
	}{
		{"dropout", InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc1"}, Rank: 2, Alpha: 2}, DoRA: true, Dropout: 0.1}, "module fc1: DoRA with dropout"},
		{"dora adapter inputs", InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc1"}, Rank: 2, Alpha: 2}, DoRA: true, AdapterInputs: true}, "module fc1: DoRA cannot be an adapter-input branch"},
	} {
		mm := loadModel(t, variantsB("mlp.onnx"))
		if c.name == "conv" {
			mm = loadModel(t, variantsB("conv.onnx"))
		}
		_, err := Inject(mm, c.cfg)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error %v, want one line with %q", c.name, err, c.want)
		}
	}
}

// doraInjected injects DoRA on fc1 and fc2 and loads the PEFT fixture's
// A, B and magnitude into it (PEFT's layouts transposed to x·W's).
func doraInjected(t *testing.T) *graph.Model {
	t.Helper()
	m := loadModel(t, variantsB("mlp.onnx"))
	inj, err := Inject(m, doraConfig())
	if err != nil {
		t.Fatal(err)
	}
	peft := loadPEFTTensors(t, variantsB("dora", "adapter"))
	for _, a := range inj.Manifest.Adapters {
		in, out, r := int(a.InFeatures), int(a.OutFeatures), a.Rank
		key := "base_model.model." + a.Module
		setInitializer(t, m, a.LoraA, transposeF64(peft[key+".lora_A.weight"], r, in))
		setInitializer(t, m, a.LoraB, transposeF64(peft[key+".lora_B.weight"], out, r))
		setInitializer(t, m, a.Magnitude, peft[key+".lora_magnitude_vector"])
	}
	return m
}

// TestDoRAInORT: at inject (B = 0) the model computes the base; with the
// fixture's A, B and magnitude it computes PEFT's DoRA forward (torch,
// float64) within 1e-5; merged it computes the same within 1e-6 and holds
// torch's merged weights; the manifest-less model merges the same.
func TestDoRAInORT(t *testing.T) {
	orttest.Require(t)
	e := readVB(t, "dora")
	ins := e.inputs(t)
	dir := t.TempDir()
	m0 := loadModel(t, variantsB("mlp.onnx"))
	if _, err := Inject(m0, doraConfig()); err != nil {
		t.Fatal(err)
	}
	step0 := mgSaveModel(t, m0, filepath.Join(dir, "step0.onnx"))
	if rel := vtRel(t, runModel(t, step0, ins), e.output("base", "y")); rel > 1e-6 {
		t.Errorf("injected (B = 0) vs base: rel %g", rel)
	}
	m := doraInjected(t)
	injectedThenMerged(t, m, e, ins, dir, "torch DoRA")
	checkWeights(t, m, e)

	m2 := doraInjected(t)
	m2.DeleteMetadata(ManifestKey)
	rep, err := Merge(m2, MergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 2 {
		t.Fatalf("recognized %d adapters, want 2 (the inner LoRA sum is part of the DoRA branch)", len(rep.Merged))
	}
	checkWeights(t, m2, e)
}

// checkWeights compares the merged model's weights with torch's.
func checkWeights(t *testing.T, m *graph.Model, e vbExpected) {
	t.Helper()
	for name, w := range e.Weights {
		if !strings.HasSuffix(name, ".weight") {
			continue // gradients
		}
		tp, _ := m.Graph().Initializer(name)
		if tp == nil {
			t.Fatalf("merged model has no %s", name)
		}
		v, _ := m.Float64s(tp)
		if rel := vtRel(t, map[string][]float64{name: v}, map[string][]float64{name: w.Data}); rel > 1e-6 {
			t.Errorf("%s vs torch's merge: rel %g", name, rel)
		}
	}
}

// TestDoRAPEFTDirs: PEFT DoRA dirs in both key layouts apply to the torch
// merge; the injected model exports PEFT's keys, shapes and values with
// use_dora, and the export applies back.
func TestDoRAPEFTDirs(t *testing.T) {
	e := readVB(t, "dora")
	for _, c := range []string{"dora", "dora-named"} {
		m := loadModel(t, variantsB("mlp.onnx"))
		rep, err := ApplyPEFT(m, variantsB(c, "adapter"), MergeOptions{})
		if err != nil {
			t.Fatalf("%s: %v", c, err)
		}
		if len(rep.Merged) != 2 {
			t.Fatalf("%s: merged %d modules", c, len(rep.Merged))
		}
		checkWeights(t, m, e)
	}
	m := doraInjected(t)
	out := filepath.Join(t.TempDir(), "exported")
	rep, err := ExportPEFT(m, out, ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Config.UseDoRA {
		t.Error("use_dora not set")
	}
	want := loadPEFTTensors(t, variantsB("dora", "adapter"))
	got := loadPEFTTensors(t, out)
	f, err := export.OpenSafetensors(filepath.Join(out, export.PEFTWeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ref, _ := export.OpenSafetensors(variantsB("dora", "adapter", export.PEFTWeightsFile))
	defer ref.Close()
	if len(got) != len(want) {
		t.Fatalf("exported %d keys, want %d", len(got), len(want))
	}
	for k, w := range want {
		gi, ok := f.Tensor(k)
		ri, _ := ref.Tensor(k)
		if !ok || !slices.Equal(gi.Shape, ri.Shape) {
			t.Fatalf("exported %s: %v, want %v", k, gi.Shape, ri.Shape)
		}
		if !slices.Equal(got[k], w) {
			t.Errorf("exported %s differs from the fixture", k)
		}
	}
	back := loadModel(t, variantsB("mlp.onnx"))
	if _, err := ApplyPEFT(back, out, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	checkWeights(t, back, e)
}

// TestDoRADirMissingMagnitude: use_dora without magnitude vectors, or a
// magnitude without use_dora, is one line naming the module.
func TestDoRADirMissingMagnitude(t *testing.T) {
	tensors := loadPEFTTensors(t, variantsB("dora", "adapter"))
	var plain []export.TensorData
	for k, v := range tensors {
		if strings.HasSuffix(k, "lora_magnitude_vector") {
			continue
		}
		f := make([]float32, len(v))
		for i, x := range v {
			f[i] = float32(x)
		}
		shape := []int{4, 12}
		switch {
		case strings.Contains(k, "fc1.lora_B"):
			shape = []int{16, 4}
		case strings.Contains(k, "fc2.lora_A"):
			shape = []int{4, 16}
		case strings.Contains(k, "fc2.lora_B"):
			shape = []int{8, 4}
		}
		td, err := export.NewFloat32Tensor(k, export.DTypeF32, shape, f)
		if err != nil {
			t.Fatal(err)
		}
		plain = append(plain, td)
	}
	dir := t.TempDir()
	cfg := export.NewPEFTConfig(4, 8, "fc1", "fc2")
	cfg.UseDoRA = true
	if err := export.WritePEFTAdapter(dir, export.NewPEFTConfig(4, 8, "fc1", "fc2"), nil); err == nil {
		t.Fatal("wrote an adapter without modules")
	}
	if err := export.WriteSafetensors(filepath.Join(dir, export.PEFTWeightsFile), plain, nil); err != nil {
		t.Fatal(err)
	}
	raw, _ := cfg.MarshalJSON()
	if err := os.WriteFile(filepath.Join(dir, export.PEFTConfigFile), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := ApplyPEFT(loadModel(t, variantsB("mlp.onnx")), dir, MergeOptions{})
	if err == nil || !strings.Contains(err.Error(), "no lora_magnitude_vector") || strings.Contains(err.Error(), "\n") {
		t.Errorf("use_dora without magnitudes: %v", err)
	}
}

// TestDoRAStepGraph: the norm is detached as PEFT detaches it, so the step
// graph autodiff builds gives PEFT's gradients of mean(y²) for A, B and
// the magnitude (torch, float64, in the fixture) within 1e-5.
func TestDoRAStepGraph(t *testing.T) {
	if doraDetach != autodiff.DetachMarker {
		t.Fatalf("doraDetach %q, autodiff's marker %q", doraDetach, autodiff.DetachMarker)
	}
	orttest.Require(t)
	e := readVB(t, "dora")
	m := doraInjected(t)
	man, _ := ReadManifest(m)
	step, err := autodiff.Build(m, autodiff.Options{Loss: "mse", Params: man.Trainable})
	if err != nil {
		t.Fatal(err)
	}
	if len(step.Params) != 6 {
		t.Fatalf("%d params, want A, B and the magnitude of two layers", len(step.Params))
	}
	path := mgSaveModel(t, m, filepath.Join(t.TempDir(), "step.onnx"))
	labels, err := ortrun.FromFloat64(step.Labels, ortrun.Float32, []int64{5, 8}, make([]float64, 40))
	if err != nil {
		t.Fatal(err)
	}
	got := runModel(t, path, append(e.inputs(t), labels))
	for _, a := range man.Adapters {
		in, out, r := int(a.InFeatures), int(a.OutFeatures), a.Rank
		for _, c := range []struct {
			param string
			want  []float64
		}{
			{a.LoraA, transposeF64(e.Weights[a.Module+".grad_A"].Data, r, in)},
			{a.LoraB, transposeF64(e.Weights[a.Module+".grad_B"].Data, out, r)},
			{a.Magnitude, e.Weights[a.Module+".grad_m"].Data},
		} {
			g := got[c.param+"_grad"]
			if rel := vtRel(t, map[string][]float64{"g": g}, map[string][]float64{"g": c.want}); rel > 1e-5 {
				t.Errorf("gradient of %s vs PEFT's (detached norm): rel %g", c.param, rel)
			} else {
				t.Logf("gradient of %s vs PEFT's: rel %.2g", c.param, rel)
			}
		}
	}
}

// TestDoRAConvInORT: DoRA on Conv layers (PEFT's DoraConv2dLayer, a 3x3
// without bias and a 1x1 with one): B = 0 computes the base; with the
// fixture's A, B and magnitude, PEFT's forward (torch, float64) within
// 1e-5; merged the same within 1e-6 with torch's kernels; the PEFT dir
// applies to torch's kernels and the model exports it back.
func TestDoRAConvInORT(t *testing.T) {
	orttest.Require(t)
	e := readVB(t, "dora-conv")
	ins := e.inputs(t)
	dir := t.TempDir()
	cfg := InjectConfig{SelectOptions: SelectOptions{Targets: []string{"c1", "c2"}, Rank: 4, Alpha: 8}, DoRA: true}
	m0 := loadModel(t, variantsB("dora-conv.onnx"))
	if _, err := Inject(m0, cfg); err != nil {
		t.Fatal(err)
	}
	if rel := vtRel(t, runModel(t, mgSaveModel(t, m0, filepath.Join(dir, "step0.onnx")), ins), e.output("base", "y")); rel > 1e-6 {
		t.Errorf("B = 0 vs base: rel %g", rel)
	}
	m := loadModel(t, variantsB("dora-conv.onnx"))
	inj, err := Inject(m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	peft := loadPEFTTensors(t, variantsB("dora-conv", "adapter"))
	for _, a := range inj.Manifest.Adapters {
		key := "base_model.model." + a.Module
		setInitializer(t, m, a.LoraA, peft[key+".lora_A.weight"])
		setInitializer(t, m, a.LoraB, peft[key+".lora_B.weight"])
		setInitializer(t, m, a.Magnitude, peft[key+".lora_magnitude_vector"])
	}
	got := runModel(t, mgSaveModel(t, m, filepath.Join(dir, "injected.onnx")), ins)
	if rel := vtRel(t, got, e.output("unmerged", "y")); rel > 1e-5 {
		t.Fatalf("injected vs torch DoRA conv forward: rel %g", rel)
	} else {
		t.Logf("injected vs torch DoRA conv forward: rel %.2g", rel)
	}
	// The manifest-less model merges the same (the conv LoRA sum inside
	// is part of the DoRA branch).
	m2 := loadModel(t, filepath.Join(dir, "injected.onnx"))
	m2.DeleteMetadata(ManifestKey)
	if rep, err := Merge(m2, MergeOptions{}); err != nil || len(rep.Merged) != 2 {
		t.Fatalf("recognized merge: %v", err)
	}
	checkWeights(t, m2, e)
	out := filepath.Join(dir, "exported")
	if _, err := ExportPEFT(m, out, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	back := loadPEFTTensors(t, out)
	for k, v := range peft {
		if !slices.Equal(back[k], v) {
			t.Errorf("exported %s differs", k)
		}
	}
	if _, err := Merge(m, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	if rel := vtRel(t, runModel(t, mgSaveModel(t, m, filepath.Join(dir, "merged.onnx")), ins), got); rel > 1e-6 {
		t.Errorf("merged vs unmerged: rel %g", rel)
	}
	checkWeights(t, m, e)
	applied := loadModel(t, variantsB("dora-conv.onnx"))
	if _, err := ApplyPEFT(applied, variantsB("dora-conv", "adapter"), MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	checkWeights(t, applied, e)
}
