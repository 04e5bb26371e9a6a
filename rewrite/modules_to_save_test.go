package rewrite

import (
	"bytes"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// perturb sets a float initializer to random values, as training would.
func perturb(t *testing.T, m *graph.Model, name string, rng *rand.Rand) []float64 {
	t.Helper()
	init, _ := m.Graph().Initializer(name)
	if init == nil {
		t.Fatalf("no initializer %s", name)
	}
	n, _ := graph.NumElements(init.Dims)
	vals := make([]float64, n)
	for i := range vals {
		vals[i] = float64(float32(rng.NormFloat64() * 0.1))
	}
	nt, err := graph.NewFloatTensor(name, graph.DataType(init.GetDataType()), init.Dims, vals)
	if err != nil {
		t.Fatal(err)
	}
	if err := graph.SetRawData(init, nt.RawData); err != nil {
		t.Fatal(err)
	}
	return graph.DecodeFloats(graph.DataType(init.GetDataType()), nt.RawData)
}

// TestModulesToSaveRoundTrip injects adapters and modules_to_save layers,
// changes every trainable tensor as training would, exports the PEFT
// directory, and checks the saved tensors' keys and torch layouts
// (computed here from the model's stored layout), the config, and that
// applying the directory to the base gives the bytes merging the injected
// model gives.
func TestModulesToSaveRoundTrip(t *testing.T) {
	cases := []struct {
		model, target string
		save          []string
		// want maps a key to how its values come from the stored
		// initializer: "same", or "transpose" of a 2-D [rows, cols].
		want map[string]string
	}{
		// Gemm with transB: fc2.weight is stored [out, in] as torch's.
		{"mlp-classifier.onnx", "fc1", []string{"fc2"}, map[string]string{
			"base_model.model.fc2.weight": "same fc2.weight",
			"base_model.model.fc2.bias":   "same fc2.bias",
		}},
		// A MatMul whose weight torch.onnx folded to [in, out], and an
		// embedding table, which PEFT stores as [vocab, dim].
		{"tiny-gpt.onnx", "q_proj", []string{"lm_head", "embed_tokens"}, map[string]string{
			"base_model.model.lm_head.weight":            "transpose onnx::MatMul_261",
			"base_model.model.model.embed_tokens.weight": "same model.embed_tokens.weight",
		}},
	}
	for _, c := range cases {
		t.Run(c.model, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(5, 6))
			m, err := graph.Load(filepath.Join("../testdata/models", c.model))
			if err != nil {
				t.Fatal(err)
			}
			inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{c.target}, Rank: 2, Alpha: 4}, ModulesToSave: c.save})
			if err != nil {
				t.Fatal(err)
			}
			man := inj.Manifest
			if len(man.Saved) != len(c.want) && len(man.Saved) != len(c.save) {
				t.Fatalf("saved %+v, want %v", man.Saved, c.save)
			}
			stored := map[string][]float64{}
			dims := map[string][]int64{}
			for _, name := range man.Trainable {
				stored[name] = perturb(t, m, name, rng)
				init, _ := m.Graph().Initializer(name)
				dims[name] = init.Dims
			}
			for _, s := range man.Saved {
				if !slices.Contains(man.Trainable, s.Weight) {
					t.Errorf("%s's weight %s is not trainable", s.Module, s.Weight)
				}
			}
			dir := filepath.Join(t.TempDir(), "peft")
			if _, err := ExportPEFT(m, dir, ExportOptions{}); err != nil {
				t.Fatal(err)
			}
			a, err := export.ReadPEFTDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			if len(a.Config.ModulesToSave) != len(man.Saved) {
				t.Errorf("config modules_to_save %v, want %d modules", a.Config.ModulesToSave, len(man.Saved))
			}
			got := map[string]export.PEFTSaved{}
			for _, sv := range a.Saved {
				got[sv.Key] = sv
			}
			for key, how := range c.want {
				sv, ok := got[key]
				if !ok {
					t.Fatalf("no key %s in %v", key, a.Saved)
				}
				op, name, _ := strings.Cut(how, " ")
				src, d := stored[name], dims[name]
				want := make([]float32, len(src))
				for i, v := range src {
					want[i] = float32(v)
				}
				if op == "transpose" {
					rows, cols := int(d[0]), int(d[1])
					for i := 0; i < rows; i++ {
						for j := 0; j < cols; j++ {
							want[j*rows+i] = float32(src[i*cols+j])
						}
					}
					if !slices.Equal(sv.Shape, []int{cols, rows}) {
						t.Errorf("%s shape %v, want [%d %d]", key, sv.Shape, cols, rows)
					}
				}
				if !slices.Equal(sv.Values, want) {
					t.Errorf("%s values differ from the trained %s (%s)", key, name, op)
				}
			}
			merged := m
			if _, err := Merge(merged, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			base, err := graph.Load(filepath.Join("../testdata/models", c.model))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ApplyPEFT(base, dir, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			for _, init := range base.Graph().Proto.Initializer {
				mt, _ := merged.Graph().Initializer(init.GetName())
				if mt == nil {
					t.Errorf("merged model lacks %s", init.GetName())
					continue
				}
				if !bytes.Equal(mustRaw(t, base, init.GetName()), mustRaw(t, merged, init.GetName())) {
					t.Errorf("%s: applying the exported directory gives other bytes than merging the injected model", init.GetName())
				}
			}
		})
	}
}

