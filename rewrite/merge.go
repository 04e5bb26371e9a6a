package rewrite

import (
	"sort"

	"github.com/onnxlora/onnxlora/graph"
)

// MergeOptions tunes Merge, MergeFile, ApplyPEFT and ApplyPEFTFile.
type MergeOptions struct {
	// Only restricts the merge to these modules (module paths as in the
	// manifest, or PEFT module names for ApplyPEFT). Adapters of other
	// modules stay live, and stay in the manifest. Empty means all.
	Only []string
	// Scale multiplies every adapter's delta, to merge at another strength
	// (negative values subtract an adapter that was merged before). Zero
	// means 1.
	Scale float64
	// Safe checks every merged weight for NaN and Inf before anything is
	// changed, like PEFT's safe_merge, and fails with the layers at fault,
	// leaving the model untouched (MergeFile: writing nothing).
	Safe bool
	// AllowPartial lets ApplyPEFT skip adapter modules that match no layer
	// of the model (they are listed in MergeReport.Unmatched) instead of
	// failing. Merge ignores it.
	AllowPartial bool
	// Map renames PEFT module paths before ApplyPEFT matches them to
	// layers; Preset picks built-in rules ("" or "auto": by the model's
	// producer_name, "none": no preset, else a MapPresets name), applied
	// after Map. Merge ignores both.
	Map    []MapRule
	Preset string
	// Quantized says how adapters beside quantized weights (MatMulNBits,
	// DequantizeLinear) merge: QuantRefuse (the default) refuses,
	// QuantDequantize writes float weights, QuantRequantize quantizes
	// W + ΔW with the layer's own scheme and reports the added error.
	Quantized string
}

// MergeReport describes what a merge did.
type MergeReport struct {
	// Source is where the adapters came from: "manifest", "recognized"
	// (branches found by their structure, the manifest being absent) or
	// "peft" (ApplyPEFT).
	Source string `json:"source"`
	// Merged lists the folded adapters in graph order.
	Merged []MergedLayer `json:"merged"`
	// Kept lists the modules whose adapters were left live (Only).
	Kept []string `json:"kept,omitempty"`
	// Unmatched lists PEFT modules that matched no layer (AllowPartial).
	Unmatched []string `json:"unmatched,omitempty"`
}

// MergedLayer is one adapter folded into its base weight.
type MergedLayer struct {
	// Module is the layer's module path (the manifest's for Merge).
	Module string `json:"module"`
	// PEFTModule is the adapter module applied (ApplyPEFT only).
	PEFTModule string `json:"peft_module,omitempty"`
	// Node is the adapted MatMul or Gemm node.
	Node string `json:"node"`
	// Weight is the initializer that now holds the merged values. It is the
	// original weight unless that was shared with other layers; then it is
	// a new initializer (Original names the shared one, left unchanged).
	Weight   string `json:"weight"`
	Original string `json:"original,omitempty"`
	// Shape and DType describe Weight as stored; Transposed is true when it
	// is stored [out, in] (Gemm transB=1 or a Transpose on the way).
	Shape      []int64 `json:"shape"`
	DType      string  `json:"dtype"`
	Transposed bool    `json:"transposed,omitempty"`
	// Rank and Alpha are the adapter's r and lora_alpha.
	Rank  int     `json:"rank"`
	Alpha float64 `json:"alpha"`
	// Scaling is the adapter's alpha/r (or alpha/sqrt(r)); Factor is what
	// A·B was multiplied by: Scaling * Scale / Gemm alpha.
	Scaling float64 `json:"scaling"`
	Factor  float64 `json:"factor"`
	// MaxDelta is the largest |ΔW| before rounding to DType; Changed
	// counts the elements whose stored value changed, of Elements.
	MaxDelta float64 `json:"max_abs_delta"`
	Changed  int64   `json:"changed"`
	Elements int64   `json:"elements"`
	// NonFinite counts merged values that are NaN or infinite (Safe
	// refuses them; otherwise they are written and counted here).
	NonFinite int64 `json:"non_finite,omitempty"`
	// Quantized is QuantDequantize or QuantRequantize for a quantized
	// layer; a requantized one reports the largest error quantizing
	// W + ΔW again added, and its Frobenius norm relative to W + ΔW.
	Quantized       string  `json:"quantized,omitempty"`
	RequantMaxError float64 `json:"requant_max_error,omitempty"`
	RequantRelError float64 `json:"requant_rel_error,omitempty"`
}

// Merge folds the model's LoRA adapters into their base weights:
// W += scaling·A·B for a weight stored [in, out], W += scaling·(A·B)ᵀ for
// one stored [out, in], with the delta divided by a Gemm's alpha (the
// layer computes alpha·x·W). The sum is computed in float64 and rounded
// once, to nearest even, to the weight's type. The branch nodes and the
// adapter's initializers are removed and the base node gets its original
// output name back, so the result has exactly the base model's nodes and
// names. A weight that other layers also read is copied first, so only the
// adapted layer changes: the copy (named <module>.weight) replaces the
// constant on this layer's path, or, when the sharing happens after a
// Transpose/Identity/Cast that others read too, the layer reads its own
// copy in the orientation and type it multiplies by, so no chain node is
// duplicated.
//
// Adapters are taken from the manifest; a model whose metadata was
// stripped is searched for branches of the shape Inject writes. Merged
// weights that lived in external data are held in memory afterwards (Save
// writes them back out); MergeFile streams instead.
func Merge(m *graph.Model, opts MergeOptions) (*MergeReport, error) {
	p, err := planMerge(m, opts)
	if err != nil {
		return nil, err
	}
	return p.applyInMemory()
}

// MergeFile merges the adapters of the model at src (as Merge does) and
// saves the result to dst, streaming: weights are read, merged and written
// to dst's data file piece by piece by a worker per CPU, so memory stays a
// small fraction of the model's size. Models without external data (and
// save.External == graph.ExternalNever) are merged in memory and saved with
// graph.Model.Save. dst must not be src or its data file.
func MergeFile(src, dst string, opts MergeOptions, save graph.SaveOptions) (*MergeReport, error) {
	m, err := graph.LoadLazy(src)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	p, err := planMerge(m, opts)
	if err != nil {
		return nil, err
	}
	return p.save(dst, save)
}

// sortedKeys returns a map's keys in order, for stable messages.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
