// Package autodiff differentiates ONNX graphs into ONNX: Build appends a
// loss and the reverse-mode gradient of that loss with respect to chosen
// initializers, written with standard ai.onnx ops only, so the resulting
// step graph runs on any inference build of ONNX Runtime.
//
// Each op's vector-Jacobian product is one entry in a table (rules*.go),
// in the spirit of PyTorch's derivatives.yaml. Shapes are read at run time
// (Shape, broadcasting reduced by axes computed from the two shapes), so a
// step graph works for any batch size and sequence length. Only the nodes
// on a path from a trainable initializer to the loss are differentiated;
// integer shape arithmetic carries no gradient; an op on that path without
// a rule is an error that names the node.
package autodiff
