#!/usr/bin/env python3
"""Make the small fixtures the export package's tests read.

Uses PyTorch only to make the numbers and the 16-bit conversions (the
safetensors Python package is not available here), and writes the
safetensors layout by hand the way the reference writer does: header JSON
with "__metadata__" first, tensors ordered by dtype (widest first) then
name, compact separators, padded with spaces to a multiple of 8 bytes.

Run from anywhere:  /usr/bin/python3 export/testdata/make_peft_fixture.py
Outputs (next to this script):
  peft_adapter/adapter_config.json      PEFT-style config (sort_keys, indent 2)
  peft_adapter/adapter_model.safetensors
  peft_expected.json                    per-module rank/alpha/scaling and A, B
  dtypes.safetensors                    one tensor per dtype, edge values
  dtypes_expected.json                  decoded values and torch's 16-bit bits
  pattern_expected.json                 get_pattern_key results from Python's re
"""
import json
import math
import os
import re
import struct

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# Reference Dtype enum order (safetensors/src/tensor.rs); writer sorts by it.
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
               "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
TORCH_DTYPE = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}


def tensor_bytes(t):
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.view(torch.int16)
    return t.numpy().tobytes()  # little-endian on this machine


def save_safetensors(path, tensors, metadata=None):
    items = sorted(tensors.items(),
                   key=lambda kv: (-DTYPE_ORDER.index(TORCH_DTYPE[kv[1].dtype]), kv[0]))
    header = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    blobs, off = [], 0
    for name, t in items:
        b = tensor_bytes(t)
        header[name] = {"dtype": TORCH_DTYPE[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def get_pattern_key(pattern_keys, key_to_match):
    """PEFT's peft.utils.other.get_pattern_key."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def make_peft():
    torch.manual_seed(1234)
    config = {
        "alpha_pattern": {"q_proj": 16},
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": False,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 4,
        "rank_pattern": {"model.layers.1.self_attn.v_proj": 2},
        "revision": None,
        "target_modules": ["v_proj", "q_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    hidden, kv = 8, 4
    modules = {}
    for layer in range(2):
        for proj, out in (("q_proj", hidden), ("v_proj", kv)):
            modules[f"model.layers.{layer}.self_attn.{proj}"] = out
    tensors, expected = {}, []
    for name, out in modules.items():
        rkey = get_pattern_key(config["rank_pattern"].keys(), name)
        akey = get_pattern_key(config["alpha_pattern"].keys(), name)
        r = config["rank_pattern"].get(rkey, config["r"])
        alpha = config["alpha_pattern"].get(akey, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        a = torch.randn(r, hidden, dtype=torch.float32) / 4
        b = torch.randn(out, r, dtype=torch.float32) / 4
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        expected.append({
            "name": name, "rank": r, "alpha": alpha, "scaling": scaling,
            "in_features": hidden, "out_features": out,
            "a": [float(x) for x in a.flatten().tolist()],
            "b": [float(x) for x in b.flatten().tolist()],
            # delta W = scaling * B @ A, for checking merges elsewhere.
            "delta": [float(x) for x in (scaling * (b.double() @ a.double())).flatten().tolist()],
        })
    d = os.path.join(HERE, "peft_adapter")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)  # as PEFT's save_pretrained
    save_safetensors(os.path.join(d, "adapter_model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(HERE, "peft_expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


def make_dtypes():
    edge = [0.0, -0.0, 1.0, -2.5, 65504.0, 65520.0, 1e-8, 6e-8, 3.0e38,
            float("inf"), float("-inf"), float("nan"), 1.00390625, 1.01171875,
            1 + 2 ** -8, 1 + 3 * 2 ** -8, 0.1, -1234.5678, 1e-40]
    src = torch.tensor(edge, dtype=torch.float32)
    tensors = {
        "f32": src,
        "f16": src.to(torch.float16),
        "bf16": src.to(torch.bfloat16),
        "f64": torch.tensor([math.pi, -1e300, 5e-324, 2.0 ** 60], dtype=torch.float64),
        "i64": torch.tensor([[1, -2], [3, 2 ** 40]], dtype=torch.int64),
        "i32": torch.tensor([7, -7, 2 ** 31 - 1], dtype=torch.int32),
        "u8": torch.tensor([0, 255, 17], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True], dtype=torch.bool),
        "scalar": torch.tensor(42.5, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }
    save_safetensors(os.path.join(HERE, "dtypes.safetensors"), tensors,
                     {"format": "pt", "note": "edge values"})

    def reprs(t):
        return [repr(float(x)) for x in t.double().flatten().tolist()]

    def bits16(t):
        return [int(x) & 0xFFFF for x in t.view(torch.int16).flatten().tolist()]

    # Narrowing checks: float32 bit patterns around halfway points and NaNs.
    patterns = [0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x7F7FFFFF,
                0xFF7FFFFF, 0x7F800000, 0x7FC00000, 0x7F800001, 0xFFC00001,
                0x00000001, 0x80008000, 0x33000000, 0x33000001, 0x387FC000,
                0x477FF000, 0x477FEFFF, 0x3DCCCCCD]
    fp = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    expected = {
        "names": sorted(tensors),
        "metadata": {"format": "pt", "note": "edge values"},
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "dtypes": {k: TORCH_DTYPE[v.dtype] for k, v in tensors.items()},
        "values": {k: reprs(v) for k, v in tensors.items()
                   if v.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)},
        "raw_hex": {k: tensor_bytes(v).hex() for k, v in tensors.items()},
        "narrow_f32_bits": patterns,
        "narrow_bf16_bits": bits16(fp.to(torch.bfloat16)),
        "narrow_f16_bits": bits16(fp.to(torch.float16)),
    }
    with open(os.path.join(HERE, "dtypes_expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


def make_patterns():
    names = ["q_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.12.self_attn.v_proj", "model.xq_proj", "model.layers.0.mlp.up_proj",
             "encoder.q_proj", "model.q_proj.extra"]
    key_lists = [
        ["q_proj"], ["v_proj", "q_proj"], ["self_attn.q_proj"], ["layers.1.self_attn.q_proj"],
        ["^q_proj"], ["q_proj|v_proj"], [r"layers\.1[0-9]?\..*"], ["layers.0.*", "q_proj"],
        ["q_proj", "layers.0.*"], ["proj"], [".*proj"], ["model.layers.0.self_attn.q_proj"],
        ["(q|v)_proj"], ["up_proj", "mlp.up_proj"], ["model"], [],
    ]
    cases = []
    for keys in key_lists:
        for name in names:
            got = get_pattern_key(keys, name)
            cases.append({"keys": keys, "name": name, "match": got if got in keys else None})
    with open(os.path.join(HERE, "pattern_expected.json"), "w") as f:
        json.dump(cases, f, indent=0)


if __name__ == "__main__":
    make_peft()
    make_dtypes()
    make_patterns()
