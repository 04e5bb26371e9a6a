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
  conv1d.onnx, conv3d.onnx, conv1d/, conv3d/
                   one layer "c": Conv1d 4->6 (k 3, stride 2, padding 1) on [2, 4, 11],
                   Conv3d 2->3 (k 3, padding 1) on [1, 2, 4, 5, 5]; the same adapter
                   files and references (r 4, alpha 8)

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
  dora-conv.onnx, dora-conv/
                   DoraConv2dLayer: x [2, 4, 9, 9] -> c1 (Conv2d 4->8, 3x3, stride 2,
                   padding 1, no bias) -> relu -> c2 (Conv2d 8->6, 1x1, bias); the
                   magnitude [1, out, 1, 1], ||V|| over dims (1, 2, 3)

Quantized bases (QLoRA: a float adapter beside the quantized product):

  nbits.onnx       x [3, 32] -> fc1 (com.microsoft MatMulNBits K 32 N 16, 4-bit, block 16,
                   packed zero points, bias) -> relu -> fc2 (MatMulNBits K 16 N 8, 8-bit,
                   block 16, no zero points: the implicit 128) -> y; the float weights
                   are quantized here blockwise (min/max with zero points, else absmax)
  qdq.onnx         the same shape with DequantizeLinear weights: fc1 int8 per column
                   (axis 1) into a MatMul, fc2 uint8 per tensor into a Gemm transB=1
                   with bias
  nbits/, qdq/expected.json
                   x; outputs of the dequantized float model (base) and with each
                   layer's A [in, r], B [r, out] added at scaling 2 (adapted); the
                   dequantized and merged weights [in, out] and the factors

Run:  /usr/bin/python3 -B testdata/variants-b/generate.py
"""

import json
import os
import struct

import numpy as np
import onnx
import onnx.numpy_helper
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


class ConvNd(nn.Module):
    """One Conv1d or Conv3d layer, "c"."""
    def __init__(self, dims):
        super().__init__()
        if dims == 1:
            self.c = nn.Conv1d(4, 6, 3, stride=2, padding=1)
        else:
            self.c = nn.Conv3d(2, 3, 3, padding=1)

    def forward(self, x):
        return self.c(x)


def convnd_case(dims):
    """Conv1d/Conv3d LoRA: PEFT's kxk path, F.convNd(A.transpose(0, 1), B).transpose(0, 1)."""
    torch.manual_seed(10 + dims)
    net = ConvNd(dims).eval()
    x = torch.randn(2, 4, 11) if dims == 1 else torch.randn(1, 2, 4, 5, 5)
    case = "conv%dd" % dims
    export(net, os.path.join(HERE, case + ".onnx"), (x,), ["x"], ["y"])
    conv_fn = F.conv1d if dims == 1 else F.conv3d
    c = net.c
    r, scaling = 4, 2.0
    g = torch.Generator().manual_seed(20 + dims)
    out, cin = c.weight.shape[:2]
    a = (torch.rand(r, cin, *c.kernel_size, generator=g) * 2 - 1) / (cin * np.prod(c.kernel_size)) ** 0.5
    b = (torch.rand(out, r, *([1] * dims), generator=g) * 2 - 1) * 0.3
    write_adapter(case, lora_config(target_modules=["c"]),
                  {"base_model.model.c.lora_A.weight": a, "base_model.model.c.lora_B.weight": b})
    w, bias = c.weight.double(), c.bias.double()
    xd = x.double()
    base = conv_fn(xd, w, bias, c.stride, c.padding)
    unmerged = base + conv_fn(conv_fn(xd, a.double(), None, c.stride, c.padding), b.double()) * scaling
    delta = conv_fn(a.double().transpose(0, 1), b.double()).transpose(0, 1) * scaling
    merged_w = (w + delta).float()
    merged = conv_fn(xd, merged_w.double(), bias, c.stride, c.padding)
    write_expected(case, {"x": x}, {"unmerged": unmerged, "merged": merged, "base": base}, {"c.weight": merged_w})


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
    # PEFT's gradients of mean(y^2) with ||V|| detached, in float64.
    leaves = {k: tuple(t.detach().double().clone().requires_grad_(True) for t in v) for k, v in adapters.items()}
    def dora_train_forward():
        def layer(name, h):
            lin = getattr(net, name)
            w = lin.weight.double()
            bias = None if lin.bias is None else lin.bias.double()
            a, b, m = leaves[name]
            norm = torch.linalg.norm(w + scaling * (b @ a), dim=1).detach()
            scale = (m / norm).view(1, -1)
            return F.linear(h, w, bias) + (scale - 1) * F.linear(h, w) + scale * F.linear(F.linear(h, a), b) * scaling
        return layer("fc2", torch.relu(layer("fc1", x.double())))
    (dora_train_forward() ** 2).mean().backward()
    for name, (a, b, m) in leaves.items():
        weights[name + ".grad_A"], weights[name + ".grad_B"], weights[name + ".grad_m"] = a.grad, b.grad, m.grad
    write_expected("dora", {"x": x}, {"unmerged": unmerged, "merged": merged, "base": base}, weights)


