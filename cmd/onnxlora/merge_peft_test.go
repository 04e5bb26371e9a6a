package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const peftFixtures = "../../testdata/peft"

func peftFixture(parts ...string) string {
	return filepath.Join(append([]string{peftFixtures}, parts...)...)
}

func TestMergePEFTFlags(t *testing.T) {
	tmp := t.TempDir()
	out := filepath.Join(tmp, "m.onnx")
	base, lora := peftFixture("base.onnx"), peftFixture("lora", "adapter")
	genai := peftFixture("base-genai.onnx")

	// Errors: one line, naming the flag.
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"merge", base, "--adapter", lora, "-o", out, "--only", ""}, 2, "empty module name in --only"},
		{[]string{"merge", base, "--adapter", lora, "-o", out, "--adapter-name", ""}, 2, "empty module name in --adapter-name"},
		{[]string{"merge", base, "--adapter", lora, "-o", out, "--only", "q_proj,"}, 2, "empty module name"},
		{[]string{"merge", base, "-o", out, "--map", "a=b"}, 2, "go with --adapter"},
		{[]string{"merge", base, "--adapter", lora, "-o", out, "--map", "(=x"}, 2, "invalid --map"},
		{[]string{"merge", base, "--adapter", lora, "-o", out, "--preset", "nope"}, 1, "unknown module map preset"},
		{[]string{"merge", genai, "--adapter", lora, "-o", out, "--preset", "none"}, 1, "4 of 6 modules match no layer of the model, e.g. model.layers.0.self_attn.q_proj; closest layer: model.layers.0.attn.q_proj; rename them with --map FROM=TO (or --map-file), or add --allow-partial"},
		{[]string{"merge", peftFixture("block.onnx"), "--adapter", lora, "-o", out}, 1, "6 of 6 modules match no layer"},
	} {
		r := run(t, c.args...)
		if r.code != c.code || !strings.Contains(r.stderr, c.msg) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Errorf("onnxlora %s: exit %d, stderr %q; want exit %d and one line with %q", strings.Join(c.args, " "), r.code, r.stderr, c.code, c.msg)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Fatal("a failed merge wrote its output")
	}
	// --verbose lists every unmatched module.
	r := run(t, "merge", genai, "--adapter", lora, "-o", out, "--preset", "none", "--verbose")
	if r.code != 1 || strings.Count(r.stderr, "(closest layer: model.layers.") != 4 {
		t.Errorf("--verbose: %q", r.stderr)
	}

	// --only and --adapter-name add up (they used to share one list, so the
	// last flag won), with suffixes as in target_modules.
	r = mustRun(t, "merge", base, "--adapter", lora, "-o", out, "--only", "q_proj", "--adapter-name", "model.layers.1.mlp.fc1", "--json")
	var rep struct {
		Merged []struct {
			PEFTModule string `json:"peft_module"`
		} `json:"merged"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range rep.Merged {
		got = append(got, m.PEFTModule)
	}
	if strings.Join(got, " ") != "model.layers.0.self_attn.q_proj model.layers.1.self_attn.q_proj model.layers.1.mlp.fc1" {
		t.Errorf("--only q_proj --adapter-name model.layers.1.mlp.fc1 merged %v", got)
	}

	// The GenAI preset is chosen from the producer; a map file does the same.
	mustRun(t, "merge", genai, "--adapter", lora, "-o", out)
	mapFile := filepath.Join(tmp, "map.yaml")
	if err := os.WriteFile(mapFile, []byte("# HF -> GenAI builder\n'self_attn\\.': 'attn.'\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r = mustRun(t, "merge", genai, "--adapter", lora, "-o", out, "--preset", "none", "--map-file", mapFile, "-q")
	if r.stdout != "" || r.stderr != "" {
		t.Errorf("--quiet printed %q %q", r.stdout, r.stderr)
	}
	r = mustRun(t, "merge", genai, "--adapter", lora, "-o", out, "--preset", "none", "--map", `self_attn\.(q|v)_proj=attn.\1_proj`)
	if !strings.Contains(r.stdout, "model.layers.1.attn.v_proj <- model.layers.1.self_attn.v_proj") {
		t.Errorf("--map: %s", r.stdout)
	}
}

func TestExportAdapterForcePrefixAndUntrained(t *testing.T) {
	tmp := t.TempDir()
	lora := filepath.Join(tmp, "lora.onnx")
	mustRun(t, "inject", peftFixture("gpt2.onnx"), "-o", lora, "--target", "c_fc,c_proj", "-q")
	dir := filepath.Join(tmp, "adapter")
	r := mustRun(t, "export-adapter", lora, "-o", dir)
	if !strings.Contains(r.stderr, "every lora_B is zero") || !strings.Contains(r.stdout, "fan_in_fan_out=true") {
		t.Errorf("untrained export: %q %q", r.stdout, r.stderr)
	}
	cfg, err := os.ReadFile(filepath.Join(dir, "adapter_config.json"))
	if err != nil || !strings.Contains(string(cfg), `"fan_in_fan_out": true`) {
		t.Errorf("config: %s %v", cfg, err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, "adapter_model.safetensors"))
	r = run(t, "export-adapter", lora, "-o", dir, "--prefix", "")
	if r.code != 1 || !strings.Contains(r.stderr, "already exists and is not empty; add --force") {
		t.Errorf("overwrite without --force: %d %q", r.code, r.stderr)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "adapter_model.safetensors")); string(after) != string(before) {
		t.Error("a refused export changed the directory")
	}
	r = mustRun(t, "export-adapter", lora, "-o", dir, "--prefix", "", "--force", "-q")
	if r.stdout != "" {
		t.Errorf("--quiet printed %q", r.stdout)
	}
	after, _ := os.ReadFile(filepath.Join(dir, "adapter_model.safetensors"))
	if strings.Contains(string(after), "base_model.model.") || !strings.Contains(string(after), `"transformer.h.0.mlp.c_fc.lora_A.weight"`) {
		t.Errorf("--prefix \"\" keys: %.300s", after)
	}
}