func mustRaw(t *testing.T, m *graph.Model, name string) []byte {
	t.Helper()
	init, _ := m.Graph().Initializer(name)
	raw, err := m.RawData(init)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// TestModulesToSaveRefusals checks each case inject cannot honour gives
// an error naming it, and leaves no manifest entry.
func TestModulesToSaveRefusals(t *testing.T) {
	cases := []struct {
		model, target string
		save          []string
		want          string
	}{
		{"mlp-classifier.onnx", "fc1", []string{"classifier"}, `"classifier" matches no`},
		{"mlp-classifier.onnx", "fc1,fc2", []string{"fc2"}, "one or the other"},
		{"shared-weight.onnx", "lm_head", []string{"branch_a"}, "also feeds other nodes"},
	}
	for _, c := range cases {
		m, err := graph.Load(filepath.Join("../testdata/models", c.model))
		if err != nil {
			t.Fatal(err)
		}
		_, err = Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: strings.Split(c.target, ","), Rank: 2, Alpha: 4}, ModulesToSave: c.save})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s --modules-to-save %v: error %v, want %q", c.model, c.save, err, c.want)
		}
	}
	// A second inject may not put an adapter on a saved layer.
	m, err := graph.Load(filepath.Join("../testdata/models", "mlp-classifier.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc1"}, Rank: 2, Alpha: 4}, ModulesToSave: []string{"fc2"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc2"}, Rank: 2, Alpha: 4}}); err == nil || !strings.Contains(err.Error(), "trained whole") {
		t.Errorf("adapter on a modules_to_save layer: error %v", err)
	}
}

// TestModulesToSaveCounts checks the trainable-params line counts a saved
// layer as PEFT does: trainable, and twice in all (original and copy).
func TestModulesToSaveCounts(t *testing.T) {
	m, err := graph.Load(filepath.Join("../testdata/models", "mlp-classifier.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc1"}, Rank: 4, Alpha: 8}, ModulesToSave: []string{"fc2"}})
	if err != nil {
		t.Fatal(err)
	}
	// fc1 [16, 32] at r=4: 16·4 + 4·32; fc2 32·5 + 5; the base 709.
	lora, saved := int64(16*4+4*32), int64(32*5+5)
	if inj.Trainable != lora+saved || inj.All != 709+lora+saved {
		t.Errorf("trainable %d, all %d; want %d, %d", inj.Trainable, inj.All, lora+saved, 709+lora+saved)
	}
}
