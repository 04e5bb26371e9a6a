"""Reference numbers for train's optimizer, schedule and clipping tests.

Runs torch.optim.AdamW / torch.optim.SGD and torch.nn.utils.clip_grad_norm_
in float64 on fixed tensors and gradients, and evaluates transformers'
schedule lambdas (written here from their documented definitions, since
transformers is not installed). Writes optim_ref.json beside this file.

    /usr/bin/python3 -B train/testdata/gen_optim_ref.py
"""
import json
import math
import os

import torch

torch.manual_seed(0)
HERE = os.path.dirname(os.path.abspath(__file__))

SHAPES = [(3, 4), (5,), (2, 2, 3)]
STEPS = 6


def fixed():
    g = torch.Generator().manual_seed(1234)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)]
    lrs = [1e-2 * (1 + 0.5 * k) for k in range(STEPS)]  # a varying lr, as a schedule gives
    return params, grads, lrs


def run(make_opt, clip=None):
    params, grads, lrs = fixed()
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make_opt(ps)
    traj, norms = [], []
    for k in range(STEPS):
        for p, g in zip(ps, grads[k]):
            p.grad = g.clone()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(ps, clip)))
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        opt.step()
        traj.append([p.detach().reshape(-1).tolist() for p in ps])
    return {"trajectory": traj, "norms": norms}


def case(name, make_opt, clip=None, **hp):
    out = run(make_opt, clip)
    out.update(name=name, hyper=hp, clip=clip)
    return out


params, grads, lrs = fixed()
cases = [
    case("adamw", lambda ps: torch.optim.AdamW(ps, lr=1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
         optimizer="adamw", beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
    case("adamw-betas", lambda ps: torch.optim.AdamW(ps, lr=1, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
         optimizer="adamw", beta1=0.8, beta2=0.95, eps=1e-3, weight_decay=0.1),
    case("adamw-clip", lambda ps: torch.optim.AdamW(ps, lr=1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
         clip=1.0, optimizer="adamw", beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
    case("sgd", lambda ps: torch.optim.SGD(ps, lr=1), optimizer="sgd", momentum=0.0, weight_decay=0.0),
    case("sgd-momentum-wd", lambda ps: torch.optim.SGD(ps, lr=1, momentum=0.9, weight_decay=0.05),
         optimizer="sgd", momentum=0.9, weight_decay=0.05),
    case("sgd-clip", lambda ps: torch.optim.SGD(ps, lr=1, momentum=0.5), clip=2.5,
         optimizer="sgd", momentum=0.5, weight_decay=0.0),
]


# transformers.optimization, as documented:
def constant_with_warmup(k, W):
    return k / max(1.0, W) if k < W else 1.0


def linear_with_warmup(k, W, N):
    if k < W:
        return k / max(1, W)
    return max(0.0, (N - k) / max(1, N - W))


def cosine_with_warmup(k, W, N, cycles=0.5):
    if k < W:
        return k / max(1, W)
    progress = (k - W) / max(1, N - W)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress)))


schedules = []
for W, N in [(0, 10), (3, 10), (5, 5), (0, 1), (2, 7), (10, 4)]:
    ks = list(range(N + 2))
    schedules.append({"warmup": W, "total": N,
                      "constant": [constant_with_warmup(k, W) for k in ks],
                      "linear": [linear_with_warmup(k, W, N) for k in ks],
                      "cosine": [cosine_with_warmup(k, W, N) for k in ks]})

ref = {
    "shapes": SHAPES,
    "params": [p.reshape(-1).tolist() for p in params],
    "grads": [[g.reshape(-1).tolist() for g in step] for step in grads],
    "lrs": lrs,
    "cases": cases,
    "schedules": schedules,
    "torch": torch.__version__,
}
with open(os.path.join(HERE, "optim_ref.json"), "w") as f:
    json.dump(ref, f)


# A whole loop on a linear model with mse, the way `onnxlora train` runs it:
# batch j of an epoch is rows j*B..j*B+B-1 in file order, a last partial
# batch is used as is, steps outlast the data and wrap to row 0; K batches
# per optimizer step with each loss divided by K; clipping before the step;
# lr = base * lambda(k).
def loop_case(name, optimizer, sched, B, K, steps, warmup, max_norm, **hp):
    g = torch.Generator().manual_seed(99)
    X = torch.randn(10, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(10, 1, generator=g, dtype=torch.float64)
    W0 = torch.randn(3, 1, generator=g, dtype=torch.float64)
    b0 = torch.randn(1, generator=g, dtype=torch.float64)
    W = torch.nn.Parameter(W0.clone())
    b = torch.nn.Parameter(b0.clone())
    if optimizer == "adamw":
        opt = torch.optim.AdamW([W, b], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                                weight_decay=hp["weight_decay"])
    else:
        opt = torch.optim.SGD([W, b], lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    lam = {"constant": lambda k: constant_with_warmup(k, warmup),
           "linear": lambda k: linear_with_warmup(k, warmup, steps),
           "cosine": lambda k: cosine_with_warmup(k, warmup, steps)}[sched]
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    n, nb = X.shape[0], (X.shape[0] + B - 1) // B
    j = 0
    records = []
    for k in range(steps):
        opt.zero_grad()
        losses = []
        for _ in range(K):
            lo = j * B
            xb, yb = X[lo:lo + B], Y[lo:lo + B]
            loss = ((xb @ W + b - yb) ** 2).mean()
            (loss / K).backward()
            losses.append(float(loss))
            j = (j + 1) % nb
        if max_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_([W, b], max_norm))
        else:
            norm = float(torch.sqrt(W.grad.pow(2).sum() + b.grad.pow(2).sum()))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sch.step()
        records.append({"step": k + 1, "loss": sum(losses) / K, "lr": lr, "grad_norm": norm})
    return {"name": name, "optimizer": optimizer, "scheduler": sched, "batch_size": B, "grad_accum": K,
            "steps": steps, "warmup": warmup, "max_grad_norm": max_norm, "hyper": hp,
            "x": X.tolist(), "y": Y.tolist(), "w0": W0.reshape(-1).tolist(), "b0": b0.tolist(),
            "records": records, "w": W.detach().reshape(-1).tolist(), "b": b.detach().tolist()}


ref["loops"] = [
    loop_case("adamw-constant-accum", "adamw", "constant", 4, 2, 5, 0, 1.0,
              lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, momentum=0.0),
    loop_case("sgd-linear-warmup-clip", "sgd", "linear", 3, 1, 9, 3, 0.5,
              lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.9),
    loop_case("adamw-cosine-noclip", "adamw", "cosine", 4, 3, 4, 1, 0.0,
              lr=0.02, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, momentum=0.0),
]
with open(os.path.join(HERE, "optim_ref.json"), "w") as f:
    json.dump(ref, f)
