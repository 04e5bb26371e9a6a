#!/usr/bin/env python3
"""Test data for ONNX Runtime LoRA adapters, made independently of onnxlora.

The .onnx_adapter files are built by hand with Debian's python3-flatbuffers
Builder from the published schema (export/onnxadapter_schema.fbs), so the Go
reader is tested against a second implementation. Numbers come from a seeded
numpy generator; expected values are numpy's own arithmetic.

Run:   /usr/bin/python3 testdata/adapters/generate.py
Check: /usr/bin/python3 testdata/adapters/generate.py --dump FILE.onnx_adapter
       prints the file, decoded with flatbuffers' Python Table accessors, as
       JSON (name, data_type, dims, data hex) so Go tests can compare a file
       Go wrote with what Python reads from it.

Outputs (next to this script; re-running gives identical bytes):
  lora-inputs.onnx        x[batch,8] -> layers.0.proj (8->6) -> layers.1.proj (6->5)
                          with "<module>.lora_A.weight" [in, r_i] and
                          "<module>.lora_B.weight" [r_i, out] as graph inputs whose
                          initializer defaults have rank 0 ([in,0], [0,out]), IR 8,
                          scaling folded into B as Olive and onnxruntime-genai do
  base.onnx               the same two MatMuls without LoRA
  adapter1.onnx_adapter   rank 4 on both modules (float32)
  adapter2.onnx_adapter   ranks 2 and 3 (float32)
  mixed.onnx_adapter      FLOAT16/BFLOAT16/DOUBLE/INT64/UINT8 params, a [1] and
                          an empty tensor, adapter_version 7, model_version 3
                          (no scalar: ONNX Runtime refuses parameters without dims)
  adapters_expected.json  every param of the three files: dims, data_type, data hex
  peft-plain/             PEFT dir: r 4, lora_alpha 8, rank_pattern/alpha_pattern
                          for layers.1.proj (r 2, alpha 3), float32
  peft-rslora/            PEFT dir: use_rslora, fan_in_fan_out, r 4, alpha 6, float16
  peft_expected.json      each PEFT dir converted: A = lora_A^T and
                          B = scaling * lora_B^T in float64, then rounded once
"""
import json
import math
import os
import struct
import sys

import flatbuffers

# numpy, onnx and torch are needed to generate, not for --dump, so that the
# Go tests' Python check needs only python3-flatbuffers.
np = onnx = TensorProto = helper = numpy_helper = torch = None


def import_generators():
    global np, onnx, TensorProto, helper, numpy_helper, torch
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# Modules of the test model: name, in, out.
MODULES = [("layers.0.proj", 8, 6), ("layers.1.proj", 6, 5)]

FLOAT, UINT8, INT64, FLOAT16, DOUBLE, BFLOAT16 = 1, 2, 7, 10, 11, 16


# ---------------------------------------------------------------- flatbuffers

def build_adapter(params, adapter_version=0, model_version=0):
    """params: list of (name, data_type, dims, raw bytes)."""
    b = flatbuffers.Builder(1024)
    offsets = []
    for name, dt, dims, raw in params:
        name_off = b.CreateString(name)
        b.StartVector(8, len(dims), 8)
        for d in reversed(dims):
            b.PrependInt64(d)
        dims_off = b.EndVector()
        # raw_data has (force_align: 8): align the bytes after the length.
        b.StartVector(1, len(raw), 8)
        b.head = b.head - len(raw)
        b.Bytes[b.head:b.head + len(raw)] = raw
        raw_off = b.EndVector()
        b.StartObject(4)
        b.PrependUOffsetTRelativeSlot(0, name_off, 0)
        b.PrependUOffsetTRelativeSlot(1, dims_off, 0)
        b.PrependInt32Slot(2, dt, 0)
        b.PrependUOffsetTRelativeSlot(3, raw_off, 0)
        offsets.append(b.EndObject())
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    params_off = b.EndVector()
    b.StartObject(4)
    b.PrependInt32Slot(0, 1, 0)  # format_version
    b.PrependInt32Slot(1, adapter_version, 0)
    b.PrependInt32Slot(2, model_version, 0)
    b.PrependUOffsetTRelativeSlot(3, params_off, 0)
    root = b.EndObject()
    b.Finish(root, file_identifier=b"TORT")
    return bytes(b.Output())


