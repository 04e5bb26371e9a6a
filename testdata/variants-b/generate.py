#!/usr/bin/python3
"""Conv LoRA, DoRA and quantized-base fixtures, with torch references.

No peft package is installed here, so the adapters are written in PEFT's
on-disk layout by hand and the references use PEFT's formulas written out
in torch (peft/tuners/lora/layer.py _ConvNd.get_delta_weight and forward,
peft/tuners/lora/dora.py), in float64 from the float32 parameters:

  Conv LoRA  lora_A.weight [r, in, k...] (the base's kernel, stride, padding),
             lora_B.weight [out, r, 1...];
             forward  y = conv(x, W) + scaling * conv(conv(x, A), B)
             merge    1x1: W += scaling * (B[:, :, 0, 0] @ A[:, :, 0, 0])[..., None, None]
                      kxk: W += scaling * conv(A.transpose(0, 1), B).transpose(0, 1)

Outputs (next to this script; re-running gives identical files):

  conv.onnx        x [2, 4, 9, 9] -> pw (Conv2d 4->8, 1x1, bias) -> relu
                   -> body (Conv2d 8->6, 3x3, stride 2, padding 1) -> relu
                   -> dw (Conv2d 6->6, 3x3, padding 1, groups 2: not adaptable) -> y
  conv/adapter/    PEFT Conv LoRA on pw and body, r 4, alpha 8
  conv/expected.json
                   x, the PEFT forward (unmerged) and torch's merge: outputs and the
                   merged kernels

DoRA (peft/tuners/lora/dora.py DoraLinearLayer, use_dora=true):
             ||V|| = ||W + scaling * B @ A|| per output row (detached in training)
             forward  y = base(x) + (m/||V|| - 1) * x W^T + (m/||V||) * scaling * B(A(x))
             merge    W = (m/||V||)[:, None] * (W + scaling * B @ A); the bias is unchanged
             keys     <module>.lora_magnitude_vector [out] (save_pretrained drops the
                      DoRA layer's ".weight"); live state_dict:
                      <module>.lora_magnitude_vector.default.weight

  mlp.onnx         x [5, 12] -> fc1 (Linear 12->16, a Gemm transB=1 with bias) -> relu
                   -> fc2 (Linear 16->8 without bias, a MatMul) -> y
  dora/adapter/    PEFT DoRA on fc1 and fc2, r 4, alpha 8, magnitudes moved off
                   their init; dora-named/adapter/ the same under the live keys
  dora/expected.json
                   x, the DoRA forward (unmerged) and the merge: outputs and weights

Run:  /usr/bin/python3 -B testdata/variants-b/generate.py
"""

import json
import os
import struct

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def write_safetensors(path, tensors, dtype="F32"):
    """safetensors as the format defines it: u64 LE header length, JSON header
    padded with spaces to 8 bytes, then little-endian data in key order."""
    header = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name].detach().numpy().astype("<f4"))
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
    """A LoraConfig.to_dict() as save_pretrained writes it."""
    c = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "onnxlora/variants-b",
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": 8, "lora_dropout": 0.0, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": 4,
        "rank_pattern": {}, "revision": None, "target_modules": [], "task_type": None,
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


def tensor_json(v):
    return {"shape": list(v.shape), "data": [float(x) for x in v.detach().flatten()]}


def write_expected(case, inputs, outputs, weights):
    e = {"inputs": {k: tensor_json(v) for k, v in inputs.items()},
         "outputs": {k: tensor_json(v) for k, v in outputs.items()},
         "weights": {k: tensor_json(v) for k, v in sorted(weights.items())}}
    with open(os.path.join(HERE, case, "expected.json"), "w") as f:
        json.dump(e, f, separators=(",", ":"))
        f.write("\n")


def export(model, path, args, inputs, outputs):
    torch.onnx.export(model, args, path, input_names=inputs, output_names=outputs,
                      opset_version=14, do_constant_folding=False)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)


# ---- Conv LoRA ----

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(4, 8, 1)
        self.body = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=2)

    def forward(self, x):
        return self.dw(torch.relu(self.body(torch.relu(self.pw(x)))))


def conv_delta(conv, a, b, scaling):
    """PEFT's _ConvNd.get_delta_weight, both of its paths."""
    if conv.weight.shape[2:4] == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
    return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scaling


def conv_forward(net, x, adapters, scaling):
    """ConvNet's forward in float64 with PEFT's Conv LoRA forward on the
    adapted layers: base + lora_B(lora_A(x)) * scaling."""
    def layer(name, h):
        c = getattr(net, name)
        y = F.conv2d(h, c.weight.double(), c.bias.double(), c.stride, c.padding, c.dilation, c.groups)
        if name in adapters:
            a, b = adapters[name]
            y = y + F.conv2d(F.conv2d(h, a.double(), None, c.stride, c.padding), b.double()) * scaling
        return y
    return layer("dw", torch.relu(layer("body", torch.relu(layer("pw", x.double())))))


