package rewrite

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// vtExpected is testdata/variants/expected.json, written by
// testdata/variants/generate.py with torch and numpy. Matrices are
// row-major; w is torch's [out, in], a/b are lora_A [r, in] and lora_B
// [out, r], delta is [out, in].
type vtExpected struct {
	Inits []struct {
		Name           string    `json:"name"`
		Out            int       `json:"out"`
		In             int       `json:"in"`
		R              int       `json:"r"`
		Alpha          float64   `json:"alpha"`
		Scaling        float64   `json:"scaling"`
		W              []float64 `json:"w"`
		SingularValues []float64 `json:"singular_values"`
		PiSSA          vtFactors `json:"pissa"`
		OLoRA          vtFactors `json:"olora"`
	} `json:"inits"`
	Resizes []struct {
		Name           string    `json:"name"`
		Out            int       `json:"out"`
		In             int       `json:"in"`
		R              int       `json:"r"`
		Alpha          float64   `json:"alpha"`
		Scaling        float64   `json:"scaling"`
		A              []float64 `json:"a"`
		B              []float64 `json:"b"`
		Delta          []float64 `json:"delta"`
		SingularValues []float64 `json:"singular_values"`
		Truncations    []struct {
			Rank           int       `json:"rank"`
			FrobeniusError float64   `json:"frobenius_error"`
			MeasuredError  float64   `json:"measured_error"`
			Delta          []float64 `json:"delta"`
		} `json:"truncations"`
		EnergyRank map[string]int `json:"energy_rank"`
	} `json:"resizes"`
}

type vtFactors struct {
	A        []float64 `json:"a"`
	B        []float64 `json:"b"`
	Residual []float64 `json:"residual"`
}

func vtLoad(t *testing.T) vtExpected {
	t.Helper()
	raw, err := os.ReadFile("../testdata/variants/expected.json")
	if err != nil {
		t.Fatal(err)
	}
	var e vtExpected
	if err := json.Unmarshal(raw, &e); err != nil {
		t.Fatal(err)
	}
	if len(e.Inits) == 0 || len(e.Resizes) == 0 {
		t.Fatal("expected.json has no cases")
	}
	return e
}

// vtLinearModel is y = x·W (MatMul, W stored [in, out]) or, with gemm,
// Gemm(x, W, transB=1) with W stored [out, in] as torch keeps it. w is
// torch's [out, in] weight.
func vtLinearModel(t *testing.T, w []float64, in, out int, gemm bool) *graph.Model {
	t.Helper()
	var node *onnxpb.NodeProto
	var wt *onnxpb.TensorProto
	var err error
	if gemm {
		wt, err = graph.NewFloatTensor("fc.weight", graph.Float, []int64{int64(out), int64(in)}, w)
		node = mgTestNode("Gemm", "/fc/Gemm", []string{"x", "fc.weight"}, []string{"y"}, mgIntAttr("transB", 1))
	} else {
		wt, err = graph.NewFloatTensor("fc.weight", graph.Float, []int64{int64(in), int64(out)}, transposeF64(w, out, in))
		node = mgTestNode("MatMul", "/fc/MatMul", []string{"x", "fc.weight"}, []string{"y"})
	}
	if err != nil {
		t.Fatal(err)
	}
	g := &onnxpb.GraphProto{
		Name: strPtr("g"), Node: []*onnxpb.NodeProto{node}, Initializer: []*onnxpb.TensorProto{wt},
		Input:  []*onnxpb.ValueInfoProto{mgValueInfo("x", graph.Float, 2, int64(in))},
		Output: []*onnxpb.ValueInfoProto{mgValueInfo("y", graph.Float, 2, int64(out))},
	}
	path := mgWriteTestModel(t, filepath.Join(t.TempDir(), "linear.onnx"), g)
	return loadModel(t, path)
}

func strPtr(s string) *string { return &s }

// vtTensor returns an initializer's values.
func vtTensor(t *testing.T, m *graph.Model, name string) []float64 {
	t.Helper()
	tp := mgTensorByName(m, name)
	if tp == nil {
		t.Fatalf("no initializer %s", name)
	}
	return mgFloatsOf(t, m, tp)
}

