package export

import (
	"fmt"
	"math"
	"strings"

	"gonum.org/v1/gonum/mat"
)

// CombineMethod is how CombineAdapters mixes adapters, named as PEFT's
// add_weighted_adapter combination_type.
type CombineMethod string

// The methods of CombineAdapters.
const (
	// CombineLinear mixes the factors themselves: A = Σ √(wᵢsᵢ)·Aᵢ and
	// B = Σ √(wᵢsᵢ)·Bᵢ. All adapters must have the same rank on a module,
	// and every wᵢsᵢ must be >= 0. The delta B·A has cross terms, so it is
	// not the weighted sum of the deltas (that is CombineCat).
	CombineLinear CombineMethod = "linear"
	// CombineCat stacks the factors: A = [w₁s₁A₁; w₂s₂A₂; ...] and
	// B = [B₁ B₂ ...], rank Σ rᵢ, so B·A = Σ wᵢsᵢBᵢAᵢ exactly.
	CombineCat CombineMethod = "cat"
	// CombineSVD takes the weighted sum of the deltas, Δ = Σ wᵢsᵢBᵢAᵢ,
	// and keeps its best rank-R approximation: B = U_R·diag(σ_R), A = V_Rᵀ.
	CombineSVD CombineMethod = "svd"
)

// CombineOptions configures CombineAdapters.
type CombineOptions struct {
	Method CombineMethod
	// Weights has one weight per adapter.
	Weights []float64
	// Rank is the svd method's target rank; 0 means the largest rank the
	// adapters have on the module (PEFT's default, max of the ranks).
	Rank int
	// DType is the element type of the result; "" keeps the first
	// adapter's.
	DType DType
}

// CombineAdapters mixes LoRA adapters of one base model as PEFT's
// LoraModel.add_weighted_adapter does: adapters[i] are the modules of the
// i-th adapter in PEFT's layout (A [r, in], B [out, r]) with their own
// scaling sᵢ (alpha/r, or alpha/√r with rsLoRA). A module present in only
// some adapters is combined from those. The result has scaling 1
// (lora_alpha = r on every module), where PEFT copies the first adapter's
// config (rsLoRA included) with lora_alpha = r. The arithmetic is float64;
// the result is rounded once to the output type. Differences from PEFT:
// with cat, a module that some adapters lack gets the rank of those that
// have it (PEFT pads with zero rows, which change nothing); with svd, the
// factors' signs may differ from torch's (the product B·A is the same).
func CombineAdapters(adapters [][]PEFTModule, opts CombineOptions) ([]PEFTModule, error) {
	if len(adapters) == 0 {
		return nil, fmt.Errorf("no adapters to combine")
	}
	if len(opts.Weights) != len(adapters) {
		return nil, fmt.Errorf("%d weights for %d adapters", len(opts.Weights), len(adapters))
	}
	for _, w := range opts.Weights {
		if math.IsNaN(w) || math.IsInf(w, 0) {
			return nil, fmt.Errorf("weight %v is not a finite number", w)
		}
	}
	switch opts.Method {
	case CombineLinear, CombineCat, CombineSVD:
	default:
		return nil, fmt.Errorf("unknown combination method %q: want linear, cat or svd", opts.Method)
	}
	if opts.Rank < 0 || (opts.Rank > 0 && opts.Method != CombineSVD) {
		return nil, fmt.Errorf("a rank (%d) goes only with the svd method, and must be positive", opts.Rank)
	}
	method := opts.Method
	if len(adapters) == 1 {
		method = CombineLinear // as PEFT does for a single adapter
	}
	// Modules by name, in the order first seen.
	type entry struct {
		mods    []*PEFTModule
		weights []float64
	}
	byName := map[string]*entry{}
	var order []string
	for i, mods := range adapters {
		seen := map[string]bool{}
		for j := range mods {
			m := &mods[j]
			if seen[m.Name] {
				return nil, fmt.Errorf("adapter %d has module %s twice", i+1, m.Name)
			}
			seen[m.Name] = true
			e := byName[m.Name]
			if e == nil {
				e = &entry{}
				byName[m.Name] = e
				order = append(order, m.Name)
			}
			if len(e.mods) > 0 {
				f := e.mods[0]
				if f.InFeatures != m.InFeatures || f.OutFeatures != m.OutFeatures || f.Embedding != m.Embedding {
					return nil, fmt.Errorf("module %s is [%d, %d] in one adapter and [%d, %d] in another: are they for the same base model?", m.Name, f.InFeatures, f.OutFeatures, m.InFeatures, m.OutFeatures)
				}
			}
			if len(m.A) != m.Rank*m.InFeatures || len(m.B) != m.OutFeatures*m.Rank || m.Rank <= 0 {
				return nil, fmt.Errorf("module %s of adapter %d: factors do not match rank %d", m.Name, i+1, m.Rank)
			}
			e.mods = append(e.mods, m)
			e.weights = append(e.weights, opts.Weights[i])
		}
	}
	dt := opts.DType
	if dt == "" {
		dt = adapters[0][0].DType
	}
	out := make([]PEFTModule, 0, len(order))
	for _, name := range order {
		e := byName[name]
		first := e.mods[0]
		in, o := first.InFeatures, first.OutFeatures
		var a, b []float64 // [r, in], [o, r]
		var r int
		var err error
		switch method {
		case CombineLinear:
			a, b, r, err = combineLinear(e.mods, e.weights)
		case CombineCat:
			a, b, r = combineCat(e.mods, e.weights)
		case CombineSVD:
			a, b, r, err = combineSVD(e.mods, e.weights, opts.Rank)
		}
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", name, err)
		}
		m := PEFTModule{Name: name, Prefix: first.Prefix, DType: dt, Rank: r, InFeatures: in, OutFeatures: o,
			Alpha: float64(r), Scaling: 1, Embedding: first.Embedding, A: make([]float32, len(a)), B: make([]float32, len(b))}
		for i, v := range a {
			m.A[i] = float32(v)
		}
		for i, v := range b {
			m.B[i] = float32(v)
		}
		out = append(out, m)
	}
	return out, nil
}