def read_adapter(buf):
    """Decodes an adapter with flatbuffers' Table accessors."""
    if buf[4:8] != b"TORT":
        raise ValueError("file identifier %r" % buf[4:8])
    root = flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0)
    t = flatbuffers.table.Table(buf, root)

    def int_slot(tab, slot):
        o = tab.Offset(4 + 2 * slot)
        return tab.Get(flatbuffers.number_types.Int32Flags, o + tab.Pos) if o else 0

    out = {"format_version": int_slot(t, 0), "adapter_version": int_slot(t, 1),
           "model_version": int_slot(t, 2), "params": []}
    o = t.Offset(10)
    vec, n = t.Vector(o), t.VectorLen(o)
    for i in range(n):
        p = flatbuffers.table.Table(buf, t.Indirect(vec + 4 * i))
        name = p.String(p.Offset(4) + p.Pos).decode()
        od = p.Offset(6)
        dims = [p.Get(flatbuffers.number_types.Int64Flags, p.Vector(od) + 8 * k)
                for k in range(p.VectorLen(od))]
        orw = p.Offset(10)
        start, length = p.Vector(orw), p.VectorLen(orw)
        out["params"].append({"name": name, "data_type": int_slot(p, 2), "dims": dims,
                              "data_offset": start, "data": bytes(buf[start:start + length]).hex()})
    return out


# ---------------------------------------------------------------- helpers

def f32(a):
    return np.ascontiguousarray(a, dtype="<f4")


def bf16_bytes(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def lora_params(ranks, rng, dtype=FLOAT):
    """Adapter params for the test model; B is already scaled."""
    params = []
    for (mod, fin, fout), r in zip(MODULES, ranks):
        a = f32(rng.standard_normal((fin, r)) * 0.5)
        b = f32(rng.standard_normal((r, fout)) * 0.5)
        params.append((mod + ".lora_A.weight", dtype, [fin, r], a.tobytes()))
        params.append((mod + ".lora_B.weight", dtype, [r, fout], b.tobytes()))
    return params


def write(path, data):
    with open(os.path.join(HERE, path), "wb") as f:
        f.write(data)


def make_model(rng):
    """Returns the adapter-input model and the same model without LoRA."""
    inits, inputs, nodes = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])], []
    base_nodes = []
    cur = "x"
    for i, (mod, fin, fout) in enumerate(MODULES):
        w = f32(rng.standard_normal((fin, fout)))
        wname, an, bn = mod + ".weight", mod + ".lora_A.weight", mod + ".lora_B.weight"
        rank = "lora_rank_%d" % i
        inits.append(numpy_helper.from_array(w, wname))
        inits.append(numpy_helper.from_array(np.zeros((fin, 0), np.float32), an))
        inits.append(numpy_helper.from_array(np.zeros((0, fout), np.float32), bn))
        inputs.append(helper.make_tensor_value_info(an, TensorProto.FLOAT, [fin, rank]))
        inputs.append(helper.make_tensor_value_info(bn, TensorProto.FLOAT, [rank, fout]))
        scope = "/" + mod.replace(".", "/")
        out = "y" if i == len(MODULES) - 1 else "h%d" % i
        nodes += [
            helper.make_node("MatMul", [cur, wname], [scope + "/base"], name=scope + "/MatMul"),
            helper.make_node("MatMul", [cur, an], [scope + "/lora_a"], name=scope + "/lora/MatMul_A"),
            helper.make_node("MatMul", [scope + "/lora_a", bn], [scope + "/lora_b"], name=scope + "/lora/MatMul_B"),
            helper.make_node("Add", [scope + "/base", scope + "/lora_b"], [out], name=scope + "/lora/Add"),
        ]
        base_nodes.append(helper.make_node("MatMul", [cur, wname], [out], name=scope + "/MatMul"))
        cur = out
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])]
    models = []
    for g in (helper.make_graph(nodes, "lora_inputs", inputs, outputs, inits),
              helper.make_graph(base_nodes, "base", inputs[:1], outputs, inits[0::3])):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="generate.py")
        m.ir_version = 8
        onnx.checker.check_model(m)
        models.append(m.SerializeToString())
    return models


# ---------------------------------------------------------------- PEFT