// vtStoredOut returns the layer's weight as torch's [out, in].
func vtStoredOut(t *testing.T, m *graph.Model, in, out int, gemm bool) []float64 {
	w := vtTensor(t, m, "fc.weight")
	if gemm {
		return w
	}
	return transposeF64(w, in, out)
}

func vtMaxDiff(a, b []float64) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	var d float64
	for i := range a {
		d = math.Max(d, math.Abs(a[i]-b[i]))
	}
	return d
}

func vtMaxAbs(a []float64) float64 {
	var m float64
	for _, x := range a {
		m = math.Max(m, math.Abs(x))
	}
	return m
}

// TestPiSSAOLoRAInitMatchTorch: inject --init pissa/olora gives PEFT's
// lora_A, lora_B and residual base weight, computed in torch by the
// generator; PiSSA's singular vectors are compared up to the sign of each
// pair (an SVD fixes them only up to sign; the product is the same).
func TestPiSSAOLoRAInitMatchTorch(t *testing.T) {
	exp := vtLoad(t)
	for _, c := range exp.Inits {
		for _, gemm := range []bool{false, true} {
			for _, method := range []Init{InitPiSSA, InitOLoRA} {
				name := c.Name + "/" + string(method)
				if gemm {
					name += "/gemm-transB"
				}
				t.Run(name, func(t *testing.T) {
					m := vtLinearModel(t, c.W, c.In, c.Out, gemm)
					cfg := InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: c.R, Alpha: c.Alpha}, Init: method}
					inj, err := Inject(m, cfg)
					if err != nil {
						t.Fatal(err)
					}
					ad := inj.Manifest.Adapters[0]
					if ad.Init != string(method) {
						t.Errorf("manifest init = %q, want %q", ad.Init, method)
					}
					// ONNX A [in, r] is lora_Aᵀ, B [r, out] is lora_Bᵀ.
					a := transposeF64(vtTensor(t, m, ad.LoraA), c.In, c.R)  // [r, in]
					b := transposeF64(vtTensor(t, m, ad.LoraB), c.R, c.Out) // [out, r]
					res := vtStoredOut(t, m, c.In, c.Out, gemm)             // [out, in]
					want := c.PiSSA
					if method == InitOLoRA {
						want = c.OLoRA
					}
					const tol = 2e-5
					if method == InitPiSSA {
						for j := 0; j < c.R; j++ {
							sign := 1.0
							if a[j*c.In]*want.A[j*c.In] < 0 {
								sign = -1
							}
							for i := 0; i < c.In; i++ {
								if d := math.Abs(sign*a[j*c.In+i] - want.A[j*c.In+i]); d > tol {
									t.Fatalf("lora_A[%d,%d] = %g, torch %g", j, i, a[j*c.In+i], want.A[j*c.In+i])
								}
							}
							for i := 0; i < c.Out; i++ {
								if d := math.Abs(sign*b[i*c.R+j] - want.B[i*c.R+j]); d > tol {
									t.Fatalf("lora_B[%d,%d] = %g, torch %g", i, j, b[i*c.R+j], want.B[i*c.R+j])
								}
							}
						}
					} else {
						if d := vtMaxDiff(a, want.A); d > tol {
							t.Errorf("lora_A differs from torch by %g", d)
						}
						if d := vtMaxDiff(b, want.B); d > tol {
							t.Errorf("lora_B differs from torch by %g", d)
						}
					}
					if d := vtMaxDiff(res, want.Residual); d > tol {
						t.Errorf("residual weight differs from torch by %g", d)
					}
					// The base is unchanged at step 0: W_res + s·B·A = W.
					back := matMul(b, false, a, false, c.Out, c.R, c.In)
					for i := range back {
						back[i] = res[i] + c.Scaling*back[i]
					}
					if d := vtMaxDiff(back, c.W); d > 1e-5*vtMaxAbs(c.W) {
						t.Errorf("W_res + scaling·B·A differs from W by %g", d)
					}
				})
			}
		}
	}
}

