"""Stateful embedding benchmarks: keeping user embeddings current, stateful vs recompute.

1. periods: U users receive P periods of L events (default 32 × 16 × 250). After each period
   every user's embedding is brought up to date
     - stateful:  run the period's events from the carried states (cost flat in p),
     - recompute: re-embed the whole prefix of p·L events (cost growing linearly in p),
   both in packed batches; per-period medians over --repeats runs, and the ratio
   recompute / stateful measured side by side in the same run (PERFORMANCE.md target: flat).
2. store: UserStateStore.update for 10,000 users × 10 new events in one call — first for new
   users, then again for the same (now existing) users — in users/s and events/s; beside it the
   embedder alone with the states already in memory, which isolates the store's gather/scatter.

A random-init model of the use-train default size (hidden 64, 2 layers, 4 heads): the cost does
not depend on the weights. CPU by default; `--device cuda` on a GPU.
Results: a table on stdout and benchmarks/results/embed_<device>.csv (device, torch version,
commit and date on every row).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from use.config import USEConfig  # noqa: E402
from use.embed import Carry, Embedder, embed_periods  # noqa: E402
from use.model import USEModel  # noqa: E402
from use.store import UserStateStore  # noqa: E402
from common import device_name, git_commit, sync  # noqa: E402

PROVIDER = {"torch": "torch_chunk", "triton": "triton", "reference": "reference"}


def bench_periods(model, args, rng) -> list:
    V = model.config.vocab_size
    seqs = [rng.integers(5, V, size=args.periods * args.period_len) for _ in range(args.users)]
    emb = Embedder(model, max_tokens=args.max_tokens)
    emb.embed([s[:args.period_len] for s in seqs[:4]])           # warm-up
    runs = [embed_periods(emb, seqs, args.periods, args.period_len, ["stateful", "recompute"], progress=False)
            for _ in range(args.repeats)]
    diff = max(float(np.abs(r.embeddings["stateful"] - r.embeddings["recompute"]).max()) for r in runs)
    rows = []
    for p in range(args.periods):
        st = statistics.median(r.seconds["stateful"][p] for r in runs)
        rc = statistics.median(r.seconds["recompute"][p] for r in runs)
        for strategy, sec, tok in (("stateful", st, runs[0].tokens["stateful"][p]),
                                   ("recompute", rc, runs[0].tokens["recompute"][p])):
            rows.append(dict(suite="periods", strategy=strategy, period=p + 1, users=args.users,
                             new_events=args.period_len, tokens=int(tok), seconds=sec,
                             tokens_per_s=tok / sec, users_per_s=args.users / sec,
                             ratio_recompute_over_stateful=rc / st))
    print(f"periods: max |stateful - recompute| = {diff:.2e} over {args.repeats} runs")
    return rows


def bench_store(model, args, rng) -> list:
    V = model.config.vocab_size
    U, E = args.store_users, args.new_events
    ids = [f"user{i:06d}" for i in range(U)]
    dev = next(model.parameters()).device
    rows = []

    def timed(fn):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        return time.perf_counter() - t0

    store = UserStateStore(model, max_tokens=args.max_tokens, max_seqs=args.max_seqs)
    store.update(ids[:8], [rng.integers(5, V, size=E) for _ in range(8)])    # warm-up
    new = [rng.integers(5, V, size=E) for _ in range(U)]
    rows.append(("store new users", timed(lambda: store.update(ids, new))))
    times = []
    for _ in range(args.repeats):
        batch = [rng.integers(5, V, size=E) for _ in range(U)]
        times.append(timed(lambda: store.update(ids, batch)))
    rows.append(("store existing users", statistics.median(times)))
    emb = Embedder(model, max_tokens=args.max_tokens, max_seqs=args.max_seqs)
    carry = Carry.empty(model, U)
    times = []
    for _ in range(args.repeats):
        batch = [rng.integers(5, V, size=E) for _ in range(U)]
        times.append(timed(lambda: emb.advance(batch, carry)))
    rows.append(("embedder only (carry in memory)", statistics.median(times)))
    kernel = "recurrent" if emb._has_retention_arg and E <= emb.recurrent_max_len else "model default (chunk)"
    return [dict(suite="store", strategy=name, period="", users=U, new_events=E, tokens=U * E, seconds=sec,
                 tokens_per_s=U * E / sec, users_per_s=U / sec, ratio_recompute_over_stateful="",
                 kernel=kernel) for name, sec in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Stateful vs recompute embedding cost per period, and "
                                             "UserStateStore update throughput.")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "reference"],
                    help="retention backend (auto: triton on CUDA, torch on CPU)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size (default: 64, the use-train default)")
    ap.add_argument("--layers", type=int, default=2, help="RetNet blocks (default: 2)")
    ap.add_argument("--heads", type=int, default=4, help="retention heads (default: 4)")
    ap.add_argument("--events", type=int, default=48, help="event types E (default: 48, the synthetic default)")
    ap.add_argument("--users", type=int, default=32, help="users in the periods benchmark (default: 32)")
    ap.add_argument("--periods", type=int, default=16, help="periods P (default: 16)")
    ap.add_argument("--period-len", type=int, default=250, help="events per period L (default: 250)")
    ap.add_argument("--store-users", type=int, default=10_000, help="users per store update (default: 10000)")
    ap.add_argument("--new-events", type=int, default=10, help="new events per user per store update (default: 10)")
    ap.add_argument("--max-tokens", type=int, default=32768, help="tokens per forward call (default: 32768)")
    ap.add_argument("--max-seqs", type=int, default=8192, help="sequences per forward call (default: 8192)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians reported (default: 3)")
    ap.add_argument("--skip", choices=["periods", "store"], action="append", default=[],
                    help="skip a suite (repeatable)")
    ap.add_argument("--csv", default=None, help="output CSV (default: benchmarks/results/embed_<device>.csv)")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = USEConfig(vocab_size=5 + args.events, num_events=args.events, hidden_size=args.hidden,
                    num_layers=args.layers, num_heads=args.heads, backend=args.backend)
    model = USEModel(cfg).to(dev).eval()
    backend = args.backend if args.backend != "auto" else ("triton" if dev.type == "cuda" else "torch")
    meta = dict(provider=PROVIDER[backend], device=device_name(dev), torch=torch.__version__, commit=git_commit(),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                model=f"h{args.hidden}-L{args.layers}-H{args.heads}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench_embed: {meta['device']}, provider {meta['provider']}, model {meta['model']}, torch "
          f"{meta['torch']}, commit {meta['commit']}, load average {load:.2f}")
    t0 = time.perf_counter()
    rows = []
    if "periods" not in args.skip:
        rows += bench_periods(model, args, rng)
    if "store" not in args.skip:
        rows += bench_store(model, args, rng)

    per = [r for r in rows if r["suite"] == "periods"]
    if per:
        print(f"\nper-period cost, {args.users} users × {args.period_len} new events, medians of {args.repeats}")
        print(f"  {'period':>6} {'stateful s':>11} {'recompute s':>12} {'recompute/stateful':>19} {'stateful tok/s':>15}")
        for p in range(1, args.periods + 1):
            s = next(r for r in per if r["period"] == p and r["strategy"] == "stateful")
            c = next(r for r in per if r["period"] == p and r["strategy"] == "recompute")
            print(f"  {p:>6} {s['seconds']:11.4f} {c['seconds']:12.4f} {c['seconds'] / s['seconds']:19.2f} "
                  f"{s['tokens_per_s']:15.0f}")
        st = [r["seconds"] for r in per if r["strategy"] == "stateful"]
        rc = [r["seconds"] for r in per if r["strategy"] == "recompute"]
        print(f"  cumulative: stateful {sum(st):.3f}s, recompute {sum(rc):.3f}s ({sum(rc) / sum(st):.1f}×); "
              f"last/first period: stateful {st[-1] / st[0]:.2f}×, recompute {rc[-1] / rc[0]:.2f}×")
    sto = [r for r in rows if r["suite"] == "store"]
    if sto:
        print(f"\nstore updates, {args.store_users} users × {args.new_events} new events in one call "
              f"(kernel: {sto[0]['kernel']})")
        print(f"  {'':<34} {'seconds':>9} {'users/s':>11} {'events/s':>11}")
        for r in sto:
            print(f"  {r['strategy']:<34} {r['seconds']:9.3f} {r['users_per_s']:11.0f} {r['tokens_per_s']:11.0f}")

    path = args.csv or os.path.join(ROOT, "benchmarks", "results", f"embed_{args.device.split(':')[0]}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = ["suite", "strategy", "period", "users", "new_events", "tokens", "seconds", "tokens_per_s",
              "users_per_s", "ratio_recompute_over_stateful", "kernel"] + list(meta)
    from use.io import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({**{"kernel": ""}, **r, **meta})
    atomic_write(path, write)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
