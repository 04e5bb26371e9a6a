package rewrite

import (
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// The fixtures under testdata/peft-* are made by testdata/make_peft_fixture.py
// with torch alone: a base export, the torch-merged export, and a PEFT
// adapter directory written by hand.

type peftExpected struct {
	InputIDs struct {
		Shape []int64   `json:"shape"`
		Data  []float64 `json:"data"`
	} `json:"input_ids"`
	Logits struct {
		Shape []int64   `json:"shape"`
		Data  []float64 `json:"data"`
	} `json:"logits"`
	Modules []string `json:"modules"`
}

func readPEFTExpected(t *testing.T, fixture string) peftExpected {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", fixture, "expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var e peftExpected
	if err := json.Unmarshal(data, &e); err != nil {
		t.Fatal(err)
	}
	return e
}

func TestApplyPEFTMatchesTorchMerge(t *testing.T) {
	for _, fixture := range []string{"peft-llama", "peft-gpt2"} {
		t.Run(fixture, func(t *testing.T) {
			exp := readPEFTExpected(t, fixture)
			dir := filepath.Join("testdata", fixture)
			m := loadModel(t, filepath.Join(dir, "base.onnx"))
			rep, err := ApplyPEFT(m, filepath.Join(dir, "adapter"), MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			var applied []string
			for _, ml := range rep.Merged {
				applied = append(applied, ml.PEFTModule)
				if !strings.HasSuffix(ml.PEFTModule, ml.Module) {
					t.Errorf("PEFT module %s went to layer %s", ml.PEFTModule, ml.Module)
				}
			}
			slices.Sort(applied)
			if !slices.Equal(applied, exp.Modules) {
				t.Fatalf("applied %v, torch merged %v", applied, exp.Modules)
			}

			// The weights equal torch's merge (float64, one rounding) to the ulp.
			torchMerged := loadModel(t, filepath.Join(dir, "merged.onnx"))
			gm, gt := m.Graph(), torchMerged.Graph()
			for _, ml := range rep.Merged {
				ours := gm.ResolveWeight(mgNodeByName(m, ml.Node).Input[1])
				theirs := gt.ResolveWeight(mgNodeByName(torchMerged, ml.Node).Input[1])
				a, b := mgFloatsOf(t, m, ours.Tensor), mgFloatsOf(t, torchMerged, theirs.Tensor)
				for i := range a {
					if d := math.Abs(a[i] - b[i]); d > ulp32(b[i]) {
						t.Fatalf("%s: weight %d is %v, torch merged %v", ml.Module, i, a[i], b[i])
					}
				}
			}

			orttest.Require(t)
			out := mgSaveModel(t, m, filepath.Join(t.TempDir(), "model.onnx"))
			feeds := mgInputIDs(t, exp.InputIDs.Shape, exp.InputIDs.Data)
			got := mgRunModel(t, out, feeds)
			want := mgRunModel(t, filepath.Join(dir, "merged.onnx"), feeds)
			worst := mgCompareRuns(t, got, want, 1e-5)
			g, _ := got[0].Float64s()
			if maxAbs, _, ok := ortrun.Compare(g, exp.Logits.Data, 1e-4, 1e-4); !ok {
				t.Errorf("logits differ from torch's by %g", maxAbs)
			}
			effect := mgCompareRunsQuiet(got, mgRunModel(t, filepath.Join(dir, "base.onnx"), feeds))
			t.Logf("%d modules applied; vs torch-merged ONNX %.3g of scale; the adapter moves logits by %.3g", len(rep.Merged), worst, effect)
			if effect < 1e-2 {
				t.Errorf("the adapter barely changes the logits (%g)", effect)
			}
		})
	}
}

// ulp32 is the spacing of float32 values around x.
func ulp32(x float64) float64 {
	f := float32(math.Abs(x))
	return float64(math.Nextafter32(f, float32(math.Inf(1))) - f)
}

func TestApplyPEFTFileStreams(t *testing.T) {
	dir := filepath.Join("testdata", "peft-llama")
	m := loadModel(t, filepath.Join(dir, "base.onnx"))
	if _, err := ApplyPEFT(m, filepath.Join(dir, "adapter"), MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "model.onnx")
	rep, err := ApplyPEFTFile(filepath.Join(dir, "base.onnx"), filepath.Join(dir, "adapter"), out, MergeOptions{}, graph.SaveOptions{External: graph.ExternalAlways, Threshold: 64})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 7 {
		t.Errorf("%d merged", len(rep.Merged))
	}
	if _, err := os.Stat(out + ".data"); err != nil {
		t.Errorf("no external data written: %v", err)
	}
	mgSameTensors(t, loadModel(t, out), m)
}

func TestApplyPEFTOptions(t *testing.T) {
	dir := filepath.Join("testdata", "peft-llama")
	base := loadModel(t, filepath.Join(dir, "base.onnx"))
	adapter := filepath.Join(dir, "adapter")

	only := mgCloneModel(base)
	rep, err := ApplyPEFT(only, adapter, MergeOptions{Only: []string{"model.layers.1.self_attn.v_proj"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 1 || rep.Merged[0].Rank != 2 || rep.Merged[0].Scaling != 8/math.Sqrt(2) {
		t.Errorf("Only: %+v", rep.Merged)
	}
	// Only takes suffixes as target_modules does.
	vrep, err := ApplyPEFT(mgCloneModel(base), adapter, MergeOptions{Only: []string{"v_proj"}})
	if err != nil || len(vrep.Merged) != 2 || !strings.HasSuffix(vrep.Merged[0].PEFTModule, ".v_proj") || !strings.HasSuffix(vrep.Merged[1].PEFTModule, ".v_proj") {
		t.Errorf("Only v_proj: %v %+v", err, vrep)
	}
	for _, bad := range [][]string{{"w_proj"}, {"proj"}, {""}} {
		if _, err := ApplyPEFT(mgCloneModel(base), adapter, MergeOptions{Only: bad}); err == nil || !strings.Contains(err.Error(), "module") {
			t.Errorf("Only %q: %v", bad, err)
		}
	}

	// Scale: half the delta.
	half := mgCloneModel(base)
	hrep, err := ApplyPEFT(half, adapter, MergeOptions{Scale: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	// The fixture's config: r=4, lora_alpha=8, use_rslora, with r=2 for
	// layer 1's v_proj and alpha 4 for down_proj; every layer is a MatMul.
	for _, ml := range hrep.Merged {
		r, alpha := 4.0, 8.0
		if ml.PEFTModule == "model.layers.1.self_attn.v_proj" {
			r = 2
		}
		if strings.HasSuffix(ml.PEFTModule, ".down_proj") {
			alpha = 4
		}
		if want := alpha / math.Sqrt(r) * 0.5; ml.Factor != want {
			t.Errorf("%s: factor %v with scale 0.5, want %v", ml.PEFTModule, ml.Factor, want)
		}
	}

	// A layer the adapter names is missing: an error, unless partial.
	renamed := mgCloneModel(base)
	mgNodeByName(renamed, "/lm_head/MatMul").Name = protoString("/head/MatMul")
	before := mgCloneModel(renamed)
	_, err = ApplyPEFT(renamed, adapter, MergeOptions{})
	var ue *UnmatchedError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "1 of 7 modules match no layer") || !strings.Contains(err.Error(), "e.g. lm_head") || strings.Contains(err.Error(), "\n") {
		t.Errorf("unmatched module: %v", err)
	}
	mgSameTensors(t, renamed, before)
	prep, err := ApplyPEFT(renamed, adapter, MergeOptions{AllowPartial: true})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(prep.Unmatched, []string{"lm_head"}) || len(prep.Merged) != 6 {
		t.Errorf("partial: unmatched %v, %d merged", prep.Unmatched, len(prep.Merged))
	}
}

func protoString(s string) *string { return &s }

func TestApplyPEFTErrors(t *testing.T) {
	llama := filepath.Join("testdata", "peft-llama")
	gpt2 := filepath.Join("testdata", "peft-gpt2")

	// An adapter for another model: no module matches.
	_, err := ApplyPEFT(loadModel(t, filepath.Join(llama, "base.onnx")), filepath.Join(gpt2, "adapter"), MergeOptions{})
	if err == nil || !strings.Contains(err.Error(), "match no layer") || !strings.Contains(err.Error(), "transformer.h.0.attn.c_attn") {
		t.Errorf("adapter of another model: %v", err)
	}
	// Same module names, other sizes (tiny-gpt has hidden size 32).
	_, err = ApplyPEFT(loadModel(t, mgTestModels+"/tiny-gpt.onnx"), filepath.Join(llama, "adapter"), MergeOptions{})
	if err == nil || !strings.Contains(err.Error(), "make a delta for 16 inputs") {
		t.Errorf("wrong sizes: %v", err)
	}

	// Features a plain merge would get wrong are refused. (use_dora is
	// applied, dora.go; a DoRA dir without magnitudes is malformed,
	// dora_test.go.)
	for _, tc := range []struct{ key, value string }{
		{"lora_bias", "true"},
		{"init_lora_weights", `"loftq"`}, // pissa and olora are rebuilt (init_peft.go)
	} {
		dir := copyAdapter(t, filepath.Join(llama, "adapter"), func(cfg map[string]any) {
			var v any
			json.Unmarshal([]byte(tc.value), &v)
			cfg[tc.key] = v
		})
		_, err := ApplyPEFT(loadModel(t, filepath.Join(llama, "base.onnx")), dir, MergeOptions{})
		if !errors.Is(err, export.ErrUnsupported) {
			t.Errorf("%s=%s: %v", tc.key, tc.value, err)
		}
	}
	// Keys the config does not select are refused, as PEFT would not load them.
	dir := copyAdapter(t, filepath.Join(llama, "adapter"), nil)
	if err := export.WriteSafetensors(filepath.Join(dir, export.PEFTWeightsFile), []export.TensorData{
		mustF32(t, "base_model.model.model.embed_tokens.lora_embedding_A", []int{4, 32}),
		mustF32(t, "base_model.model.model.embed_tokens.lora_embedding_B", []int{16, 4}),
	}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ApplyPEFT(loadModel(t, filepath.Join(llama, "base.onnx")), dir, MergeOptions{}); err == nil || !strings.Contains(err.Error(), "none of its 1 modules is selected by target_modules") || !strings.Contains(err.Error(), "model.embed_tokens") {
		t.Errorf("embedding adapter outside target_modules: %v", err)
	}
}

func mustF32(t *testing.T, name string, shape []int) export.TensorData {
	t.Helper()
	td, err := export.NewFloat32Tensor(name, export.DTypeF32, shape, make([]float32, shape[0]*shape[1]))
	if err != nil {
		t.Fatal(err)
	}
	return td
}

// copyAdapter copies an adapter directory, editing its config.
func copyAdapter(t *testing.T, src string, edit func(map[string]any)) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{export.PEFTConfigFile, export.PEFTWeightsFile} {
		data, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		if f == export.PEFTConfigFile && edit != nil {
			var cfg map[string]any
			if err := json.Unmarshal(data, &cfg); err != nil {
				t.Fatal(err)
			}
			edit(cfg)
			data, _ = json.Marshal(cfg)
		}
		if err := os.WriteFile(filepath.Join(dir, f), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestMatchPEFTModules(t *testing.T) {
	layers := func(names ...string) []*Layer {
		var ls []*Layer
		for _, n := range names {
			ls = append(ls, &Layer{Module: n, Op: "MatMul"})
		}
		return ls
	}
	mods := func(names ...string) []PEFTAssignment {
		var as []PEFTAssignment
		for _, n := range names {
			as = append(as, PEFTAssignment{Kind: KindLoRA, Module: n, Mapped: n})
		}
		return as
	}
	for _, tc := range []struct {
		name   string
		mods   []PEFTAssignment
		layers []*Layer
		want   map[string]int
		err    string
	}{
		{"exact", mods("model.layers.0.self_attn.q_proj"), layers("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"),
			map[string]int{"model.layers.0.self_attn.q_proj": 0}, ""},
		{"the export drops the root", mods("model.layers.1.self_attn.q_proj"), layers("layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"),
			map[string]int{"model.layers.1.self_attn.q_proj": 1}, ""},
		{"the export adds a root", mods("layers.1.mlp.fc1"), layers("decoder.layers.0.mlp.fc1", "decoder.layers.1.mlp.fc1"),
			map[string]int{"layers.1.mlp.fc1": 1}, ""},
		{"the longest match wins", mods("model.decoder.layers.0.fc1"), layers("encoder.layers.0.fc1", "decoder.layers.0.fc1", "layers.0.fc1"),
			map[string]int{"model.decoder.layers.0.fc1": 1}, ""},
		{"layers.1 is not layers.11", mods("h.1.attn.c_attn"), layers("h.11.attn.c_attn"), map[string]int{}, ""},
		{"a layer index is never dropped", mods("model.decoder.layers.1.fc1"), layers("fc1", "fc2"), map[string]int{}, ""},
		{"nor added", mods("fc1"), layers("layers.0.fc1"), map[string]int{}, ""},
		{"no match", mods("model.layers.0.self_attn.q_proj"), layers("model.layers.0.attn.q_proj"), map[string]int{}, ""},
		{"a tie", mods("layers.0.fc1"), layers("encoder.layers.0.fc1", "decoder.layers.0.fc1"), nil, "matches 2 layers equally"},
		{"a layer claimed twice", mods("a.layers.0.q", "b.layers.0.q"), layers("layers.0.q"), nil, "matched by 2 modules"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := assignLayers(tc.mods, tc.layers)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := map[string]int{}
			for _, a := range tc.mods {
				if a.layer != nil {
					got[a.Module] = slices.Index(tc.layers, a.layer)
				}
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
}