// TestPiSSANiter: the randomized SVD's residual still restores W exactly,
// and it is no better than the optimal rank-r residual (Eckart–Young, with
// numpy's singular values) and close to it.
func TestPiSSANiter(t *testing.T) {
	exp := vtLoad(t)
	for _, c := range exp.Inits {
		t.Run(c.Name, func(t *testing.T) {
			m := vtLinearModel(t, c.W, c.In, c.Out, false)
			cfg := InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: c.R, Alpha: c.Alpha}, Init: InitPiSSANiter(4), Seed: 3}
			inj, err := Inject(m, cfg)
			if err != nil {
				t.Fatal(err)
			}
			ad := inj.Manifest.Adapters[0]
			a := vtTensor(t, m, ad.LoraA) // [in, r]
			b := vtTensor(t, m, ad.LoraB) // [r, out]
			res := vtTensor(t, m, "fc.weight")
			ab := matMul(a, false, b, false, c.In, c.R, c.Out)
			var resNorm float64
			for i := range ab {
				resNorm += res[i] * res[i]
				ab[i] = res[i] + c.Scaling*ab[i]
			}
			resNorm = math.Sqrt(resNorm)
			if d := vtMaxDiff(ab, transposeF64(c.W, c.Out, c.In)); d > 1e-5*vtMaxAbs(c.W) {
				t.Errorf("W_res + scaling·A·B differs from W by %g", d)
			}
			best := tailNorm(c.SingularValues, c.R)
			if resNorm < best*(1-1e-5) || resNorm > best*1.25 {
				t.Errorf("‖W_res‖_F = %g; the optimal rank-%d residual is %g", resNorm, c.R, best)
			}
		})
	}
}

func TestInitErrors(t *testing.T) {
	exp := vtLoad(t)
	c := exp.Inits[0]
	for _, tc := range []struct {
		cfg  InjectConfig
		want string
	}{
		{InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: c.In + 1, Alpha: 1}, Init: InitPiSSA}, "min(in, out)"},
		{InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: c.In + 1, Alpha: 1}, Init: InitPiSSA, AllowLargeRank: true}, "exceeds min(in, out)"},
		{InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: 2, Alpha: -1}, Init: InitOLoRA}, "scaling must be positive"},
		{InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: 2, Alpha: 1}, Init: "pissa_niter_x"}, "unknown init"},
		{InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: 2, Alpha: 1}, Init: "svd"}, "unknown init"},
	} {
		m := vtLinearModel(t, c.W, c.In, c.Out, false)
		before := vtTensor(t, m, "fc.weight")
		_, err := Inject(m, tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("init %s rank %d: error %v, want %q", tc.cfg.Init, tc.cfg.Rank, err, tc.want)
		}
		if d := vtMaxDiff(vtTensor(t, m, "fc.weight"), before); d != 0 {
			t.Errorf("init %s: a failed inject changed the base weight", tc.cfg.Init)
		}
	}
}

// vtInjectFactors injects a plain adapter on the linear model and sets its
// factors to lora_A a [r, in] and lora_B b [out, r].
func vtInjectFactors(t *testing.T, m *graph.Model, a, b []float64, in, out, r int, alpha float64) Adapter {
	t.Helper()
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"fc"}, Rank: r, Alpha: alpha}, AllowLargeRank: true})
	if err != nil {
		t.Fatal(err)
	}
	ad := inj.Manifest.Adapters[0]
	if err := graph.SetFloat64s(mgTensorByName(m, ad.LoraA), transposeF64(a, r, in)); err != nil {
		t.Fatal(err)
	}
	if err := graph.SetFloat64s(mgTensorByName(m, ad.LoraB), transposeF64(b, out, r)); err != nil {
		t.Fatal(err)
	}
	return ad
}

// vtDelta reads the adapter's scaling·A·B back as torch's [out, in].
func vtDelta(t *testing.T, m *graph.Model, ad Adapter, in, out int) ([]float64, int, float64) {
	t.Helper()
	man, err := ReadManifest(m)
	if err != nil {
		t.Fatal(err)
	}
	e := man.Adapters[0]
	at, bt := mgTensorByName(m, ad.LoraA), mgTensorByName(m, ad.LoraB)
	r := int(at.Dims[1])
	if e.Rank != r || int(bt.Dims[0]) != r {
		t.Fatalf("manifest rank %d, A %v, B %v", e.Rank, at.Dims, bt.Dims)
	}
	s := vtTensor(t, m, ad.ScalingTensor)[0]
	if math.Abs(s-e.Scaling) > 1e-6*math.Abs(e.Scaling) || math.Abs(e.Scaling-e.Alpha/float64(r)) > 1e-9*math.Abs(e.Scaling) {
		t.Fatalf("scaling tensor %g, manifest scaling %g, alpha/r %g", s, e.Scaling, e.Alpha/float64(r))
	}
	d := matMul(mgFloatsOf(t, m, at), false, mgFloatsOf(t, m, bt), false, in, r, out)
	for i := range d {
		d[i] *= s
	}
	return transposeF64(d, in, out), r, s
}

