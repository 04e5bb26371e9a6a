#!/usr/bin/python3
"""Generate the small ONNX test models in testdata/models/.

Run with the Debian interpreter that has torch 1.13 and onnx 1.12:

    /usr/bin/python3 testdata/models/generate.py            # or scripts/gen-testdata.sh

Everything is deterministic (fixed seeds, no timestamps); re-running the
script rewrites byte-identical files.  The script asserts for every model:

  * onnx.checker.check_model(path, full_check=True) passes;
  * a small float64 numpy reference evaluator (this onnx version has no
    onnx.reference) run on the saved file reproduces the torch outputs;
  * optionally (--ort-binding PATH or $ORT_NODE_BINDING), ONNX Runtime itself
    runs the saved file and reproduces the outputs.  ONNX Runtime is not a
    Python package here, so this goes through the onnxruntime-node native
    binding (onnxruntime_binding.node, next to its libonnxruntime.so.1) and the
    `node` executable.

It also writes golden.json: for each of the first seven models, a fixed input
and the expected outputs (float64 reference evaluation of the saved model,
rounded to 6 significant digits) plus a tolerance, for tests of the Go runtime
wrapper; and, from torch in float64 (see README.md for the formats):

  * testdata/grad/<case>.json: loss and gradients of LoRA-injected models,
    checked against the ONNX file by the reference evaluator and finite
    differences;
  * testdata/train/<case>.json + .jsonl: AdamW/SGD training runs with
    onnxlora train's semantics (per-step loss, lr, grad norm, final adapters);
  * testdata/data/: a bigram dataset for tiny-llama and what a torch LoRA
    fine-tune reaches on it.
"""

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 17
SEED = 1234

# --------------------------------------------------------------------------
# torch models
# --------------------------------------------------------------------------

GPT_VOCAB, GPT_HIDDEN, GPT_HEADS, GPT_LAYERS, GPT_FFN, GPT_MAXPOS = 64, 32, 4, 2, 64, 32


class GPTAttention(nn.Module):
    """Causal self-attention written with plain torch ops (Qwen-like: q/k/v with bias, o without)."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=True)
        self.k_proj = nn.Linear(hidden, hidden, bias=True)
        self.v_proj = nn.Linear(hidden, hidden, bias=True)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        b, t, h = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        pos = torch.arange(t, device=x.device)
        causal = pos.unsqueeze(0) <= pos.unsqueeze(1)  # [t, t], True where key <= query
        scores = scores.masked_fill(~causal, -1.0e4)
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h)
        return self.o_proj(ctx)


class GPTMLP(nn.Module):
    """Llama-style gated MLP, no biases."""

    def __init__(self, hidden, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class GPTLayer(nn.Module):
    def __init__(self, hidden, heads, ffn):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.self_attn = GPTAttention(hidden, heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.mlp = GPTMLP(hidden, ffn)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(GPT_VOCAB, GPT_HIDDEN)
        self.embed_positions = nn.Embedding(GPT_MAXPOS, GPT_HIDDEN)
        self.layers = nn.ModuleList([GPTLayer(GPT_HIDDEN, GPT_HEADS, GPT_FFN) for _ in range(GPT_LAYERS)])
        self.norm = nn.LayerNorm(GPT_HIDDEN)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(pos)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TinyGPT(nn.Module):
    """GPT-like decoder; lm_head is NOT tied (tying is covered by shared-weight.onnx)."""

    def __init__(self):
        super().__init__()
        self.model = GPTModel()
        self.lm_head = nn.Linear(GPT_HIDDEN, GPT_VOCAB, bias=False)

    def forward(self, input_ids):
        return self.lm_head(self.model(input_ids))


BERT_VOCAB, BERT_HIDDEN, BERT_HEADS, BERT_LAYERS, BERT_FFN, BERT_MAXPOS = 64, 32, 4, 2, 64, 32


class BertSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads, self.head_dim = BERT_HEADS, BERT_HIDDEN // BERT_HEADS
        self.query = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)
        self.key = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)
        self.value = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)

    def forward(self, x, ext_mask):
        b, t, h = x.shape
        q = self.query(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + ext_mask
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h)


class BertSelfOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)
        self.LayerNorm = nn.LayerNorm(BERT_HIDDEN, eps=1e-12)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self):
        super().__init__()
        setattr(self, "self", BertSelfAttention())  # HF naming: attention.self.query
        self.output = BertSelfOutput()

    def forward(self, x, ext_mask):
        return self.output(getattr(self, "self")(x, ext_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(BERT_HIDDEN, BERT_FFN)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(BERT_FFN, BERT_HIDDEN)
        self.LayerNorm = nn.LayerNorm(BERT_HIDDEN, eps=1e-12)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = BertAttention()
        self.intermediate = BertIntermediate()
        self.output = BertOutput()

    def forward(self, x, ext_mask):
        a = self.attention(x, ext_mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer() for _ in range(BERT_LAYERS)])

    def forward(self, x, ext_mask):
        for layer in self.layer:
            x = layer(x, ext_mask)
        return x


class BertEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(BERT_VOCAB, BERT_HIDDEN)
        self.position_embeddings = nn.Embedding(BERT_MAXPOS, BERT_HIDDEN)
        self.LayerNorm = nn.LayerNorm(BERT_HIDDEN, eps=1e-12)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos))


class BertPooler(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))  # 2-D input -> exported as Gemm(transB=1)


class TinyBert(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = BertEmbeddings()
        self.encoder = BertEncoder()
        self.pooler = BertPooler()

    def forward(self, input_ids, attention_mask):
        ext_mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
        h = self.encoder(self.embeddings(input_ids), ext_mask)
        return h, self.pooler(h)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


LL_VOCAB, LL_HIDDEN, LL_HEADS, LL_LAYERS, LL_FFN, LL_THETA, LL_EPS = 64, 32, 4, 2, 64, 10000.0, 1e-6


class LlamaRMSNorm(nn.Module):
    """RMSNorm written out (pow/mean/rsqrt/mul) so it exports as elementary ops."""

    def __init__(self, hidden, eps=LL_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads, self.head_dim = LL_HEADS, LL_HIDDEN // LL_HEADS
        self.q_proj = nn.Linear(LL_HIDDEN, LL_HIDDEN, bias=False)
        self.k_proj = nn.Linear(LL_HIDDEN, LL_HIDDEN, bias=False)
        self.v_proj = nn.Linear(LL_HIDDEN, LL_HIDDEN, bias=False)
        self.o_proj = nn.Linear(LL_HIDDEN, LL_HIDDEN, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, h = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h)
        return self.o_proj(ctx)


class LlamaLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(LL_HIDDEN)
        self.self_attn = LlamaAttention()
        self.post_attention_layernorm = LlamaRMSNorm(LL_HIDDEN)
        self.mlp = GPTMLP(LL_HIDDEN, LL_FFN)  # gate/up/down, SiLU, no biases

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(LL_VOCAB, LL_HIDDEN)
        self.layers = nn.ModuleList([LlamaLayer() for _ in range(LL_LAYERS)])
        self.norm = nn.LayerNorm(LL_HIDDEN)  # final norm: LayerNormalization at opset 17
        hd = LL_HIDDEN // LL_HEADS
        inv_freq = 1.0 / (LL_THETA ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, attention_mask, position_ids):
        x = self.embed_tokens(input_ids)
        # rotary tables from position_ids: [b, 1, t, head_dim]
        freqs = position_ids[:, :, None].to(x.dtype) * self.inv_freq.to(x.dtype)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        # additive mask [b, 1, t, t]: 0 where the key is at or before the query and not padding
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        causal = pos.unsqueeze(0) <= pos.unsqueeze(1)
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = (~allowed).to(x.dtype) * -1.0e4
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class TinyLlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = LlamaModel()
        self.lm_head = nn.Linear(LL_HIDDEN, LL_VOCAB, bias=False)

    def forward(self, input_ids, attention_mask, position_ids):
        return self.lm_head(self.model(input_ids, attention_mask, position_ids))


G2_VOCAB, G2_HIDDEN, G2_HEADS, G2_LAYERS, G2_FFN, G2_MAXPOS = 64, 32, 4, 2, 64, 32


class GPT2Attention(nn.Module):
    """GPT-2-style attention with separate q/k/v (all Linear layers have biases)."""

    def __init__(self):
        super().__init__()
        self.heads, self.head_dim = G2_HEADS, G2_HIDDEN // G2_HEADS
        self.q_proj = nn.Linear(G2_HIDDEN, G2_HIDDEN)
        self.k_proj = nn.Linear(G2_HIDDEN, G2_HIDDEN)
        self.v_proj = nn.Linear(G2_HIDDEN, G2_HIDDEN)
        self.c_proj = nn.Linear(G2_HIDDEN, G2_HIDDEN)

    def forward(self, x):
        b, t, h = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        pos = torch.arange(t, device=x.device)
        causal = pos.unsqueeze(0) <= pos.unsqueeze(1)
        scores = scores.masked_fill(~causal, -1.0e4)
        probs = torch.softmax(scores, dim=-1)
        return self.c_proj(torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h))


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(G2_HIDDEN, G2_FFN)
        self.act = nn.GELU()  # exact (erf) GELU
        self.c_proj = nn.Linear(G2_FFN, G2_HIDDEN)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(G2_HIDDEN)
        self.attn = GPT2Attention()
        self.ln_2 = nn.LayerNorm(G2_HIDDEN)
        self.mlp = GPT2MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(G2_VOCAB, G2_HIDDEN)
        self.wpe = nn.Embedding(G2_MAXPOS, G2_HIDDEN)
        self.h = nn.ModuleList([GPT2Block() for _ in range(G2_LAYERS)])
        self.ln_f = nn.LayerNorm(G2_HIDDEN)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class TinyGPT2(nn.Module):
    """GPT-2-like decoder (HF GPT-2 module names, q/k/v unfused); exported at opset 14."""

    def __init__(self):
        super().__init__()
        self.transformer = GPT2Model()
        self.lm_head = nn.Linear(G2_HIDDEN, G2_VOCAB, bias=False)

    def forward(self, input_ids):
        return self.lm_head(self.transformer(input_ids))


class MLPClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def randomize_norms(module, g):
    """Give norm weights/biases distinct random values so torch.onnx does not deduplicate them."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight") or name.split(".")[-2] in ("norm", "ln_1", "ln_2", "ln_f"):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------
