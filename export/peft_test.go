package export

import (
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

type peftExpected struct {
	Name        string    `json:"name"`
	Rank        int       `json:"rank"`
	Alpha       float64   `json:"alpha"`
	Scaling     float64   `json:"scaling"`
	InFeatures  int       `json:"in_features"`
	OutFeatures int       `json:"out_features"`
	A           []float32 `json:"a"`
	B           []float32 `json:"b"`
	Delta       []float64 `json:"delta"`
}

const fixtureDir = "testdata/peft_adapter"

// TestReadPEFTFixture checks modules, resolved rank/alpha/scaling and the
// weights against the values the Python script wrote alongside the adapter.
func TestReadPEFTFixture(t *testing.T) {
	var want []peftExpected
	loadJSON(t, "testdata/peft_expected.json", &want)
	cfg, mods, err := ReadPEFTAdapter(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.R != 4 || cfg.LoraAlpha != 8 || cfg.TaskType != "CAUSAL_LM" || cfg.BaseModelNameOrPath != "tiny-llama" ||
		cfg.LoraDropout != 0.05 || cfg.Bias != "none" || !cfg.InferenceMode || cfg.InitLoraWeights != "true" {
		t.Errorf("config %+v", cfg)
	}
	if !reflect.DeepEqual(cfg.TargetModules, TargetModules{Names: []string{"v_proj", "q_proj"}}) {
		t.Errorf("target_modules %+v", cfg.TargetModules)
	}
	if !reflect.DeepEqual(cfg.RankPattern, []Pattern[int]{{"model.layers.1.self_attn.v_proj", 2}}) ||
		!reflect.DeepEqual(cfg.AlphaPattern, []Pattern[float64]{{"q_proj", 16}}) {
		t.Errorf("patterns %v %v", cfg.RankPattern, cfg.AlphaPattern)
	}
	for _, k := range []string{"megatron_core", "loftq_config", "lora_bias", "revision", "layers_pattern", "megatron_config"} {
		if _, ok := cfg.Extra[k]; !ok {
			t.Errorf("extra key %q lost", k)
		}
	}
	if len(mods) != len(want) {
		t.Fatalf("%d modules, want %d", len(mods), len(want))
	}
	for i, m := range mods {
		w := want[i]
		if m.Name != w.Name || m.Rank != w.Rank || m.Alpha != w.Alpha || m.Scaling != w.Scaling ||
			m.InFeatures != w.InFeatures || m.OutFeatures != w.OutFeatures {
			t.Errorf("module %d: %s r=%d alpha=%v s=%v in=%d out=%d, want %+v", i, m.Name, m.Rank, m.Alpha, m.Scaling, m.InFeatures, m.OutFeatures, w)
		}
		if m.Prefix != PEFTKeyPrefix || m.KeyA != PEFTKeyPrefix+w.Name+".lora_A.weight" ||
			m.KeyB != PEFTKeyPrefix+w.Name+".lora_B.weight" || m.DType != DTypeF32 || m.AdapterName != "" {
			t.Errorf("module %s keys: %q %q %q %s", m.Name, m.Prefix, m.KeyA, m.KeyB, m.DType)
		}
		if !reflect.DeepEqual(m.A, w.A) || !reflect.DeepEqual(m.B, w.B) {
			t.Errorf("module %s weights differ", m.Name)
		}
		if !reflect.DeepEqual(m.ShapeA(), []int{w.Rank, w.InFeatures}) || !reflect.DeepEqual(m.ShapeB(), []int{w.OutFeatures, w.Rank}) {
			t.Errorf("module %s shapes %v %v", m.Name, m.ShapeA(), m.ShapeB())
		}
		// delta W = scaling * B @ A, as torch computed it.
		for o := 0; o < m.OutFeatures; o++ {
			for in := 0; in < m.InFeatures; in++ {
				var s float64
				for r := 0; r < m.Rank; r++ {
					s += float64(m.B[o*m.Rank+r]) * float64(m.A[r*m.InFeatures+in])
				}
				if d := w.Delta[o*m.InFeatures+in]; math.Abs(m.Scaling*s-d) > 1e-12 {
					t.Fatalf("module %s delta[%d,%d] = %v, torch %v", m.Name, o, in, m.Scaling*s, d)
				}
			}
		}
	}
}

// TestPEFTRoundTrip: what we read, we write back byte for byte as the
// Python script (imitating PEFT) wrote it, and read again unchanged.
func TestPEFTRoundTrip(t *testing.T) {
	cfg, mods, err := ReadPEFTAdapter(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "out")
	if err := WritePEFTAdapter(dir, cfg, mods); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{PEFTWeightsFile, PEFTConfigFile} {
		got, _ := os.ReadFile(filepath.Join(dir, name))
		want, _ := os.ReadFile(filepath.Join(fixtureDir, name))
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from the fixture:\n%s\n---\n%s", name, got, want)
		}
	}
	cfg2, mods2, err := ReadPEFTAdapter(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, cfg2) || !reflect.DeepEqual(mods, mods2) {
		t.Error("round trip changed the adapter")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("files %v", entries)
	}
}

// TestPatternKeyMatchesPython compares PatternKey with PEFT's
// get_pattern_key run by Python's re on the same keys and names.
func TestPatternKeyMatchesPython(t *testing.T) {
	var cases []struct {
		Keys  []string `json:"keys"`
		Name  string   `json:"name"`
		Match *string  `json:"match"`
	}
	loadJSON(t, "testdata/pattern_expected.json", &cases)
	if len(cases) < 100 {
		t.Fatalf("only %d cases", len(cases))
	}
	for _, c := range cases {
		got, ok, err := PatternKey(c.Keys, c.Name)
		if err != nil {
			t.Fatal(err)
		}
		if (c.Match == nil) != !ok || (ok && got != *c.Match) {
			t.Errorf("PatternKey(%q, %q) = %q, %v; Python: %v", c.Keys, c.Name, got, ok, c.Match)
		}
	}
	if _, _, err := PatternKey([]string{`(?<=x)q`}, "q"); err == nil {
		t.Error("lookbehind accepted by RE2?")
	}
}

func TestScalingRules(t *testing.T) {
	c := NewPEFTConfig(16, 32, "q_proj")
	c.RankPattern = []Pattern[int]{{"layers.0.*", 4}, {"q_proj", 8}}
	c.AlphaPattern = []Pattern[float64]{{"v_proj", 2}}
	r, _ := c.ModuleRank("model.layers.0.q_proj")
	if r != 4 { // first key in order wins
		t.Errorf("rank %d", r)
	}
	r, _ = c.ModuleRank("model.layers.1.q_proj")
	a, _ := c.ModuleAlpha("model.layers.1.q_proj")
	if r != 8 || a != 32 || c.Scaling(a, r) != 4 {
		t.Errorf("r=%d alpha=%v", r, a)
	}
	c.UseRSLoRA = true
	if s := c.Scaling(a, r); math.Abs(s-32/math.Sqrt(8)) > 1e-15 {
		t.Errorf("rslora scaling %v", s)
	}
	a, _ = c.ModuleAlpha("model.layers.1.v_proj")
	if a != 2 {
		t.Errorf("alpha %v", a)
	}
}

// adapterDir writes a config and a safetensors file built from tensors.
func adapterDir(t *testing.T, config string, tensors []TensorData) string {
	t.Helper()
	dir := t.TempDir()
	if config != "" {
		if err := os.WriteFile(filepath.Join(dir, PEFTConfigFile), []byte(config), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if tensors != nil {
		if err := WriteSafetensors(filepath.Join(dir, PEFTWeightsFile), tensors, map[string]string{"format": "pt"}); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func zeros(name string, dt DType, shape ...int) TensorData {
	n, _ := byteSize(dt, shape)
	return TensorData{Name: name, DType: dt, Shape: shape, Data: make([]byte, n)}
}

const baseConfig = `{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q"],"bias":"none"}`

func lora(module string, r, in, out int) []TensorData {
	return []TensorData{
		zeros("base_model.model."+module+".lora_A.weight", DTypeF32, r, in),
		zeros("base_model.model."+module+".lora_B.weight", DTypeF32, out, r),
	}
}

func TestReadPEFTErrors(t *testing.T) {
	ok := lora("m.q", 2, 3, 5)
	with := func(extra ...TensorData) []TensorData { return append(append([]TensorData{}, ok...), extra...) }
	cases := []struct {
		name        string
		config      string
		tensors     []TensorData
		want        string
		unsupported bool
	}{
		{"no config", "", ok, "adapter_config.json: no such file", false},
		{"no weights", baseConfig, nil, "adapter_model.safetensors: no such file", false},
		{"bad json", `{"r":`, ok, "adapter_config.json", false},
		{"dup key", `{"peft_type":"LORA","r":2,"r":3}`, ok, `duplicate key "r"`, false},
		{"peft type", `{"peft_type":"IA3","r":2}`, ok, `peft_type is "IA3"`, false},
		{"no peft type", `{"r":2}`, ok, `peft_type is ""`, false},
		{"rank zero", `{"peft_type":"LORA","r":0}`, ok, "r is 0", false},
		{"rank float", `{"peft_type":"LORA","r":2.5}`, ok, "r: 2.5 is not an integer", false},
		{"alpha null", `{"peft_type":"LORA","r":2,"lora_alpha":null}`, ok, "lora_alpha: null is not a number", false},
		{"no tensors", baseConfig, []TensorData{}, "no lora_A/lora_B weights found", false},
		{"bias value", `{"peft_type":"LORA","r":2,"bias":"some"}`, ok, `bias is "some"`, false},
		{"target type", `{"peft_type":"LORA","r":2,"target_modules":3}`, ok, "target_modules: must be a list of strings or a string", false},
		{"rank pattern value", `{"peft_type":"LORA","r":2,"rank_pattern":{"q":"x"}}`, ok, `rank_pattern: key "q"`, false},
		{"rank pattern regex", `{"peft_type":"LORA","r":2,"rank_pattern":{"(?<=m)q":2}}`, ok, "not a regular expression Go can evaluate", false},
		{"dora", `{"peft_type":"LORA","r":2,"use_dora":true}`, ok, "DoRA", true},
		{"pissa", `{"peft_type":"LORA","r":2,"init_lora_weights":"pissa_niter_4"}`, ok, "path_initial_model_for_weight_conversion", true},
		{"loftq", `{"peft_type":"LORA","r":2,"init_lora_weights":"loftq"}`, ok, "loftq", true},
		{"lora_bias cfg", `{"peft_type":"LORA","r":2,"lora_bias":true}`, ok, "LoRA bias", true},
		{"layer replication", `{"peft_type":"LORA","r":2,"layer_replication":[[0,2]]}`, ok, "layer replication", true},
		{"missing B", baseConfig, ok[:1], `module "m.q" has lora_A ("base_model.model.m.q.lora_A.weight") but no lora_B`, false},
		{"missing A", baseConfig, ok[1:], `module "m.q" has lora_B ("base_model.model.m.q.lora_B.weight") but no lora_A`, false},
		{"rank A vs B", baseConfig, []TensorData{ok[0], zeros("base_model.model.m.q.lora_B.weight", DTypeF32, 5, 3)}, "rank mismatch, lora_A [2 3] has 2 rows but lora_B [5 3] has 3 columns", false},
		{"rank vs config", baseConfig, lora("m.q", 3, 3, 5), "weights have rank 3 but the config gives rank 2", false},
		{"rank vs pattern", `{"peft_type":"LORA","r":2,"rank_pattern":{"q":4}}`, ok, "weights have rank 2 but the config gives rank 4", false},
		{"embedding", baseConfig, with(zeros("base_model.model.embed.lora_embedding_A", DTypeF32, 2, 7), zeros("base_model.model.embed.lora_embedding_B", DTypeF32, 5, 2)), "Embedding", true},
		{"embedding half", baseConfig, with(zeros("base_model.model.embed.lora_embedding_A", DTypeF32, 2, 7)), `module "embed" has lora_A`, false},
		{"embedding and linear", baseConfig, with(zeros("base_model.model.m.q.lora_embedding_A", DTypeF32, 2, 7)), "both Linear", false},
		{"magnitude", baseConfig, with(zeros("base_model.model.m.q.lora_magnitude_vector", DTypeF32, 5)), "DoRA magnitude vector", false},
		{"lora B bias", baseConfig, with(zeros("base_model.model.m.q.lora_B.bias", DTypeF32, 5)), "LoRA bias", true},
		{"trained bias", `{"peft_type":"LORA","r":2,"bias":"all"}`, with(zeros("base_model.model.m.q.bias", DTypeF32, 5)), `bias="all"`, true},
		{"modules_to_save", `{"peft_type":"LORA","r":2,"modules_to_save":["score"]}`, with(zeros("base_model.model.score.weight", DTypeF32, 2, 5)), "modules_to_save", true},
		{"modules_to_save wrapper", baseConfig, with(zeros("base_model.model.score.modules_to_save.default.weight", DTypeF32, 2, 5)), "modules_to_save", true},
		{"unknown key", baseConfig, with(zeros("base_model.model.m.k.weight", DTypeF32, 2)), `unrecognised tensor "base_model.model.m.k.weight"`, false},
		{"bad lora key", baseConfig, with(zeros("base_model.model.m.k.lora_A.x.y.weight", DTypeF32, 2)), "unrecognised LoRA key", false},
		{"conv", baseConfig, []TensorData{zeros("base_model.model.c.lora_A.weight", DTypeF32, 2, 3, 1, 1), zeros("base_model.model.c.lora_B.weight", DTypeF32, 4, 2, 1, 1)}, "Conv LoRA", true},
		{"int dtype", baseConfig, []TensorData{zeros("base_model.model.m.q.lora_A.weight", DTypeI32, 2, 3), zeros("base_model.model.m.q.lora_B.weight", DTypeI32, 5, 2)}, "not a float type", false},
		{"mixed dtype", baseConfig, []TensorData{zeros("base_model.model.m.q.lora_A.weight", DTypeF32, 2, 3), zeros("base_model.model.m.q.lora_B.weight", DTypeF16, 5, 2)}, "lora_A is F32 but lora_B is F16", false},
		{"two adapter names", baseConfig, with(zeros("base_model.model.m.q.lora_A.other.weight", DTypeF32, 2, 3)), "different prefixes or adapter names", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := adapterDir(t, c.config, c.tensors)
			_, _, err := ReadPEFTAdapter(dir)
			if err == nil {
				t.Fatal("accepted")
			}
			msg := err.Error()
			if !strings.Contains(msg, c.want) || strings.Contains(msg, "\n") || !strings.Contains(msg, dir) {
				t.Errorf("error %q, want one line naming %s and containing %q", msg, dir, c.want)
			}
			if errors.Is(err, ErrUnsupported) != c.unsupported {
				t.Errorf("errors.Is(ErrUnsupported) = %v for %q", !c.unsupported, msg)
			}
		})
	}
}

func TestReadPEFTBinOnly(t *testing.T) {
	dir := adapterDir(t, baseConfig, nil)
	os.WriteFile(filepath.Join(dir, "adapter_model.bin"), []byte("pickle"), 0o644)
	if _, _, err := ReadPEFTAdapter(dir); err == nil || !strings.Contains(err.Error(), "adapter_model.bin (a pickle)") {
		t.Errorf("error %v", err)
	}
}

func TestReadPEFTKeyForms(t *testing.T) {
	ts := []TensorData{
		zeros("base_model.model.m.q.lora_A.default.weight", DTypeBF16, 2, 3),
		zeros("base_model.model.m.q.lora_B.default.weight", DTypeBF16, 5, 2),
		zeros("x.q.lora_A.weight", DTypeF16, 2, 4),
		zeros("x.q.lora_B.weight", DTypeF16, 6, 2),
	}
	_, mods, err := ReadPEFTAdapter(adapterDir(t, `{"peft_type":"LORA","r":2,"lora_alpha":4,"use_rslora":true}`, ts))
	if err != nil {
		t.Fatal(err)
	}
	if len(mods) != 2 {
		t.Fatalf("%d modules", len(mods))
	}
	m := mods[0]
	if m.Name != "m.q" || m.Prefix != PEFTKeyPrefix || m.AdapterName != "default" || m.DType != DTypeBF16 || m.KeyA != ts[0].Name {
		t.Errorf("adapter-name form: %+v", m)
	}
	if m.Scaling != 4/math.Sqrt(2) {
		t.Errorf("rslora scaling %v", m.Scaling)
	}
	m = mods[1]
	if m.Name != "x.q" || m.Prefix != "" || m.InFeatures != 4 || m.OutFeatures != 6 || m.DType != DTypeF16 {
		t.Errorf("unprefixed form: %+v", m)
	}
}

func TestPEFTConfigJSON(t *testing.T) {
	in := `{"peft_type":"LORA","r":4,"lora_alpha":0.5,"target_modules":".*\\.(q|v)_proj",
	 "layers_to_transform":3,"init_lora_weights":"gaussian","rank_pattern":{"z":2,"a":3},
	 "alpha_pattern":null,"custom":{"nested":[1,2]},"task_type":null}`
	var c PEFTConfig
	if err := json.Unmarshal([]byte(in), &c); err != nil {
		t.Fatal(err)
	}
	if !c.TargetModules.IsRegex || c.TargetModules.Regex != `.*\.(q|v)_proj` || !reflect.DeepEqual(c.LayersToTransform, []int{3}) ||
		c.InitLoraWeights != "gaussian" || c.LoraAlpha != 0.5 || c.TaskType != "" {
		t.Errorf("%+v", c)
	}
	if !reflect.DeepEqual(c.RankPattern, []Pattern[int]{{"z", 2}, {"a", 3}}) {
		t.Errorf("rank_pattern order lost: %v", c.RankPattern)
	}
	out, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"rank_pattern":{"z":2,"a":3}`, `"custom":{"nested":[1,2]}`, `"target_modules":".*\\.(q|v)_proj"`,
		`"layers_to_transform":[3]`, `"init_lora_weights":"gaussian"`, `"task_type":null`, `"modules_to_save":null`, `"alpha_pattern":{}`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("%s missing from %s", want, out)
		}
	}
	var back PEFTConfig
	if err := json.Unmarshal(out, &back); err != nil {
		t.Fatal(err)
	}
	back.AlphaPattern = nil // {} and null both mean no patterns
	if !reflect.DeepEqual(back, c) {
		t.Errorf("round trip\n got %+v\nwant %+v", back, c)
	}
	if ok, checkable := c.TargetModules.matches("model.layers.0.self_attn.q_proj"); !ok || !checkable {
		t.Error("regex target_modules should match")
	}
}

func testModules() []PEFTModule {
	mk := func(name string, r, in, out int) PEFTModule {
		m := PEFTModule{Name: name, Rank: r, InFeatures: in, OutFeatures: out, A: make([]float32, r*in), B: make([]float32, out*r)}
		for i := range m.A {
			m.A[i] = float32(i) / 7
		}
		for i := range m.B {
			m.B[i] = -float32(i) / 3
		}
		return m
	}
	return []PEFTModule{mk("model.layers.0.attn.q_proj", 2, 3, 4), mk("model.layers.0.attn.v_proj", 2, 3, 2)}
}

func TestWritePEFTAdapterFromScratch(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a")
	cfg := NewPEFTConfig(2, 4)
	mods := testModules()
	mods[1].DType = DTypeBF16
	if err := WritePEFTAdapter(dir, cfg, mods); err != nil {
		t.Fatal(err)
	}
	if cfg.TargetModules.Names != nil {
		t.Error("WritePEFTAdapter modified the caller's config")
	}
	got, gotMods, err := ReadPEFTAdapter(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.TargetModules.Names, []string{"q_proj", "v_proj"}) {
		t.Errorf("derived target_modules %v", got.TargetModules)
	}
	if gotMods[0].Scaling != 2 || gotMods[0].DType != DTypeF32 || gotMods[1].DType != DTypeBF16 {
		t.Errorf("modules %+v", gotMods)
	}
	if !reflect.DeepEqual(gotMods[0].A, mods[0].A) || !reflect.DeepEqual(gotMods[0].B, mods[0].B) {
		t.Error("F32 weights changed")
	}
	for i, v := range mods[1].B {
		if gotMods[1].B[i] != BFloat16ToFloat32(BFloat16FromFloat32(v)) {
			t.Fatalf("BF16 B[%d] = %v", i, gotMods[1].B[i])
		}
	}
	raw, _ := os.ReadFile(filepath.Join(dir, PEFTConfigFile))
	var generic map[string]any
	if err := json.Unmarshal(raw, &generic); err != nil {
		t.Fatal(err)
	}
	if generic["peft_type"] != "LORA" || generic["r"] != 2.0 || generic["bias"] != "none" || generic["init_lora_weights"] != true {
		t.Errorf("config file %s", raw)
	}
}

func TestWritePEFTAdapterErrors(t *testing.T) {
	cases := []struct {
		name   string
		cfg    func(*PEFTConfig)
		mods   func([]PEFTModule) []PEFTModule
		want   string
		unsupp bool
	}{
		{"rank", func(c *PEFTConfig) { c.R = 3 }, nil, "has rank 2 but the config gives 3", false},
		{"alpha", nil, func(m []PEFTModule) []PEFTModule { m[0].Alpha = 9; return m }, "has alpha 9 but the config gives 4", false},
		{"target", func(c *PEFTConfig) { c.TargetModules = TargetModules{Names: []string{"q_proj"}} }, nil, `"model.layers.0.attn.v_proj" is not selected by target_modules`, false},
		{"target regex", func(c *PEFTConfig) { c.TargetModules = TargetModules{Regex: ".*q_proj", IsRegex: true} }, nil, "not selected by target_modules", false},
		{"data length", nil, func(m []PEFTModule) []PEFTModule { m[0].A = m[0].A[1:]; return m }, "lora_A", false},
		{"duplicate", nil, func(m []PEFTModule) []PEFTModule { return append(m, m[0]) }, "duplicate module", false},
		{"empty", nil, func([]PEFTModule) []PEFTModule { return nil }, "no modules", false},
		{"name", nil, func(m []PEFTModule) []PEFTModule { m[0].Name = "a..b"; return m }, "not a dotted module path", false},
		{"dtype", nil, func(m []PEFTModule) []PEFTModule { m[0].DType = DTypeI8; return m }, "not a float type", false},
		{"dora", func(c *PEFTConfig) { c.UseDoRA = true }, nil, "DoRA", false},
		{"peft type", func(c *PEFTConfig) { c.PEFTType = "IA3" }, nil, `peft_type is "IA3"`, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := NewPEFTConfig(2, 4, "q_proj", "v_proj")
			if c.cfg != nil {
				c.cfg(cfg)
			}
			mods := testModules()
			if c.mods != nil {
				mods = c.mods(mods)
			}
			parent := t.TempDir()
			dir := filepath.Join(parent, "a")
			err := WritePEFTAdapter(dir, cfg, mods)
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), dir) {
				t.Errorf("error %q, want %q", err, c.want)
			}
			if errors.Is(err, ErrUnsupported) != c.unsupp {
				t.Errorf("ErrUnsupported mismatch for %q", err)
			}
			if _, err := os.Stat(dir); !os.IsNotExist(err) {
				t.Error("a failed write left the folder behind")
			}
		})
	}
	// All-linear and Python-only regexes cannot be checked here; they pass.
	cfg := NewPEFTConfig(2, 4)
	cfg.TargetModules = TargetModules{Regex: "all-linear", IsRegex: true}
	if err := WritePEFTAdapter(t.TempDir(), cfg, testModules()); err != nil {
		t.Error(err)
	}
}

func FuzzPEFTConfig(f *testing.F) {
	if data, err := os.ReadFile(filepath.Join(fixtureDir, PEFTConfigFile)); err == nil {
		f.Add(data)
	}
	f.Add([]byte(`{"peft_type":"LORA","r":2,"target_modules":"q","layers_to_transform":1,"rank_pattern":{"(":1}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var c PEFTConfig
		if json.Unmarshal(data, &c) != nil {
			return
		}
		if c.Validate() == nil {
			c.ModuleRank("model.layers.0.q")
			c.ModuleAlpha("model.layers.0.q")
		}
		out, err := json.Marshal(c)
		if err != nil {
			return // e.g. NaN is not representable; Validate refuses it too
		}
		var back PEFTConfig
		if err := json.Unmarshal(out, &back); err != nil {
			t.Fatalf("re-read of %s: %v", out, err)
		}
	})
}

// TestWritePEFTAdapterReplacesTogether writes an adapter over an earlier one
// in a folder that also holds the user's files: both adapter files are the
// new ones, the user's files stay, and nothing is left beside the folder.
func TestWritePEFTAdapterReplacesTogether(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "a")
	mods := testModules()
	if err := WritePEFTAdapter(dir, NewPEFTConfig(2, 4), mods); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "README.md"), []byte("notes"), 0o644); err != nil {
		t.Fatal(err)
	}
	mods[0].A[0] += 1
	if err := WritePEFTAdapter(dir, NewPEFTConfig(2, 8), mods); err != nil {
		t.Fatal(err)
	}
	cfg, got, err := ReadPEFTAdapter(dir)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.LoraAlpha != 8 || got[0].A[0] != mods[0].A[0] {
		t.Errorf("alpha %v, A[0] %v: not the second adapter", cfg.LoraAlpha, got[0].A[0])
	}
	if b, err := os.ReadFile(filepath.Join(dir, "README.md")); err != nil || string(b) != "notes" {
		t.Errorf("the user's README: %q, %v", b, err)
	}
	entries, _ := os.ReadDir(parent)
	if len(entries) != 1 {
		t.Errorf("beside the adapter folder: %v", entries)
	}
}

