package rewrite

import (
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/x448/float16"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// The adapter directories under testdata/peft are written by
// testdata/peft/generate.py in PEFT's save_pretrained layout (and the live
// state_dict layout), with torch's merge of each in expected.json.

const peftFixtures = "../testdata/peft"

type peftTensorJSON struct {
	Shape []int64   `json:"shape"`
	Data  []float64 `json:"data"`
}

type peftFixtureExpected struct {
	InputIDs        peftTensorJSON            `json:"input_ids"`
	Outputs         map[string]peftTensorJSON `json:"outputs"`
	Weights         map[string]peftTensorJSON `json:"weights"`
	TiedMergeEffect float64                   `json:"tied_merge_effect"`
}

func readFixtureJSON(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatal(err)
	}
}

// torchWeight returns a merged layer's weight in torch's layout: [out, in]
// for a Linear (conv1d: Conv1D's [in, out]), [vocab, dim] for an
// embedding, and the bias vector for a "<module>.bias" name; read straight
// from the ONNX tensors, in the units the node computes with.
func torchWeight(t *testing.T, m *graph.Model, name string, conv1d bool) []float64 {
	t.Helper()
	layers, _ := FindLayers(m)
	targets := append(layers, findEmbeddings(m)...)
	module, bias := strings.CutSuffix(name, ".bias")
	for _, l := range targets {
		if l.Module != module {
			continue
		}
		if bias {
			w, beta, _ := layerBias(l)
			if w == nil {
				t.Fatalf("%s: no bias", module)
			}
			v := mgFloatsOf(t, m, w.Tensor)
			for i := range v {
				v[i] *= beta
			}
			return v
		}
		stored := mgFloatsOf(t, m, l.Weight.Tensor)
		in, out := int(l.In), int(l.Out)
		storedOutIn := l.StoredTransposed()
		res := make([]float64, in*out)
		for i := 0; i < in; i++ {
			for j := 0; j < out; j++ {
				v := stored[i*out+j]
				if storedOutIn {
					v = stored[j*in+i]
				}
				v *= l.Alpha
				if l.Op == opGather || conv1d {
					res[i*out+j] = v
				} else {
					res[j*in+i] = v
				}
			}
		}
		return res
	}
	t.Fatalf("no layer %s", module)
	return nil
}

func TestPEFTFixturesMatchTorch(t *testing.T) {
	for _, tc := range []struct {
		name, base, adapter string
		modules             int
		conv1d              bool
	}{
		{"lora", "base.onnx", "lora", 6, false},
		{"lora-named", "base.onnx", "lora-named", 6, false},
		{"embedding", "base.onnx", "embedding", 2, false},
		{"modules-to-save", "base.onnx", "modules-to-save", 6, false},
		{"modules-to-save-named", "base.onnx", "modules-to-save-named", 6, false},
		{"conv1d", "gpt2.onnx", "conv1d", 4, true},
		{"genai-preset", "base-genai.onnx", "lora", 6, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var exp peftFixtureExpected
			readFixtureJSON(t, filepath.Join(peftFixtures, tc.adapter, "expected.json"), &exp)
			m := loadModel(t, filepath.Join(peftFixtures, tc.base))
			rep, err := ApplyPEFT(m, filepath.Join(peftFixtures, tc.adapter, "adapter"), MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			// modules_to_save counts as two updates: score's weight and bias.
			if n := len(rep.Merged); n != tc.modules {
				t.Fatalf("%d updates, want %d: %+v", n, tc.modules, rep.Merged)
			}
			worstW := 0.0
			for name, w := range exp.Weights {
				tname := name
				if tc.name == "genai-preset" {
					tname = strings.ReplaceAll(name, "self_attn", "attn")
				}
				got := torchWeight(t, m, tname, tc.conv1d)
				if len(got) != len(w.Data) {
					t.Fatalf("%s: %d values, torch %d", name, len(got), len(w.Data))
				}
				for i := range got {
					d := math.Abs(got[i] - w.Data[i])
					if d > ulp32(w.Data[i]) {
						t.Fatalf("%s[%d] = %v, torch's merge %v", name, i, got[i], w.Data[i])
					}
					worstW = math.Max(worstW, d)
				}
			}
			orttest.Require(t)
			out := mgSaveModel(t, m, filepath.Join(t.TempDir(), "model.onnx"))
			feeds := mgInputIDs(t, exp.InputIDs.Shape, exp.InputIDs.Data)
			got := mgRunModel(t, out, feeds)
			baseOut := mgRunModel(t, filepath.Join(peftFixtures, tc.base), feeds)
			worst, moved := 0.0, 0.0
			for i, o := range got {
				w, ok := exp.Outputs[o.Name]
				if !ok {
					t.Fatalf("output %s not in expected.json", o.Name)
				}
				g, _ := o.Float64s()
				b, _ := baseOut[i].Float64s()
				maxAbs, _, ok := ortrun.Compare(g, w.Data, 1e-4, 1e-4)
				if !ok {
					t.Errorf("%s differs from torch's by %g", o.Name, maxAbs)
				}
				worst = math.Max(worst, maxAbs)
				for k := range b {
					moved = math.Max(moved, math.Abs(w.Data[k]-b[k]))
				}
			}
			if moved < 1e-2 {
				t.Errorf("the adapter barely changes the outputs (%g)", moved)
			}
			t.Logf("%d updates; weights within %.3g of torch's merge, outputs within %.3g (the adapter moves them by %.3g)", len(rep.Merged), worstW, worst, moved)
			if tc.name == "embedding" {
				t.Logf("PEFT's in-place merge_and_unload would also move the tied head's logits by %.3g", exp.TiedMergeEffect)
			}
		})
	}
}

