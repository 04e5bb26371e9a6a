#!/usr/bin/python3
"""PEFT adapter directories in PEFT's on-disk layout, with torch's merge of each.

No peft, transformers or safetensors package is installed here, so this
writes what PEFT's save_pretrained writes, by hand, from PEFT's sources
(peft/utils/save_and_load.py get_peft_model_state_dict, peft/tuners/lora/
layer.py), and merges with the formulas of PEFT's get_delta_weight in torch:

  Linear     lora_A.weight [r, in], lora_B.weight [out, r];
             W[out, in] += scaling * B @ A
  Conv1D     same shapes, fan_in_fan_out=true: W[in, out] += scaling * (B @ A).T
  Embedding  lora_embedding_A [r, vocab], lora_embedding_B [dim, r] (ParameterDict
             entries: no ".weight"); E[vocab, dim] += scaling * (B @ A).T
  modules_to_save
             the whole trained module is saved under its own parameter names

Key layouts: save_pretrained drops the adapter name ("base_model.model.<m>.lora_A.weight",
"base_model.model.score.weight"); the live PeftModel.state_dict() keeps it
("<m>.lora_A.default.weight", "score.modules_to_save.default.weight"). Both are written.

Outputs (next to this script; re-running gives identical files):

  base.onnx            Tiny: model.embed_tokens (32x16) -> 2 blocks (self_attn.q_proj,
                       v_proj; mlp.fc1 16->24 +bias, fc2) -> lm_head TIED to embed_tokens,
                       and score (16->3, +bias) on the mean: outputs logits, score
  base-fp16.onnx       base.onnx with every float initializer rounded to float16
  base-genai.onnx      base.onnx renamed as onnxruntime-genai's builder names modules
                       (self_attn -> attn) with producer_name "onnxruntime-genai"
  block.onnx           one block exported alone (modules "self_attn.q_proj", "mlp.fc1")
  gpt2.onnx            GPT-2-shaped with transformers' Conv1D (Gemm without transB)
  <case>/adapter/      adapter_config.json + adapter_model.safetensors
  <case>/expected.json input_ids, torch's outputs with the adapter merged (or, for
                       the embedding, applied as PEFT's forward applies it), and the
                       merged parameters in torch's layout

Cases:
  lora                 q_proj, v_proj, fc1; r 4, alpha 8; save_pretrained keys
  lora-named           the same tensors under the live state_dict keys (".default.")
  embedding            LoRA on embed_tokens (and q_proj): the tied lm_head keeps the
                       base table, as in PEFT's unmerged forward (PEFT's in-place
                       merge_and_unload would change the head too; expected.json
                       records by how much, "tied_merge_effect")
  modules-to-save      SEQ_CLS adapter: LoRA on q_proj/v_proj, score saved whole
                       (modules_to_save ["classifier", "score"], as PEFT fills it)
  modules-to-save-named  the same with ".modules_to_save.default." keys
  fp16                 the lora case's float32 adapter on base-fp16.onnx: expected.json
                       has the merged float16 bits rounded once from float64, and the
                       bits torch's `w16 += delta32` gives
  conv1d               fan_in_fan_out on gpt2.onnx's c_fc/c_proj
  layers-999           the lora adapter with layers_to_transform [999], which PEFT refuses

Run:  /usr/bin/python3 -B testdata/peft/generate.py
"""

