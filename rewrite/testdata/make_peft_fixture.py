#!/usr/bin/python3
"""Make the PEFT fixtures for rewrite/peft_test.go, independently of onnxlora.

For two small torch models this writes, under rewrite/testdata/<name>/:

  base.onnx                    the model exported by torch.onnx.export
  merged.onnx                  the model with the LoRA deltas merged by torch
                               (W + scaling * B @ A, as PEFT's merge does)
  adapter/adapter_config.json  a PEFT LoRA config
  adapter/adapter_model.safetensors
                               lora_A [r, in] / lora_B [out, r] under PEFT's
                               keys, written by hand (no peft or safetensors
                               package is installed here)
  expected.json                a fixed input and torch's merged outputs

Models:

  peft-llama   Llama-shaped (nn.Linear, exported as MatMul on a transposed
               weight copy): q/v/down_proj and lm_head adapted, with
               rank_pattern, alpha_pattern and use_rslora.
  peft-gpt2    GPT-2-shaped with transformers' Conv1D (weight [in, out],
               exported as Gemm without transB) and fan_in_fan_out=true. The
               adapter is for the LM-head model (keys
               "transformer.h.0.attn.c_attn"), the ONNX file is the bare
               transformer (modules "h.0.attn.c_attn"), so matching needs the
               dotted-suffix rule.

Run with Debian's torch and onnx (hence /usr/bin/python3):

    /usr/bin/python3 -B rewrite/testdata/make_peft_fixture.py

Deterministic: fixed seeds, no timestamps.
"""

import json
import math
import os
import re
import struct

import numpy as np
import onnx
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
torch.use_deterministic_algorithms(True)


# ---- models ----

class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.o_proj(a @ v)


class MLP(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, h):
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Layer(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = Attention(d)
        self.post_attention_layernorm = nn.LayerNorm(d)
        self.mlp = MLP(d, inter)

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, vocab, d, inter, n):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Layer(d, inter) for _ in range(n)])
        self.norm = nn.LayerNorm(d)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    def __init__(self, vocab=32, d=16, inter=24, n=2):
        super().__init__()
        self.model = LlamaModel(vocab, d, inter, n)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        return self.lm_head(self.model(ids))


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a Linear whose weight is [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)

    def forward(self, h):
        q, k, v = self.c_attn(h).split(h.shape[-1], dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.c_proj(a @ v)


class GPT2MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)

    def forward(self, h):
        return self.c_proj(torch.tanh(self.c_fc(h)))


class GPT2Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = GPT2Attention(d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = GPT2MLP(d)

    def forward(self, h):
        h = h + self.attn(self.ln_1(h))
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, vocab=32, d=16, n=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([GPT2Block(d) for _ in range(n)])
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids):
        h = self.wte(ids)
        for block in self.h:
            h = block(h)
        return self.ln_f(h)


class GPT2LMHeadModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = GPT2Model()
        self.lm_head = nn.Linear(16, 32, bias=False)

    def forward(self, ids):
        return self.lm_head(self.transformer(ids))


# ---- PEFT semantics, written out ----

def pattern_value(patterns, name, default):
    """PEFT's get_pattern_key: first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for k, v in patterns.items():
        if re.match(rf"(.*\.)?({k})$", name):
            return v
    return default


def targeted(targets, name):
    return any(name == t or name.endswith("." + t) for t in targets)


def write_safetensors(path, tensors):
    """safetensors by hand: u64 LE header size, JSON header (8-byte aligned
    with spaces), then the raw little-endian data in header order."""
    header = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name].detach().numpy().astype("<f4"))
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def make_adapter(model, config, seed):
    """Random lora_A/lora_B for every targeted Linear/Conv1D of model,
    keyed as PEFT saves them, and the merged copy of the model."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    merged = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, Conv1D)) or not targeted(config["target_modules"], name):
            continue
        r = pattern_value(config["rank_pattern"], name, config["r"])
        alpha = pattern_value(config["alpha_pattern"], name, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        w = mod.weight
        if config["fan_in_fan_out"]:
            fin, fout = w.shape  # Conv1D stores [in, out]
        else:
            fout, fin = w.shape
        a = torch.randn(r, fin, generator=g) / math.sqrt(fin)
        b = torch.randn(fout, r, generator=g) * 0.5
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        # PEFT's get_delta_weight: transpose(B @ A, fan_in_fan_out) * scaling,
        # computed here in float64 and rounded once.
        delta = b.double() @ a.double()
        if config["fan_in_fan_out"]:
            delta = delta.T
        merged[name] = (w.double() + scaling * delta).float()
    return tensors, merged


def export(model, path, ids):
    torch.onnx.export(model, (ids,), path, input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
                      opset_version=17, do_constant_folding=True)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)


def build(name, peft_model, onnx_model, config, seed):
    out = os.path.join(HERE, name)
    os.makedirs(os.path.join(out, "adapter"), exist_ok=True)
    ids = torch.tensor([[3, 17, 5, 30, 1], [8, 0, 22, 11, 9]], dtype=torch.int64)
    onnx_model.eval()
    export(onnx_model, os.path.join(out, "base.onnx"), ids)
    tensors, merged = make_adapter(peft_model, config, seed)
    write_safetensors(os.path.join(out, "adapter", "adapter_model.safetensors"), tensors)
    with open(os.path.join(out, "adapter", "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for mod_name, w in merged.items():
            modules[mod_name].weight.copy_(w)
    export(onnx_model, os.path.join(out, "merged.onnx"), ids)
    with torch.no_grad():
        logits = onnx_model(ids)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"input_ids": {"shape": list(ids.shape), "data": ids.flatten().tolist()},
                   "logits": {"shape": list(logits.shape), "data": [float(x) for x in logits.flatten()]},
                   "modules": sorted(merged)}, f, indent=1)
        f.write("\n")


def base_config(**kw):
    c = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": 8, "lora_dropout": 0.0,
        "modules_to_save": None, "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": None,
        "target_modules": [], "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    c.update(kw)
    return c


def main():
    torch.manual_seed(0)
    llama = LlamaForCausalLM()
    build("peft-llama", llama, llama, base_config(
        base_model_name_or_path="onnxlora/tiny-llama",
        target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
        rank_pattern={"model.layers.1.self_attn.v_proj": 2},
        alpha_pattern={"down_proj": 4},
        use_rslora=True,
    ), seed=1)

    torch.manual_seed(1)
    gpt2 = GPT2LMHeadModel()
    build("peft-gpt2", gpt2, gpt2.transformer, base_config(
        base_model_name_or_path="onnxlora/tiny-gpt2",
        target_modules=["c_attn", "c_proj"],
        r=4, lora_alpha=16, fan_in_fan_out=True,
    ), seed=2)


if __name__ == "__main__":
    main()
