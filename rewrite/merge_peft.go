package rewrite

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
)

// ApplyPEFT merges a HuggingFace PEFT LoRA adapter directory
// (adapter_config.json + adapter_model.safetensors) into the model's
// weights, without injecting a branch first.
//
// Each adapter module (key base_model.model.<module>.lora_A.weight, [r, in],
// and .lora_B.weight, [out, r]) goes to the layer whose module path matches
// it by dotted suffix: PEFT's "model.layers.0.self_attn.q_proj" matches an
// ONNX layer called that, "layers.0.self_attn.q_proj" or
// "base.model.layers.0.self_attn.q_proj"; the longest match wins, and a tie
// is an error. Modules that match no layer are an error listing them
// (unless opts.AllowPartial), as are layers claimed by two modules.
//
// PEFT's delta for a torch Linear is W[out, in] += scaling·B·A; in ONNX's
// x·W orientation that is W[in, out] += scaling·Aᵀ·Bᵀ, and for a weight the
// model stores [out, in] (Gemm transB=1, or through a Transpose) it is added
// as PEFT adds it. fan_in_fan_out (GPT-2's Conv1D) only says how torch
// stores the base weight: lora_A and lora_B keep their shapes and the layer
// computes the same x·W + scaling·x·Aᵀ·Bᵀ, so the delta is placed by the
// ONNX layer's own orientation either way. r, lora_alpha, use_rslora,
// rank_pattern and alpha_pattern are honoured; DoRA, LoRA biases, embedding
// and convolution adapters and base-altering initializations are refused
// (errors wrapping export.ErrUnsupported). The arithmetic, rounding, weight
// sharing and options are Merge's; opts.Only names PEFT modules.
func ApplyPEFT(m *graph.Model, adapterDir string, opts MergeOptions) (*MergeReport, error) {
	p, err := planPEFT(m, adapterDir, opts)
	if err != nil {
		return nil, err
	}
	return p.applyInMemory()
}

// ApplyPEFTFile applies a PEFT adapter directory to the model at src (as
// ApplyPEFT does) and saves the result to dst, streaming weights like
// MergeFile.
func ApplyPEFTFile(src, adapterDir, dst string, opts MergeOptions, save graph.SaveOptions) (*MergeReport, error) {
	m, err := graph.Load(src)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	p, err := planPEFT(m, adapterDir, opts)
	if err != nil {
		return nil, err
	}
	return p.save(dst, save)
}

// planPEFT matches the adapter's modules to layers and plans their merge.
func planPEFT(m *graph.Model, dir string, opts MergeOptions) (*plan, error) {
	_, mods, err := export.ReadPEFTAdapter(dir)
	if err != nil {
		return nil, err
	}
	mods, err = onlyPEFTModules(mods, opts.Only)
	if err != nil {
		return nil, fmt.Errorf("peft adapter %s: %w", dir, err)
	}
	layers, _ := FindLayers(m)
	if len(layers) == 0 {
		return nil, errors.New("the model has no MatMul or Gemm layer with a constant weight to apply a PEFT adapter to")
	}
	top := layers[0].Graph
	for top.Parent != nil {
		top = top.Parent
	}
	p, err := newPlan(m, top, opts, "peft")
	if err != nil {
		return nil, err
	}
	match, err := matchPEFTModules(mods, layers)
	if err != nil {
		return nil, fmt.Errorf("peft adapter %s: %w", dir, err)
	}
	var unmatched []string
	type pair struct {
		layer int
		mod   *export.PEFTModule
	}
	var pairs []pair
	for i := range mods {
		li, ok := match[mods[i].Name]
		if !ok {
			unmatched = append(unmatched, mods[i].Name)
			continue
		}
		pairs = append(pairs, pair{li, &mods[i]})
	}
	if len(unmatched) > 0 && !opts.AllowPartial {
		return nil, fmt.Errorf("peft adapter %s: %s", dir, describeUnmatched(unmatched, mods, layers))
	}
	if len(pairs) == 0 {
		return nil, fmt.Errorf("peft adapter %s: none of its %d modules matches a layer of the model", dir, len(mods))
	}
	p.report.Unmatched = unmatched
	sort.Slice(pairs, func(a, b int) bool { return pairs[a].layer < pairs[b].layer })
	for _, pr := range pairs {
		l, mod := layers[pr.layer], pr.mod
		if int64(mod.InFeatures) != l.In || int64(mod.OutFeatures) != l.Out {
			hint := ""
			if int64(mod.InFeatures) == l.Out && int64(mod.OutFeatures) == l.In {
				hint = " (in and out swapped: is this adapter for another export of the model?)"
			}
			return nil, fmt.Errorf("peft module %s: lora_A %v and lora_B %v make a delta for %d inputs and %d outputs, but layer %s has %d inputs and %d outputs%s",
				mod.Name, mod.ShapeA(), mod.ShapeB(), mod.InFeatures, mod.OutFeatures, l.Module, l.In, l.Out, hint)
		}
		// PEFT's A [r, in] and B [out, r] are the transposes of the ONNX
		// branch's A [in, r] and B [r, out].
		r := mod.Rank
		a := make([]float64, mod.InFeatures*r)
		for k := 0; k < r; k++ {
			for i := 0; i < mod.InFeatures; i++ {
				a[i*r+k] = float64(mod.A[k*mod.InFeatures+i])
			}
		}
		b := make([]float64, r*mod.OutFeatures)
		for j := 0; j < mod.OutFeatures; j++ {
			for k := 0; k < r; k++ {
				b[k*mod.OutFeatures+j] = float64(mod.B[j*r+k])
			}
		}
		rep := &MergedLayer{Module: l.Module, PEFTModule: mod.Name, Rank: r, Alpha: mod.Alpha, Scaling: mod.Scaling}
		if err := p.addUpdate(l, a, b, r, mod.Scaling, rep); err != nil {
			return nil, fmt.Errorf("peft module %s -> layer %s: %w", mod.Name, l.Module, err)
		}
	}
	return p, nil
}

