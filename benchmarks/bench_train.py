"""Training-step throughput (tokens/s) of the USE model by retention backend, measured in one run.

CPU (default): torch (chunkwise) vs reference (materialised decay mask, the published approach),
small model, T=2048. Target: >= 2x.
GPU (--device cuda): triton vs reference, 12 layers, hidden 768, bf16 autocast, T=2048. Target >= 5x;
peak memory too.

A step = forward over a padded batch, FEP loss (W=5 labels) + SUP loss on two halves of the batch,
backward, AdamW step: what use-train does per micro-batch.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from use import USEConfig, USEModel  # noqa: E402
from use.losses import fep_loss, sup_loss  # noqa: E402
from common import device_name, git_commit  # noqa: E402


def make_batch(B, T, cfg, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.event_offset, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[B // 2:, T - T // 8:] = False                   # some padding, as real batches have
    labels = torch.randint(0, 2, (B, T, cfg.num_events), generator=g, dtype=torch.uint8)
    fmask = mask.clone()
    fmask[:, -5:] = False
    return [t.to(device) for t in (ids, mask, labels, fmask)]


def step(model, opt, batch, amp):
    ids, mask, labels, fmask = batch
    with amp():
        out = model(ids, mask, heads=("fep",))
        loss = fep_loss(out.fep_logits, labels, fmask, mask)
        z = model.sup_projection(model.token_mean(out.hidden, mask))
        B = ids.shape[0] // 2
        loss = loss + sup_loss(z[:B], z[B:2 * B])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(backend, args, device):
    cfg = USEConfig(vocab_size=64, num_events=59, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, backend=backend)
    torch.manual_seed(0)
    model = USEModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(args.batch, args.seq_len, cfg, device)
    bf16 = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    for _ in range(args.warmup):
        step(model, opt, batch, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step(model, opt, batch, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    tokens = int(batch[1].sum())
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"provider": backend, "seconds_per_step": med, "tokens_per_s": tokens / med, "peak_mib": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence T")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 4 on CPU, 8 on GPU)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: 64 on CPU, 768 on GPU)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: 2 on CPU, 12 on GPU)")
    p.add_argument("--heads", type=int, default=None, help="heads (default: 4 on CPU, 12 on GPU)")
    p.add_argument("--iters", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--fast", default=None, help="fast backend (default: torch on CPU, triton on GPU)")
    p.add_argument("--csv", default=None, help="CSV output (default: benchmarks/results/train_<device>.csv)")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (8 if gpu else 4)
    args.hidden = args.hidden or (768 if gpu else 64)
    args.layers = args.layers or (12 if gpu else 2)
    args.heads = args.heads or (12 if gpu else 4)
    fast = args.fast or ("triton" if gpu else "torch")
    rows = []
    for backend in (fast, "reference"):
        try:
            rows.append(measure(backend, args, device))
        except torch.cuda.OutOfMemoryError:
            rows.append({"provider": backend, "seconds_per_step": float("nan"), "tokens_per_s": float("nan"), "peak_mib": float("nan")})
            torch.cuda.empty_cache()
    ref = rows[-1]
    name = device_name(device)
    print(f"\ntraining step, T={args.seq_len} B={args.batch} hidden={args.hidden} layers={args.layers} heads={args.heads} "
          f"({'bf16 autocast' if gpu else 'fp32'}) on {name}")
    print(f"{'provider':>10} {'s/step':>9} {'tokens/s':>11} {'peak MiB':>9} {'speed-up':>9}")
    for r in rows:
        r["speedup"] = ref["seconds_per_step"] / r["seconds_per_step"]
        print(f"{r['provider']:>10} {r['seconds_per_step']:9.3f} {r['tokens_per_s']:11,.0f} {r['peak_mib']:9.0f} {r['speedup']:8.2f}x")
    target = 5.0 if gpu else 2.0
    verdict = "meets" if rows[0]["speedup"] >= target else "MISSES"
    print(f"{fast} vs reference: {rows[0]['speedup']:.2f}x ({verdict} the {target:.0f}x target)")
    out = args.csv or os.path.join(os.path.dirname(__file__), "results", f"train_{device.type}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    commit = git_commit()
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "device", "torch", "commit", "T", "B", "hidden", "layers", "provider", "s_per_step", "tokens_per_s", "peak_mib", "speedup"])
        for r in rows:
            w.writerow([datetime.date.today().isoformat(), name, torch.__version__, commit, args.seq_len, args.batch, args.hidden,
                        args.layers, r["provider"], f"{r['seconds_per_step']:.4f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_mib']:.0f}", f"{r['speedup']:.2f}"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
