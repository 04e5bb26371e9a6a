"""Time a training step of `onnxlora train` beside torch's eager step, in one run.

Same model (tiny-llama with rank-8 LoRA on all seven projections), same data
(testdata/data/lm-train.jsonl, batches of 16 in file order, right-padded),
same AdamW with clipping and a linear schedule, float32 on CPU, one thread
for both (ONNX Runtime's session uses one intra-op thread). Needs /usr/bin/time
(Debian's time package) for onnxlora's peak memory. Prints ms per
step, the ratio and each side's peak resident memory.

    go build -o /tmp/onnxlora ./cmd/onnxlora
    /usr/bin/python3 -B train/testdata/bench_step.py --onnxlora /tmp/onnxlora

onnxlora's per-step time is the difference of two runs (2N and N steps), so
loading and building the step graph are left out; torch's is N timed steps
after a warm-up. Peak memory is the whole process's (torch's includes the
torch import itself, about 200 MB).
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, BATCH, LR = 8, 16, 16, 0.01


def load_generator():
    spec = importlib.util.spec_from_file_location("gen", os.path.join(ROOT, "testdata", "models", "generate.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def batches():
    rows = [json.loads(l)["input_ids"] for l in open(os.path.join(ROOT, "testdata", "data", "lm-train.jsonl"))]
    out = []
    for lo in range(0, len(rows), BATCH):
        chunk = rows[lo:lo + BATCH]
        t = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), t, dtype=torch.int64)
        mask = torch.zeros(len(chunk), t, dtype=torch.int64)
        labels = torch.full((len(chunk), t), -100, dtype=torch.int64)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            labels[i, :len(r)] = torch.tensor(r)
        pos = torch.arange(t)[None].expand(len(chunk), t)
        out.append((ids, mask, pos, labels))
    return out


def torch_stepper(gen, steps):
    torch.set_num_threads(1)
    mods = gen.onnx_modules("tiny-llama.onnx")
    chosen = [p for p in mods if gen.target_matches(p, TARGETS)]
    values = gen.lora_init_values("tiny-llama.onnx", chosen, RANK, 7, True)
    m, params, _, _ = gen.lora_model("tiny-llama.onnx", TARGETS, RANK, ALPHA, values)
    m = m.float()
    train = [p for n, p in params.items() if n.endswith(("lora_A.weight", "lora_B.weight"))]
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(train, lr=LR, weight_decay=0.0)
    total = 2 * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, (total - k) / total))
    data = batches()

    def step(k):
        ids, mask, pos, labels = data[k % len(data)]
        logits = m(ids, mask, pos)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train, 1.0)
        opt.step()
        sched.step()

    for k in range(steps):  # warm-up
        step(k)

    def timed():
        t0 = time.perf_counter()
        for k in range(steps):
            step(steps + k)
        return (time.perf_counter() - t0) / steps * 1e3
    return timed


def onnxlora_ms_per_step(exe, steps):
    with tempfile.TemporaryDirectory() as d:
        lora = os.path.join(d, "lora.onnx")
        subprocess.run([exe, "inject", os.path.join(ROOT, "testdata", "models", "tiny-llama.onnx"), "-o", lora,
                        "--target", ",".join(TARGETS), "--rank", str(RANK), "--alpha", str(ALPHA), "-q"],
                       check=True, stdout=subprocess.DEVNULL)
        times, rss = {}, 0.0
        for n in (steps, 2 * steps):
            t0 = time.perf_counter()
            # /usr/bin/time reports the child's own peak after exec; the
            # rusage of a child forked from this process would count torch.
            r = subprocess.run(["/usr/bin/time", "-f", "%M", exe, "train", lora, "--data", os.path.join(ROOT, "testdata", "data", "lm-train.jsonl"),
                            "-o", os.path.join(d, "out.onnx"), "--steps", str(n), "--batch-size", str(BATCH),
                            "--lr", str(LR), "--shuffle=false", "-q"], check=True, stderr=subprocess.PIPE, text=True)
            times[n] = time.perf_counter() - t0
            rss = max(rss, int(r.stderr.strip().splitlines()[-1]) / 1024)
        return (times[2 * steps] - times[steps]) / steps * 1e3, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnxlora", required=True, help="the onnxlora binary")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    args = ap.parse_args()
    gen = load_generator()
    torch_round = torch_stepper(gen, args.steps)
    ours, theirs, ours_rss = [], [], 0.0
    for _ in range(args.rounds):
        ms, rss = onnxlora_ms_per_step(args.onnxlora, args.steps)
        ours.append(ms)
        ours_rss = max(ours_rss, rss)
        theirs.append(torch_round())
    theirs_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = lambda v: sorted(v)[len(v) // 2]
    print("tiny-llama, LoRA r=%d on 7 projections, batch %d, AdamW, 1 thread, %d steps x %d rounds"
          % (RANK, BATCH, args.steps, args.rounds))
    print("onnxlora train: %.3f ms/step median (min %.3f), peak RSS %.0f MB" % (med(ours), min(ours), ours_rss))
    print("torch eager:    %.3f ms/step median (min %.3f), peak RSS %.0f MB" % (med(theirs), min(theirs), theirs_rss))
    print("ratio onnxlora/torch (medians): %.2f; per round: %s" % (
        med(ours) / med(theirs), " ".join("%.2f" % (a / b) for a, b in zip(ours, theirs))))


if __name__ == "__main__":
    sys.exit(main())
