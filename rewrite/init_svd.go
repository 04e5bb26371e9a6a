package rewrite

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
)

// Initializations that start the adapter from the base weight itself and
// write the residual into the base, as PEFT's init_lora_weights does.
const (
	// InitPiSSA is PEFT's "pissa": with W = U·S·Vᵀ (full SVD), A and B
	// are the top r singular vectors scaled by sqrt(S_r/scaling) and the
	// base becomes W − scaling·A·B, the minor components.
	InitPiSSA Init = "pissa"
	// InitOLoRA is PEFT's "olora": with Wᵀ = Q·R (torch's [out, in]
	// weight), lora_A = R[:r] and lora_B = Q[:, :r], and the base becomes
	// W − scaling·(Q_r·R_r)ᵀ.
	InitOLoRA Init = "olora"
)

// InitPiSSANiter returns PEFT's "pissa_niter_N": PiSSA from a randomized
// SVD (torch.svd_lowrank with N subspace iterations), much faster on big
// weights; the residual is computed from the factors, so the model is
// still unchanged at step 0.
func InitPiSSANiter(n int) Init { return Init(fmt.Sprintf("pissa_niter_%d", n)) }

// ChangesBase reports whether the init writes a residual into the base
// weights (pissa, pissa_niter_N, olora). Such adapters are a delta on the
// residual model, not on the original one; ExportPEFTConverted turns them
// into a plain LoRA on the original weights.
func (i Init) ChangesBase() bool {
	_, _, ok := i.svdInit()
	return ok
}

// svdInit parses the base-altering inits: method "pissa" (niter < 0 for
// the full SVD) or "olora".
func (i Init) svdInit() (method string, niter int, ok bool) {
	s := strings.ToLower(string(i))
	switch {
	case s == string(InitPiSSA):
		return "pissa", -1, true
	case s == string(InitOLoRA):
		return "olora", 0, true
	case strings.HasPrefix(s, "pissa_niter_"):
		n, err := strconv.Atoi(strings.TrimPrefix(s, "pissa_niter_"))
		if err != nil || n < 0 || n > 1000 {
			return "", 0, false
		}
		return "pissa", n, true
	}
	return "", 0, false
}

// check validates an Init name.
func (i Init) check() error {
	if i == InitKaiming || i == InitGaussian || i.ChangesBase() {
		return nil
	}
	return fmt.Errorf("unknown init %q: use %s, %s, %s, pissa_niter_N (N subspace iterations, 0..1000) or %s", i, InitKaiming, InitGaussian, InitPiSSA, InitOLoRA)
}

// initFactors are an adapter's starting A (in×r) and B (r×out) in the x·W
// orientation, already rounded to the layer's type.
type initFactors struct{ a, b []float64 }

// loraAValues returns lora_A's initial values for a layer.
func loraAValues(l *Layer, r int64, cfg InjectConfig) []float64 {
	if f := cfg.factors[l.Module]; f != nil {
		return f.a
	}
	return initA(l.Module, l.In, r, cfg)
}

// loraBValues returns lora_B's initial values: zero, or the factor of a
// base-altering init.
func loraBValues(l *Layer, r int64, cfg InjectConfig) []float64 {
	if f := cfg.factors[l.Module]; f != nil {
		return f.b
	}
	return make([]float64, r*l.Out)
}

// baseInit computes the PiSSA/OLoRA factors of the selected layers and
// writes each residual W − scaling·A·B into its base weight (through
// Merge's update: float64, rounded once to the weight's type, a shared
// weight copied first). It returns nil for the other inits. Nothing is
// changed unless every factorization succeeds.
func baseInit(m *graph.Model, layers []*Layer, sel []Selection, cfg InjectConfig, adapted map[string]bool) (map[string]*initFactors, error) {
	method, niter, ok := cfg.Init.svdInit()
	if !ok {
		return nil, nil
	}
	if cfg.AdapterInputs {
		return nil, fmt.Errorf("--init %s puts the base weight's top components in A and B, which adapter inputs leave empty: inject without adapter inputs", cfg.Init)
	}
	p, err := newPlan(m, m.Graph(), MergeOptions{}, "init")
	if err != nil {
		return nil, err
	}
	out := map[string]*initFactors{}
	for _, s := range sel {
		l := layers[s.Index]
		if adapted[l.Module] {
			return nil, fmt.Errorf("module %s already has an adapter; merge it first or exclude it", l.Module)
		}
		scaling := s.Alpha / float64(s.Rank)
		if cfg.RSLoRA {
			scaling = s.Alpha / math.Sqrt(float64(s.Rank))
		}
		f, err := svdFactors(m, l, s.Rank, scaling, method, niter, cfg.Seed)
		if err != nil {
			return nil, fmt.Errorf("module %s: --init %s: %w", l.Module, cfg.Init, err)
		}
		rep := &MergedLayer{Module: l.Module}
		if err := p.addUpdate(l, f.a, f.b, s.Rank, -scaling, rep); err != nil {
			return nil, fmt.Errorf("module %s: --init %s: %w", l.Module, cfg.Init, err)
		}
		out[l.Module] = f
	}
	if _, err := p.applyInMemory(); err != nil {
		return nil, err
	}
	return out, nil
}

