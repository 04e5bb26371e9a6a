// Command onnxlora adds LoRA adapters to ONNX models and merges trained
// adapters back, so fine-tuned models run in any ONNX runtime without Python.
//
// Usage:
//
//	onnxlora inspect MODEL [--target q_proj,v_proj] [--json | --dot [--layer REGEX]]
//	onnxlora inject MODEL -o OUT --target q_proj,v_proj --rank 8 --alpha 16 [--dry-run]
//	onnxlora merge MODEL -o OUT [--only MODULES] [--scale F] [--safe]
//	onnxlora merge BASE --adapter PEFT_DIR -o OUT
//	onnxlora export-adapter MODEL -o PEFT_DIR
//	onnxlora verify A B [--samples N] [--dim name=value] [--rtol R --atol A]
//	onnxlora version
//	onnxlora completion bash|zsh|fish|powershell
//
// inspect lists the MatMul/Gemm layers that can take an adapter (module path,
// node, weight, shape [in,out], dtype, parameters, sharing), which of them a
// selection would adapt, the adapters already in the model with the norm of
// their update, and the nodes that were skipped and why. inject adds the
// adapters, writes their description (the manifest) into the model's
// metadata and prints PEFT's "trainable params" line. merge folds trained
// adapters into the base weights, or applies a PEFT adapter directory to an
// ONNX export of its base model; export-adapter writes the adapters as a PEFT
// directory; verify runs two models in ONNX Runtime on the same inputs and
// compares every output.
//
// Layers are named by PEFT-style module paths derived from node and weight
// names, and --target, --target-regex, --exclude, --layers, --rank-pattern
// and --alpha-pattern follow PEFT's LoraConfig rules. See docs/guide.md for
// the full lifecycle (inspect, inject, train, merge) and docs/reference.md
// for naming rules, the manifest and the inspect JSON schema.
//
// Exit status: 0 on success, 1 on failure, 2 on a usage error. Errors are
// one line on stderr: "onnxlora: <message>".
package main

import "os"

func main() {
	os.Exit(Main(NewFactory(SystemIO()), os.Args[1:]))
}