import json
import math
import os
import struct

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
torch.use_deterministic_algorithms(True)
VOCAB, D, INTER, LABELS = 32, 16, 24, 3
IDS = torch.tensor([[3, 17, 5, 30, 1], [8, 0, 22, 11, 9]], dtype=torch.int64)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)

    def forward(self, h):
        return self.v_proj(torch.relu(self.q_proj(h)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, INTER)
        self.fc2 = nn.Linear(INTER, D)

    def forward(self, h):
        return self.fc2(torch.relu(self.fc1(h)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attn()
        self.mlp = MLP()

    def forward(self, h):
        h = h + self.self_attn(h)
        return h + self.mlp(h)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return h


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tie_word_embeddings
        self.score = nn.Linear(D, LABELS)

    def forward(self, ids):
        h = self.model(ids)
        return self.lm_head(h), self.score(h.mean(dim=1))


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: weight [in, out], y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        shape = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(INTER, D)
        self.c_proj = Conv1D(D, INTER)

    def forward(self, h):
        return h + self.c_proj(torch.relu(self.c_fc(h)))


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = GPT2MLP()

    def forward(self, h):
        return self.mlp(h)


class GPT2Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.h = nn.ModuleList([GPT2Block(), GPT2Block()])

    def forward(self, ids):
        x = self.wte(ids)
        for b in self.h:
            x = b(x)
        return x


class GPT2(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = GPT2Inner()
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        return (self.lm_head(self.transformer(ids)),)


# ---- files ----

def write_safetensors(path, tensors, dtype="F32"):
    """safetensors as the format defines it: u64 LE header length, JSON header
    padded with spaces to 8 bytes, then little-endian data in key order."""
    header = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    np_type = {"F32": "<f4", "F16": "<f2"}[dtype]
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name].detach().numpy().astype(np_type))
        b = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def lora_config(**kw):
    """A LoraConfig.to_dict() as save_pretrained writes it (sorted, indent 2)."""
    c = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "onnxlora/tiny",
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": 8, "lora_dropout": 0.0, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": 4,
        "rank_pattern": {}, "revision": None, "target_modules": [], "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": False,
    }
    c.update(kw)
    return c


def write_adapter(case, config, tensors):
    d = os.path.join(HERE, case, "adapter")
    os.makedirs(d, exist_ok=True)
    write_safetensors(os.path.join(d, "adapter_model.safetensors"), tensors)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def write_expected(case, outputs, weights, **extra):
    e = {"input_ids": {"shape": list(IDS.shape), "data": IDS.flatten().tolist()},
         "outputs": {k: {"shape": list(v.shape), "data": [float(x) for x in v.flatten()]} for k, v in outputs.items()},
         "weights": {k: {"shape": list(v.shape), "data": [float(x) for x in v.flatten()]} for k, v in sorted(weights.items())}}
    e.update(extra)
    with open(os.path.join(HERE, case, "expected.json"), "w") as f:
        json.dump(e, f, separators=(",", ":"))
        f.write("\n")


def export(model, path, args, inputs, outputs):
    torch.onnx.export(model, args, path, input_names=inputs, output_names=outputs,
                      opset_version=14, do_constant_folding=False)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    return m


# ---- adapters and torch merges ----

def targeted(targets, name):
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_factors(model, targets, r, g):
    """Random trained-looking factors for each targeted Linear/Conv1D, in
    PEFT's shapes: A [r, in], B [out, r]."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)) and targeted(targets, name):
            if isinstance(mod, Conv1D):
                fin, fout = mod.weight.shape
            else:
                fout, fin = mod.weight.shape
            out[name] = (torch.randn(r, fin, generator=g) / math.sqrt(fin), torch.randn(fout, r, generator=g) * 0.5)
    return out


def merged_linear(mod, a, b, scaling, fan_in_fan_out=False):
    """get_delta_weight in float64, added once: W + scaling * transpose(B @ A)."""
    delta = b.double() @ a.double()
    if fan_in_fan_out:
        delta = delta.T
    return mod.weight.double() + scaling * delta


def keys(name, named, embedding=False):
    mid = ".default" if named else ""
    if embedding:
        return f"base_model.model.{name}.lora_embedding_A{mid}", f"base_model.model.{name}.lora_embedding_B{mid}"
    return f"base_model.model.{name}.lora_A{mid}.weight", f"base_model.model.{name}.lora_B{mid}.weight"


def run(model):
    with torch.no_grad():
        logits, score = model(IDS)
    return {"logits": logits, "score": score}


def fp16_bits(x):
    return [int(v) for v in np.asarray(x, dtype=np.float16).view(np.uint16).flatten()]


def main():
    torch.manual_seed(0)
    tiny = Tiny().eval()
    base = export(tiny, os.path.join(HERE, "base.onnx"), (IDS,), ["input_ids"], ["logits", "score"])
    mods = dict(tiny.named_modules())
    r, alpha = 4, 8
    scaling = alpha / r

    # lora and lora-named: one set of factors, two key layouts.
    g = torch.Generator().manual_seed(1)
    targets = ["q_proj", "v_proj", "fc1"]
    factors = lora_factors(tiny, targets, r, g)
    merged = {n: merged_linear(mods[n], a, b, scaling) for n, (a, b) in factors.items()}
    tuned = Tiny().eval()
    tuned.load_state_dict(tiny.state_dict())
    tm = dict(tuned.named_modules())
    with torch.no_grad():
        for n, w in merged.items():
            tm[n].weight.copy_(w.float())
    outs = run(tuned)
    for case, named in (("lora", False), ("lora-named", True)):
        tensors = {}
        for n, (a, b) in factors.items():
            ka, kb = keys(n, named)
            tensors[ka], tensors[kb] = a, b
        write_adapter(case, lora_config(target_modules=targets), tensors)
        write_expected(case, outs, merged)
        if not named:
            # A config PEFT refuses: no module of the model is in layer 999.
            write_adapter("layers-999", lora_config(target_modules=targets, layers_to_transform=[999]), tensors)

    # fp16 base: the lora adapter (float32, as PEFT keeps adapters) on float16 weights.
    half = onnx.load(os.path.join(HERE, "base.onnx"))
    for init in half.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for vi in list(half.graph.output) + list(half.graph.value_info):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(half, os.path.join(HERE, "base-fp16.onnx"))
    bits_f64, bits_torch = {}, {}
    for n, (a, b) in factors.items():
        w16 = mods[n].weight.detach().half()
        once = (w16.double() + scaling * (b.double() @ a.double())).numpy()
        bits_f64[n] = fp16_bits(once)
        # PEFT: delta in the adapter's float32, then base.weight.data += delta
        t = w16.clone()
        t += (b @ a) * scaling
        bits_torch[n] = fp16_bits(t.numpy())
    os.makedirs(os.path.join(HERE, "fp16"), exist_ok=True)
    with open(os.path.join(HERE, "fp16", "expected.json"), "w") as f:
        json.dump({"adapter": "../lora/adapter", "float16_bits_once": bits_f64, "float16_bits_torch": bits_torch,
                   "shapes": {n: list(mods[n].weight.shape) for n in factors}}, f, separators=(",", ":"))
        f.write("\n")

    # base-genai: the onnxruntime-genai builder's names.
    genai = onnx.load(os.path.join(HERE, "base.onnx"))
    genai.producer_name, genai.producer_version = "onnxruntime-genai", "0.0.0"

    def rename(s):
        return s.replace("self_attn", "attn")
    for init in genai.graph.initializer:
        init.name = rename(init.name)
    for node in genai.graph.node:
        node.name = rename(node.name)
        node.input[:] = [rename(i) for i in node.input]
        node.output[:] = [rename(o) for o in node.output]
    onnx.checker.check_model(genai, full_check=True)
    onnx.save(genai, os.path.join(HERE, "base-genai.onnx"))

    # block.onnx: one block alone; its modules have no layer index.
    export(tiny.model.layers[1], os.path.join(HERE, "block.onnx"), (torch.zeros(2, 5, D),), ["hidden"], ["out"])

    # embedding: LoRA on embed_tokens and q_proj; lm_head stays tied to the base table.
    g = torch.Generator().manual_seed(2)
    ea = torch.randn(r, VOCAB, generator=g) * 0.3
    eb = torch.randn(D, r, generator=g) * 0.3
    qf = lora_factors(tiny, ["model.layers.0.self_attn.q_proj"], r, g)
    tensors = {}
    ka, kb = keys("model.embed_tokens", False, embedding=True)
    tensors[ka], tensors[kb] = ea, eb
    for n, (a, b) in qf.items():
        ka, kb = keys(n, False)
        tensors[ka], tensors[kb] = a, b
    write_adapter("embedding", lora_config(target_modules=["embed_tokens", "q_proj"],
                                           layers_to_transform=None), tensors)
    table = tiny.model.embed_tokens.weight.double() + scaling * (eb.double() @ ea.double()).T
    qm = {n: merged_linear(mods[n], a, b, scaling) for n, (a, b) in qf.items()}
    emb = Tiny().eval()
    emb.load_state_dict(tiny.state_dict())
    emb.lm_head.weight = nn.Parameter(tiny.model.embed_tokens.weight.detach().clone())  # untie: the head keeps the base
    em = dict(emb.named_modules())
    with torch.no_grad():
        emb.model.embed_tokens.weight.copy_(table.float())
        for n, w in qm.items():
            em[n].weight.copy_(w.float())
    outs = run(emb)
    # PEFT's unmerged forward, computed directly: E[ids] + scaling * A.T[ids] @ B.T.
    with torch.no_grad():
        direct = tiny.model.embed_tokens(IDS) + scaling * (nn.functional.embedding(IDS, ea.T) @ eb.T)
        assert torch.allclose(direct, emb.model.embed_tokens(IDS), atol=1e-6)
    tied = Tiny().eval()
    tied.load_state_dict(emb.state_dict(), strict=False)
    with torch.no_grad():
        tied.model.embed_tokens.weight.copy_(table.float())  # tied: the head changes too
        tm2 = dict(tied.named_modules())
        for n, w in qm.items():
            tm2[n].weight.copy_(w.float())
    tied_effect = float((run(tied)["logits"] - outs["logits"]).abs().max())
    weights = dict(qm)
    weights["model.embed_tokens"] = table
    weights["lm_head"] = tiny.model.embed_tokens.weight.double()
    write_expected("embedding", outs, weights, tied_merge_effect=tied_effect)

    # modules-to-save: a sequence-classification adapter.
    g = torch.Generator().manual_seed(3)
    sf = lora_factors(tiny, ["q_proj", "v_proj"], r, g)
    sw = tiny.score.weight.detach() + torch.randn(LABELS, D, generator=g) * 0.5
    sb = tiny.score.bias.detach() + torch.randn(LABELS, generator=g)
    sm = {n: merged_linear(mods[n], a, b, scaling) for n, (a, b) in sf.items()}
    cls = Tiny().eval()
    cls.load_state_dict(tiny.state_dict())
    cm = dict(cls.named_modules())
    with torch.no_grad():
        for n, w in sm.items():
            cm[n].weight.copy_(w.float())
        cls.score.weight.copy_(sw)
        cls.score.bias.copy_(sb)
    outs = run(cls)
    weights = dict(sm)
    weights["score"] = sw.double()
    weights["score.bias"] = sb.double()
    for case, named in (("modules-to-save", False), ("modules-to-save-named", True)):
        tensors = {}
        for n, (a, b) in sf.items():
            ka, kb = keys(n, named)
            tensors[ka], tensors[kb] = a, b
        mid = ".modules_to_save.default" if named else ""
        tensors[f"base_model.model.score{mid}.weight"] = sw
        tensors[f"base_model.model.score{mid}.bias"] = sb
        write_adapter(case, lora_config(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                                        modules_to_save=["classifier", "score"]), tensors)
        write_expected(case, outs, weights)

    # conv1d: GPT-2's Conv1D with fan_in_fan_out.
    torch.manual_seed(4)
    gpt2 = GPT2().eval()
    export(gpt2, os.path.join(HERE, "gpt2.onnx"), (IDS,), ["input_ids"], ["logits"])
    g = torch.Generator().manual_seed(5)
    cf = lora_factors(gpt2, ["c_fc", "c_proj"], r, g)
    gm = dict(gpt2.named_modules())
    cmerged = {n: merged_linear(gm[n], a, b, scaling, fan_in_fan_out=True) for n, (a, b) in cf.items()}
    tensors = {}
    for n, (a, b) in cf.items():
        ka, kb = keys(n, False)
        tensors[ka], tensors[kb] = a, b
    write_adapter("conv1d", lora_config(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True,
                                        base_model_name_or_path="onnxlora/tiny-gpt2"), tensors)
    tuned = GPT2().eval()
    tuned.load_state_dict(gpt2.state_dict())
    tg = dict(tuned.named_modules())
    with torch.no_grad():
        for n, w in cmerged.items():
            tg[n].weight.copy_(w.float())
        (logits,) = tuned(IDS)
    write_expected("conv1d", {"logits": logits}, cmerged)


if __name__ == "__main__":
    main()
