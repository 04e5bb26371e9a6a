// Package export reads and writes the files that carry LoRA adapters outside
// ONNX: safetensors tensor files and HuggingFace PEFT adapter directories
// (adapter_config.json + adapter_model.safetensors).
//
// The safetensors reader validates the whole header before it allocates
// anything for tensor data and then reads each tensor on demand, so large
// files are never loaded whole. Writers are deterministic and atomic (a
// temporary file in the destination folder, fsync, rename).
//
// PEFT adapters are read into one [PEFTModule] per adapted layer, with the
// rank, alpha and scaling resolved the way PEFT resolves them
// (rank_pattern/alpha_pattern, use_rslora). Features that change the LoRA
// arithmetic and that this package does not model (DoRA, LoRA biases,
// embedding LoRA, convolution LoRA, PiSSA-style initialisations that alter
// the base weights, ...) are refused with an error wrapping [ErrUnsupported],
// so a merge can never silently produce a wrong model.
package export