// TestReadPEFTDirLazy checks that the lazy read leaves A and B in the file,
// gives the same values as the eager read through Factors and Load, and
// refuses once closed.
func TestReadPEFTDirLazy(t *testing.T) {
	var want []peftExpected
	loadJSON(t, "testdata/peft_expected.json", &want)
	eager, err := ReadPEFTDir(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	lazy, err := ReadPEFTDirLazy(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(lazy.Modules) != len(want) || len(eager.Modules) != len(want) {
		t.Fatalf("%d lazy and %d eager modules, want %d", len(lazy.Modules), len(eager.Modules), len(want))
	}
	for i := range lazy.Modules {
		m := &lazy.Modules[i]
		if m.A != nil || m.B != nil {
			t.Fatalf("%s: lazy read holds the factors", m.Name)
		}
		a, b, err := m.Factors()
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(a, want[i].A) || !reflect.DeepEqual(b, want[i].B) || !reflect.DeepEqual(a, eager.Modules[i].A) {
			t.Errorf("%s: lazy factors differ from the fixture's", m.Name)
		}
		if m.A != nil {
			t.Errorf("%s: Factors kept the values", m.Name)
		}
	}
	if err := lazy.Modules[0].Load(); err != nil || !reflect.DeepEqual(lazy.Modules[0].A, want[0].A) {
		t.Errorf("Load: %v", err)
	}
	if err := lazy.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := lazy.Modules[0].Factors(); err != nil {
		t.Errorf("a loaded module's factors after Close: %v", err)
	}
	if _, _, err := lazy.Modules[1].Factors(); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("factors of an unread module after Close: %v", err)
	}
}
