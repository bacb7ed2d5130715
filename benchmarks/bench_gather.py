"""Segment gathering + FEP labels: the C++/CUDA op against the published approach, side by side.

The published USE data path builds every batch in Python: per-segment lists, a
`collections.Counter` sliding over the future window for the FEP labels, and one dense tensor built
at the end. `reference` below is that approach (checked equal to the op before timing); `cpu` /
`cuda` are `gather_segments` (padded) and `*_packed` is `gather_segments_packed`.

Bytes (the floor): tokens read (B * (L + W) * 4) + outputs written per position (ids 8, mask 1,
labels E, fep_mask 1). On CUDA the op is also compared with a measured copy bandwidth: torch
clone of a uint8 tensor of the same byte count (read + write counted, like the op).

    python benchmarks/bench_gather.py                 # CPU, ~30 s
    python benchmarks/bench_gather.py --device cuda   # GB/s vs copy bandwidth

Writes benchmarks/results/gather_<device>.csv (device name, torch version, commit, date).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time
from collections import Counter

import numpy as np
import torch

from common import device_name, git_commit
from use_kernels import gather_segments, gather_segments_packed, sample_segments

EVENT_OFFSET = 5
PAD_ID = 3
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---- the published approach ---------------------------------------------------------------------


def published_gather(user_seqs, users, starts, lengths, *, max_len, W, E):
    """Per-segment Python lists, a Counter sliding over the future window, one dense tensor at the
    end. `user_seqs` holds each user's full sequence as a Python list (as the published data
    loader keeps them), so the future window may run past the segment's end."""
    ids_rows, attn_rows, label_rows, fmask_rows = [], [], [], []
    for u, s, n in zip(users, starts, lengths):
        seq = user_seqs[u]
        end = len(seq)
        window = Counter(seq[s + 1:s + 1 + W])              # future window of position s
        labels, fmask = [], []
        for i in range(n):
            p = s + i
            if i > 0:                                       # slide: tokens[p] leaves, tokens[p+W] enters
                window[seq[p]] -= 1
                if p + W < end:
                    window[seq[p + W]] += 1
            row = [0] * E
            for tok, c in window.items():
                e = tok - EVENT_OFFSET
                if c > 0 and 0 <= e < E:
                    row[e] = 1
            labels.append(row)
            fmask.append(p + W < end)
        pad = max_len - n
        ids_rows.append(seq[s:s + n] + [PAD_ID] * pad)
        attn_rows.append([True] * n + [False] * pad)
        label_rows.append(labels + [[0] * E] * pad)
        fmask_rows.append(fmask + [False] * pad)
    return (torch.tensor(ids_rows, dtype=torch.int64), torch.tensor(attn_rows, dtype=torch.bool),
            torch.tensor(label_rows, dtype=torch.uint8), torch.tensor(fmask_rows, dtype=torch.bool))


# ---- timing -------------------------------------------------------------------------------------