def conv_case():
    torch.manual_seed(0)
    net = ConvNet().eval()
    x = torch.randn(2, 4, 9, 9)
    export(net, os.path.join(HERE, "conv.onnx"), (x,), ["x"], ["y"])
    r, alpha = 4, 8
    scaling = alpha / r
    adapters, tensors = {}, {}
    g = torch.Generator().manual_seed(1)
    for name in ["pw", "body"]:
        c = getattr(net, name)
        out, cin = c.weight.shape[:2]
        a = (torch.rand(r, cin, *c.kernel_size, generator=g) * 2 - 1) / (cin * c.kernel_size[0] * c.kernel_size[1]) ** 0.5
        b = (torch.rand(out, r, 1, 1, generator=g) * 2 - 1) * 0.3
        adapters[name] = (a, b)
        tensors["base_model.model." + name + ".lora_A.weight"] = a
        tensors["base_model.model." + name + ".lora_B.weight"] = b
    write_adapter("conv", lora_config(target_modules=["body", "pw"]), tensors)
    unmerged = conv_forward(net, x, adapters, scaling)
    merged_net = ConvNet().eval()
    merged_net.load_state_dict(net.state_dict())
    weights = {}
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            c = getattr(merged_net, name)
            w = c.weight.double() + conv_delta(c, a.double(), b.double(), scaling)
            c.weight.copy_(w.float())
            weights[name + ".weight"] = c.weight
    merged = conv_forward(merged_net, x, {}, scaling)
    base = conv_forward(net, x, {}, scaling)
    write_expected("conv", {"x": x}, {"unmerged": unmerged, "merged": merged, "base": base}, weights)


# ---- DoRA ----

class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def dora_norm(lin, a, b, scaling):
    """DoraLinearLayer.get_weight_norm: ||W + scaling * B @ A|| over dim 1."""
    return torch.linalg.norm(lin.weight.double() + scaling * (b @ a), dim=1)


def dora_forward(net, x, adapters, scaling):
    """Mlp's forward in float64 with DoraLinearLayer.forward on the adapted
    layers: base + (m/||V|| - 1) * x W^T + (m/||V||) * scaling * lora(x)."""
    def layer(name, h):
        lin = getattr(net, name)
        w = lin.weight.double()
        bias = None if lin.bias is None else lin.bias.double()
        y = F.linear(h, w, bias)
        if name in adapters:
            a, b, m = (t.double() for t in adapters[name])
            scale = (m / dora_norm(lin, a, b, scaling)).view(1, -1)
            y = y + (scale - 1) * F.linear(h, w) + scale * F.linear(F.linear(h, a), b) * scaling
        return y
    return layer("fc2", torch.relu(layer("fc1", x.double())))


def dora_case():
    torch.manual_seed(2)
    net = Mlp().eval()
    x = torch.randn(5, 12)
    export(net, os.path.join(HERE, "mlp.onnx"), (x,), ["x"], ["y"])
    r, alpha = 4, 8
    scaling = alpha / r
    g = torch.Generator().manual_seed(3)
    adapters, saved, live = {}, {}, {}
    for name in ["fc1", "fc2"]:
        lin = getattr(net, name)
        out, cin = lin.weight.shape
        a = (torch.rand(r, cin, generator=g) * 2 - 1) / cin ** 0.5
        b = (torch.rand(out, r, generator=g) * 2 - 1) * 0.3
        # a trained-looking magnitude: the init ||W + s*B@A|| moved by up to 10%
        m = (dora_norm(lin, a.double(), b.double(), scaling) * (1 + 0.1 * (torch.rand(out, generator=g).double() * 2 - 1))).float()
        adapters[name] = (a, b, m)
        for k, v in (("lora_A", a), ("lora_B", b)):
            saved["base_model.model.%s.%s.weight" % (name, k)] = v
            live["base_model.model.%s.%s.default.weight" % (name, k)] = v
        saved["base_model.model.%s.lora_magnitude_vector" % name] = m
        live["base_model.model.%s.lora_magnitude_vector.default.weight" % name] = m
    cfg = lora_config(target_modules=["fc1", "fc2"], use_dora=True)
    write_adapter("dora", cfg, saved)
    write_adapter("dora-named", cfg, live)
    unmerged = dora_forward(net, x, adapters, scaling)
    merged_net = Mlp().eval()
    merged_net.load_state_dict(net.state_dict())
    weights = {}
    with torch.no_grad():
        for name, (a, b, m) in adapters.items():
            lin = getattr(merged_net, name)
            a, b, m = a.double(), b.double(), m.double()
            v = lin.weight.double() + scaling * (b @ a)
            lin.weight.copy_(((m / dora_norm(lin, a, b, scaling)).view(-1, 1) * v).float())
            weights[name + ".weight"] = lin.weight
    merged = dora_forward(merged_net, x, {}, scaling)
    base = dora_forward(net, x, {}, scaling)
    write_expected("dora", {"x": x}, {"unmerged": unmerged, "merged": merged, "base": base}, weights)


def main():
    conv_case()
    dora_case()


if __name__ == "__main__":
    main()