func TestPEFTFloat32AdapterOnFloat16Base(t *testing.T) {
	var exp struct {
		Once  map[string][]uint16 `json:"float16_bits_once"`
		Torch map[string][]uint16 `json:"float16_bits_torch"`
	}
	readFixtureJSON(t, filepath.Join(peftFixtures, "fp16", "expected.json"), &exp)
	m := loadModel(t, filepath.Join(peftFixtures, "base-fp16.onnx"))
	if _, err := ApplyPEFT(m, filepath.Join(peftFixtures, "lora", "adapter"), MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	layers, _ := FindLayers(m)
	total, offByOne := 0, 0
	for name, once := range exp.Once {
		var l *Layer
		for _, c := range layers {
			if c.Module == name {
				l = c
			}
		}
		if l == nil || l.Weight.DataType() != graph.Float16 {
			t.Fatalf("%s: no float16 layer", name)
		}
		raw := mgRawOf(t, m, l.Weight.Tensor)
		for i := range once {
			got := uint16(raw[2*i]) | uint16(raw[2*i+1])<<8
			if got != once[i] {
				t.Fatalf("%s[%d] = %#04x, want %#04x (float64 sum rounded once)", name, i, got, once[i])
			}
			total++
			if tv := exp.Torch[name][i]; tv != got {
				d := math.Abs(float64(float16.Frombits(tv).Float32()) - float64(float16.Frombits(got).Float32()))
				if d > float16Ulp(float16.Frombits(got).Float32()) {
					t.Fatalf("%s[%d]: torch's fp32 path gives %#04x, more than an ulp from %#04x", name, i, tv, got)
				}
				offByOne++
			}
		}
	}
	t.Logf("%d float16 weights equal the once-rounded float64 merge; %d differ by one ulp from torch's w16 += delta32", total, offByOne)
}

func float16Ulp(x float32) float64 {
	h := float16.Fromfloat32(float32(math.Abs(float64(x))))
	return float64(float16.Frombits(h.Bits()+1).Float32() - h.Float32())
}

// TestPEFTRefusesWhatPEFTWouldNot covers each case that used to be applied
// silently although PEFT would drop or refuse it.
func TestPEFTRefusesWhatPEFTWouldNot(t *testing.T) {
	lora := filepath.Join(peftFixtures, "lora", "adapter")
	base := filepath.Join(peftFixtures, "base.onnx")
	for _, tc := range []struct {
		name string
		edit func(map[string]any)
		want string
	}{
		{"layers_to_transform out of range", func(c map[string]any) { c["layers_to_transform"] = []int{999} }, "none of its 6 modules is selected by target_modules [\"q_proj\" \"v_proj\" \"fc1\"] with layers_to_transform [999]"},
		{"layers_to_transform one layer", func(c map[string]any) { c["layers_to_transform"] = []int{1} }, "3 of its 6 modules are not selected"},
		{"unknown target_modules", func(c map[string]any) { c["target_modules"] = []string{"query", "value"} }, "none of its 6 modules is selected"},
		{"key outside target_modules", func(c map[string]any) { c["target_modules"] = []string{"q_proj", "v_proj"} }, "2 of its 6 modules are not selected"},
		{"bad regex", func(c map[string]any) { c["target_modules"] = `.*(q_proj` }, "invalid regex"},
		{"regex with layers", func(c map[string]any) {
			c["target_modules"] = `.*_proj`
			c["layers_to_transform"] = []int{0}
		}, "layers_to_transform cannot be used with a string target_modules"},
		{"excluded", func(c map[string]any) { c["exclude_modules"] = []string{"fc1"} }, "2 of its 6 modules are not selected"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyAdapter(t, lora, tc.edit)
			_, err := ApplyPEFT(loadModel(t, base), dir, MergeOptions{})
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %v, want one line with %q", err, tc.want)
			}
		})
	}
	// A regex target that does select every key is fine.
	dir := copyAdapter(t, lora, func(c map[string]any) { c["target_modules"] = `model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.fc1)` })
	if _, err := ApplyPEFT(loadModel(t, base), dir, MergeOptions{}); err != nil {
		t.Errorf("regex target_modules: %v", err)
	}

	// A layer index is never dropped: block.onnx's "mlp.fc1" is no match
	// for model.layers.1.mlp.fc1 ...
	_, err := ApplyPEFT(loadModel(t, filepath.Join(peftFixtures, "block.onnx")), lora, MergeOptions{})
	var ue *UnmatchedError
	if !errors.As(err, &ue) || len(ue.Modules) != 6 {
		t.Fatalf("single block: %v", err)
	}
	// ... unless a map says so; then layer 1's modules are torch's.
	rules, err := ParseMapRules([]string{`^model\.layers\.1\.=`})
	if err != nil {
		t.Fatal(err)
	}
	blk := loadModel(t, filepath.Join(peftFixtures, "block.onnx"))
	rep, err := ApplyPEFT(blk, lora, MergeOptions{Map: rules, AllowPartial: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 3 || len(rep.Unmatched) != 3 {
		t.Fatalf("mapped block: %d merged, unmatched %v", len(rep.Merged), rep.Unmatched)
	}
	var exp peftFixtureExpected
	readFixtureJSON(t, filepath.Join(peftFixtures, "lora", "expected.json"), &exp)
	for _, mod := range []string{"self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"} {
		got, want := torchWeight(t, blk, mod, false), exp.Weights["model.layers.1."+mod].Data
		for i := range got {
			if math.Abs(got[i]-want[i]) > ulp32(want[i]) {
				t.Fatalf("%s[%d] = %v, torch %v", mod, i, got[i], want[i])
			}
		}
	}

	// The GenAI names need the preset; without it the error names the
	// layer with the same index.
	_, err = ApplyPEFT(loadModel(t, filepath.Join(peftFixtures, "base-genai.onnx")), lora, MergeOptions{Preset: "none"})
	if !errors.As(err, &ue) || ue.Modules[0].Closest != "model.layers.0.attn.q_proj" && ue.Modules[0].Closest != "model.layers.0.attn.v_proj" || !strings.Contains(err.Error(), "4 of 6 modules match no layer") {
		t.Fatalf("genai without preset: %v", err)
	}
	for _, u := range ue.Modules {
		if u.Closest == "" || numberSegments(u.Closest) != numberSegments(u.Module) {
			t.Errorf("%s: closest %q is not in the same layer", u.Module, u.Closest)
		}
	}
	if _, err := ApplyPEFT(loadModel(t, base), lora, MergeOptions{Preset: "nope"}); err == nil || !strings.Contains(err.Error(), "unknown module map preset") {
		t.Errorf("bad preset: %v", err)
	}
}

func TestMatchPEFTDryRun(t *testing.T) {
	m := loadModel(t, filepath.Join(peftFixtures, "base-genai.onnx"))
	before := mgCloneModel(m)
	pm, err := MatchPEFT(m, filepath.Join(peftFixtures, "modules-to-save", "adapter"), MergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mgSameTensors(t, m, before)
	if pm.Preset != "genai" || len(pm.Assignments) != 5 {
		t.Fatalf("preset %q, %d assignments", pm.Preset, len(pm.Assignments))
	}
	for _, a := range pm.Assignments {
		switch {
		case a.Kind == KindModulesToSave:
			if a.Layer != "score" || a.Op != "Gemm" || len(a.Keys) != 2 {
				t.Errorf("score: %+v", a)
			}
		case a.Layer == "" || a.Mapped == a.Module || !strings.Contains(a.Layer, ".attn."):
			t.Errorf("%s -> %s (mapped %s)", a.Module, a.Layer, a.Mapped)
		}
	}
}

func TestMapRules(t *testing.T) {
	rules, err := ParseMapRules([]string{`self_attn\.(q|v)_proj=attn.\1_proj`, `^model\.=base.`})
	if err != nil {
		t.Fatal(err)
	}
	if got := applyMapRules(rules, "model.layers.3.self_attn.q_proj"); got != "base.layers.3.attn.q_proj" {
		t.Errorf("got %s", got)
	}
	for _, bad := range []string{"noequals", "=x", "(=x"} {
		if _, err := ParseMapRules([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	dir := t.TempDir()
	for name, text := range map[string]string{
		"m.json":      `{"self_attn\\.": "attn.", "^model\\.": ""}`,
		"l.json":      `[{"from": "self_attn\\.", "to": "attn."}, {"from": "^model\\.", "to": ""}]`,
		"m.yaml":      "# comment\n'self_attn\\.': attn.\n\"^model\\\\.\": ''\n",
		"l.yaml":      "- from: 'self_attn\\.'\n  to: attn.\n- from: '^model\\.'\n  to: ''\n",
		"bad.yaml":    "- from: x\n",
		"bad.json":    `{"a": 1}`,
		"empty.yaml":  "# nothing\n",
		"regex.json":  `{"(": "x"}`,
		"extra.json":  `[{"from": "a", "to": "b", "x": 1}]`,
		"trail.json":  `{"a": "b"} x`,
		"plain.yaml":  "self_attn.: attn. # trailing comment\n",
		"nokey.yaml":  "just text\n",
		"quote.yaml":  "'unterminated: x\n",
		"dquote.yaml": "\"a\\q\": b\n",
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		rules, err := ReadMapFile(p)
		good := name == "m.json" || name == "l.json" || name == "m.yaml" || name == "l.yaml" || name == "plain.yaml"
		if good != (err == nil) {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if name == "plain.yaml" {
			if got := applyMapRules(rules, "a.self_attnXq"); got != "a.attn.q" {
				t.Errorf("plain.yaml: %s", got)
			}
		} else if good {
			if got := applyMapRules(rules, "model.layers.0.self_attn.q_proj"); got != "layers.0.attn.q_proj" {
				t.Errorf("%s: %s", name, got)
			}
		}
	}
}

func TestTrainableLineLikePEFT(t *testing.T) {
	// Python: f"{n:,d}" for each n.
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 27904: "27,904", 1234567: "1,234,567", -1234: "-1,234", 100000: "100,000"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q, want %q", n, got, want)
		}
	}
	if got := TrainableLine(2048, 27904); got != "trainable params: 2,048 || all params: 27,904 || trainable%: 7.3394" {
		t.Errorf("got %q", got)
	}
}