func combineLinear(mods []*PEFTModule, weights []float64) (a, b []float64, r int, err error) {
	r = mods[0].Rank
	a = make([]float64, len(mods[0].A))
	b = make([]float64, len(mods[0].B))
	for i, m := range mods {
		if m.Rank != r {
			var ranks []string
			for _, x := range mods {
				ranks = append(ranks, fmt.Sprint(x.Rank))
			}
			return nil, nil, 0, fmt.Errorf("ranks %s differ; linear needs one rank (use cat or svd)", strings.Join(ranks, ", "))
		}
		ws := weights[i] * m.Scaling
		if ws < 0 {
			return nil, nil, 0, fmt.Errorf("weight × scaling is %g; linear takes its square root, so it must be >= 0 (use cat or svd for negative weights)", ws)
		}
		c := math.Sqrt(ws)
		for k, v := range m.A {
			a[k] += c * float64(v)
		}
		for k, v := range m.B {
			b[k] += c * float64(v)
		}
	}
	return a, b, r, nil
}

func combineCat(mods []*PEFTModule, weights []float64) (a, b []float64, r int) {
	for _, m := range mods {
		r += m.Rank
	}
	in, o := mods[0].InFeatures, mods[0].OutFeatures
	a = make([]float64, r*in)
	b = make([]float64, o*r)
	off := 0
	for i, m := range mods {
		c := weights[i] * m.Scaling
		for k := 0; k < m.Rank; k++ {
			for j := 0; j < in; j++ {
				a[(off+k)*in+j] = c * float64(m.A[k*in+j])
			}
			for j := 0; j < o; j++ {
				b[j*r+off+k] = float64(m.B[j*m.Rank+k])
			}
		}
		off += m.Rank
	}
	return a, b, r
}

func combineSVD(mods []*PEFTModule, weights []float64, rank int) (a, b []float64, r int, err error) {
	in, o := mods[0].InFeatures, mods[0].OutFeatures
	if rank == 0 {
		for _, m := range mods {
			rank = max(rank, m.Rank)
		}
	}
	if rank > min(in, o) {
		return nil, nil, 0, fmt.Errorf("rank %d is more than min(in, out) = %d", rank, min(in, o))
	}
	delta := mat.NewDense(o, in, nil)
	for i, m := range mods {
		c := weights[i] * m.Scaling
		bm := mat.NewDense(o, m.Rank, toF64(m.B))
		am := mat.NewDense(m.Rank, in, toF64(m.A))
		var p mat.Dense
		p.Mul(bm, am)
		p.Scale(c, &p)
		delta.Add(delta, &p)
	}
	var svd mat.SVD
	if !svd.Factorize(delta, mat.SVDThin) {
		return nil, nil, 0, fmt.Errorf("the SVD of the combined delta did not converge")
	}
	var u, v mat.Dense
	svd.UTo(&u)
	svd.VTo(&v)
	s := svd.Values(nil)
	a = make([]float64, rank*in)
	b = make([]float64, o*rank)
	for k := 0; k < rank; k++ {
		for j := 0; j < in; j++ {
			a[k*in+j] = v.At(j, k)
		}
		for j := 0; j < o; j++ {
			b[j*rank+k] = u.At(j, k) * s[k]
		}
	}
	return a, b, rank, nil
}

func toF64(x []float32) []float64 {
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v)
	}
	return out
}