// TestResizeMatchesNumpy: the spectrum equals numpy's SVD of scaling·A·B;
// resizing to rank R gives numpy's best rank-R approximation, a reported
// error equal to the discarded singular values' root sum of squares, and
// a measured error equal to it; full rank is lossless; --energy picks
// numpy's rank.
func TestResizeMatchesNumpy(t *testing.T) {
	exp := vtLoad(t)
	for _, c := range exp.Resizes {
		t.Run(c.Name, func(t *testing.T) {
			w := make([]float64, c.In*c.Out)
			base := vtLinearModel(t, w, c.In, c.Out, false)
			ad := vtInjectFactors(t, base, c.A, c.B, c.In, c.Out, c.R, c.Alpha)
			sp, err := Spectra(base)
			if err != nil {
				t.Fatal(err)
			}
			if d := vtMaxDiff(sp[0].Singular, c.SingularValues); d > 1e-5*c.SingularValues[0] {
				t.Errorf("singular values %v, numpy %v", sp[0].Singular, c.SingularValues)
			}
			for _, tr := range c.Truncations {
				m := mgCloneModel(base)
				rep, err := Resize(m, ResizeOptions{Rank: tr.Rank})
				if err != nil {
					t.Fatal(err)
				}
				l := rep.Layers[0]
				if l.NewRank != tr.Rank || l.OldRank != c.R {
					t.Fatalf("rank %d -> %d, want %d -> %d", l.OldRank, l.NewRank, c.R, tr.Rank)
				}
				if math.Abs(l.Error-tr.FrobeniusError) > 1e-5*c.SingularValues[0] {
					t.Errorf("rank %d: reported error %g, numpy %g", tr.Rank, l.Error, tr.FrobeniusError)
				}
				got, r, _ := vtDelta(t, m, ad, c.In, c.Out)
				if r != tr.Rank {
					t.Fatalf("stored rank %d, want %d", r, tr.Rank)
				}
				if d := vtMaxDiff(got, tr.Delta); d > 1e-5*vtMaxAbs(c.Delta) {
					t.Errorf("rank %d: scaling·A·B differs from numpy's truncation by %g", tr.Rank, d)
				}
				var measured float64
				for i := range got {
					measured += (got[i] - c.Delta[i]) * (got[i] - c.Delta[i])
				}
				measured = math.Sqrt(measured)
				if math.Abs(measured-tr.MeasuredError) > 1e-5*c.SingularValues[0] {
					t.Errorf("rank %d: measured error %g, numpy %g", tr.Rank, measured, tr.MeasuredError)
				}
				if tr.Rank == len(c.SingularValues) && measured > 1e-5*vtMaxAbs(c.Delta) {
					t.Errorf("full rank is not lossless: error %g", measured)
				}
			}
			for e, want := range c.EnergyRank {
				var frac float64
				if err := json.Unmarshal([]byte(e), &frac); err != nil {
					t.Fatal(err)
				}
				m := mgCloneModel(base)
				rep, err := Resize(m, ResizeOptions{Energy: frac})
				if err != nil {
					t.Fatal(err)
				}
				if got := rep.Layers[0].NewRank; got != want {
					t.Errorf("energy %v: rank %d, numpy %d", frac, got, want)
				}
				if rep.Layers[0].Energy < frac {
					t.Errorf("energy %v: kept only %g", frac, rep.Layers[0].Energy)
				}
			}
		})
	}
}