def save_safetensors(path, tensors):
    """tensors: dict name -> (dtype string, shape, raw bytes); written in name order."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        dt, shape, raw = tensors[name]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def make_peft(dirname, cfg, dtype, rng):
    """Writes a PEFT dir and returns the expected ORT adapter params."""
    d = os.path.join(HERE, dirname)
    os.makedirs(d, exist_ok=True)
    tensors, expected = {}, []
    for mod, fin, fout in MODULES:
        r = cfg["rank_pattern"].get(mod, cfg["r"])
        alpha = cfg["alpha_pattern"].get(mod, cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        la = rng.standard_normal((r, fin)) * 0.3
        lb = rng.standard_normal((fout, r)) * 0.3
        if dtype == "F16":
            la, lb = la.astype(np.float16), lb.astype(np.float16)
        else:
            la, lb = la.astype(np.float32), lb.astype(np.float32)
        key = "base_model.model." + mod
        tensors[key + ".lora_A.weight"] = (dtype, la.shape, la.astype("<" + la.dtype.str[1:]).tobytes())
        tensors[key + ".lora_B.weight"] = (dtype, lb.shape, lb.astype("<" + lb.dtype.str[1:]).tobytes())
        a = la.astype(np.float64).T
        b = scaling * lb.astype(np.float64).T
        expected.append({"module": mod, "rank": r, "alpha": alpha, "scaling": scaling,
                         "A_dims": [fin, r], "B_dims": [r, fout],
                         "A_f32": f32(a).reshape(-1).tolist(), "B_f32": f32(b).reshape(-1).tolist(),
                         "A_f16_bits": a.astype(np.float16).view(np.uint16).reshape(-1).tolist(),
                         "B_f16_bits": b.astype(np.float16).view(np.uint16).reshape(-1).tolist()})
    save_safetensors(os.path.join(d, "adapter_model.safetensors"), tensors)
    full = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": 0.0,
            "use_rslora": cfg["use_rslora"], "use_dora": False,
            "fan_in_fan_out": cfg["fan_in_fan_out"], "bias": "none", "inference_mode": True,
            "target_modules": ["proj"], "rank_pattern": cfg["rank_pattern"],
            "alpha_pattern": cfg["alpha_pattern"], "modules_to_save": None,
            "layers_to_transform": None, "init_lora_weights": True}
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(full, f, indent=2, sort_keys=True)
        f.write("\n")
    return expected


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--dump":
        with open(sys.argv[2], "rb") as f:
            print(json.dumps(read_adapter(f.read()), indent=1))
        return
    import_generators()
    rng = np.random.RandomState(20241)
    lora_model, base_model = make_model(rng)
    write("lora-inputs.onnx", lora_model)
    write("base.onnx", base_model)
    files = {
        "adapter1.onnx_adapter": build_adapter(lora_params([4, 4], rng)),
        "adapter2.onnx_adapter": build_adapter(lora_params([2, 3], rng)),
    }
    h = rng.standard_normal((3, 2))
    mixed = [
        ("half", FLOAT16, [3, 2], h.astype("<f2").tobytes()),
        ("brain", BFLOAT16, [2, 3], bf16_bytes(h.T)),
        ("double", DOUBLE, [2], np.array([math.pi, -1e300], "<f8").tobytes()),
        ("one", INT64, [1], np.array([-5], "<i8").tobytes()),
        ("empty", FLOAT, [3, 0], b""),
        ("bytes", UINT8, [5], bytes([0, 1, 2, 254, 255])),
    ]
    files["mixed.onnx_adapter"] = build_adapter(mixed, adapter_version=7, model_version=3)
    expected = {}
    for name, data in files.items():
        write(name, data)
        expected[name] = read_adapter(data)
    with open(os.path.join(HERE, "adapters_expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")

    peft = {
        "peft-plain": make_peft("peft-plain", {"r": 4, "lora_alpha": 8, "use_rslora": False,
                                               "fan_in_fan_out": False,
                                               "rank_pattern": {"layers.1.proj": 2},
                                               "alpha_pattern": {"layers.1.proj": 3}}, "F32", rng),
        "peft-rslora": make_peft("peft-rslora", {"r": 4, "lora_alpha": 6, "use_rslora": True,
                                                 "fan_in_fan_out": True, "rank_pattern": {},
                                                 "alpha_pattern": {}}, "F16", rng),
    }
    with open(os.path.join(HERE, "peft_expected.json"), "w") as f:
        json.dump(peft, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
