// Package train fine-tunes the trainable tensors of an ONNX model (the
// lora_A/lora_B initializers an injected model's manifest lists) on ONNX
// Runtime, with PyTorch's semantics: AdamW and SGD as torch.optim defines
// them, learning-rate schedules as transformers defines them, and global-norm
// clipping as torch.nn.utils.clip_grad_norm_.
//
// The step graph (built by package autodiff) computes the loss and the
// gradients; the trainable values live here, in float64, are fed to the
// session each step and updated by the optimizer in Go. Frozen weights stay
// inside the session, which is opened once.
//
// Data is JSONL: one object a line whose keys name graph inputs, plus
// optional "labels". Batches are right-padded; missing attention_mask and
// position_ids are filled (see Dataset).
package train