// TestResizeAlpha: a new alpha changes the scaling, not the update.
func TestResizeAlpha(t *testing.T) {
	c := vtLoad(t).Resizes[0]
	m := vtLinearModel(t, make([]float64, c.In*c.Out), c.In, c.Out, false)
	ad := vtInjectFactors(t, m, c.A, c.B, c.In, c.Out, c.R, c.Alpha)
	rep, err := Resize(m, ResizeOptions{Rank: 3, Alpha: 7})
	if err != nil {
		t.Fatal(err)
	}
	if l := rep.Layers[0]; l.NewAlpha != 7 || math.Abs(l.Scaling-7.0/3) > 1e-15 {
		t.Fatalf("alpha %g scaling %g, want 7 and 7/3", l.NewAlpha, l.Scaling)
	}
	got, _, s := vtDelta(t, m, ad, c.In, c.Out)
	if math.Abs(s-7.0/3) > 1e-6 {
		t.Errorf("scaling tensor %g", s)
	}
	if d := vtMaxDiff(got, c.Truncations[1].Delta); c.Truncations[1].Rank != 3 || d > 1e-5*vtMaxAbs(c.Delta) {
		t.Errorf("rank-3 update with alpha 7 differs from numpy's by %g", d)
	}
}

func TestResizeErrors(t *testing.T) {
	for _, o := range []ResizeOptions{{}, {Rank: 2, Energy: 0.9}, {Energy: 1.5}, {Rank: -1}, {Energy: math.NaN()}} {
		if err := o.check(); err == nil {
			t.Errorf("%+v: no error", o)
		}
	}
	c := vtLoad(t).Resizes[0]
	m := vtLinearModel(t, make([]float64, c.In*c.Out), c.In, c.Out, false)
	if _, err := Resize(m, ResizeOptions{Rank: 2}); err == nil || !strings.Contains(err.Error(), "no LoRA adapters") {
		t.Errorf("model without adapters: %v", err)
	}
	vtInjectFactors(t, m, c.A, c.B, c.In, c.Out, c.R, c.Alpha)
	if _, err := Resize(m, ResizeOptions{Rank: 2, Only: []string{"nope"}}); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("unknown module: %v", err)
	}
}

