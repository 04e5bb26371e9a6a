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
)

// TestExportThenApplyPEFTEqualsMerge: exporting an injected model's adapters
// and applying them to the base model gives, bit for bit, what merging the
// injected model gives.
func TestExportThenApplyPEFTEqualsMerge(t *testing.T) {
	for _, c := range mgTestdataCases() {
		t.Run(c.name, func(t *testing.T) {
			path := c.modelPath(t)
			base := loadModel(t, path)
			m := loadModel(t, path)
			inj := mgInjectRandom(t, m, c.inject, 91)
			dir := filepath.Join(t.TempDir(), "adapter")
			rep, err := ExportPEFT(m, dir, ExportOptions{BaseModel: "onnxlora/" + c.name, TaskType: "CAUSAL_LM"})
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Modules) != len(inj.Manifest.Adapters) {
				t.Fatalf("exported %d modules, injected %d", len(rep.Modules), len(inj.Manifest.Adapters))
			}
			checkExportedFiles(t, m, dir, inj.Manifest)

			merged := mgCloneModel(m)
			if _, err := Merge(merged, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			applied := mgCloneModel(base)
			prep, err := ApplyPEFT(applied, dir, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if prep.Source != "peft" || len(prep.Merged) != len(rep.Modules) || len(prep.Unmatched) != 0 {
				t.Fatalf("ApplyPEFT report: %+v", prep)
			}
			for _, ml := range prep.Merged {
				if ml.PEFTModule != ml.Module {
					t.Errorf("PEFT module %s applied to layer %s", ml.PEFTModule, ml.Module)
				}
			}
			mgSameTensors(t, applied, merged)

			// The streaming path writes the same bytes.
			out := filepath.Join(t.TempDir(), "model.onnx")
			if _, err := ApplyPEFTFile(path, dir, out, MergeOptions{}, graph.SaveOptions{External: graph.ExternalAlways}); err != nil {
				t.Fatal(err)
			}
			mgSameTensors(t, loadModel(t, out), merged)
		})
	}
}

// checkExportedFiles reads the adapter back and checks it against the
// manifest: shapes, transposed values, config.
func checkExportedFiles(t *testing.T, m *graph.Model, dir string, man *Manifest) {
	t.Helper()
	cfg, mods, err := export.ReadPEFTAdapter(dir)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, export.PEFTConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	var js map[string]any
	if err := json.Unmarshal(raw, &js); err != nil {
		t.Fatal(err)
	}
	if js["peft_type"] != "LORA" || js["fan_in_fan_out"] != false || js["task_type"] != "CAUSAL_LM" || !strings.HasPrefix(js["base_model_name_or_path"].(string), "onnxlora/") {
		t.Errorf("config: %s", raw)
	}
	if len(mods) != len(man.Adapters) {
		t.Fatalf("%d modules read back, %d adapters", len(mods), len(man.Adapters))
	}
	byName := map[string]export.PEFTModule{}
	for _, mod := range mods {
		byName[mod.Name] = mod
	}
	for _, a := range man.Adapters {
		mod, ok := byName[a.Module]
		if !ok {
			t.Fatalf("module %s not exported", a.Module)
		}
		if mod.KeyA != "base_model.model."+a.Module+".lora_A.weight" || mod.Rank != a.Rank || mod.Alpha != a.Alpha ||
			mod.InFeatures != int(a.InFeatures) || mod.OutFeatures != int(a.OutFeatures) || cfg.UseRSLoRA != a.RSLoRA || mod.Scaling != a.Scaling {
			t.Errorf("module %s: read back %+v (config rslora %v), manifest %+v", a.Module, mod, cfg.UseRSLoRA, a)
		}
		av := mgFloatsOf(t, m, mgTensorByName(m, a.LoraA))
		bv := mgFloatsOf(t, m, mgTensorByName(m, a.LoraB))
		r, in, out := a.Rank, int(a.InFeatures), int(a.OutFeatures)
		for i := 0; i < in; i++ {
			for k := 0; k < r; k++ {
				if float64(mod.A[k*in+i]) != av[i*r+k] {
					t.Fatalf("module %s: lora_A is not the transpose of the ONNX A", a.Module)
				}
			}
		}
		for k := 0; k < r; k++ {
			for j := 0; j < out; j++ {
				if float64(mod.B[j*r+k]) != bv[k*out+j] {
					t.Fatalf("module %s: lora_B is not the transpose of the ONNX B", a.Module)
				}
			}
		}
	}
}

func TestExportConfigPatterns(t *testing.T) {
	m := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	mgInjectRandom(t, m, InjectConfig{SelectOptions: SelectOptions{
		Targets: []string{"q_proj", "v_proj", "model.layers.0.mlp.down_proj"}, Rank: 8, Alpha: 16,
		RankPattern:  []PatternEntry{{Key: "model.layers.1.self_attn.v_proj", Value: 2}},
		AlphaPattern: []PatternEntry{{Key: "down_proj", Value: 4}},
	}}, 101)
	dir := t.TempDir()
	rep, err := ExportPEFT(m, dir, ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, export.PEFTConfigFile))
	var js struct {
		R             int                `json:"r"`
		Alpha         float64            `json:"lora_alpha"`
		Targets       []string           `json:"target_modules"`
		RankPattern   map[string]int     `json:"rank_pattern"`
		AlphaPattern  map[string]float64 `json:"alpha_pattern"`
		TaskType      *string            `json:"task_type"`
		BaseModelPath *string            `json:"base_model_name_or_path"`
	}
	if err := json.Unmarshal(raw, &js); err != nil {
		t.Fatal(err)
	}
	slices.Sort(js.Targets)
	want := []string{"model.layers.0.mlp.down_proj", "q_proj", "v_proj"}
	if js.R != 8 || js.Alpha != 16 || !slices.Equal(js.Targets, want) || js.TaskType != nil || js.BaseModelPath != nil {
		t.Errorf("config: %s", raw)
	}
	if len(js.RankPattern) != 1 || js.RankPattern["layers.1.self_attn.v_proj"] != 2 {
		t.Errorf("rank_pattern: %v", js.RankPattern)
	}
	if len(js.AlphaPattern) != 1 || js.AlphaPattern["layers.0.mlp.down_proj"] != 4 {
		t.Errorf("alpha_pattern: %v", js.AlphaPattern)
	}
	if len(rep.Modules) != 5 {
		t.Errorf("modules: %v", rep.Modules)
	}

	// Only exports a subset; mixing rsLoRA and plain adapters is refused.
	sub := t.TempDir()
	if rep, err := ExportPEFT(m, sub, ExportOptions{Only: []string{"model.layers.0.self_attn.q_proj"}}); err != nil || len(rep.Modules) != 1 {
		t.Errorf("Only: %v %v", rep, err)
	}
	man, _ := ReadManifest(m)
	man.Adapters[0].RSLoRA = true
	if err := WriteManifest(m, man); err != nil {
		t.Fatal(err)
	}
	if _, err := ExportPEFT(m, t.TempDir(), ExportOptions{}); err == nil || !strings.Contains(err.Error(), "use_rslora") {
		t.Errorf("mixed rsLoRA: %v", err)
	}
}

