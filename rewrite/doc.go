// Package rewrite finds the layers of an ONNX model that can take LoRA
// adapters, injects adapters into them, and merges trained adapters back.
//
// A layer is a MatMul or Gemm node whose second input is a constant 2-D
// weight, reached directly or through Identity, Transpose and Cast nodes
// (FindLayers). Each layer has a PEFT-style module path derived from its
// node name or weight name (ModulePath), so the targets PEFT users write,
// such as "q_proj" or "all-linear", select the same layers here (Select,
// SelectOptions).
//
// Inject adds beside each selected layer the branch
//
//	y = base(x) + scaling * ((dropout(x) · A) · B)
//
// with A [in, r] small random and B [r, out] zero, so the model computes
// what it did until the adapters are trained. A Manifest in the model's
// metadata records every adapter for Merge and for training tools.
//
// Merge folds adapters into their base weights (W += scaling · A·B,
// computed in float64 and rounded once) and removes the branches, leaving
// the base graph with new weights; ApplyPEFT does the same from a PEFT
// adapter directory.
package rewrite