def time_cpu(fn, min_time=0.5, max_reps=200):
    """Median wall time (s) over repeats, after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_cuda(fn):
    try:
        from triton.testing import do_bench
        return do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0] / 1e3
    except ImportError:  # CUDA events, median of 50
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)


# ---- setup --------------------------------------------------------------------------------------


def make_corpus(num_users, user_len, E, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.arange(num_users + 1, dtype=np.int64) * user_len
    # Events plus a few special / out-of-range ids, as a tokenised corpus has.
    tokens = rng.integers(0, EVENT_OFFSET + E + 2, size=num_users * user_len).astype(np.int32)
    return tokens, offsets


def min_bytes(B, L, W, E):
    return B * (L + W) * 4 + B * L * (8 + 1 + E + 1)


def check_equal(got, want, what):
    for name, g, w in zip(("input_ids", "attention_mask", "fep_labels", "fep_mask"), got, want):
        if not torch.equal(g.cpu(), w):
            raise SystemExit(f"{what}: {name} differs from the reference; not timing a wrong result")


# ---- main ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="segments per batch (default: 64 and 256 on CPU; 64 and 1024 on CUDA)")
    ap.add_argument("--seg-len", type=int, default=512)
    ap.add_argument("--user-len", type=int, default=4000)
    ap.add_argument("--events", type=int, default=52, help="E, the number of event types")
    ap.add_argument("--windows", type=int, nargs="+", default=[5, 100], help="FEP windows W")
    ap.add_argument("--csv", "--out", dest="out", default=None, help="CSV path (default benchmarks/results/gather_<device>.csv)")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible")
    batches = args.batch or ([64, 256] if dev == "cpu" else [64, 1024])
    L, E = args.seg_len, args.events

    num_users = max(batches) * 2
    tokens_np, offsets_np = make_corpus(num_users, args.user_len, E)
    tokens, offsets = torch.from_numpy(tokens_np).to(dev), torch.from_numpy(offsets_np).to(dev)
    user_seqs = [tokens_np[offsets_np[u]:offsets_np[u + 1]].tolist() for u in range(num_users)]

    load = os.getloadavg()[0]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(), device_name=device_name(dev), torch=torch.__version__,
                threads=torch.get_num_threads(), loadavg_1min=round(load, 2))
    print(f"gather_segments benchmark | {meta['device_name']} | torch {meta['torch']} | "
          f"commit {meta['commit']} | load average {load:.2f} on {os.cpu_count()} CPUs")
    if dev == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        print("note: the machine is busy; multi-threaded rows wait on descheduled threads, "
              "the *_1thread rows are the stable measure")
    print(f"segments of {L} from users of {args.user_len} events, E={E}\n")
    header = f"{'provider':<20}{'B':>6}{'W':>5}{'time':>12}{'vs reference':>14}{'GB/s':>9}"
    if dev == "cuda":
        header += f"{'% of copy':>11}"
    print(header)
    print("-" * len(header))

    rows = []
    for B in batches:
        # Fixed-length segments (min_len = max_len = L) at random starts: the realistic batch.
        seg = sample_segments(offsets_np, B, min_len=L, max_len=L, rng=B)
        seg_t = [torch.from_numpy(x).to(dev) for x in seg]
        seg_lists = [x.tolist() for x in seg]
        for W in args.windows:
            nbytes = min_bytes(B, L, W, E)
            want = published_gather(user_seqs, *seg_lists, max_len=L, W=W, E=E)
            padded = lambda: gather_segments(tokens, offsets, *seg_t, max_len=L, pad_id=PAD_ID,  # noqa: E731
                                             fep_window=W, num_events=E, event_offset=EVENT_OFFSET)
            packed = lambda: gather_segments_packed(tokens, offsets, *seg_t, fep_window=W,  # noqa: E731
                                                    num_events=E, event_offset=EVENT_OFFSET)
            check_equal(padded(), want, f"{dev} op")

            t_ref = time_cpu(lambda: published_gather(user_seqs, *seg_lists, max_len=L, W=W, E=E),
                             min_time=2.0, max_reps=5)
            timer = time_cuda if dev == "cuda" else time_cpu
            results = [("reference", t_ref), (dev, timer(padded)), (f"{dev}_packed", timer(packed))]
            if dev == "cpu" and torch.get_num_threads() > 1:
                # One thread too: what a DataLoader worker (torch threads = 1) gets, and a number
                # that other processes on a shared machine cannot disturb.
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                results += [("cpu_1thread", time_cpu(padded)), ("cpu_packed_1thread", time_cpu(packed))]
                torch.set_num_threads(threads)
            copy_gbs = None
            if dev == "cuda":
                buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
                copy_gbs = 2 * nbytes / time_cuda(lambda: buf.clone()) / 1e9
            for provider, t in results:
                gbs = nbytes / t / 1e9
                row = dict(meta, provider=provider, layout="packed" if "packed" in provider else "padded",
                           B=B, seg_len=L, user_len=args.user_len, E=E, W=W, time_ms=t * 1e3,
                           ratio_vs_reference=t_ref / t, gb_per_s=gbs,
                           copy_gb_per_s=copy_gbs, pct_of_copy=(100 * gbs / copy_gbs) if copy_gbs else None)
                rows.append(row)
                line = (f"{provider:<20}{B:>6}{W:>5}{t * 1e3:>10.3f}ms{t_ref / t:>13.1f}x{gbs:>9.2f}")
                if dev == "cuda":
                    line += f"{row['pct_of_copy']:>10.1f}%"
                print(line)
    if dev == "cuda":
        print(f"\ncopy bandwidth (torch clone, same bytes): {rows[-1]['copy_gb_per_s']:.1f} GB/s")

    out = args.out or os.path.join(RESULTS, f"gather_{dev}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