// onlyPEFTModules keeps the modules named in only (all when empty).
func onlyPEFTModules(mods []export.PEFTModule, only []string) ([]export.PEFTModule, error) {
	if len(only) == 0 {
		return mods, nil
	}
	want := map[string]bool{}
	for _, o := range only {
		if o = strings.TrimSpace(o); o != "" {
			want[o] = true
		}
	}
	var kept []export.PEFTModule
	for _, m := range mods {
		if want[m.Name] {
			kept = append(kept, m)
			delete(want, m.Name)
		}
	}
	if len(want) > 0 {
		var names []string
		for _, m := range mods {
			names = append(names, m.Name)
		}
		return nil, fmt.Errorf("no module(s) %s in the adapter; it has: %s", strings.Join(sortedKeys(want), ", "), strings.Join(names, ", "))
	}
	return kept, nil
}

// suffixSegments returns how many dotted segments a and b share when one is
// a dotted suffix of the other ("model.layers.0.q" and "layers.0.q": 3),
// else 0.
func suffixSegments(a, b string) int {
	short, long := a, b
	if len(short) > len(long) {
		short, long = long, short
	}
	if long == short || strings.HasSuffix(long, "."+short) {
		return strings.Count(short, ".") + 1
	}
	return 0
}

// commonSuffix counts the trailing dotted segments a and b have in common.
func commonSuffix(a, b string) int {
	sa, sb := strings.Split(a, "."), strings.Split(b, ".")
	n := 0
	for n < len(sa) && n < len(sb) && sa[len(sa)-1-n] == sb[len(sb)-1-n] {
		n++
	}
	return n
}

// matchPEFTModules maps each PEFT module to the index of its layer: the
// layer sharing the longest dotted suffix, one being a suffix of the other.
// Modules with no such layer are left out; ties and layers claimed twice
// are errors.
func matchPEFTModules(mods []export.PEFTModule, layers []*Layer) (map[string]int, error) {
	match := map[string]int{}
	claimed := map[int][]string{}
	var problems []string
	for _, mod := range mods {
		best, bestIdx := 0, []int(nil)
		for i, l := range layers {
			s := suffixSegments(mod.Name, l.Module)
			switch {
			case s > best:
				best, bestIdx = s, []int{i}
			case s == best && s > 0:
				bestIdx = append(bestIdx, i)
			}
		}
		switch len(bestIdx) {
		case 0:
			continue
		case 1:
			match[mod.Name] = bestIdx[0]
			claimed[bestIdx[0]] = append(claimed[bestIdx[0]], mod.Name)
		default:
			var names []string
			for _, i := range bestIdx {
				names = append(names, layers[i].Module)
			}
			problems = append(problems, fmt.Sprintf("module %s (keys %s, %s) matches %d layers equally: %s", mod.Name, mod.KeyA, mod.KeyB, len(names), strings.Join(names, ", ")))
		}
	}
	for i, names := range claimed {
		if len(names) > 1 {
			sort.Strings(names)
			problems = append(problems, fmt.Sprintf("layer %s is matched by %d modules: %s", layers[i].Module, len(names), strings.Join(names, ", ")))
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return nil, fmt.Errorf("ambiguous module mapping:\n  %s", strings.Join(problems, "\n  "))
	}
	return match, nil
}

// describeUnmatched lists modules that match no layer, each with its keys
// and the closest layer name, to make a naming mismatch obvious.
func describeUnmatched(unmatched []string, mods []export.PEFTModule, layers []*Layer) string {
	byName := map[string]*export.PEFTModule{}
	for i := range mods {
		byName[mods[i].Name] = &mods[i]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d of %d modules match no layer of the model (set AllowPartial to apply the rest):", len(unmatched), len(mods))
	for _, name := range unmatched {
		mod := byName[name]
		closest, score := "", 0
		for _, l := range layers {
			if s := commonSuffix(name, l.Module); s > score {
				closest, score = l.Module, s
			}
		}
		fmt.Fprintf(&b, "\n  %s (keys %s, %s)", name, mod.KeyA, mod.KeyB)
		if closest != "" {
			fmt.Fprintf(&b, "; closest layer: %s", closest)
		}
	}
	return b.String()
}