// TestResizePEFT: a PEFT directory resized to rank 3 holds numpy's rank-3
// truncation, with rank_pattern for a module resized differently.
func TestResizePEFT(t *testing.T) {
	exp := vtLoad(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	var mods []export.PEFTModule
	for i, c := range exp.Resizes[:2] {
		mod := export.PEFTModule{
			Name: []string{"model.layers.0.q_proj", "model.layers.0.v_proj"}[i], Rank: c.R, InFeatures: c.In, OutFeatures: c.Out,
			Alpha: c.Alpha, Scaling: c.Scaling, A: make([]float32, len(c.A)), B: make([]float32, len(c.B)),
		}
		for k, v := range c.A {
			mod.A[k] = float32(v)
		}
		for k, v := range c.B {
			mod.B[k] = float32(v)
		}
		mods = append(mods, mod)
	}
	cfg := export.NewPEFTConfig(mods[0].Rank, mods[0].Alpha, "q_proj", "v_proj")
	cfg.RankPattern = []export.Pattern[int]{{Key: "v_proj", Value: mods[1].Rank}}
	cfg.AlphaPattern = []export.Pattern[float64]{{Key: "v_proj", Value: mods[1].Alpha}}
	if err := export.WritePEFTAdapter(src, cfg, mods); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "dst")
	if _, err := ResizePEFT(src, src, ResizeOptions{Rank: 3}); err == nil {
		t.Error("resizing onto the input directory: no error")
	}
	rep, err := ResizePEFT(src, dst, ResizeOptions{Rank: 3, Only: []string{"model.layers.0.q_proj"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Layers) != 1 || rep.Layers[0].NewRank != 3 {
		t.Fatalf("report %+v", rep.Layers)
	}
	gotCfg, got, err := export.ReadPEFTAdapter(dst)
	if err != nil {
		t.Fatal(err)
	}
	if got[0].Rank != 3 || got[1].Rank != mods[1].Rank {
		t.Fatalf("ranks %d, %d; want 3, %d (config r=%d, rank_pattern %v)", got[0].Rank, got[1].Rank, mods[1].Rank, gotCfg.R, gotCfg.RankPattern)
	}
	c := exp.Resizes[0]
	d := make([]float64, c.Out*c.In)
	for i := 0; i < c.Out; i++ {
		for j := 0; j < c.In; j++ {
			for k := 0; k < 3; k++ {
				d[i*c.In+j] += got[0].Scaling * float64(got[0].B[i*3+k]) * float64(got[0].A[k*c.In+j])
			}
		}
	}
	if diff := vtMaxDiff(d, c.Truncations[1].Delta); c.Truncations[1].Rank != 3 || diff > 1e-5*vtMaxAbs(c.Delta) {
		t.Errorf("resized PEFT update differs from numpy's rank-3 truncation by %g", diff)
	}
	for k := range got[1].A {
		if got[1].A[k] != mods[1].A[k] {
			t.Fatal("a module outside Only changed")
		}
	}
}

// TestConvertPiSSAToLoRA: a PiSSA adapter trained (randomized) and
// exported with the step-0 model as initial, applied to the ORIGINAL base,
// gives the weights of the trained PiSSA model merged, and the exported
// config has r and lora_alpha doubled.
func TestConvertPiSSAToLoRA(t *testing.T) {
	for _, init := range []Init{InitPiSSA, InitOLoRA} {
		t.Run(string(init), func(t *testing.T) {
			dir := t.TempDir()
			orig := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
			m := mgCloneModel(orig)
			if _, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj", "v_proj"}, Rank: 4, Alpha: 8}, Init: init}); err != nil {
				t.Fatal(err)
			}
			if err := CheckPlainExport(m, nil); err == nil {
				t.Error("CheckPlainExport accepts a PiSSA model")
			}
			step0 := mgSaveModel(t, m, filepath.Join(dir, "step0.onnx"))
			mgRandomizeAdapters(t, m, 9)
			peftDir := filepath.Join(dir, "converted")
			rep, err := ExportPEFTConverted(m, step0, peftDir, ExportOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Config.R != 8 || rep.Config.LoraAlpha != 16 || rep.Config.InitLoraWeights != "true" {
				t.Errorf("config r=%d alpha=%g init=%q, want 8, 16, true", rep.Config.R, rep.Config.LoraAlpha, rep.Config.InitLoraWeights)
			}
			merged := mgCloneModel(m)
			if _, err := Merge(merged, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			applied := mgCloneModel(orig)
			if _, err := ApplyPEFT(applied, peftDir, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			layers, _ := FindLayers(orig)
			n := 0
			for _, l := range layers {
				if !strings.HasSuffix(l.Module, "q_proj") && !strings.HasSuffix(l.Module, "v_proj") {
					continue
				}
				n++
				want := vtTensor(t, merged, l.Weight.Name)
				got := vtTensor(t, applied, l.Weight.Name)
				if d := vtMaxDiff(got, want); d > 1e-5*vtMaxAbs(want) {
					t.Errorf("%s: converted adapter on the original base differs from the merged PiSSA model by %g", l.Module, d)
				}
			}
			if n == 0 {
				t.Fatal("no q_proj/v_proj layer")
			}
		})
	}
}

// TestVariantsAdapterInputs: adapter-input branches have no factors to
// resize (refused), an empty spectrum, and cannot start from PiSSA.
func TestVariantsAdapterInputs(t *testing.T) {
	m := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	if _, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}, Rank: 4, Alpha: 8}, AdapterInputs: true}); err != nil {
		t.Fatal(err)
	}
	sp, err := Spectra(m)
	if err != nil {
		t.Fatal(err)
	}
	if len(sp) != 2 || len(sp[0].Singular) != 0 {
		t.Errorf("spectra of rank-0 adapter inputs: %+v", sp)
	}
	if _, err := Resize(m, ResizeOptions{Rank: 2}); err == nil || !strings.Contains(err.Error(), "initializers") {
		t.Errorf("resize of adapter inputs: %v", err)
	}
	m2 := loadModel(t, mgTestModels+"/tiny-gpt.onnx")
	if _, err := Inject(m2, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}, Rank: 4, Alpha: 8}, AdapterInputs: true, Init: InitPiSSA}); err == nil || !strings.Contains(err.Error(), "adapter inputs") {
		t.Errorf("pissa with adapter inputs: %v", err)
	}
}