# float64 numpy reference evaluator (onnx 1.12 has no onnx.reference)
# --------------------------------------------------------------------------

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
INT_TYPES = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}


def _tensor(t, base_dir):
    a = numpy_helper.to_array(t, base_dir)
    return a.astype(np.float64) if t.data_type in FLOAT_TYPES else a


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _layernorm(x, scale, bias, axis, eps):
    axes = tuple(range(axis % x.ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * scale
    return y + bias if bias is not None else y


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _slice(x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    sl = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        sl[a] = slice(int(s), int(max(min(e, 2**62), -(2**62))), int(st))
    return x[tuple(sl)]


def reference_run(model_path, feeds, overrides=None, lora=None, model=None):
    """Evaluate an ONNX model in float64 numpy. All float types are computed as float64.

    overrides replaces initializer values by name. lora maps a MatMul/Gemm node name to (A [in, r],
    B [r, out], scaling) and adds scaling * (x @ A) @ B to that node's output, as a LoRA branch would.
    """
    model = model or onnx.load(model_path)  # loads external data relative to the file
    base_dir = os.path.dirname(model_path)
    env = {t.name: _tensor(t, base_dir) for t in model.graph.initializer}
    for name, arr in (overrides or {}).items():
        assert name in env, "no initializer " + name
        env[name] = np.asarray(arr, dtype=np.float64)
    for name, arr in feeds.items():
        env[name] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr
    for node in model.graph.node:
        a = _attrs(node)
        x = [env[i] if i else None for i in node.input]
        op = node.op_type
        if op == "Constant":
            y = _tensor(a["value"], base_dir)
        elif op == "Identity":
            y = x[0]
        elif op in ("Add", "Sub", "Mul", "Div", "Pow"):
            f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}[op]
            y = f(x[0], x[1])
            if op == "Div" and x[0].dtype.kind in "iu":
                y = np.trunc(y).astype(x[0].dtype)
        elif op == "MatMul":
            y = np.matmul(x[0], x[1])
        elif op == "Gemm":
            A = x[0].T if a.get("transA", 0) else x[0]
            B = x[1].T if a.get("transB", 0) else x[1]
            y = a.get("alpha", 1.0) * (A @ B)
            if len(x) > 2 and x[2] is not None:
                y = y + a.get("beta", 1.0) * x[2]
        elif op == "Gather":
            y = np.take(x[0], x[1], axis=a.get("axis", 0))
        elif op == "Shape":
            y = np.array(x[0].shape, dtype=np.int64)
        elif op == "Reshape":
            shape = [int(s) for s in x[1]]
            shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
            y = x[0].reshape(shape)
        elif op == "Transpose":
            y = np.transpose(x[0], a.get("perm"))
        elif op == "Unsqueeze":
            y = x[0]
            for ax in sorted(int(v) % (x[0].ndim + len(x[1])) for v in x[1]):
                y = np.expand_dims(y, ax)
        elif op == "Squeeze":
            y = np.squeeze(x[0], axis=tuple(int(v) for v in x[1]))
        elif op == "Concat":
            y = np.concatenate(x, axis=a["axis"])
        elif op == "Slice":
            y = _slice(x[0], *[v for v in x[1:]])
        elif op == "Range":
            y = np.arange(x[0], x[1], x[2]).astype(x[0].dtype)
        elif op == "Expand":
            y = x[0] * np.ones([int(s) for s in x[1]], dtype=x[0].dtype)
        elif op == "ConstantOfShape":
            v = _tensor(a["value"], base_dir) if "value" in a else np.zeros(1)
            y = np.full([int(s) for s in x[0]], v.reshape(-1)[0], dtype=v.dtype)
        elif op == "Cast":
            to = a["to"]
            y = x[0].astype(np.float64) if to in FLOAT_TYPES else x[0].astype(INT_TYPES[to])
        elif op == "Not":
            y = np.logical_not(x[0])
        elif op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
            f = {"Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal,
                 "Greater": np.greater, "GreaterOrEqual": np.greater_equal}[op]
            y = f(x[0], x[1])
        elif op == "Where":
            y = np.where(x[0], x[1], x[2])
        elif op == "Softmax":
            y = _softmax(x[0], a.get("axis", -1))
        elif op == "LayerNormalization":
            y = _layernorm(x[0], x[1], x[2] if len(x) > 2 else None, a.get("axis", -1), a.get("epsilon", 1e-5))
        elif op == "Relu":
            y = np.maximum(x[0], 0)
        elif op == "Sigmoid":
            y = 1.0 / (1.0 + np.exp(-x[0]))
        elif op == "Tanh":
            y = np.tanh(x[0])
        elif op == "Sqrt":
            y = np.sqrt(x[0])
        elif op == "Erf":
            y = np.vectorize(math.erf)(x[0]) if x[0].size else x[0]
        elif op == "Neg":
            y = -x[0]
        elif op == "Reciprocal":
            y = 1.0 / x[0]
        elif op == "Cos":
            y = np.cos(x[0])
        elif op == "Sin":
            y = np.sin(x[0])
        elif op == "And":
            y = np.logical_and(x[0], x[1])
        elif op in ("ReduceMean", "ReduceSum"):
            axes = a.get("axes") if op == "ReduceMean" or len(x) < 2 or x[1] is None else [int(v) for v in x[1]]
            f = np.mean if op == "ReduceMean" else np.sum
            y = f(x[0], axis=None if axes is None else tuple(axes), keepdims=bool(a.get("keepdims", 1)))
        else:
            raise NotImplementedError("reference evaluator: op %s (node %s)" % (op, node.name))
        if lora and node.name in lora:
            la, lb, ls = lora[node.name]
            xin = x[0].T if op == "Gemm" and a.get("transA", 0) else x[0]
            y = y + ls * ((xin @ la) @ lb)
        env[node.output[0]] = np.asarray(y)
    return {o.name: env[o.name] for o in model.graph.output}


# --------------------------------------------------------------------------
# optional ONNX Runtime check through the onnxruntime-node native binding
# --------------------------------------------------------------------------

ORT_JS = r"""
const binding = require(process.argv[2]);
class Tensor { constructor(type, data, dims) { this.type = type; this.data = data; this.dims = dims; this.location = 'cpu'; } }
binding.initOrtOnce(3, Tensor, true);
const req = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const s = new binding.InferenceSession();
s.loadModel(req.model, {});
const feeds = {};
for (const [name, v] of Object.entries(req.inputs)) {
  let data;
  if (v.type === 'int64') data = BigInt64Array.from(v.data.map(BigInt));
  else if (v.type === 'float32') data = Float32Array.from(v.data);
  else if (v.type === 'float16') data = Uint16Array.from(v.data);  // raw fp16 bits
  else throw new Error('unsupported input type ' + v.type);
  feeds[name] = new Tensor(v.type, data, v.dims);
}
const fetches = {};
for (const m of s.outputMetadata) fetches[m.name] = null;
const out = s.run(feeds, fetches, {});
const res = {};
for (const [name, t] of Object.entries(out)) res[name] = {type: t.type, dims: Array.from(t.dims), data: Array.from(t.data, Number)};
process.stdout.write(JSON.stringify(res));
s.dispose();
"""


def ort_run(binding, model_path, feeds):
    inputs = {}
    for name, arr in feeds.items():
        if arr.dtype == np.int64:
            inputs[name] = {"type": "int64", "dims": list(arr.shape), "data": arr.reshape(-1).tolist()}
        elif arr.dtype == np.float32:
            inputs[name] = {"type": "float32", "dims": list(arr.shape), "data": arr.reshape(-1).tolist()}
        else:
            raise ValueError(arr.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        js = os.path.join(tmp, "ort_run.js")
        with open(js, "w") as f:
            f.write(ORT_JS)
        r = subprocess.run(["node", js, os.path.abspath(binding)], input=json.dumps(
            {"model": os.path.abspath(model_path), "inputs": inputs}), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("ONNX Runtime failed on %s:\n%s" % (model_path, r.stderr))
    out = {}
    for name, v in json.loads(r.stdout).items():
        if v["type"] == "float16":
            a = np.array(v["data"], dtype=np.uint16).view(np.float16)
        else:
            a = np.array(v["data"], dtype={"float32": np.float32, "int64": np.int64}[v["type"]])
        out[name] = a.reshape(v["dims"])
    return out


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def torch_export(module, args, input_names, output_names, dynamic_axes, opset=OPSET):
    module.eval()
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, args, buf, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def save(model, relpath, **kw):
    path = os.path.join(HERE, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kw.get("save_as_external_data"):
        # onnx appends to an existing external data file: start from an empty one
        data = os.path.join(os.path.dirname(path), kw["location"])
        if os.path.exists(data):
            os.remove(data)
    onnx.save_model(model, path, **kw)
    return path


def bf16_bits(a):
    """float32 array -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_tensor(name, a):
    t = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(a.shape))
    t.raw_data = bf16_bits(a).tobytes()
    return t


def bf16_round(a):
    return (bf16_bits(a).astype(np.uint32) << 16).view(np.float32)


def to_np(t):
    return t.detach().cpu().numpy()


def adaptable_layers(model):
    """[(node name, op, weight initializer name, shape, dtype)] for MatMul/Gemm with a constant B."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        src, via = n.input[1], []
        while src not in inits and src in producers and producers[src].op_type in ("Cast", "Transpose", "Identity"):
            via.append(producers[src].op_type)
            src = producers[src].input[0]
        if src in inits:
            t = inits[src]
            attrs = _attrs(n)
            rows.append({"node": n.name, "op": n.op_type + ("(transB=1)" if attrs.get("transB") else ""),
                         "weight": t.name, "shape": list(t.dims),
                         "dtype": TensorProto.DataType.Name(t.data_type), "via": via})
    return rows


class Checker:
    def __init__(self, ort_binding):
        self.ort_binding = ort_binding
        self.golden = {}
        self.summary = []

    def check(self, relpath, feeds, expected, atol, rtol=1e-3, golden=True):
        """check_model + reference evaluator vs torch (+ ORT), and record golden data if golden."""
        path = os.path.join(HERE, relpath)
        onnx.checker.check_model(path, full_check=True)
        ref = reference_run(path, feeds)
        assert list(ref) == list(expected), (list(ref), list(expected))
        d_torch = d_ort = 0.0
        for name, want in expected.items():
            got = ref[name]
            assert got.shape == want.shape, (relpath, name, got.shape, want.shape)
            assert np.allclose(got, want.astype(np.float64), atol=atol, rtol=rtol), (
                relpath, name, float(np.abs(got - want).max()))
            d_torch = max(d_torch, float(np.abs(got - want).max()))
        status = "reference==torch (max diff %.1e)" % d_torch
        if self.ort_binding:
            ort = ort_run(self.ort_binding, path, feeds)
            for name, want in ref.items():
                got = ort[name].astype(np.float64)
                assert got.shape == want.shape, (relpath, name, got.shape, want.shape)
                assert np.allclose(got, want, atol=atol, rtol=rtol), (
                    "ORT mismatch", relpath, name, float(np.abs(got - want).max()))
                d_ort = max(d_ort, float(np.abs(got - want).max()))
            status += ", ORT==reference (max diff %.1e)" % d_ort
        model = onnx.load(path, load_external_data=False)
        self.summary.append((relpath, adaptable_layers(model)))
        print("ok  %-36s %s" % (relpath, status))
        if not golden:  # golden.json keeps the original models only; newer ones have grad/train cases
            return
        self.golden[relpath] = {
            "inputs": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "data": v.reshape(-1).tolist()}
                       for k, v in feeds.items()},
            "outputs": {k: {"dtype": onnx_out_dtype(model, k), "shape": list(v.shape),
                            "data": [float("%.6g" % x) for x in v.reshape(-1)]} for k, v in ref.items()},
            "atol": atol, "rtol": rtol,
        }


def onnx_out_dtype(model, name):
    for o in model.graph.output:
        if o.name == name:
            return {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}[o.type.tensor_type.elem_type]
    raise KeyError(name)


# --------------------------------------------------------------------------
# model builders
# --------------------------------------------------------------------------


def gpt_inputs():
    g = np.random.RandomState(7)
    return {"input_ids": g.randint(0, GPT_VOCAB, size=(2, 5)).astype(np.int64)}


def build_tiny_gpt(ck):
    torch.manual_seed(SEED)
    m = TinyGPT().eval()
    ids = torch.zeros(1, 3, dtype=torch.int64)  # trace input; axes are exported dynamic
    model = torch_export(m, (ids,), ["input_ids"], ["logits"],
                         {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}})
    feeds = gpt_inputs()
    with torch.no_grad():
        want = {"logits": to_np(m(torch.from_numpy(feeds["input_ids"])))}
    save(model, "tiny-gpt.onnx")
    ck.check("tiny-gpt.onnx", feeds, want, atol=1e-4)

    # 5. same model, weights in an external data file (tensors >= 1 KiB external, small ones inline)
    ext = onnx.load_from_string(model.SerializeToString())
    save(ext, "tiny-gpt-extdata/model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
         location="model.onnx.data", size_threshold=1024, convert_attribute=False)
    ck.check("tiny-gpt-extdata/model.onnx", feeds, want, atol=1e-4)

    # 4. float16 copy: all float tensors and compute converted to float16 after export
    fp16 = convert_to_fp16(onnx.load_from_string(model.SerializeToString()))
    save(fp16, "tiny-gpt-fp16.onnx")
    # reference (float16 weights, float64 compute) vs float32 torch: ~6e-4 (weight rounding);
    # ORT float16 compute vs reference: ~5e-4 with ORT 1.30. Logits are O(1).
    ck.check("tiny-gpt-fp16.onnx", feeds, want, atol=5e-3, rtol=1e-2)
    return model


def _fp16_tensor(t):
    if t.data_type != TensorProto.FLOAT:
        return t
    a = numpy_helper.to_array(t)
    assert np.all(np.abs(a) < 65504), t.name
    n = numpy_helper.from_array(a.astype(np.float16), t.name)
    return n


def convert_to_fp16(model):
    """Convert an exported float32 graph to float16 end to end (weights, constants, compute, output)."""
    g = model.graph
    new_inits = [_fp16_tensor(t) for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(new_inits)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_fp16_tensor(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del g.value_info[:]
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True), full_check=True)
    return model


def build_tiny_bert(ck):
    torch.manual_seed(SEED + 1)
    m = TinyBert().eval()
    ids = torch.zeros(1, 3, dtype=torch.int64)
    mask = torch.ones(1, 3, dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    model = torch_export(m, (ids, mask), ["input_ids", "attention_mask"], ["last_hidden_state", "pooler_output"],
                         {"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes,
                          "pooler_output": {0: "batch"}})
    g = np.random.RandomState(8)
    feeds = {"input_ids": g.randint(0, BERT_VOCAB, size=(2, 6)).astype(np.int64),
             "attention_mask": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=np.int64)}
    with torch.no_grad():
        h, p = m(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    save(model, "tiny-bert.onnx")
    ck.check("tiny-bert.onnx", feeds, {"last_hidden_state": to_np(h), "pooler_output": to_np(p)}, atol=1e-4)


def build_mlp_gemm(ck):
    torch.manual_seed(SEED + 2)
    m = MLP().eval()
    model = torch_export(m, (torch.zeros(1, 16),), ["input"], ["output"],
                         {"input": {0: "batch"}, "output": {0: "batch"}})
    feeds = {"input": np.random.RandomState(9).randn(3, 16).astype(np.float32)}
    with torch.no_grad():
        want = {"output": to_np(m(torch.from_numpy(feeds["input"])))}
    save(model, "mlp-gemm-transb.onnx")
    ck.check("mlp-gemm-transb.onnx", feeds, want, atol=1e-5)


SW_VOCAB, SW_HIDDEN = 64, 16


class SharedWeight(nn.Module):
    """branch_a and branch_b are the same nn.Linear; lm_head is tied to embed_tokens."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(SW_VOCAB, SW_HIDDEN)
        self.shared = nn.Linear(SW_HIDDEN, SW_HIDDEN, bias=False)

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        s = self.shared(h) + self.shared(torch.relu(h))  # branch_a, branch_b
        return torch.matmul(s, self.embed_tokens.weight.t())  # tied lm_head


def build_shared_weight(ck):
    # torch.onnx.export would give the second use its own name (/shared_1/MatMul), route it through an
    # Identity copy of the weight, and constant-fold the tied lm_head transpose into a separate copy.
    # Build the graph by hand so that one initializer really feeds two MatMuls, and the tied embedding
    # feeds Gather and (through Transpose) the lm_head MatMul.
    torch.manual_seed(SEED + 3)
    m = SharedWeight().eval()
    emb = to_np(m.embed_tokens.weight)
    w = to_np(m.shared.weight).T.copy()  # MatMul layout [in, out]
    dims = ["batch", "sequence"]
    nodes = [
        helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["/embed_tokens/Gather_output_0"],
                         name="/embed_tokens/Gather"),
        helper.make_node("MatMul", ["/embed_tokens/Gather_output_0", "shared.weight"], ["/branch_a/MatMul_output_0"],
                         name="/branch_a/MatMul"),
        helper.make_node("Relu", ["/embed_tokens/Gather_output_0"], ["/Relu_output_0"], name="/Relu"),
        helper.make_node("MatMul", ["/Relu_output_0", "shared.weight"], ["/branch_b/MatMul_output_0"],
                         name="/branch_b/MatMul"),
        helper.make_node("Add", ["/branch_a/MatMul_output_0", "/branch_b/MatMul_output_0"], ["/Add_output_0"],
                         name="/Add"),
        helper.make_node("Transpose", ["embed_tokens.weight"], ["/lm_head/Transpose_output_0"], perm=[1, 0],
                         name="/lm_head/Transpose"),
        helper.make_node("MatMul", ["/Add_output_0", "/lm_head/Transpose_output_0"], ["logits"],
                         name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "shared_weight",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims + [SW_VOCAB])],
        [numpy_helper.from_array(emb, "embed_tokens.weight"), numpy_helper.from_array(w, "shared.weight")])
    model = helper.make_model(graph, producer_name="onnxlora-testdata", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    feeds = gpt_inputs()
    with torch.no_grad():
        want = {"logits": to_np(m(torch.from_numpy(feeds["input_ids"])))}
    save(model, "shared-weight.onnx")
    ck.check("shared-weight.onnx", feeds, want, atol=1e-5)


def build_bf16(ck):
    # ONNX Runtime 1.30 CPU has no bfloat16 MatMul/Gemm kernel ("Could not find an implementation for
    # MatMul(13)"), so weights are stored as bfloat16 and Cast to float32 right before MatMul/Gemm.
    torch.manual_seed(SEED + 4)
    w1 = bf16_round(to_np(torch.randn(16, 32) * 0.25))  # fc1: MatMul layout [in, out]
    b1 = bf16_round(to_np(torch.randn(32) * 0.1))
    w2 = bf16_round(to_np(torch.randn(8, 32) * 0.25))  # fc2: Gemm transB=1 layout [out, in]
    b2 = bf16_round(to_np(torch.randn(8) * 0.1))
    F = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["fc1.weight"], ["/fc1/Cast_output_0"], to=F, name="/fc1/Cast"),
        helper.make_node("MatMul", ["x", "/fc1/Cast_output_0"], ["/fc1/MatMul_output_0"], name="/fc1/MatMul"),
        helper.make_node("Cast", ["fc1.bias"], ["/fc1/Cast_1_output_0"], to=F, name="/fc1/Cast_1"),
        helper.make_node("Add", ["/fc1/MatMul_output_0", "/fc1/Cast_1_output_0"], ["/fc1/Add_output_0"],
                         name="/fc1/Add"),
        helper.make_node("Relu", ["/fc1/Add_output_0"], ["/Relu_output_0"], name="/Relu"),
        helper.make_node("Cast", ["fc2.weight"], ["/fc2/Cast_output_0"], to=F, name="/fc2/Cast"),
        helper.make_node("Cast", ["fc2.bias"], ["/fc2/Cast_1_output_0"], to=F, name="/fc2/Cast_1"),
        helper.make_node("Gemm", ["/Relu_output_0", "/fc2/Cast_output_0", "/fc2/Cast_1_output_0"], ["y"],
                         alpha=1.0, beta=1.0, transB=1, name="/fc2/Gemm"),
    ]
    graph = helper.make_graph(
        nodes, "bf16_matmul",
        [helper.make_tensor_value_info("x", F, ["batch", 16])],
        [helper.make_tensor_value_info("y", F, ["batch", 8])],
        [bf16_tensor("fc1.weight", w1), bf16_tensor("fc1.bias", b1),
         bf16_tensor("fc2.weight", w2), bf16_tensor("fc2.bias", b2)])
    model = helper.make_model(graph, producer_name="onnxlora-testdata", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    feeds = {"x": np.random.RandomState(10).randn(3, 16).astype(np.float32)}
    x = torch.from_numpy(feeds["x"])
    # torch reference in bfloat16 storage, float32 compute (same as the graph)
    tw1, tb1, tw2, tb2 = (torch.from_numpy(a).to(torch.bfloat16) for a in (w1, b1, w2, b2))
    want = {"y": to_np(torch.relu(x @ tw1.float() + tb1.float()) @ tw2.float().t() + tb2.float())}
    save(model, "bf16-matmul.onnx")
    ck.check("bf16-matmul.onnx", feeds, want, atol=1e-5)


def llama_inputs():
    """Batch 2, right padding on row 1 (attention_mask 0 there), position_ids 0..t-1."""
    g = np.random.RandomState(11)
    ids = g.randint(1, LL_VOCAB, size=(2, 6)).astype(np.int64)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=np.int64)
    ids[mask == 0] = 0
    pos = np.tile(np.arange(6, dtype=np.int64), (2, 1))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def make_tiny_llama():
    torch.manual_seed(SEED + 5)
    m = TinyLlama().eval()
    randomize_norms(m, torch.Generator().manual_seed(SEED + 50))
    return m


def build_tiny_llama(ck):
    m = make_tiny_llama()
    axes = {0: "batch", 1: "sequence"}
    ids = torch.zeros(1, 3, dtype=torch.int64)
    model = torch_export(m, (ids, torch.ones(1, 3, dtype=torch.int64), torch.arange(3)[None]),
                         ["input_ids", "attention_mask", "position_ids"], ["logits"],
                         {"input_ids": axes, "attention_mask": axes, "position_ids": axes, "logits": axes})
    feeds = llama_inputs()
    with torch.no_grad():
        want = {"logits": to_np(m(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask",
                                                                              "position_ids"))))}
    save(model, "tiny-llama.onnx")
    ck.check("tiny-llama.onnx", feeds, want, atol=1e-4, golden=False)


def make_tiny_gpt2():
    torch.manual_seed(SEED + 6)
    m = TinyGPT2().eval()
    randomize_norms(m, torch.Generator().manual_seed(SEED + 60))
    return m


def build_tiny_gpt2(ck):
    m = make_tiny_gpt2()
    axes = {0: "batch", 1: "sequence"}
    model = torch_export(m, (torch.zeros(1, 3, dtype=torch.int64),), ["input_ids"], ["logits"],
                         {"input_ids": axes, "logits": axes}, opset=14)
    feeds = {"input_ids": np.random.RandomState(12).randint(0, G2_VOCAB, size=(2, 5)).astype(np.int64)}
    with torch.no_grad():
        want = {"logits": to_np(m(torch.from_numpy(feeds["input_ids"])))}
    save(model, "tiny-gpt2-opset14.onnx")
    ck.check("tiny-gpt2-opset14.onnx", feeds, want, atol=1e-4, golden=False)


def make_mlp_classifier():
    torch.manual_seed(SEED + 7)
    return MLPClassifier().eval()


def build_mlp_classifier(ck):
    m = make_mlp_classifier()
    model = torch_export(m, (torch.zeros(1, 16),), ["x"], ["logits"], {"x": {0: "batch"}, "logits": {0: "batch"}})
    feeds = {"x": np.random.RandomState(13).randn(3, 16).astype(np.float32)}
    with torch.no_grad():
        want = {"logits": to_np(m(torch.from_numpy(feeds["x"])))}
    save(model, "mlp-classifier.onnx")
    ck.check("mlp-classifier.onnx", feeds, want, atol=1e-5, golden=False)


# --------------------------------------------------------------------------
# gradient and training reference cases (testdata/grad, testdata/train)
# --------------------------------------------------------------------------

TESTDATA = os.path.dirname(HERE)


def make_tiny_gpt():
    torch.manual_seed(SEED)
    return TinyGPT().eval()


def make_mlp_gemm():
    torch.manual_seed(SEED + 2)
    return MLP().eval()


# model file -> torch factory, graph inputs in forward order, output name
REF_MODELS = {
    "tiny-llama.onnx": (make_tiny_llama, ["input_ids", "attention_mask", "position_ids"], "logits"),
    "tiny-gpt2-opset14.onnx": (make_tiny_gpt2, ["input_ids"], "logits"),
    "tiny-gpt.onnx": (make_tiny_gpt, ["input_ids"], "logits"),
    "mlp-classifier.onnx": (make_mlp_classifier, ["x"], "logits"),
    "mlp-gemm-transb.onnx": (make_mlp_gemm, ["input"], "output"),
}


class LoRALinear(nn.Module):
    """y = base(x) + scaling * ((x @ A) @ B) with A [in, r], B [r, out] (onnxlora's layout)."""

    def __init__(self, base, a, b, scaling):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.from_numpy(a.astype(np.float64)))
        self.lora_B = nn.Parameter(torch.from_numpy(b.astype(np.float64)))
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + torch.matmul(torch.matmul(x, self.lora_A), self.lora_B) * self.scaling


def module_path_of_node(name):
    """Module path of a torch.onnx scoped node name ("/model/layers.0/self_attn/q_proj/MatMul")."""
    segs = [x for x in name.split("/") if x]
    assert segs and segs[-1] in ("MatMul", "Gemm"), name
    return ".".join(segs[:-1])


def target_matches(path, targets):
    return any(path == t or path.endswith("." + t) for t in targets)


def onnx_modules(model_file):
    """{module path: (node name, in, out)} of the adaptable MatMul/Gemm layers of a testdata model."""
    model = onnx.load(os.path.join(HERE, model_file))
    out = {}
    for r in adaptable_layers(model):
        shape = r["shape"]
        io_ = (shape[1], shape[0]) if r["op"].endswith("(transB=1)") else (shape[0], shape[1])
        out[module_path_of_node(r["node"])] = (r["node"],) + io_
    return out


def f32_list(a):
    """float32 values as the shortest decimals that round-trip through float64 to the same float32."""
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    vals = [float(str(v)) for v in a]
    assert np.array_equal(np.array(vals, dtype=np.float32), a)
    return vals


def tensor_json(a, dtype):
    a = np.asarray(a)
    if dtype == "float32":
        data = f32_list(a)
    elif dtype == "float64":
        data = [float(v) for v in a.reshape(-1)]  # json writes repr: round-trips the float64 exactly
    else:
        data = [int(v) for v in a.reshape(-1)]
    return {"dtype": dtype, "shape": list(a.shape), "data": data}


def expected_json(a):
    t = tensor_json(np.asarray(a, dtype=np.float64), "float64")
    return {"shape": t["shape"], "data": t["data"]}


def dump_case(path, obj):
    """JSON with one line per tensor: readable, diffable, small."""
    flat = {}

    def walk(o):
        if isinstance(o, dict):
            if "data" in o and isinstance(o["data"], list):
                key = "@@T%d@@" % len(flat)
                flat[key] = json.dumps(o, separators=(", ", ": "))
                return key
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list) and o and isinstance(o[0], dict):
            key = "@@T%d@@" % len(flat)
            flat[key] = json.dumps(o, separators=(", ", ": "))
            return key
        return o

    text = json.dumps(walk(obj), indent=1)
    for k, v in flat.items():
        text = text.replace('"%s"' % k, v)
    assert json.loads(text) == json.loads(json.dumps(obj))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def lora_model(model_file, targets, rank, alpha, values):
    """The torch model of model_file in float64 with LoRA on every targeted nn.Linear.

    values maps "<module>.lora_A.weight"/"<module>.lora_B.weight" to float32 arrays. Returns the model
    and {param name: torch parameter} for the LoRA tensors and every named torch parameter.
    """
    make, _, _ = REF_MODELS[model_file]
    m = make()
    onnx_mods = onnx_modules(model_file)
    torch_lin = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert set(onnx_mods) == torch_lin, (model_file, set(onnx_mods) ^ torch_lin)
    chosen = sorted((p for p in onnx_mods if target_matches(p, targets)), key=list(onnx_mods).index) if targets else []
    assert not targets or chosen, targets
    params = {}
    for path in chosen:
        parent_name, _, leaf = path.rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        lin = getattr(parent, leaf)
        a, b = values[path + ".lora_A.weight"], values[path + ".lora_B.weight"]
        assert a.shape == (lin.in_features, rank) and b.shape == (rank, lin.out_features), path
        wrapped = LoRALinear(lin, a, b, alpha / rank)
        setattr(parent, leaf, wrapped)
        params[path + ".lora_A.weight"] = wrapped.lora_A
        params[path + ".lora_B.weight"] = wrapped.lora_B
    m = m.double()
    for p in m.parameters():
        p.requires_grad_(False)
    for name, p in m.named_parameters():
        if not name.endswith(("lora_A", "lora_B")):
            params[name.replace(".base.", ".")] = p  # a wrapped layer's own weight/bias keep their names
    return m, params, chosen, onnx_mods


def lora_init_values(model_file, chosen, rank, seed, b_zero):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform bound), B zero or N(0, 0.1^2); float32."""
    g = np.random.RandomState(seed)
    mods = onnx_modules(model_file)
    vals = {}
    for path in chosen:
        _, fin, fout = mods[path]
        bound = 1.0 / math.sqrt(fin)
        vals[path + ".lora_A.weight"] = g.uniform(-bound, bound, size=(fin, rank)).astype(np.float32)
        vals[path + ".lora_B.weight"] = (np.zeros((rank, fout)) if b_zero else
                                         0.1 * g.randn(rank, fout)).astype(np.float32)
    return vals


def torch_loss(kind, out, labels):
    if kind == "causal-lm":
        v = out.shape[-1]
        return nn.functional.cross_entropy(out[:, :-1, :].reshape(-1, v), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="mean")
    if kind == "cross-entropy":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="mean")
    assert kind == "mse"
    return ((out - labels) ** 2).mean()


def numpy_loss(kind, out, labels):
    if kind == "mse":
        return float(((out - labels) ** 2).mean())
    if kind == "causal-lm":
        out, labels = out[:, :-1, :], labels[:, 1:]
    out, labels = out.reshape(-1, out.shape[-1]), labels.reshape(-1)
    keep = labels != -100
    z = out[keep] - out[keep].max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(keep.sum()), labels[keep]].mean())


def run_torch(model, model_file, feeds):
    _, names, _ = REF_MODELS[model_file]
    args = [torch.from_numpy(feeds[n].astype(np.float64) if feeds[n].dtype.kind == "f" else feeds[n]) for n in names]
    return model(*args)


def onnx_loss(model_file, onnx_model, feeds, kind, labels, lora, overrides):
    _, _, output = REF_MODELS[model_file]
    out = reference_run(os.path.join(HERE, model_file), feeds, overrides=overrides, lora=lora,
                        model=onnx_model)[output]
    return numpy_loss(kind, out, labels)


def grad_case(name, model_file, targets, rank, alpha, kind, feeds, labels, extra=(), seed=0):
    """Write testdata/grad/<name>.json: loss and gradients from torch autograd in float64, with a
    float64 ONNX reference evaluation of the same loss and central finite differences as checks."""
    inject = {"targets": list(targets), "rank": rank, "alpha": alpha} if targets else None
    chosen = [p for p in onnx_modules(model_file) if target_matches(p, targets)]
    values = lora_init_values(model_file, chosen, rank, seed, b_zero=False)
    m, params, chosen, mods = lora_model(model_file, targets, rank, alpha, values)
    trainable = [p + s for p in chosen for s in (".lora_A.weight", ".lora_B.weight")] + list(extra)
    onnx_model = onnx.load(os.path.join(HERE, model_file))
    init_names = {t.name for t in onnx_model.graph.initializer}
    for e in extra:
        assert e in init_names and e in params, e
    for n in trainable:
        params[n].requires_grad_(True)
    out = run_torch(m, model_file, feeds)
    tl = torch.from_numpy(labels.astype(np.float64) if labels.dtype.kind == "f" else labels)
    loss = torch_loss(kind, out, tl)
    loss.backward()
    grads = {n: params[n].grad.detach().numpy().copy() for n in trainable}

    # independent checks on the ONNX file: loss of the float64 evaluator, central differences
    scaling = alpha / rank if targets else 0.0
    lora = {mods[p][0]: (values[p + ".lora_A.weight"].astype(np.float64),
                         values[p + ".lora_B.weight"].astype(np.float64), scaling) for p in chosen}
    overrides = {e: params[e].detach().numpy().copy() for e in extra}
    ref = onnx_loss(model_file, onnx_model, feeds, kind, labels, lora, overrides)
    # float32 constants in the file (eps, 1/sqrt(head_dim)) vs float64 ones in torch: ~1e-10 relative
    assert abs(ref - loss.item()) <= 1e-8 * abs(loss.item()), (name, ref, loss.item())
    g = np.random.RandomState(seed + 1)
    worst = 0.0
    for n in trainable:
        for idx in [tuple(g.randint(0, d) for d in grads[n].shape) for _ in range(3)]:
            fd = []
            for sign in (1, -1):
                lo, ov = dict(lora), {k: v.copy() for k, v in overrides.items()}
                if n in ov:
                    ov[n][idx] += sign * 1e-5
                else:
                    path, which = n.rsplit(".lora_", 1)
                    la, lb, ls = lo[mods[path][0]]
                    la, lb = la.copy(), lb.copy()
                    (la if which.startswith("A") else lb)[idx] += sign * 1e-5
                    lo[mods[path][0]] = (la, lb, ls)
                fd.append(onnx_loss(model_file, onnx_model, feeds, kind, labels, lo, ov))
            d = (fd[0] - fd[1]) / 2e-5
            err = abs(d - grads[n][idx]) / (1e-6 + abs(grads[n][idx]))
            assert abs(d - grads[n][idx]) <= 1e-7 + 1e-5 * abs(grads[n][idx]), (name, n, idx, d, grads[n][idx])
            worst = max(worst, err)
    label_dtype = "float32" if labels.dtype.kind == "f" else "int64"
    case = {
        "model": model_file, "inject": inject, "loss": kind, "output": REF_MODELS[model_file][2],
        "inputs": dict({k: tensor_json(v, "float32" if v.dtype.kind == "f" else "int64") for k, v in feeds.items()},
                       labels=tensor_json(labels, label_dtype)),
        "params": {k: tensor_json(v, "float32") for k, v in values.items()},
        "trainable": trainable,
        "expected": {"loss": float(loss.item()), "grads": {n: expected_json(grads[n]) for n in trainable}},
    }
    dump_case(os.path.join(TESTDATA, "grad", name + ".json"), case)
    print("ok  grad/%-32s loss %.6f, %d trainable, onnx ref diff %.1e, finite diff rel err <= %.1e" % (
        name + ".json", loss.item(), len(trainable), abs(ref - loss.item()), worst))


def lm_batch(seed, lengths, vocab, t=None):
    """Right-padded token batch: ids (pad 0), attention_mask, position_ids 0..t-1, labels (-100 at pads)."""
    g = np.random.RandomState(seed)
    t = t or max(lengths)
    ids = np.zeros((len(lengths), t), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = g.randint(1, vocab, size=n)
        mask[i, :n] = 1
    labels = np.where(mask == 1, ids, -100)
    pos = np.tile(np.arange(t, dtype=np.int64), (len(lengths), 1))
    return ids, mask, pos, labels


ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_grad_cases():
    ids, mask, pos, labels = lm_batch(21, [7, 4], LL_VOCAB)
    grad_case("tiny-llama-causal-lm-pad", "tiny-llama.onnx", ALL_LLAMA, 4, 8, "causal-lm",
              {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, labels, seed=101,
              extra=["model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                     "model.norm.weight", "model.norm.bias"])
    ids, mask, pos, labels = lm_batch(22, [5], LL_VOCAB)
    grad_case("tiny-llama-qv", "tiny-llama.onnx", ["q_proj", "v_proj"], 4, 8, "causal-lm",
              {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, labels, seed=102)

    ids, _, _, labels = lm_batch(23, [6, 4], G2_VOCAB)
    grad_case("tiny-gpt2-opset14-causal-lm", "tiny-gpt2-opset14.onnx", ["q_proj", "k_proj", "v_proj", "c_proj", "c_fc"],
              4, 8, "causal-lm", {"input_ids": ids}, labels, seed=103,
              extra=["transformer.h.0.ln_1.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"])
    ids, _, _, labels = lm_batch(24, [5, 5], G2_VOCAB)
    grad_case("tiny-gpt2-opset14-embeddings", "tiny-gpt2-opset14.onnx", [], 4, 8, "causal-lm",
              {"input_ids": ids}, labels, seed=104, extra=["transformer.wte.weight", "transformer.wpe.weight"])

    ids, _, _, labels = lm_batch(25, [6, 6], GPT_VOCAB)
    grad_case("tiny-gpt-causal-lm", "tiny-gpt.onnx", ALL_LLAMA, 4, 8, "causal-lm", {"input_ids": ids}, labels,
              seed=105)

    g = np.random.RandomState(26)
    x = g.randn(6, 16).astype(np.float32)
    cls = g.randint(0, 5, size=6).astype(np.int64)
    cls[3] = -100
    grad_case("mlp-classifier-cross-entropy", "mlp-classifier.onnx", ["fc1", "fc2"], 4, 8, "cross-entropy",
              {"x": x}, cls, seed=106, extra=["fc2.bias"])
    y = g.randn(6, 5).astype(np.float32)
    grad_case("mlp-classifier-mse", "mlp-classifier.onnx", ["fc1", "fc2"], 4, 8, "mse", {"x": x}, y, seed=107)
    x = g.randn(4, 16).astype(np.float32)
    y = g.randn(4, 8).astype(np.float32)
    grad_case("mlp-gemm-transb-mse", "mlp-gemm-transb.onnx", ["fc1", "fc2", "fc3"], 4, 8, "mse", {"input": x}, y,
              seed=108)


def lr_lambda(kind, k, warmup, total):
    """transformers' get_{constant,linear,cosine}_schedule_with_warmup multiplier at optimizer step k."""
    if k < warmup:
        return float(k) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - k) / float(max(1, total - warmup)))
    assert kind == "cosine"
    progress = float(k - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def collate(model_file, rows, kind):
    """A batch as onnxlora train builds it: right padding with id 0, attention_mask 0 and labels -100 at
    pads, missing attention_mask = ones, missing position_ids = 0..t-1, causal-lm labels = input_ids."""
    _, names, _ = REF_MODELS[model_file]
    if "input_ids" not in names:  # fixed-shape rows (the classifier): stack
        feeds = {n: np.array([r[n] for r in rows], dtype=np.float32) for n in names}
        labels = np.array([r["labels"] for r in rows], dtype=np.int64 if kind != "mse" else np.float32)
        return feeds, labels
    t = max(len(r["input_ids"]) for r in rows)
    ids = np.zeros((len(rows), t), dtype=np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = r["input_ids"]
        mask[i, :n] = r.get("attention_mask", [1] * n)
        labels[i, :n] = r.get("labels", r["input_ids"])
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": np.tile(np.arange(t, dtype=np.int64), (len(rows), 1))}
    return {n: feeds[n] for n in names}, labels


def torch_train(model_file, targets, rank, alpha, initial, rows, flags, record=None, after_step=None, saved=()):
    """The reference loop in float64: returns ([{step, loss, lr, grad_norm}], {param: final value}).
    record collects each step's clipped gradients; after_step(step, model) runs after each update. saved
    names base parameters trained whole beside the adapters (PEFT's modules_to_save)."""
    m, params, chosen, _ = lora_model(model_file, targets, rank, alpha, initial)
    names = [p + s for p in chosen for s in (".lora_A.weight", ".lora_B.weight")] + list(saved)
    ps = [params[n] for n in names]
    for p in ps:
        p.requires_grad_(True)
    lr = flags["lr"]
    if flags["optimizer"] == "adamw":
        opt = torch.optim.AdamW(ps, lr=lr, betas=(flags["adam-beta1"], flags["adam-beta2"]),
                                eps=flags["adam-epsilon"], weight_decay=flags["weight-decay"])
    else:
        opt = torch.optim.SGD(ps, lr=lr, momentum=flags["momentum"], weight_decay=flags["weight-decay"])
    bs, accum, total = flags["batch-size"], flags["grad-accum"], flags["steps"]
    per_epoch = (len(rows) + bs - 1) // bs
    steps, batch_no = [], 0
    for k in range(total):
        step_lr = lr * lr_lambda(flags["lr-scheduler"], k, flags["warmup-steps"], total)
        for group in opt.param_groups:
            group["lr"] = step_lr
        opt.zero_grad()
        losses = []
        for _ in range(accum):
            j = batch_no % per_epoch
            batch_no += 1
            feeds, labels = collate(model_file, rows[j * bs:(j + 1) * bs], flags["loss"])
            tl = torch.from_numpy(labels.astype(np.float64) if labels.dtype.kind == "f" else labels)
            loss = torch_loss(flags["loss"], run_torch(m, model_file, feeds), tl)
            (loss / accum).backward()
            losses.append(loss.item())
        if flags["max-grad-norm"] > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(ps, flags["max-grad-norm"]))
        else:
            norm = float(torch.norm(torch.stack([torch.norm(p.grad, 2) for p in ps]), 2))
        if record is not None:
            record.append({n: p.grad.detach().numpy().copy() for n, p in zip(names, ps)})
        opt.step()
        steps.append({"step": k + 1, "loss": float(np.mean(losses)), "lr": step_lr, "grad_norm": norm})
        if after_step:
            after_step(k + 1, m)
    return steps, {n: p.detach().numpy().copy() for n, p in zip(names, ps)}


TRAIN_DEFAULTS = {"steps": 6, "batch-size": 2, "grad-accum": 1, "lr": 0.01, "optimizer": "adamw",
                  "adam-beta1": 0.9, "adam-beta2": 0.999, "adam-epsilon": 1e-8, "momentum": 0.0,
                  "weight-decay": 0.0, "lr-scheduler": "constant", "warmup-steps": 0, "max-grad-norm": 1.0,
                  "loss": "causal-lm", "shuffle": False}


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def train_case(name, model_file, targets, rank, alpha, rows, flags, seed, b_zero, clips=None, save=()):
    """Write testdata/train/<name>.json and <name>.jsonl. clips: assert that every step clips (True) or
    none does (False). Every step's norm must be 1% away from max-grad-norm, so float32 gradients cannot
    flip the clipping decision. save: modules trained whole (modules_to_save; nn.Linear weight and bias,
    which the ONNX files keep under the same names)."""
    flags = dict(TRAIN_DEFAULTS, **flags)
    chosen = [p for p in onnx_modules(model_file) if target_matches(p, targets)]
    initial = lora_init_values(model_file, chosen, rank, seed, b_zero=b_zero)
    grads = []
    saved = [mod + "." + leaf for mod in save for leaf in ("weight", "bias")]
    steps, final = torch_train(model_file, targets, rank, alpha, initial, rows, flags, record=grads, saved=saved)
    g = flags["max-grad-norm"]
    if g > 0:
        for s in steps:
            assert abs(s["grad_norm"] - g) > 0.01 * g, (name, s, g)
            assert clips is None or (s["grad_norm"] > g) == clips, (name, s, g)
    # step 1's loss again, from the float64 evaluator on the ONNX file with the initial adapters
    mods = onnx_modules(model_file)
    lora = {mods[p][0]: (initial[p + ".lora_A.weight"].astype(np.float64),
                         initial[p + ".lora_B.weight"].astype(np.float64), alpha / rank) for p in chosen}
    onnx_model = onnx.load(os.path.join(HERE, model_file))
    bs = flags["batch-size"]
    per_epoch = (len(rows) + bs - 1) // bs
    first = []
    for j in range(flags["grad-accum"]):
        feeds, labels = collate(model_file, rows[(j % per_epoch) * bs:(j % per_epoch + 1) * bs], flags["loss"])
        first.append(onnx_loss(model_file, onnx_model, feeds, flags["loss"], labels, lora, {}))
    ref = float(np.mean(first))
    assert abs(ref - steps[0]["loss"]) <= 1e-8 * steps[0]["loss"], (name, ref, steps[0]["loss"])
    write_jsonl(os.path.join(TESTDATA, "train", name + ".jsonl"), rows)
    case = {
        "model": model_file, "inject": dict({"targets": list(targets), "rank": rank, "alpha": alpha},
                                             **({"modules_to_save": list(save)} if save else {})),
        "data": name + ".jsonl", "flags": flags,
        "initial": {k: tensor_json(v, "float32") for k, v in initial.items()},
        "expected": {"steps": steps, "final": {k: expected_json(v) for k, v in final.items()}},
    }
    dump_case(os.path.join(TESTDATA, "train", name + ".json"), case)
    init = np.concatenate([v.reshape(-1) for v in initial.values()]).astype(np.float64)
    fin = np.concatenate([v.reshape(-1) for k, v in final.items() if k in initial])
    # smallest |gradient| relative to its tensor's largest, over all steps (Adam divides by it)
    tiny = min(float(np.abs(v).min() / np.abs(v).max()) for gr in grads for v in gr.values() if np.abs(v).max() > 0)
    print("ok  train/%-28s loss %.4f -> %.4f, grad_norm %.3g..%.3g, |final-initial|/|initial| %.2f, "
          "min |g|/max|g| %.0e" % (name + ".json", steps[0]["loss"], steps[-1]["loss"],
                                   min(s["grad_norm"] for s in steps), max(s["grad_norm"] for s in steps),
                                   np.linalg.norm(fin - init) / np.linalg.norm(init), tiny))
    return steps


def lm_rows(seed, n, lengths, vocab, prompt=0):
    g = np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        ids = g.randint(1, vocab, size=g.randint(lengths[0], lengths[1] + 1)).tolist()
        r = {"input_ids": ids}
        if prompt:
            r["labels"] = [-100] * prompt + ids[prompt:]
        rows.append(r)
    return rows


def mlp_rows(seed, n):
    g = np.random.RandomState(seed)
    return [{"x": f32_list(g.randn(16).astype(np.float32)), "labels": int(g.randint(0, 5))} for _ in range(n)]


def build_train_cases():
    lm_targets = {"tiny-llama.onnx": ["q_proj", "v_proj", "o_proj", "down_proj"],
                  "tiny-gpt2-opset14.onnx": ["q_proj", "v_proj", "c_fc"]}
    for i, (mf, short) in enumerate([("tiny-llama.onnx", "tiny-llama"), ("tiny-gpt2-opset14.onnx", "tiny-gpt2")]):
        tg, vocab = lm_targets[mf], 64
        train_case(short + "-adamw", mf, tg, 4, 8, lm_rows(300 + i, 8, (4, 9), vocab),
                   {"optimizer": "adamw", "weight-decay": 0.01, "lr-scheduler": "constant",
                    "max-grad-norm": 1.0}, seed=310 + i, b_zero=True, clips=False)
        train_case(short + "-sgd", mf, tg, 4, 8, lm_rows(320 + i, 8, (4, 9), vocab, prompt=2 if i == 0 else 0),
                   {"optimizer": "sgd", "lr": 2.0, "momentum": 0.9, "lr-scheduler": "linear", "warmup-steps": 2,
                    "max-grad-norm": 0.1}, seed=330 + i, b_zero=(i == 1), clips=True)
        train_case(short + "-accum-cosine", mf, tg, 4, 8, lm_rows(340 + i, 7, (4, 9), vocab),
                   {"steps": 4, "grad-accum": 2, "optimizer": "adamw", "lr-scheduler": "cosine", "warmup-steps": 1,
                    "max-grad-norm": 0.0}, seed=350 + i, b_zero=True)
    cls = {"loss": "cross-entropy"}
    train_case("mlp-classifier-adamw", "mlp-classifier.onnx", ["fc1", "fc2"], 4, 8, mlp_rows(360, 8),
               dict(cls, **{"optimizer": "adamw", "weight-decay": 0.01, "max-grad-norm": 1.0}), seed=361,
               b_zero=True)
    train_case("mlp-classifier-sgd", "mlp-classifier.onnx", ["fc1", "fc2"], 4, 8, mlp_rows(362, 8),
               dict(cls, **{"optimizer": "sgd", "lr": 2.0, "momentum": 0.9, "weight-decay": 0.01,
                            "lr-scheduler": "linear", "warmup-steps": 2, "max-grad-norm": 0.1}),
               seed=363, b_zero=False, clips=True)
    train_case("mlp-classifier-accum-cosine", "mlp-classifier.onnx", ["fc1", "fc2"], 4, 8, mlp_rows(364, 7),
               dict(cls, **{"steps": 4, "grad-accum": 2, "optimizer": "adamw", "lr-scheduler": "cosine",
                            "warmup-steps": 1, "max-grad-norm": 0.0}), seed=365, b_zero=True)
    # A sequence-classification setup as PEFT's: LoRA on the body, the head trained whole.
    train_case("mlp-classifier-modules-to-save", "mlp-classifier.onnx", ["fc1"], 4, 8, mlp_rows(366, 8),
               dict(cls, **{"optimizer": "adamw", "lr": 0.02, "weight-decay": 0.01, "max-grad-norm": 1.0}),
               seed=367, b_zero=True, save=["fc2"])


# --------------------------------------------------------------------------
# a small fine-tuning dataset for tiny-llama (testdata/data)
# --------------------------------------------------------------------------

BIGRAM_P = 0.75  # probability of a token's first successor; its second successor has the rest


def bigram_table():
    """succ[t] = the two successors of token t (1..63); 0 is kept for padding."""
    g = np.random.RandomState(400)
    first, second = g.permutation(np.arange(1, LL_VOCAB)), g.permutation(np.arange(1, LL_VOCAB))
    succ = np.zeros((LL_VOCAB, 2), dtype=np.int64)
    succ[1:, 0], succ[1:, 1] = first, second
    return succ


def bigram_rows(seed, n, succ):
    g = np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        ids = [int(g.randint(1, LL_VOCAB))]
        for _ in range(g.randint(8, 17) - 1):
            ids.append(int(succ[ids[-1], 0 if g.rand() < BIGRAM_P else 1]))
        rows.append({"input_ids": ids})
    return rows


def bigram_optimal_loss(rows, succ):
    """Mean -log p(next | prev) under the true process over every predicted token: the best reachable loss."""
    nll = []
    for r in rows:
        for a, b in zip(r["input_ids"], r["input_ids"][1:]):
            p = (BIGRAM_P if succ[a, 0] == b else 0.0) + (1 - BIGRAM_P if succ[a, 1] == b else 0.0)
            nll.append(-math.log(p))
    return float(np.mean(nll))


def lm_eval_loss(model, rows, batch_size):
    """Causal-LM loss over all of rows, every predicted token weighted equally (not a mean of batch means)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(0, len(rows), batch_size):
            feeds, labels = collate("tiny-llama.onnx", rows[j:j + batch_size], "causal-lm")
            n = int((labels[:, 1:] != -100).sum())
            total += torch_loss("causal-lm", run_torch(model, "tiny-llama.onnx", feeds), torch.from_numpy(labels)).item() * n
            count += n
    return total / count


def build_finetune_data():
    succ = bigram_table()
    train, ev = bigram_rows(401, 256, succ), bigram_rows(402, 32, succ)
    out = os.path.join(TESTDATA, "data")
    write_jsonl(os.path.join(out, "lm-train.jsonl"), train)
    write_jsonl(os.path.join(out, "lm-eval.jsonl"), ev)
    targets, rank, alpha, eval_every, eval_bs = ALL_LLAMA, 8, 16, 16, 8
    flags = dict(TRAIN_DEFAULTS, **{"steps": 96, "batch-size": 16, "lr": 0.01, "lr-scheduler": "linear"})
    chosen = [p for p in onnx_modules("tiny-llama.onnx") if target_matches(p, targets)]
    initial = lora_init_values("tiny-llama.onnx", chosen, rank, 403, b_zero=True)
    m0, _, _, _ = lora_model("tiny-llama.onnx", targets, rank, alpha, initial)
    evals = [{"step": 0, "eval_loss": lm_eval_loss(m0, ev, eval_bs)}]

    def after(step, m):
        if step % eval_every == 0:
            evals.append({"step": step, "eval_loss": lm_eval_loss(m, ev, eval_bs)})

    steps, _ = torch_train("tiny-llama.onnx", targets, rank, alpha, initial, train, flags, after_step=after)
    before, after_ = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    assert after_ < before - 1.5, (before, after_)
    case = {
        "model": "tiny-llama.onnx", "inject": {"targets": targets, "rank": rank, "alpha": alpha},
        "data": "lm-train.jsonl", "eval_data": "lm-eval.jsonl", "flags": flags,
        "eval_every": eval_every, "eval_batch_size": eval_bs,
        "commands": ["onnxlora inject testdata/models/tiny-llama.onnx -o lora.onnx --target %s --rank %d --alpha %d"
                     % (",".join(targets), rank, alpha),
                     "onnxlora train lora.onnx --data testdata/data/lm-train.jsonl --eval-data "
                     "testdata/data/lm-eval.jsonl --eval-every %d -o trained.onnx --steps %d --batch-size %d "
                     "--lr %g --lr-scheduler linear --weight-decay 0 --max-grad-norm 1 --shuffle=false"
                     % (eval_every, flags["steps"], flags["batch-size"], flags["lr"])],
        "note": ("torch float64 loop with the same semantics as testdata/train; A ~ U(+-1/sqrt(in)) from this "
                 "generator's seed (not onnxlora inject's), B = 0; eval_loss weights every predicted token "
                 "equally; optimal_eval_loss is the loss of the true bigram process on lm-eval.jsonl"),
        "initial": {k: tensor_json(v, "float32") for k, v in initial.items()},
        "expected": {"eval_loss_before": before, "eval_loss_after": after_,
                     "perplexity_before": math.exp(before), "perplexity_after": math.exp(after_),
                     "optimal_eval_loss": bigram_optimal_loss(ev, succ),
                     "eval": evals, "steps": steps},
    }
    dump_case(os.path.join(out, "lm-finetune-torch.json"), case)
    print("ok  data/lm-finetune-torch.json      eval loss %.4f -> %.4f (optimal %.4f), train loss %.4f -> %.4f" % (
        before, after_, case["expected"]["optimal_eval_loss"], steps[0]["loss"], steps[-1]["loss"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ort-binding", default=os.environ.get("ORT_NODE_BINDING"),
                    help="path to onnxruntime-node's onnxruntime_binding.node; also run every model in ORT")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = Checker(args.ort_binding)
    build_tiny_gpt(ck)
    build_tiny_bert(ck)
    build_mlp_gemm(ck)
    build_shared_weight(ck)
    build_bf16(ck)
    build_tiny_llama(ck)
    build_tiny_gpt2(ck)
    build_mlp_classifier(ck)
    print()
    build_grad_cases()
    print()
    build_train_cases()
    build_finetune_data()
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(ck.golden, f, indent=1, sort_keys=True)
        f.write("\n")
    print()
    for relpath, layers in ck.summary:
        print(relpath)
        for r in layers:
            print("   %-47s %-14s %-22s %-8s %s%s" % (r["node"], r["op"], r["weight"], r["shape"], r["dtype"],
                                                  " via " + "->".join(r["via"]) if r["via"] else ""))
    if not args.ort_binding:
        print("\nnote: ONNX Runtime check skipped (pass --ort-binding or set ORT_NODE_BINDING)", file=sys.stderr)


if __name__ == "__main__":
    main()