func TestExportPEFTFanInFanOutPrefixUntrained(t *testing.T) {
	for _, tc := range []struct {
		model  string
		fanIn  bool
		corpus bool
	}{
		{"../testdata/peft/gpt2.onnx", true, false},                             // Conv1D: Gemm without transB on "c_fc.weight"
		{"../testdata/peft/base.onnx", false, false},                            // nn.Linear: MatMul through a Transpose
		{"../../shared/corpus/llama-tiny-fp16-extdata/model.onnx", false, true}, // GenAI: [in, out] under "q_proj.MatMul.weight"
		{"../../shared/corpus/gpt2-conv1d-gemm-pytorch16.onnx", true, true},     // PyTorch 1.6 GPT-2
	} {
		t.Run(filepath.Base(tc.model), func(t *testing.T) {
			if _, err := os.Stat(tc.model); tc.corpus && err != nil {
				t.Skipf("the model corpus is absent (%s): %v", tc.model, err)
			}
			m := loadModel(t, tc.model)
			if _, err := Inject(m, mgInjectDefaults(InjectConfig{SelectOptions: SelectOptions{Targets: []string{"all-linear"}}})); err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join(t.TempDir(), "untrained")
			rep, err := ExportPEFT(m, dir, ExportOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !rep.Untrained || rep.FanInFanOut != tc.fanIn || rep.Config.FanInFanOut != tc.fanIn {
				t.Fatalf("untrained %v, fan_in_fan_out %v (config %v), want true, %v", rep.Untrained, rep.FanInFanOut, rep.Config.FanInFanOut, tc.fanIn)
			}
			cfg, err := export.ReadPEFTConfig(filepath.Join(dir, export.PEFTConfigFile))
			if err != nil || cfg.FanInFanOut != tc.fanIn {
				t.Fatalf("written fan_in_fan_out %v (%v)", cfg.FanInFanOut, err)
			}
			mgRandomizeAdapters(t, m, 3)
			bare := ""
			dir = filepath.Join(t.TempDir(), "bare")
			rep, err = ExportPEFT(m, dir, ExportOptions{Prefix: &bare})
			if err != nil || rep.Untrained {
				t.Fatalf("trained export: %v, untrained %v", err, rep.Untrained)
			}
			f, err := export.OpenSafetensors(filepath.Join(dir, export.PEFTWeightsFile))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			for _, k := range f.Names() {
				if strings.HasPrefix(k, export.PEFTKeyPrefix) || !strings.HasSuffix(k, ".weight") {
					t.Fatalf("key %q with prefix \"\"", k)
				}
			}
			bad := "base_model"
			if _, err := ExportPEFT(m, filepath.Join(t.TempDir(), "x"), ExportOptions{Prefix: &bad}); err == nil || !strings.Contains(err.Error(), "must be dotted segments ending in a dot") {
				t.Errorf("prefix without a dot: %v", err)
			}
		})
	}
}
