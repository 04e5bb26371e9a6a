package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestInspectAdapterDir(t *testing.T) {
	r := mustRun(t, "inspect", peftFixture("base-genai.onnx"), "--adapter", peftFixture("embedding", "adapter"), "--json")
	var rep struct {
		Preset  string `json:"preset"`
		Modules []struct {
			Kind, Module, Mapped, Layer, Op string
			Keys                            []string
			Shapes                          [][]int
			LayerShape                      []int64 `json:"layer_shape"`
		} `json:"modules"`
		Unmatched int `json:"unmatched"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Preset != "genai" || len(rep.Modules) != 2 || rep.Unmatched != 0 {
		t.Fatalf("%+v", rep)
	}
	e := rep.Modules[0]
	if e.Kind != "embedding" || e.Layer != "model.embed_tokens" || e.Op != "Gather" || e.LayerShape[0] != 32 || e.LayerShape[1] != 16 ||
		e.Keys[0] != "base_model.model.model.embed_tokens.lora_embedding_A" || e.Shapes[0][1] != 32 || e.Shapes[1][0] != 16 {
		t.Errorf("embedding: %+v", e)
	}
	q := rep.Modules[1]
	if q.Layer != "model.layers.0.attn.q_proj" || q.Mapped != q.Layer {
		t.Errorf("q_proj: %+v", q)
	}
	// Without the preset the same modules show as unmatched, and nothing fails.
	r = mustRun(t, "inspect", peftFixture("base-genai.onnx"), "--adapter", peftFixture("embedding", "adapter"), "--preset", "none")
	if !strings.Contains(r.stdout, "2 module(s): 1 matched, 1 unmatched") || !strings.Contains(r.stdout, "(none)") {
		t.Errorf("text:\n%s", r.stdout)
	}
	// A config PEFT would refuse is an error here too.
	r = run(t, "inspect", peftFixture("block.onnx"), "--adapter", peftFixture("fp16"))
	if r.code != 1 || !strings.Contains(r.stderr, "adapter_config.json") {
		t.Errorf("no adapter: %d %q", r.code, r.stderr)
	}
}
