// Package inspect describes an ONNX model from the point of view of LoRA:
// which layers can take an adapter, which ones a selection would adapt, and
// which adapters the model already carries.
//
// Build gathers everything into a Report, a plain struct with JSON tags:
//
//	m, err := graph.Load("model.onnx")
//	...
//	r, err := inspect.Build(m, inspect.Options{
//		Select: &rewrite.SelectOptions{Targets: []string{"q_proj", "v_proj"}, Rank: 8, Alpha: 16},
//	})
//
// The report holds:
//
//   - the model's header: producer, IR version, opsets, file size, node and
//     parameter counts, and the external data files it references (read
//     from the protobuf only; weights are not loaded);
//   - every adaptable layer (a MatMul or Gemm with a constant 2-D float
//     weight, as rewrite.FindLayers finds them) with its module path, node,
//     weight, shape [in, out], dtype, parameter count and whether the weight
//     is shared with other nodes;
//   - when Options.Select is set, the layers the same matcher as
//     rewrite.Inject would adapt, with their rank and alpha and PEFT's
//     "trainable params" line for the result;
//   - the adapters listed in the model's manifest (rewrite.ReadManifest) with
//     rank, alpha, scaling and the Frobenius norm of their weight update
//     scaling·A·B, computed from the r×r Gram matrices of A and B without
//     forming the product;
//   - the MatMul-like nodes that were skipped, and why.
//
// A report renders three ways: WriteText (aligned tables for people),
// WriteJSON (stable, indented JSON for scripts; the schema is documented in
// docs/reference.md and versioned by Report.SchemaVersion) and WriteDOT (a
// Graphviz drawing with one cluster per layer showing the input x, the base
// weight and node, and the adapter's A, B, scaling and Add).
package inspect
