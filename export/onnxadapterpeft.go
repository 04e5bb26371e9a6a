package export

import (
	"fmt"
	"sort"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
)

// Parameter name suffixes of an adapter-input model, as Olive's
// ExtractAdapters and onnxruntime-genai's model builder write them.
const (
	OnnxAdapterSuffixA = ".lora_A.weight"
	OnnxAdapterSuffixB = ".lora_B.weight"
)

// OnnxAdapterFromPEFT converts PEFT modules (as ReadPEFTAdapter returns
// them) to ONNX Runtime adapter parameters in ONNX's x·W orientation, with
// the scaling folded into B as adapter-input models expect:
// "<module>.lora_A.weight" = lora_Aᵀ [in, r] and "<module>.lora_B.weight" =
// scaling·lora_Bᵀ [r, out], computed in float64 and rounded once to dt
// (FLOAT, FLOAT16, BFLOAT16 or DOUBLE). Module names are the PEFT keys
// without their "base_model.model." prefix. fan_in_fan_out needs no
// handling: it only says how torch stores the base weight, and lora_A and
// lora_B have the same shapes either way.
func OnnxAdapterFromPEFT(mods []PEFTModule, dt graph.DataType) (*OnnxAdapter, error) {
	if !dt.IsFloat() {
		return nil, fmt.Errorf("adapter data type %v is not a float type", dt)
	}
	if len(mods) == 0 {
		return nil, fmt.Errorf("no LoRA modules to convert")
	}
	a := &OnnxAdapter{FormatVersion: OnnxAdapterFormatVersion}
	for i := range mods {
		m := &mods[i]
		r, in, out := m.Rank, m.InFeatures, m.OutFeatures
		if r <= 0 || in <= 0 || out <= 0 || len(m.A) != r*in || len(m.B) != out*r {
			return nil, fmt.Errorf("module %s: lora_A has %d values for [%d %d] and lora_B %d for [%d %d]", m.Name, len(m.A), r, in, len(m.B), out, r)
		}
		av := make([]float64, in*r)
		for k := 0; k < r; k++ {
			for j := 0; j < in; j++ {
				av[j*r+k] = float64(m.A[k*in+j])
			}
		}
		bv := make([]float64, r*out)
		for o := 0; o < out; o++ {
			for k := 0; k < r; k++ {
				bv[k*out+o] = m.Scaling * float64(m.B[o*r+k])
			}
		}
		pa, err := NewOnnxAdapterParam(m.Name+OnnxAdapterSuffixA, dt, []int64{int64(in), int64(r)}, av)
		if err != nil {
			return nil, err
		}
		pb, err := NewOnnxAdapterParam(m.Name+OnnxAdapterSuffixB, dt, []int64{int64(r), int64(out)}, bv)
		if err != nil {
			return nil, err
		}
		a.Params = append(a.Params, pa, pb)
	}
	// Marshal's checks (duplicates, sizes) now, so callers fail before
	// writing anything.
	if _, err := a.Marshal(); err != nil {
		return nil, err
	}
	return a, nil
}

// peftDType maps adapter float types to safetensors dtypes.
var peftDType = map[graph.DataType]DType{
	graph.Float: DTypeF32, graph.Float16: DTypeF16, graph.BFloat16: DTypeBF16, graph.Double: DTypeF64,
}