# ---- quantized bases ----

def pack_codes(codes, bits):
    """Codes (ints per row) packed low-first into bytes, as MatMulNBits reads them."""
    per = 8 // bits
    out = np.zeros((codes.shape[0], (codes.shape[1] + per - 1) // per), dtype=np.uint8)
    for j in range(codes.shape[1]):
        out[:, j // per] |= (codes[:, j].astype(np.uint8) << ((j % per) * bits)).astype(np.uint8)
    return out


def nbits_quantize(w, bits, block, zero_points):
    """Blockwise along K of w [N, K]: with zero points min/max per block, else
    symmetric around the implicit zero point 2^(bits-1). Returns codes [N, K],
    scales [N, k_blocks], zero points [N, k_blocks] and the dequantized w."""
    n, k = w.shape
    kb = (k + block - 1) // block
    qmax = 2 ** bits - 1
    codes = np.zeros((n, kb * block), dtype=np.int64)
    scales = np.zeros((n, kb), dtype=np.float32)
    zps = np.full((n, kb), 2 ** (bits - 1), dtype=np.int64)
    wp = np.zeros((n, kb * block), dtype=np.float64)
    wp[:, :k] = w
    for b in range(kb):
        blk = wp[:, b * block:(b + 1) * block]
        if zero_points:
            lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
            sc = ((hi - lo) / qmax).astype(np.float32)
            zp = np.clip(np.round(-lo / sc), 0, qmax).astype(np.int64)
        else:
            sc = (np.abs(blk).max(1) / (2 ** (bits - 1) - 1)).astype(np.float32)
            zp = np.full(n, 2 ** (bits - 1), dtype=np.int64)
        q = np.clip(np.round(blk / sc[:, None].astype(np.float64)) + zp[:, None], 0, qmax)
        codes[:, b * block:(b + 1) * block] = q
        scales[:, b], zps[:, b] = sc, zp
    deq = (codes - np.repeat(zps, block, axis=1)) * np.repeat(scales.astype(np.float64), block, axis=1)
    return codes, scales, zps, deq[:, :k]


def nbits_node(name, x, out, w, bias, bits, block, zero_points, inits):
    n, k = w.shape
    codes, scales, zps, deq = nbits_quantize(w, bits, block, zero_points)
    kb = scales.shape[1]
    blob = block * bits // 8
    packed = pack_codes(codes, bits).reshape(n, kb, blob)
    inputs = [x, name + ".weight_Q%d" % bits, name + ".weight_scales"]
    inits += [onnx.numpy_helper.from_array(packed, inputs[1]),
              onnx.numpy_helper.from_array(scales.reshape(-1), inputs[2])]
    if zero_points:
        inputs.append(name + ".weight_zp")
        inits.append(onnx.numpy_helper.from_array(pack_codes(zps, bits).reshape(-1), inputs[3]))
    if bias is not None:
        while len(inputs) < 5:
            inputs.append("")
        inputs.append(name + ".bias")
        inits.append(onnx.numpy_helper.from_array(bias.astype(np.float32), inputs[5]))
    node = onnx.helper.make_node("MatMulNBits", inputs, [out], name="/%s/MatMul_Q%d" % (name, bits), domain="com.microsoft",
                                 K=k, N=n, bits=bits, block_size=block)
    return node, deq


def quant_case():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    w1 = rng.standard_normal((16, 32)) * 0.2          # torch layout [out, in]
    b1 = rng.standard_normal(16) * 0.1
    w2 = rng.standard_normal((8, 16)) * 0.2
    inits = []
    n1, deq1 = nbits_node("fc1", "x", "h", w1, b1, 4, 16, True, inits)
    relu = onnx.helper.make_node("Relu", ["h"], ["hr"], name="/Relu")
    n2, deq2 = nbits_node("fc2", "hr", "y", w2, None, 8, 16, False, inits)
    g = onnx.helper.make_graph([n1, relu, n2], "nbits",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 32])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 8])], inits)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)],
                               producer_name="onnxlora-variants-b")
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, os.path.join(HERE, "nbits.onnx"))

    # QDQ: an int8 per-column MatMul weight [in, out] and a uint8 per-tensor Gemm one.
    w3 = rng.standard_normal((32, 16)) * 0.2           # MatMul layout [in, out]
    s3 = (np.abs(w3).max(0) / 127).astype(np.float32)
    q3 = np.clip(np.round(w3 / s3), -127, 127).astype(np.int8)
    deq3 = q3.astype(np.float64) * s3
    w4 = rng.standard_normal((8, 16)) * 0.2            # Gemm transB layout [out, in]
    b4 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    lo, hi = min(w4.min(), 0), max(w4.max(), 0)
    s4 = np.float32((hi - lo) / 255)
    z4 = np.uint8(np.clip(np.round(-lo / s4), 0, 255))
    q4 = np.clip(np.round(w4 / s4) + z4, 0, 255).astype(np.uint8)
    deq4 = (q4.astype(np.float64) - float(z4)) * float(s4)
    H = onnx.helper
    qinits = [onnx.numpy_helper.from_array(q3, "fc1.weight_quantized"), onnx.numpy_helper.from_array(s3, "fc1.weight_scale"),
              onnx.numpy_helper.from_array(np.zeros(16, np.int8), "fc1.weight_zero_point"),
              onnx.numpy_helper.from_array(q4, "fc2.weight_quantized"), onnx.numpy_helper.from_array(np.array(s4, np.float32), "fc2.weight_scale"),
              onnx.numpy_helper.from_array(np.array(z4, np.uint8), "fc2.weight_zero_point"),
              onnx.numpy_helper.from_array(b4, "fc2.bias")]
    nodes = [H.make_node("DequantizeLinear", ["fc1.weight_quantized", "fc1.weight_scale", "fc1.weight_zero_point"], ["fc1.weight"], name="/fc1/DequantizeLinear", axis=1),
             H.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="/fc1/MatMul"),
             H.make_node("Relu", ["h"], ["hr"], name="/Relu"),
             H.make_node("DequantizeLinear", ["fc2.weight_quantized", "fc2.weight_scale", "fc2.weight_zero_point"], ["fc2.weight"], name="/fc2/DequantizeLinear"),
             H.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["y"], name="/fc2/Gemm", transB=1)]
    g = H.make_graph(nodes, "qdq", [H.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 32])],
                     [H.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 8])], qinits)
    m = H.make_model(g, opset_imports=[H.make_opsetid("", 13)], producer_name="onnxlora-variants-b")
    m.ir_version = 7
    onnx.checker.check_model(m)
    onnx.save(m, os.path.join(HERE, "qdq.onnx"))

    # Adapters in x·W orientation, A [in, r], B [r, out], scaling 8/4.
    r, scaling = 4, 2.0
    xd = x.astype(np.float64)
    cases = {"nbits": ([deq1.T, deq2.T], [b1.astype(np.float32).astype(np.float64), None]),
             "qdq": ([deq3, deq4.T], [None, b4.astype(np.float64)])}
    for case, (ws, bs) in cases.items():
        weights, adapters = {}, {}
        def fwd(delta):
            h = xd @ (ws[0] + delta[0])
            if bs[0] is not None:
                h = h + bs[0]
            h = np.maximum(h, 0)
            y = h @ (ws[1] + delta[1])
            if bs[1] is not None:
                y = y + bs[1]
            return y
        deltas = []
        for i, name in enumerate(["fc1", "fc2"]):
            fin, fout = ws[i].shape
            a = ((rng.random((fin, r)) * 2 - 1) / np.sqrt(fin)).astype(np.float32)
            b = ((rng.random((r, fout)) * 2 - 1) * 0.3).astype(np.float32)
            adapters[name + ".A"], adapters[name + ".B"] = torch.from_numpy(a), torch.from_numpy(b)
            d = scaling * (a.astype(np.float64) @ b.astype(np.float64))
            deltas.append(d)
            weights[name + ".dequantized"] = torch.from_numpy(ws[i])
            weights[name + ".merged"] = torch.from_numpy(ws[i] + d)
        os.makedirs(os.path.join(HERE, case), exist_ok=True)
        weights.update(adapters)
        write_expected(case, {"x": torch.from_numpy(x)},
                       {"base": torch.from_numpy(fwd([0, 0])), "adapted": torch.from_numpy(fwd(deltas))}, weights)


class DoraConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def dora_conv_norm(conv, a, b, scaling):
    """DoraConv2dLayer.get_weight_norm: ||W + scaling * B·A|| over dims (1, 2, 3),
    kept as [1, out, 1, 1]."""
    w = conv.weight.double()
    lw = torch.mm(b.flatten(start_dim=1), a.flatten(start_dim=1)).reshape(w.shape)
    return (w + scaling * lw).norm(p=2, dim=(1, 2, 3), keepdim=True).transpose(1, 0)


def dora_conv_case():
    torch.manual_seed(5)
    net = DoraConvNet().eval()
    x = torch.randn(2, 4, 9, 9)
    export(net, os.path.join(HERE, "dora-conv.onnx"), (x,), ["x"], ["y"])
    r, scaling = 4, 2.0
    g = torch.Generator().manual_seed(6)
    adapters, saved = {}, {}
    for name in ["c1", "c2"]:
        c = getattr(net, name)
        out, cin = c.weight.shape[:2]
        a = (torch.rand(r, cin, *c.kernel_size, generator=g) * 2 - 1) / (cin * np.prod(c.kernel_size)) ** 0.5
        b = (torch.rand(out, r, 1, 1, generator=g) * 2 - 1) * 0.3
        m = (dora_conv_norm(c, a.double(), b.double(), scaling) * (1 + 0.1 * (torch.rand(1, out, 1, 1, generator=g).double() * 2 - 1))).float()
        adapters[name] = (a, b, m)
        saved["base_model.model.%s.lora_A.weight" % name] = a
        saved["base_model.model.%s.lora_B.weight" % name] = b
        saved["base_model.model.%s.lora_magnitude_vector" % name] = m
    write_adapter("dora-conv", lora_config(target_modules=["c1", "c2"], use_dora=True), saved)

    def fwd(net, adapters):
        def layer(name, h):
            c = getattr(net, name)
            w = c.weight.double()
            bias = None if c.bias is None else c.bias.double()
            y = F.conv2d(h, w, bias, c.stride, c.padding)
            if name in adapters:
                a, b, m = (t.double() for t in adapters[name])
                scale = m / dora_conv_norm(c, a, b, scaling)
                lora = F.conv2d(F.conv2d(h, a, None, c.stride, c.padding), b)
                y = y + (scale - 1) * F.conv2d(h, w, None, c.stride, c.padding) + scale * lora * scaling
            return y
        return layer("c2", torch.relu(layer("c1", x.double())))

    unmerged = fwd(net, adapters)
    merged_net = DoraConvNet().eval()
    merged_net.load_state_dict(net.state_dict())
    weights = {}
    with torch.no_grad():
        for name, (a, b, m) in adapters.items():
            c = getattr(merged_net, name)
            a, b, m = a.double(), b.double(), m.double()
            w = c.weight.double()
            v = w + scaling * torch.mm(b.flatten(start_dim=1), a.flatten(start_dim=1)).reshape(w.shape)
            factor = (m / dora_conv_norm(c, a, b, scaling)).view(-1, 1, 1, 1)
            c.weight.copy_((factor * v).float())
            weights[name + ".weight"] = c.weight
    write_expected("dora-conv", {"x": x}, {"unmerged": unmerged, "merged": fwd(merged_net, {}), "base": fwd(net, {})}, weights)


def main():
    conv_case()
    convnd_case(1)
    convnd_case(3)
    dora_case()
    dora_conv_case()
    quant_case()


if __name__ == "__main__":
    main()
