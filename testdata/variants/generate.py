#!/usr/bin/python3
"""References for PiSSA/OLoRA initialization and rank resize.

Run with /usr/bin/python3 (torch 1.13, numpy) from the repository root:

    /usr/bin/python3 testdata/variants/generate.py

It writes testdata/variants/expected.json. Everything is computed here,
independently of onnxlora: PEFT's pissa_init and olora_init written out in
torch (layer.py: torch.linalg.svd / torch.linalg.qr of the [out, in] weight,
S/scaling, residual W - scaling*B@A), and numpy's SVD of scaling*A@B for
resize (singular values, the best rank-R approximation and its Frobenius
error). Matrices are stored row-major as flat lists; "w" is torch's
[out, in] Linear weight, "a"/"b" are lora_A [r, in] and lora_B [out, r].
"""
import json
import os

import numpy as np
import torch

rng = np.random.default_rng(1616)


def flat(x):
    return [float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def pissa(w, r, scaling):
    # PEFT pissa_init, init_lora_weights="pissa", in float32.
    wt = torch.tensor(w, dtype=torch.float32)
    V, S, Uh = torch.linalg.svd(wt, full_matrices=False)
    Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    A = torch.diag(torch.sqrt(Sr)) @ Uhr
    B = Vr @ torch.diag(torch.sqrt(Sr))
    res = wt - scaling * B @ A
    return A.numpy(), B.numpy(), res.numpy(), S.numpy()


def olora(w, r, scaling):
    # PEFT olora_init, in float32.
    wt = torch.tensor(w, dtype=torch.float32)
    Q, R = torch.linalg.qr(wt)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    res = wt - scaling * B @ A
    return A.numpy(), B.numpy(), res.numpy()


inits = []
for name, (out_f, in_f, r, alpha) in {
    "tall": (12, 8, 3, 6.0),   # out > in
    "wide": (6, 10, 4, 4.0),   # in > out
    "square-r1": (7, 7, 1, 2.0),
}.items():
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    scaling = alpha / r
    pa, pb, pres, s = pissa(w, r, scaling)
    oa, ob, ores = olora(w, r, scaling)
    inits.append({
        "name": name, "out": out_f, "in": in_f, "r": r, "alpha": alpha, "scaling": scaling,
        "w": flat(w), "singular_values": flat(s),
        "pissa": {"a": flat(pa), "b": flat(pb), "residual": flat(pres)},
        "olora": {"a": flat(oa), "b": flat(ob), "residual": flat(ores)},
    })

resizes = []
for name, (out_f, in_f, r, alpha, decay) in {
    "decaying": (10, 12, 6, 12.0, 0.5),
    "flat": (9, 7, 5, 5.0, 1.0),
    "rank-above-dims": (4, 5, 6, 6.0, 0.7),  # r > min(in, out)
}.items():
    # lora_A [r, in], lora_B [out, r]; a decaying column scale makes a
    # spectrum worth truncating.
    a = rng.standard_normal((r, in_f)) * (decay ** np.arange(r))[:, None]
    b = rng.standard_normal((out_f, r))
    a = a.astype(np.float32).astype(np.float64)
    b = b.astype(np.float32).astype(np.float64)
    scaling = alpha / r
    delta = scaling * b @ a  # [out, in]
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    k = min(r, in_f, out_f)
    s = s[:k]
    cases = []
    for R in sorted({k, 3, 1}):
        approx = (u[:, :R] * s[:R]) @ vt[:R]
        cases.append({
            "rank": R,
            "frobenius_error": float(np.sqrt(np.sum(s[R:] ** 2))),
            "measured_error": float(np.linalg.norm(delta - approx)),
            "delta": flat(approx),
        })
    energy = {}
    for e in (0.5, 0.9, 0.99):
        c = np.cumsum(s ** 2) / np.sum(s ** 2)
        energy[str(e)] = int(np.searchsorted(c, e) + 1)
    resizes.append({
        "name": name, "out": out_f, "in": in_f, "r": r, "alpha": alpha, "scaling": scaling,
        "a": flat(a), "b": flat(b), "delta": flat(delta),
        "singular_values": flat(s), "truncations": cases, "energy_rank": energy,
    })

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "expected.json"), "w") as f:
    json.dump({"torch": torch.__version__, "numpy": np.__version__, "inits": inits, "resizes": resizes}, f)
    f.write("\n")
print("wrote", os.path.join(here, "expected.json"))