// TestApplyPEFTResidualInit: a PEFT adapter saved with init_lora_weights
// "pissa" or "olora" applies to the original base as PEFT loads it: the
// base becomes torch's residual (from the generator) and the trained
// adapter is added, W' = W_res + s·B·A. pissa_niter_N is refused.
func TestApplyPEFTResidualInit(t *testing.T) {
	exp := vtLoad(t)
	for _, c := range exp.Inits {
		for _, method := range []string{"pissa", "olora", "pissa_niter_4"} {
			t.Run(c.Name+"/"+method, func(t *testing.T) {
				dir := filepath.Join(t.TempDir(), "adapter")
				// "Trained" factors in PEFT's layout: A [r, in], B [out, r].
				a := make([]float32, c.R*c.In)
				b := make([]float32, c.Out*c.R)
				for i := range a {
					a[i] = float32(math.Sin(float64(3*i+1))) * 0.3
				}
				for i := range b {
					b[i] = float32(math.Cos(float64(5*i+2))) * 0.3
				}
				mod := export.PEFTModule{Name: "fc", Rank: c.R, InFeatures: c.In, OutFeatures: c.Out, Alpha: c.Alpha, Scaling: c.Scaling, A: a, B: b}
				if err := export.WritePEFTAdapter(dir, export.NewPEFTConfig(c.R, c.Alpha, "fc"), []export.PEFTModule{mod}); err != nil {
					t.Fatal(err)
				}
				cfgPath := filepath.Join(dir, export.PEFTConfigFile)
				raw, err := os.ReadFile(cfgPath)
				if err != nil {
					t.Fatal(err)
				}
				var cfg map[string]any
				if err := json.Unmarshal(raw, &cfg); err != nil {
					t.Fatal(err)
				}
				cfg["init_lora_weights"] = method
				raw, _ = json.Marshal(cfg)
				if err := os.WriteFile(cfgPath, raw, 0o644); err != nil {
					t.Fatal(err)
				}
				m := vtLinearModel(t, c.W, c.In, c.Out, true)
				_, err = ApplyPEFT(m, dir, MergeOptions{})
				if method == "pissa_niter_4" {
					if err == nil || !strings.Contains(err.Error(), "random") || !strings.Contains(err.Error(), dir) {
						t.Fatalf("pissa_niter: %v", err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				want := c.PiSSA.Residual
				if method == "olora" {
					want = c.OLoRA.Residual
				}
				want = append([]float64(nil), want...)
				for i := 0; i < c.Out; i++ {
					for j := 0; j < c.In; j++ {
						for k := 0; k < c.R; k++ {
							want[i*c.In+j] += c.Scaling * float64(b[i*c.R+k]) * float64(a[k*c.In+j])
						}
					}
				}
				got := vtStoredOut(t, m, c.In, c.Out, true)
				if d := vtMaxDiff(got, want); d > 3e-5*vtMaxAbs(c.W) {
					t.Errorf("merged weight differs from torch's residual + s·B·A by %g", d)
				}
			})
		}
	}
}

// TestResizeFloat32OnHalf: adapters with float32 factors beside a float16
// layer resize like plain ones; full rank keeps the update.
func TestResizeFloat32OnHalf(t *testing.T) {
	m := loadModel(t, mgTestModels+"/tiny-gpt-fp16.onnx")
	inj, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}, Rank: 4, Alpha: 8}, Init: InitPiSSA, AdapterDType: graph.Float})
	if err != nil {
		t.Fatal(err)
	}
	before, err := Spectra(m)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := Resize(m, ResizeOptions{Rank: 4})
	if err != nil {
		t.Fatal(err)
	}
	after, err := Spectra(m)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Layers) != len(inj.Layers) || vtMaxDiff(before[0].Singular, after[0].Singular) > 1e-5*before[0].Singular[0] {
		t.Errorf("full-rank resize changed the spectrum: %v -> %v", before[0].Singular, after[0].Singular)
	}
	if dt := graph.DataType(mgTensorByName(m, inj.Manifest.Adapters[0].LoraA).GetDataType()); dt != graph.Float {
		t.Errorf("lora_A is %v after resize, want FLOAT", dt)
	}
}
