package rewrite

import (
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// ---- Merge restores the base graph ----

func TestMergeRestoresBaseGraph(t *testing.T) {
	for _, c := range mgTestdataCases() {
		t.Run(c.name, func(t *testing.T) {
			path := c.modelPath(t)
			base := loadModel(t, path)
			m := loadModel(t, path)
			inj := mgInjectRandom(t, m, c.inject, 11)
			injected := mgCloneModel(m)
			rep, err := Merge(m, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Source != "manifest" || len(rep.Merged) != len(inj.Manifest.Adapters) {
				t.Fatalf("report: source %s, %d merged, want %d", rep.Source, len(rep.Merged), len(inj.Manifest.Adapters))
			}
			mgCheckMergedWeights(t, injected, m, rep, c.inject, 1)
			mgCheckSameAsBase(t, base, m, rep)
		})
	}
}

// mgCheckMergedWeights recomputes every merged weight from the injected
// model with the reference merge and compares bits. Nothing is taken from
// the report but which weight went where: the factor comes from the rank,
// alpha and RSLoRA given to inject (cfg, before mgInjectDefaults), the
// merge's scale and the Gemm's alpha attribute; the layout from the node's
// transB and the Transposes on the weight's way to it.
func mgCheckMergedWeights(t testing.TB, injected, merged *graph.Model, rep *MergeReport, cfg InjectConfig, scale float64) {
	t.Helper()
	cfg = mgInjectDefaults(cfg)
	man, _ := ReadManifest(injected)
	byModule := map[string]Adapter{}
	for _, a := range man.Adapters {
		byModule[a.Module] = a
	}
	for _, ml := range rep.Merged {
		a := byModule[ml.Module]
		orig := ml.Weight
		if ml.Original != "" {
			orig = ml.Original
		}
		wt := mgTensorByName(injected, orig)
		if wt == nil {
			wt = mgConstantByName(injected, orig)
		}
		w := mgFloatsOf(t, injected, wt)
		ta, tb := mgTensorByName(injected, a.LoraA), mgTensorByName(injected, a.LoraB)
		av, bv := mgFloatsOf(t, injected, ta), mgFloatsOf(t, injected, tb)
		in, r, out := int(ta.Dims[0]), int(ta.Dims[1]), int(tb.Dims[1])

		rank, alpha := float64(cfg.Rank), cfg.Alpha
		if v, ok := mgPatternValue(cfg.RankPattern, ml.Module); ok {
			rank = v
		}
		if v, ok := mgPatternValue(cfg.AlphaPattern, ml.Module); ok {
			alpha = v
		}
		if int(rank) != r {
			t.Fatalf("%s: lora_A is %v, want rank %v", ml.Module, ta.Dims, rank)
		}
		scaling := alpha / rank
		if cfg.RSLoRA {
			scaling = alpha / math.Sqrt(rank)
		}
		node, injNode := mgNodeByName(merged, ml.Node), mgNodeByName(injected, ml.Node)
		gemmAlpha, transB := 1.0, false
		if node.GetOpType() == "Gemm" {
			if at := graph.Attr(node, "alpha"); at != nil {
				gemmAlpha = float64(at.GetF())
			}
			if at := graph.Attr(node, "transB"); at != nil {
				transB = at.GetI() == 1
			}
		}
		factor := scaling * scale / gemmAlpha
		// Stored [out, in] when transB and the Transposes on the way from
		// the stored weight to the node disagree.
		transposed := transB != mgTransposesOnPath(t, merged, node, ml.Weight)
		// A private copy read directly holds the original values in the
		// node's orientation: transposed if a Transpose led to the original.
		if ml.Original != "" && node.Input[1] == ml.Weight && mgTransposesOnPath(t, injected, injNode, orig) {
			w = transposeF64(w, int(wt.Dims[0]), int(wt.Dims[1]))
		}
		if ml.Factor != factor || ml.Scaling != scaling || ml.Transposed != transposed || ml.Rank != r || ml.Alpha != alpha {
			t.Errorf("%s: report says factor %v, scaling %v, transposed %v, rank %d, alpha %v; want %v, %v, %v, %d, %v",
				ml.Module, ml.Factor, ml.Scaling, ml.Transposed, ml.Rank, ml.Alpha, factor, scaling, transposed, r, alpha)
		}
		want := mgRefMerged(w, av, bv, in, out, r, factor, transposed)
		dt := graph.DataType(mgTensorByName(merged, ml.Weight).GetDataType())
		wantRaw := mgMustEncode(t, dt, want)
		got := mgRawOf(t, merged, mgTensorByName(merged, ml.Weight))
		if !slices.Equal(got, wantRaw) {
			t.Errorf("%s: merged weight %s differs from the reference", ml.Module, ml.Weight)
		}
		if ml.MaxDelta <= 0 || ml.Changed == 0 {
			t.Errorf("%s: report says max delta %g, %d changed", ml.Module, ml.MaxDelta, ml.Changed)
		}
	}
}

// mgPatternValue applies PEFT's rank_pattern/alpha_pattern rule: the first
// key matching a dot-separated suffix of the module path wins.
func mgPatternValue(ps []PatternEntry, module string) (float64, bool) {
	for _, p := range ps {
		if regexp.MustCompile(`^(.*\.)?(` + p.Key + `)$`).MatchString(module) {
			return p.Value, true
		}
	}
	return 0, false
}

// mgTransposesOnPath follows node's weight input back through Identity,
// Cast and Transpose nodes to the value target and reports whether an odd
// number of Transposes lies on the way.
func mgTransposesOnPath(t testing.TB, m *graph.Model, node *onnxpb.NodeProto, target string) bool {
	t.Helper()
	producer := map[string]*onnxpb.NodeProto{}
	m.Graph().Walk(func(g *graph.Graph) {
		for _, n := range g.Proto.Node {
			for _, o := range n.Output {
				producer[o] = n
			}
		}
	})
	odd := false
	for v := node.Input[1]; v != target; {
		p := producer[v]
		if p == nil || len(p.Input) == 0 {
			t.Fatalf("node %s: no path from %s to its weight %s", node.GetName(), node.Input[1], target)
		}
		switch p.GetOpType() {
		case "Transpose":
			odd = !odd
		case "Identity", "Cast":
		case "Constant":
			if p.Output[0] == target {
				return odd
			}
			t.Fatalf("node %s: weight path reaches Constant %s, not %s", node.GetName(), p.Output[0], target)
		default:
			t.Fatalf("node %s: unexpected %s on the weight's path", node.GetName(), p.GetOpType())
		}
		v = p.Input[0]
	}
	return odd
}

// mgCheckSameAsBase compares the merged model with the base one: the same
// protobuf except the data of the merged weights (and private copies of
// shared weights, which must be new initializers).
func mgCheckSameAsBase(t testing.TB, base, merged *graph.Model, rep *MergeReport) {
	t.Helper()
	changed := map[string]bool{}
	copies := map[string]bool{}
	for _, ml := range rep.Merged {
		if ml.Original != "" {
			copies[ml.Weight] = true
		} else {
			changed[ml.Weight] = true
		}
	}
	got := proto.Clone(merged.Proto).(*onnxpb.ModelProto)
	want := base.Proto
	baseInits := map[string]*onnxpb.TensorProto{}
	graph.NewGraph(want.Graph).Walk(func(s *graph.Graph) {
		for _, tp := range s.Proto.Initializer {
			baseInits[tp.GetName()] = tp
		}
		for _, n := range s.Proto.Node {
			if n.GetOpType() == "Constant" && len(n.Attribute) > 0 && n.Attribute[0].T != nil {
				baseInits[n.Output[0]] = n.Attribute[0].T
			}
		}
	})
	gg := graph.NewGraph(got.Graph)
	var rewired []string
	gg.Walk(func(s *graph.Graph) {
		inits := s.Proto.Initializer[:0]
		for _, tp := range s.Proto.Initializer {
			if copies[tp.GetName()] {
				continue // checked separately
			}
			if changed[tp.GetName()] {
				b := baseInits[tp.GetName()]
				if !slices.Equal(tp.Dims, b.Dims) || tp.GetDataType() != b.GetDataType() {
					t.Errorf("merged weight %s changed shape or type", tp.GetName())
				}
				if slices.Equal(mgRawOf(t, merged, tp), mgRawOf(t, base, b)) {
					t.Errorf("merged weight %s did not change", tp.GetName())
				}
				tp = proto.Clone(b).(*onnxpb.TensorProto)
			}
			inits = append(inits, tp)
		}
		s.Proto.Initializer = inits
		for _, n := range s.Proto.Node {
			if n.GetOpType() == "Constant" && len(n.Attribute) > 0 && n.Attribute[0].T != nil && changed[n.Output[0]] {
				n.Attribute[0].T = proto.Clone(baseInits[n.Output[0]]).(*onnxpb.TensorProto)
			}
			for i, in := range n.Input {
				if copies[in] {
					rewired = append(rewired, n.GetName())
					n.Input[i] = mgNodeByName(base, n.GetName()).Input[i]
				}
			}
		}
	})
	if len(rewired) != len(copies) {
		t.Errorf("%d private weight copies, but %d nodes read them", len(copies), len(rewired))
	}
	if !proto.Equal(got, want) {
		// Narrow it down for the message.
		if len(got.Graph.Node) != len(want.Graph.Node) {
			t.Fatalf("merged graph has %d nodes, base has %d", len(got.Graph.Node), len(want.Graph.Node))
		}
		for i := range got.Graph.Node {
			if !proto.Equal(got.Graph.Node[i], want.Graph.Node[i]) {
				t.Fatalf("node %d differs:\n got %v\nwant %v", i, got.Graph.Node[i], want.Graph.Node[i])
			}
		}
		for i := range got.Graph.Initializer {
			if i >= len(want.Graph.Initializer) || !proto.Equal(got.Graph.Initializer[i], want.Graph.Initializer[i]) {
				t.Fatalf("initializer %d (%s) differs", i, got.Graph.Initializer[i].GetName())
			}
		}
		t.Fatalf("merged model differs from the base model (metadata: %v vs %v)", got.MetadataProps, want.MetadataProps)
	}
}

// ---- options, recognition, sharing, errors ----

func TestMergeWithoutManifest(t *testing.T) {
	for _, c := range mgTestdataCases() {
		t.Run(c.name, func(t *testing.T) {
			m := loadModel(t, c.modelPath(t))
			mgInjectRandom(t, m, c.inject, 31)
			stripped := mgCloneModel(m)
			stripped.DeleteMetadata(ManifestKey)
			rep, err := Merge(m, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			rep2, err := Merge(stripped, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if rep2.Source != "recognized" || len(rep2.Merged) != len(rep.Merged) {
				t.Fatalf("recognized %d adapters (%s), the manifest has %d", len(rep2.Merged), rep2.Source, len(rep.Merged))
			}
			for i := range rep.Merged {
				a, b := rep.Merged[i], rep2.Merged[i]
				// Without a manifest the exact scaling is the tensor's, which
				// may be rounded; everything else must agree.
				a.Scaling, b.Scaling, a.Factor, b.Factor, a.Alpha, b.Alpha, a.MaxDelta, b.MaxDelta, a.Changed, b.Changed = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
				if !equalJSON(a, b) {
					t.Errorf("adapter %d: manifest %+v, recognized %+v", i, a, b)
				}
			}
			if strings.Contains(c.name, "rslora") || strings.Contains(c.name, "fp16") || strings.Contains(c.name, "bf16") {
				return // the scaling tensor rounds alpha/sqrt(r), or the A/B type rounds it
			}
			if !proto.Equal(m.Proto, stripped.Proto) {
				t.Error("merging by recognition gives another model than merging by the manifest")
			}
		})
	}
}

func TestMergeOnlyKeepsTheRestLive(t *testing.T) {
	orttest.Require(t)
	dir := t.TempDir()
	m := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	inj := mgInjectRandom(t, m, InjectConfig{}, 41)
	injPath := mgSaveModel(t, m, filepath.Join(dir, "injected.onnx"))
	feeds := func(*ortrun.Session) []ortrun.Tensor { return mgGoldenFeeds(t, "tiny-gpt.onnx") }
	want := mgRunModel(t, injPath, feeds)

	only := []string{"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"}
	part := loadModel(t, injPath)
	rep, err := Merge(part, MergeOptions{Only: only})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merged) != 3 || len(rep.Kept) != len(inj.Manifest.Adapters)-3 {
		t.Fatalf("merged %d, kept %d", len(rep.Merged), len(rep.Kept))
	}
	man, _ := ReadManifest(part)
	if man == nil || len(man.Adapters) != len(rep.Kept) || len(man.Trainable) != 2*len(rep.Kept) {
		t.Fatalf("manifest after a partial merge: %+v", man)
	}
	for _, a := range man.Adapters {
		if slices.Contains(only, a.Module) {
			t.Errorf("merged module %s is still in the manifest", a.Module)
		}
	}
	partPath := mgSaveModel(t, part, filepath.Join(dir, "part.onnx"))
	mgCompareRuns(t, mgRunModel(t, partPath, feeds), want, 1e-5)

	// Merging the rest gives what merging everything at once gives.
	rest := loadModel(t, partPath)
	if _, err := Merge(rest, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	all := loadModel(t, injPath)
	if _, err := Merge(all, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	mgSameTensors(t, rest, all)

	// Only takes suffixes as Targets does: "q_proj" is every q_proj, "proj"
	// (not a dotted suffix) nothing.
	qrep, err := Merge(loadModel(t, injPath), MergeOptions{Only: []string{"q_proj"}})
	if err != nil || len(qrep.Merged) == 0 {
		t.Fatalf("Only q_proj: %v", err)
	}
	for _, ml := range qrep.Merged {
		if !strings.HasSuffix(ml.Module, ".q_proj") {
			t.Errorf("Only q_proj merged %s", ml.Module)
		}
	}
	if _, err := Merge(loadModel(t, injPath), MergeOptions{Only: []string{"proj"}}); err == nil || !strings.Contains(err.Error(), "no adapter for module(s) proj") {
		t.Errorf("unknown module: %v", err)
	}
	if _, err := Merge(loadModel(t, injPath), MergeOptions{Only: []string{" "}}); err == nil || !strings.Contains(err.Error(), "empty module name") {
		t.Errorf("blank module: %v", err)
	}
}

func TestMergeScale(t *testing.T) {
	m := loadModel(t, mgTestModels+"/mlp-gemm-transb.onnx")
	mgInjectRandom(t, m, InjectConfig{}, 51)
	injected := mgCloneModel(m)
	rep, err := Merge(m, MergeOptions{Scale: 0.25})
	if err != nil {
		t.Fatal(err)
	}
	// The model's Gemms all have transB=1 (its weights are stored [out, in]).
	for _, ml := range rep.Merged {
		if !ml.Transposed {
			t.Errorf("%s: merged as stored [in, out]", ml.Module)
		}
	}
	mgCheckMergedWeights(t, injected, m, rep, InjectConfig{}, 0.25)

	if _, err := Merge(mgCloneModel(injected), MergeOptions{Scale: math.NaN()}); err == nil {
		t.Error("a NaN scale was accepted")
	}
}

func TestMergeSafe(t *testing.T) {
	dir := t.TempDir()
	m := loadModel(t, mgTestModels+"/tiny-gpt-fp16.onnx")
	mgInjectRandom(t, m, InjectConfig{}, 61)
	// Large factors overflow float16 in one layer.
	man, _ := ReadManifest(m)
	a := man.Adapters[3]
	for _, name := range []string{a.LoraA, a.LoraB} {
		tp := mgTensorByName(m, name)
		big := make([]float64, tp.Dims[0]*tp.Dims[1])
		for i := range big {
			big[i] = 30000
		}
		if err := graph.SetFloat64s(tp, big); err != nil {
			t.Fatal(err)
		}
	}
	injPath := mgSaveModel(t, m, filepath.Join(dir, "in", "model.onnx"))
	before := proto.Clone(m.Proto)

	_, err := Merge(m, MergeOptions{Safe: true})
	if err == nil || !strings.Contains(err.Error(), "safe merge") || !strings.Contains(err.Error(), a.Module) {
		t.Fatalf("safe merge of an overflowing adapter: %v", err)
	}
	if !proto.Equal(before, m.Proto) {
		t.Error("a refused safe merge changed the model")
	}
	out := filepath.Join(dir, "out", "model.onnx")
	os.MkdirAll(filepath.Dir(out), 0o755)
	if _, err := MergeFile(injPath, out, MergeOptions{Safe: true}, graph.SaveOptions{External: graph.ExternalAlways}); err == nil {
		t.Fatal("MergeFile with Safe wrote an overflowing merge")
	}
	if ents, _ := os.ReadDir(filepath.Dir(out)); len(ents) != 0 {
		t.Errorf("a refused MergeFile left files: %v", ents)
	}
	rep, err := Merge(m, MergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ml := range rep.Merged {
		if (ml.Module == a.Module) != (ml.NonFinite > 0) {
			t.Errorf("%s: %d non-finite values reported", ml.Module, ml.NonFinite)
		}
	}
}

func TestMergeSharedWeights(t *testing.T) {
	base := loadModel(t, mgTestModels+"/shared-weight.onnx")
	for _, tc := range []struct {
		targets []string
		copies  map[string]string // module -> original weight of its copy
	}{
		{[]string{"branch_a"}, map[string]string{"branch_a": "shared.weight"}},
		// The first adapter gets a copy; the second then reads the weight
		// alone and is merged in place.
		{[]string{"branch_a", "branch_b"}, map[string]string{"branch_a": "shared.weight"}},
		// The tied lm_head reads the embedding through a Transpose that only
		// it uses: the embedding is copied and the Transpose reads the copy.
		{[]string{"lm_head"}, map[string]string{"lm_head": "embed_tokens.weight"}},
	} {
		t.Run(strings.Join(tc.targets, "+"), func(t *testing.T) {
			m := mgCloneModel(base)
			mgInjectRandom(t, m, InjectConfig{SelectOptions: SelectOptions{Targets: tc.targets, Rank: 4, Alpha: 8}}, 71)
			injected := mgCloneModel(m)
			rep, err := Merge(m, MergeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for _, ml := range rep.Merged {
				if ml.Original != tc.copies[ml.Module] {
					t.Errorf("%s: merged into %s (copy of %q), want a copy of %q", ml.Module, ml.Weight, ml.Original, tc.copies[ml.Module])
				}
				if ml.Original != "" && ml.Weight != ml.Module+".weight" {
					t.Errorf("%s: the copy is called %s", ml.Module, ml.Weight)
				}
			}
			mgCheckMergedWeights(t, injected, m, rep, InjectConfig{SelectOptions: SelectOptions{Targets: tc.targets, Rank: 4, Alpha: 8}}, 1)
			mgCheckSameAsBase(t, base, m, rep)
			// Layers that were not adapted still read the original values.
			for _, name := range []string{"shared.weight", "embed_tokens.weight"} {
				adaptedInPlace := false
				for _, ml := range rep.Merged {
					adaptedInPlace = adaptedInPlace || (ml.Weight == name)
				}
				if !adaptedInPlace && !slices.Equal(mgRawOf(t, m, mgTensorByName(m, name)), mgRawOf(t, base, mgTensorByName(base, name))) {
					t.Errorf("%s changed", name)
				}
			}
		})
	}
}

func TestMergeErrors(t *testing.T) {
	if _, err := Merge(loadModel(t, mgTestModels+"/tiny-gpt.onnx"), MergeOptions{}); err == nil || !strings.Contains(err.Error(), "no LoRA adapters") {
		t.Errorf("base model: %v", err)
	}
	m := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	mgInjectRandom(t, m, InjectConfig{}, 81)
	man, _ := ReadManifest(m)
	a := man.Adapters[2]

	// A branch edited after inject: its Mul now reads something else.
	edited := mgCloneModel(m)
	g := edited.Graph()
	mul := g.Producer(g.Producer(a.Output).Input[1])
	mul.Input[1] = mul.Input[0]
	before := proto.Clone(edited.Proto)
	if _, err := Merge(edited, MergeOptions{}); err == nil || !strings.Contains(err.Error(), a.Module) || !strings.Contains(err.Error(), "no longer a LoRA branch") {
		t.Errorf("edited branch: %v", err)
	}
	if !proto.Equal(before, edited.Proto) {
		t.Error("a failed merge changed the model")
	}

	// A branch value read elsewhere cannot be removed.
	leaky := mgCloneModel(m)
	leaky.Proto.Graph.Output = append(leaky.Proto.Graph.Output, &onnxpb.ValueInfoProto{Name: proto.String(a.BaseOutput)})
	if _, err := Merge(leaky, MergeOptions{}); err == nil || !strings.Contains(err.Error(), "readers outside the adapter branch") {
		t.Errorf("branch value as graph output: %v", err)
	}

	// A Gemm with alpha 0 cannot take a delta.
	gm := loadModel(t, mgTestModels+"/mlp-gemm-transb.onnx")
	mgInjectRandom(t, gm, InjectConfig{}, 82)
	for _, n := range gm.Proto.Graph.Node {
		if n.GetName() == "/fc1/Gemm" {
			mgSetAttr(n, mgFloatAttr("alpha", 0))
		}
	}
	if _, err := Merge(gm, MergeOptions{}); err == nil || !strings.Contains(err.Error(), "alpha is 0") {
		t.Errorf("Gemm alpha 0: %v", err)
	}

	// MergeFile never overwrites its input.
	dir := t.TempDir()
	p := mgSaveModel(t, m, filepath.Join(dir, "model.onnx"))
	if _, err := MergeFile(p, p, MergeOptions{}, graph.SaveOptions{External: graph.ExternalAlways}); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("MergeFile onto its input: %v", err)
	}
}