// PEFTFromOnnxAdapter converts an adapter whose parameters come in
// "<module>.lora_A.weight" [in, r] / "<module>.lora_B.weight" [r, out]
// pairs to PEFT modules (lora_A = Aᵀ, lora_B = Bᵀ) and a config for
// WritePEFTAdapter. The adapter's B already holds the scaling, which cannot
// be told apart from B itself, so every module gets lora_alpha = r and
// scaling 1 (plain LoRA, not rsLoRA); merged weights are the same. The
// config's r is the most common rank, with rank_pattern and alpha_pattern
// entries for the others. dt is the PEFT tensor type ("" keeps each
// parameter's own type).
func PEFTFromOnnxAdapter(a *OnnxAdapter, dt DType) (*PEFTConfig, []PEFTModule, error) {
	type pair struct{ a, b *OnnxAdapterParam }
	pairs := map[string]*pair{}
	for i := range a.Params {
		p := &a.Params[i]
		var mod string
		switch {
		case strings.HasSuffix(p.Name, OnnxAdapterSuffixA):
			mod = strings.TrimSuffix(p.Name, OnnxAdapterSuffixA)
		case strings.HasSuffix(p.Name, OnnxAdapterSuffixB):
			mod = strings.TrimSuffix(p.Name, OnnxAdapterSuffixB)
		default:
			return nil, nil, fmt.Errorf("parameter %q is not named <module>%s or <module>%s, so it is not a LoRA factor PEFT can hold", p.Name, OnnxAdapterSuffixA, OnnxAdapterSuffixB)
		}
		if mod == "" {
			return nil, nil, fmt.Errorf("parameter %q has no module name", p.Name)
		}
		if pairs[mod] == nil {
			pairs[mod] = &pair{}
		}
		if strings.HasSuffix(p.Name, OnnxAdapterSuffixA) {
			pairs[mod].a = p
		} else {
			pairs[mod].b = p
		}
	}
	if len(pairs) == 0 {
		return nil, nil, fmt.Errorf("the adapter has no parameters")
	}
	names := make([]string, 0, len(pairs))
	for n := range pairs {
		names = append(names, n)
	}
	sort.Strings(names)
	mods := make([]PEFTModule, 0, len(names))
	rankCount := map[int]int{}
	for _, n := range names {
		pr := pairs[n]
		if pr.a == nil || pr.b == nil {
			return nil, nil, fmt.Errorf("module %s has only one of %s and %s", n, OnnxAdapterSuffixA, OnnxAdapterSuffixB)
		}
		if len(pr.a.Dims) != 2 || len(pr.b.Dims) != 2 || pr.a.Dims[1] != pr.b.Dims[0] || pr.a.Dims[1] <= 0 || pr.a.Dims[0] <= 0 || pr.b.Dims[1] <= 0 {
			return nil, nil, fmt.Errorf("module %s: A %v and B %v are not [in, r] and [r, out] with r > 0", n, pr.a.Dims, pr.b.Dims)
		}
		if pr.a.DataType != pr.b.DataType {
			return nil, nil, fmt.Errorf("module %s: A is %v and B %v; both must have one float type", n, pr.a.DataType, pr.b.DataType)
		}
		mdt := dt
		if mdt == "" {
			var ok bool
			if mdt, ok = peftDType[pr.a.DataType]; !ok {
				return nil, nil, fmt.Errorf("module %s: %v is not a float type", n, pr.a.DataType)
			}
		}
		av, err := pr.a.Float64s()
		if err != nil {
			return nil, nil, err
		}
		bv, err := pr.b.Float64s()
		if err != nil {
			return nil, nil, err
		}
		in, r, out := int(pr.a.Dims[0]), int(pr.a.Dims[1]), int(pr.b.Dims[1])
		m := PEFTModule{Name: n, DType: mdt, Rank: r, InFeatures: in, OutFeatures: out,
			Alpha: float64(r), Scaling: 1, A: make([]float32, r*in), B: make([]float32, out*r)}
		for j := 0; j < in; j++ {
			for k := 0; k < r; k++ {
				m.A[k*in+j] = float32(av[j*r+k])
			}
		}
		for k := 0; k < r; k++ {
			for o := 0; o < out; o++ {
				m.B[o*r+k] = float32(bv[k*out+o])
			}
		}
		mods = append(mods, m)
		rankCount[r]++
	}
	// The most common rank (the smallest on a tie) is r; others get patterns.
	best := mods[0].Rank
	for r, c := range rankCount {
		if c > rankCount[best] || (c == rankCount[best] && r < best) {
			best = r
		}
	}
	cfg := NewPEFTConfig(best, float64(best))
	cfg.InferenceMode = true
	for _, m := range mods {
		if m.Rank != best {
			cfg.RankPattern = append(cfg.RankPattern, Pattern[int]{Key: m.Name, Value: m.Rank})
			cfg.AlphaPattern = append(cfg.AlphaPattern, Pattern[float64]{Key: m.Name, Value: float64(m.Rank)})
		}
	}
	return cfg, mods, nil
}
