package rewrite

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/internal/testutil"
)

// adapterInputsConfig adapts every linear layer in adapter-input mode.
func adapterInputsConfig() InjectConfig {
	cfg := allLinear(8, 16)
	cfg.AdapterInputs = true
	return cfg
}

// TestInjectAdapterInputs checks the model inject --adapter-inputs writes:
// A and B are main-graph inputs with rank-0 defaults and a symbolic rank,
// no scaling node, IR >= 4, the mode in the manifest; recognition finds the
// branches with the manifest stripped; and merging with no adapter gives
// back exactly the base model.
func TestInjectAdapterInputs(t *testing.T) {
	for name, path := range injectModels(t) {
		t.Run(name, func(t *testing.T) {
			base := loadModel(t, path)
			m := loadModel(t, path)
			inj, err := Inject(m, adapterInputsConfig())
			if err != nil {
				t.Fatal(err)
			}
			if len(inj.Manifest.Adapters) == 0 {
				t.Fatal("no adapters")
			}
			// Round trip through a file, as users get it (not for external
			// data, whose references a save moves, which the comparison
			// with the base below would see).
			if !strings.Contains(path, "extdata") {
				saved := mgSaveModel(t, m, filepath.Join(t.TempDir(), "inputs.onnx"))
				m = loadModel(t, saved)
			}
			if m.Proto.GetIrVersion() < 4 {
				t.Errorf("IR version %d", m.Proto.GetIrVersion())
			}
			top := m.Graph()
			man, err := ReadManifest(m)
			if err != nil || man == nil {
				t.Fatalf("manifest: %v", err)
			}
			for _, a := range man.Adapters {
				if a.Mode != ModeAdapterInputs || a.ScalingTensor != "" || a.Scaling != 1 {
					t.Errorf("%s: mode %q, scaling tensor %q, scaling %g", a.Module, a.Mode, a.ScalingTensor, a.Scaling)
				}
				for _, f := range []struct {
					name      string
					dims      []int64
					fixedAxis int
					size      int64
				}{{a.LoraA, []int64{a.InFeatures, 0}, 0, a.InFeatures}, {a.LoraB, []int64{0, a.OutFeatures}, 1, a.OutFeatures}} {
					if f.name != a.Module+".lora_A.weight" && f.name != a.Module+".lora_B.weight" {
						t.Errorf("%s: input named %q", a.Module, f.name)
					}
					if !top.IsGraphInput(f.name) || !top.IsOverridableInitializer(f.name) {
						t.Fatalf("%s is not an overridable main-graph input", f.name)
					}
					init, _ := top.Initializer(f.name)
					if !slices.Equal(init.Dims, f.dims) || graph.DataType(init.GetDataType()).String() != a.DType {
						t.Errorf("%s: default %v %v, want %v %s", f.name, init.Dims, graph.DataType(init.GetDataType()), f.dims, a.DType)
					}
					d := inputType(top, f.name).GetShape().GetDim()
					if len(d) != 2 || d[f.fixedAxis].GetDimValue() != f.size || d[1-f.fixedAxis].GetDimParam() == "" {
						t.Errorf("%s: declared shape %v", f.name, d)
					}
				}
			}
			var muls int
			top.Walk(func(g *graph.Graph) {
				for _, n := range g.Proto.Node {
					if slices.Contains(man.Adapters[0].Nodes, n.GetName()) && n.GetOpType() == "Mul" {
						muls++
					}
				}
			})
			if muls != 0 {
				t.Errorf("%d scaling nodes", muls)
			}
			if inj.Trainable != 0 {
				t.Errorf("trainable %d: rank-0 defaults hold no parameters", inj.Trainable)
			}

			// Stripped metadata: recognized by structure, same modules.
			stripped := mgCloneModel(m)
			stripped.DeleteMetadata(ManifestKey)
			found, _, source, err := findAdapters(stripped, stripped.Graph())
			if err != nil || source != sourceRecognized || len(found) != len(man.Adapters) {
				t.Fatalf("recognized %d of %d (%s): %v", len(found), len(man.Adapters), source, err)
			}
			for i, f := range found {
				if !f.isInputs() || f.Rank != 0 || f.Scaling != 1 || f.Module != man.Adapters[i].Module {
					t.Errorf("recognized %s: inputs %v rank %d scaling %g, want %s", f.Module, f.isInputs(), f.Rank, f.Scaling, man.Adapters[i].Module)
				}
			}

			// Merging the rank-0 defaults restores the base exactly, with
			// the manifest and without.
			for _, mm := range []*graph.Model{m, stripped} {
				rep, err := Merge(mm, MergeOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if base.Proto.GetIrVersion() < 4 {
					mm.Proto.IrVersion = base.Proto.IrVersion
					top := mm.Graph()
					// Before IR 4 the base listed its initializers as inputs.
					var ins []*onnxpb.ValueInfoProto
					ins = append(ins, base.Proto.Graph.Input...)
					top.Proto.Input = ins
				}
				mgCheckSameAsBase(t, base, mm, &MergeReport{Source: rep.Source})
			}
		})
	}
}

// TestInjectAdapterInputsErrors: the modes do not mix on one module, and
// a manifest that disagrees with the graph about the mode is refused.
func TestInjectAdapterInputsErrors(t *testing.T) {
	m := loadModel(t, testutil.TestModel("tiny-gpt.onnx"))
	if _, err := Inject(m, adapterInputsConfig()); err != nil {
		t.Fatal(err)
	}
	if _, err := Inject(m, allLinear(4, 8)); err == nil {
		t.Error("a second adapter on an adapted module was accepted")
	}
	man, _ := ReadManifest(m)
	man.Adapters[0].Mode = ""
	if err := WriteManifest(m, man); err != nil {
		t.Fatal(err)
	}
	if _, err := Merge(m, MergeOptions{}); err == nil {
		t.Error("a manifest with the wrong mode was accepted")
	}
}

// TestAdapterInputsDropoutAndTransA: the optional nodes of the kind (a
// Dropout, the Transpose for Gemm transA) are built, recognized with the
// manifest stripped, and removed by a merge that gives back the base.
func TestAdapterInputsDropoutAndTransA(t *testing.T) {
	for name, path := range map[string]string{
		"gemm-transb": testutil.TestModel("mlp-gemm-transb.onnx"),
		"gemm-transa": mgBuildGemmTransA(t, t.TempDir()),
	} {
		t.Run(name, func(t *testing.T) {
			base := loadModel(t, path)
			m := loadModel(t, path)
			cfg := adapterInputsConfig()
			cfg.Dropout = 0.1
			inj, err := Inject(m, cfg)
			if err != nil {
				t.Fatal(err)
			}
			m.DeleteMetadata(ManifestKey)
			found, _, _, err := findAdapters(m, m.Graph())
			if err != nil || len(found) != len(inj.Manifest.Adapters) {
				t.Fatalf("recognized %d of %d: %v", len(found), len(inj.Manifest.Adapters), err)
			}
			for _, f := range found {
				if !f.isInputs() || f.branch.Dropout == nil || float32(f.Dropout) != 0.1 {
					t.Errorf("%s: inputs %v, dropout %v (%g)", f.Module, f.isInputs(), f.branch.Dropout != nil, f.Dropout)
				}
				if f.Base.GetOpType() == "Gemm" && (f.node("Transpose_A") != nil) != (name == "gemm-transa") {
					t.Errorf("%s: transpose %v", f.Module, f.node("Transpose_A") != nil)
				}
			}
			rep, err := Merge(m, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			mgCheckSameAsBase(t, base, m, rep)
		})
	}
}