// layerWeight returns the layer's effective weight in the x·W orientation
// (in×out): the stored values, transposed back when stored [out, in], times
// a Gemm's alpha.
func layerWeight(m *graph.Model, l *Layer) ([]float64, error) {
	w, err := m.Float64s(l.Weight.Tensor)
	if err != nil {
		return nil, err
	}
	if int64(len(w)) != l.In*l.Out {
		return nil, fmt.Errorf("weight %q holds %d values, expected %d×%d", l.Weight.Name, len(w), l.In, l.Out)
	}
	if l.StoredTransposed() {
		w = transposeF64(w, int(l.Out), int(l.In))
	}
	if l.Alpha != 1 {
		for i := range w {
			w[i] *= l.Alpha
		}
	}
	return w, nil
}

// svdFactors computes one layer's PiSSA or OLoRA factors, as PEFT's
// pissa_init and olora_init do on torch's [out, in] weight, written here
// in the x·W orientation (A = lora_Aᵀ, B = lora_Bᵀ).
func svdFactors(m *graph.Model, l *Layer, r int, scaling float64, method string, niter int, seed uint64) (*initFactors, error) {
	in, out := int(l.In), int(l.Out)
	if k := min(in, out); r > k {
		return nil, fmt.Errorf("rank %d exceeds min(in, out) = %d of the [%d, %d] weight", r, k, in, out)
	}
	if !(scaling > 0) || math.IsInf(scaling, 0) {
		return nil, fmt.Errorf("the scaling must be positive, got %v (alpha/r)", scaling)
	}
	w, err := layerWeight(m, l)
	if err != nil {
		return nil, err
	}
	for _, v := range w {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return nil, fmt.Errorf("weight %q holds NaN or infinite values", l.Weight.Name)
		}
	}
	a := make([]float64, in*r)
	b := make([]float64, r*out)
	switch method {
	case "pissa":
		var u, s, v []float64
		var k int
		if niter < 0 {
			u, s, v, err = thinSVD(w, in, out)
			k = min(in, out)
		} else {
			h := fnv.New64a()
			h.Write([]byte(l.Module))
			rng := rand.New(rand.NewPCG(seed, h.Sum64()))
			u, s, v, err = randomizedSVD(w, in, out, r, niter, rng)
			k = r
		}
		if err != nil {
			return nil, err
		}
		// A = U_r·diag(sqrt(S_r/scaling)), B = diag(sqrt(S_r/scaling))·V_rᵀ.
		for j := 0; j < r; j++ {
			g := math.Sqrt(s[j] / scaling)
			for i := 0; i < in; i++ {
				a[i*r+j] = u[i*k+j] * g
			}
			for i := 0; i < out; i++ {
				b[j*out+i] = v[i*k+j] * g
			}
		}
	case "olora":
		// torch's weight is Wᵀ [out, in]: Q_r [out, r] is lora_B, R_r
		// [r, in] lora_A; transposed, B = Q_rᵀ and A = R_rᵀ.
		q, rr := thinQR(transposeF64(w, in, out), out, in, r)
		for i := 0; i < out; i++ {
			for j := 0; j < r; j++ {
				b[j*out+i] = q[i*r+j]
			}
		}
		for j := 0; j < r; j++ {
			for i := 0; i < in; i++ {
				a[i*r+j] = rr[j*in+i]
			}
		}
	default:
		return nil, fmt.Errorf("unknown method %q", method)
	}
	// The branch holds A and B in the layer's type; the residual is taken
	// against those stored values, so base + branch is W to within the
	// rounding of the residual.
	if a, err = roundTo(l.DType, a); err != nil {
		return nil, err
	}
	if b, err = roundTo(l.DType, b); err != nil {
		return nil, err
	}
	return &initFactors{a: a, b: b}, nil
}

// roundTo rounds values to dt and back.
func roundTo(dt graph.DataType, vals []float64) ([]float64, error) {
	raw, err := graph.EncodeFloats(dt, vals)
	if err != nil {
		return nil, err
	}
	return graph.DecodeFloats(dt, raw), nil
}

// Check reports whether i names an initialization Inject knows: kaiming,
// gaussian, pissa, pissa_niter_N or olora.
func (i Init) Check() error { return i.check() }
