"""Retention benchmarks: every fast path against the reference, side by side in one run.

CPU (default)
    torch_chunk (chunkwise PyTorch, the CPU backend) vs reference (the published materialised
    [B, H, T, T] decay mask), B=2, H=12, D=64, float32, T = 512, 1024, 2048, 4096; forward
    (inference, no autograd) and forward+backward. Targets at T=4096 (PERFORMANCE.md):
    >= 5x faster and >= 10x less peak memory.

    Peak memory on the CPU is the growth of the process's resident set (VmHWM - VmRSS from
    /proc/self/status, the high-water mark reset with `echo 5 > /proc/self/clear_refs` right before
    the call), measured in a fresh subprocess per (provider, T) with MALLOC_MMAP_THRESHOLD_=65536 so
    that every allocation of 64 KiB or more is its own mapping, returned to the OS when freed: the
    figure then counts what was really live at the peak, including temporaries inside ATen kernels
    that tensor-level tracking would miss, and nothing retained from an earlier measurement.
    Timing runs in this process with the default allocator: medians of calls that alternate
    between the providers. OMP_WAIT_POLICY defaults to PASSIVE here: on a machine whose cores are
    shared with other jobs, OpenMP's default active spin-wait makes every parallel region wait for
    a descheduled thread, and a path made of many small ops (the chunkwise one) slowed down 10-100x
    in our runs while the reference (a few huge, page-fault-bound ops) barely moved. PASSIVE
    removes that artefact without favouring either side; pass OMP_WAIT_POLICY=ACTIVE to compare.

GPU (--device cuda), run by benchmarks/device_check.sh
    bf16, B=8, H=12, D=64, T = 512 … 8192, forward and forward+backward for triton (also with a
    learnable γ: triton_dgamma), torch_chunk,
    reference (skipped where it would not fit) and fla's chunk_simple_gla with the same γ
    (g = log γ per token; skipped when fla is not importable). Correctness against the float64
    recurrence on fresh data comes first; a failure stops the run before any timing.
    triton.testing.do_bench medians; TFLOP/s on the chunkwise FLOP count, GB/s on the minimal bytes
    and % of the IO floor (minimal bytes / measured copy bandwidth, PERFORMANCE.md), peak memory
    from torch.cuda.max_memory_allocated. Then the recurrent update (many users, few new tokens
    each): bytes moved (states in and out + q, k, v, o) per second against copy bandwidth.

Results: a table on stdout and a CSV (device, versions, commit, date on every row).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

# Must precede `import torch` (libgomp reads it when loaded); see the docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from common import git_commit, versions  # noqa: E402
from use_kernels.retention import (chunk_retention, default_decay, recurrent_retention,  # noqa: E402
                                   retention_ref)

PROVIDER_BACKEND = {"reference": "reference", "torch_chunk": "torch", "triton": "triton"}


def make(B, T, H, D, dtype, device, seed=0, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v, default_decay(H).to(device)


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def memory_worker(provider: str, T: int, B: int, H: int, D: int) -> dict:
    """Runs in a fresh subprocess: peak resident growth (bytes) of one forward and one fwd+bwd."""
    torch.manual_seed(0)
    backend = PROVIDER_BACKEND[provider]
    q, k, v, g = make(B, T, H, D, torch.float32, "cpu")
    out = {}
    for mode in ("fwd", "fwd_bwd"):
        for x in (q, k, v):
            x.grad = None
            x.requires_grad_(mode == "fwd_bwd")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        if mode == "fwd":
            with torch.no_grad():
                o, _ = chunk_retention(q, k, v, g, backend=backend)
        else:
            o, _ = chunk_retention(q, k, v, g, backend=backend)
            o.sum().backward()
        out[mode] = (_status_kib("VmHWM") - base) * 1024
        del o
    return out


def measure_memory(provider, T, B, H, D) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-worker", provider, str(T), str(B), str(H), str(D)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker failed for {provider} T={T}:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def time_interleaved(fns: dict, budget_s: float, min_reps: int = 3, max_reps: int = 15) -> dict:
    """Median seconds per call of each fn, calls alternating between providers (after one warm-up
    each) so that load from other processes on a shared machine hits every provider alike."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s // max(sum(first.values()), 1e-6))))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def check_cpu() -> None:
    """Correct first: torch_chunk and reference against the float64 recurrence on fresh data."""
    q, k, v, g = make(2, 300, 4, 64, torch.float64, "cpu", seed=123)
    o_ref, _ = retention_ref(q, k, v, g)
    for provider, backend in PROVIDER_BACKEND.items():
        if backend == "triton":
            continue
        o, _ = chunk_retention(q.float(), k.float(), v.float(), g, backend=backend)
        err = ((o.double() - o_ref).abs().max() / o_ref.abs().max()).item()
        print(f"check {provider:12s} fp32 vs fp64 recurrence: max rel err {err:.2e}")
        if not err < 1e-5:
            sys.exit(f"{provider} is wrong (rel err {err:.2e}): no timing")


def run_cpu(args) -> list:
    check_cpu()
    B, H, D = args.B or 2, args.H, args.D
    Ts = args.T or [512, 1024, 2048, 4096]
    providers = ["reference", "torch_chunk"]
    rows = []
    for T in Ts:
        fwd, fwd_bwd, res = {}, {}, {}
        for provider in providers:
            backend = PROVIDER_BACKEND[provider]
            q, k, v, g = make(B, T, H, D, torch.float32, "cpu", requires_grad=True)

            def f(q=q, k=k, v=v, g=g, backend=backend):
                with torch.no_grad():
                    chunk_retention(q, k, v, g, backend=backend)

            def fb(q=q, k=k, v=v, g=g, backend=backend):
                for x in (q, k, v):
                    x.grad = None
                o, _ = chunk_retention(q, k, v, g, backend=backend)
                o.sum().backward()
            fwd[provider], fwd_bwd[provider] = f, fb
        t_f = time_interleaved(fwd, args.budget / 2)
        t_fb = time_interleaved(fwd_bwd, args.budget / 2)
        del fwd, fwd_bwd
        for provider in providers:
            mem = measure_memory(provider, T, B, H, D)
            res[provider] = dict(fwd_s=t_f[provider], fwd_bwd_s=t_fb[provider], peak_fwd=mem["fwd"],
                                 peak_fwd_bwd=mem["fwd_bwd"])
        ref = res["reference"]
        for provider in providers:
            r = res[provider]
            rows.append(dict(
                provider=provider, T=T, B=B, H=H, D=D, dtype="float32",
                fwd_ms=r["fwd_s"] * 1e3, fwd_bwd_ms=r["fwd_bwd_s"] * 1e3,
                speedup_fwd=ref["fwd_s"] / r["fwd_s"], speedup_fwd_bwd=ref["fwd_bwd_s"] / r["fwd_bwd_s"],
                peak_fwd_mib=r["peak_fwd"] / 2**20, peak_fwd_bwd_mib=r["peak_fwd_bwd"] / 2**20,
                mem_ratio_fwd=ref["peak_fwd"] / max(r["peak_fwd"], 1),
                mem_ratio_fwd_bwd=ref["peak_fwd_bwd"] / max(r["peak_fwd_bwd"], 1)))
            print_row(rows[-1], first=len(rows) == 1)
    return rows


COLS_CPU = [("provider", "12s"), ("T", "6d"), ("fwd_ms", "10.2f"), ("fwd_bwd_ms", "11.2f"),
            ("speedup_fwd", "12.1f"), ("speedup_fwd_bwd", "16.1f"), ("peak_fwd_mib", "13.1f"),
            ("peak_fwd_bwd_mib", "17.1f"), ("mem_ratio_fwd", "14.1f"), ("mem_ratio_fwd_bwd", "18.1f")]


def _width(fmt: str) -> int:
    return int(re.match(r"\d+", fmt).group())


def print_row(row, first=False, cols=COLS_CPU):
    if first:
        print(" ".join(f"{name:>{_width(fmt)}}" for name, fmt in cols))
    cells = []
    for name, fmt in cols:
        val = row.get(name, "")
        width = _width(fmt)
        if isinstance(val, float) and math.isnan(val) or val == "" or val is None:
            cells.append(f"{'-':>{width}}")
        elif isinstance(val, str):
            cells.append(f"{val:>{width}}")
        else:
            cells.append(format(val, fmt))
    print(" ".join(cells), flush=True)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        return chunk_simple_gla
    except Exception as e:   # fla is optional: it travels as a wheel to the GPU machine
        print(f"fla not importable ({type(e).__name__}: {e}); skipping the fla rows")
        return None


def gpu_fn(provider, gamma, fla_fn):
    if provider == "fla":
        log_g = torch.log(gamma.float())
        import inspect
        if "g_gamma" in inspect.signature(fla_fn).parameters:
            # fla >= 0.4 takes a constant per-head decay (log γ, [H]): its fastest path for retention.
            return lambda q, k, v: fla_fn(q=q, k=k, v=v, g_gamma=log_g, scale=q.shape[-1] ** -0.5)[0]
        per_token = {}   # g = log γ per token [B, T, H], built once per shape (outside the timing)

        def f(q, k, v):
            B, T, H, _ = q.shape
            if (B, T) not in per_token:
                per_token[(B, T)] = log_g.view(1, 1, H).expand(B, T, H).contiguous()
            return fla_fn(q=q, k=k, v=v, g=per_token[(B, T)], scale=q.shape[-1] ** -0.5)[0]
        return f
    if provider == "triton_dgamma":         # learnable decay: the backward also returns dγ
        g_learn = gamma.detach().float().clone().requires_grad_()
        return lambda q, k, v: chunk_retention(q, k, v, g_learn, backend="triton")[0]
    if provider == "triton_recurrent":
        return lambda q, k, v: recurrent_retention(q, k, v, gamma, backend="triton")[0]
    backend = PROVIDER_BACKEND[provider]
    return lambda q, k, v: chunk_retention(q, k, v, gamma, backend=backend)[0]


def check_gpu(providers, fla_fn, dev="cuda", shape=(2, 300, 4, 64)) -> None:
    """Fresh data, float64 truth; bf16 must be within 2x the error of plain bf16 PyTorch and fp32
    within 1e-4 relative, outputs and gradients. Exits before any timing on a failure."""
    B, T, H, D = shape
    q, k, v, gamma = make(B, T, H, D, torch.float64, dev, seed=321)
    w = torch.randn(B, T, H, D, dtype=torch.float64, device=dev)

    def grads(fn, dtype):
        xs = [x.to(dtype).detach().requires_grad_() for x in (q, k, v)]
        o = fn(*xs)
        (o.double() * w).sum().backward()
        return [o] + [x.grad for x in xs]

    truth = grads(lambda a, b, c: retention_ref(a, b, c, gamma)[0], torch.float64)
    plain = grads(lambda a, b, c: _plain_bf16(a, b, c, gamma), torch.bfloat16)
    ok = True
    for provider in providers:
        fn = gpu_fn(provider, gamma, fla_fn)
        for dtype in ((torch.bfloat16, torch.float32) if provider != "fla" else (torch.bfloat16,)):
            try:
                got = grads(fn, dtype)
            except Exception as e:
                print(f"check {provider} {dtype}: failed to run: {e}")
                ok = False
                continue
            for name, a, b, p in zip(("o", "dq", "dk", "dv"), got, truth, plain):
                err = (a.double() - b).abs().max().item()
                if dtype == torch.bfloat16:
                    bound = 2 * (p.double() - b).abs().max().item()
                else:
                    bound = 1e-4 * max(1.0, b.abs().max().item())
                good = err <= bound
                ok &= good or provider == "fla"      # fla is a comparison, not ours to fix
                print(f"check {provider:16s} {str(dtype)[6:]:8s} {name:2s}: err {err:.2e} bound {bound:.2e} "
                      f"{'ok' if good else 'FAIL'}")
    if not ok:
        sys.exit("correctness check failed: no timing")


def _plain_bf16(q, k, v, gamma):
    """The parallel form written in PyTorch with bf16 tensors (what the 2x rule compares with)."""
    T, H = q.shape[1], q.shape[2]
    qf, kf, vf = (x.transpose(1, 2) for x in (q, k, v))
    idx = torch.arange(T, device=q.device)
    diff = idx.view(T, 1) - idx.view(1, T)
    g = gamma.double().view(H, 1, 1)
    decay = torch.where(diff >= 0, g ** diff.clamp(min=0), torch.zeros((), dtype=torch.float64,
                                                                       device=q.device)).to(q.dtype)
    return (((qf @ kf.transpose(-1, -2)) * decay * q.shape[-1] ** -0.5) @ vf).transpose(1, 2)


def _do_bench(fn, grad_to_none=None, smoke=False) -> float:
    """Median ms: triton.testing.do_bench on the GPU; a plain timer in --_smoke mode."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])[0]


def copy_bandwidth(dev="cuda", smoke=False) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    n = 2**28 if not smoke else 2**20
    a = torch.empty(n, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    ms = _do_bench(lambda: b.copy_(a), smoke=smoke)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def run_gpu(args) -> list:
    smoke = args._smoke      # the GPU code path on CPU tensors (Triton interpreter), tiny shapes
    dev = "cpu" if smoke else "cuda"
    cuda = dev == "cuda"
    fla_fn = _fla() if cuda else None
    providers = ["triton", "triton_dgamma", "torch_chunk", "reference"] + (["fla"] if fla_fn is not None else [])
    check_gpu(["triton", "triton_recurrent", "torch_chunk"] + (["fla"] if fla_fn else []), fla_fn, dev,
              (2, 300, 4, 64) if cuda else (1, 40, 2, 32))
    bw = copy_bandwidth(dev, smoke)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    B, H, D, C = args.B or 8, args.H, args.D, 64
    Ts = args.T or [512, 1024, 2048, 4096, 8192]
    dtype = torch.bfloat16
    free = torch.cuda.mem_get_info()[0] if cuda else 2**34
    rows = []
    for T in Ts:
        flops_fwd = B * H * T * (4 * C * D + 4 * D * D)        # PERFORMANCE.md chunkwise count
        el = B * T * H * D * 2                                   # one bf16 [B, T, H, D] tensor
        bytes_fwd, bytes_fb = 4 * el, 11 * el                   # q,k,v,o | + q,k,v,do,dq,dk,dv
        res = {}
        for provider in providers:
            if provider == "reference" and 6 * B * H * T * T * 4 > 0.8 * free:
                res[provider] = None                            # [B, H, T, T] fp32 ×~6 would not fit
                continue
            q, k, v, gamma = make(B, T, H, D, dtype, dev, requires_grad=True)
            do = torch.randn_like(v)
            fn = gpu_fn(provider, gamma, fla_fn)
            try:
                with torch.no_grad():
                    ms_f = _do_bench(lambda: fn(q, k, v), smoke=smoke)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0
                ms_fb = _do_bench(lambda: fn(q, k, v).backward(do), grad_to_none=[q, k, v], smoke=smoke)
                peak = torch.cuda.max_memory_allocated() - base if cuda else 0
                res[provider] = (ms_f, ms_fb, peak)
            except torch.cuda.OutOfMemoryError:
                res[provider] = None
            del q, k, v, do
            if cuda:
                torch.cuda.empty_cache()
        ref = res.get("reference")
        for provider in providers:
            r = res[provider]
            row = dict(provider=provider, T=T, B=B, H=H, D=D, dtype="bfloat16")
            if r is None:
                row.update(note="skipped (would not fit)" if provider == "reference" else "OOM")
            else:
                ms_f, ms_fb, peak = r
                row.update(fwd_ms=ms_f, fwd_bwd_ms=ms_fb,
                           tflops_fwd=flops_fwd / (ms_f * 1e-3) / 1e12,
                           tflops_fwd_bwd=3 * flops_fwd / (ms_fb * 1e-3) / 1e12,
                           gbps_fwd=bytes_fwd / (ms_f * 1e-3) / 1e9, gbps_fwd_bwd=bytes_fb / (ms_fb * 1e-3) / 1e9,
                           pct_io_floor_fwd=100 * bytes_fwd / bw / (ms_f * 1e-3),
                           pct_io_floor_fwd_bwd=100 * bytes_fb / bw / (ms_fb * 1e-3),
                           peak_fwd_bwd_mib=peak / 2**20)
                if ref is not None:
                    row.update(speedup_fwd=ref[0] / ms_f, speedup_fwd_bwd=ref[1] / ms_fb,
                               mem_ratio_fwd_bwd=ref[2] / max(peak, 1))
                if "fla" in res and res["fla"] is not None and provider != "fla":
                    row.update(vs_fla_fwd=res["fla"][0] / ms_f, vs_fla_fwd_bwd=res["fla"][1] / ms_fb)
            rows.append(row)
            print_row(row, first=len(rows) == 1, cols=COLS_GPU)
    rows += run_recurrent_gpu(args, bw, dev, smoke)
    return rows


COLS_GPU = [("provider", "16s"), ("T", "6d"), ("fwd_ms", "9.3f"), ("fwd_bwd_ms", "11.3f"),
            ("tflops_fwd_bwd", "15.1f"), ("gbps_fwd_bwd", "13.0f"), ("pct_io_floor_fwd", "17.1f"),
            ("pct_io_floor_fwd_bwd", "21.1f"), ("speedup_fwd_bwd", "16.1f"), ("mem_ratio_fwd_bwd", "18.1f"),
            ("vs_fla_fwd_bwd", "15.2f"), ("note", "24s")]


def run_recurrent_gpu(args, bw, dev="cuda", smoke=False) -> list:
    """Streaming update: N users × H heads, a few new tokens each, states in and out (float32)."""
    H, D = args.H, args.D
    rows = []
    print()
    for N, T_new in (((4096, 1), (4096, 4), (16384, 4), (4096, 16)) if not smoke else ((8, 1), (8, 4))):
        q, k, v, gamma = make(N, T_new, H, D, torch.bfloat16, dev)
        s0 = torch.randn(N, H, D, D, device=dev)
        moved = 2 * s0.numel() * 4 + 4 * q.numel() * 2               # states in+out, q,k,v,o
        for provider in ("triton_recurrent", "triton", "torch_chunk"):
            if provider == "triton_recurrent":
                f = lambda: recurrent_retention(q, k, v, gamma, initial_state=s0, output_final_state=True,  # noqa: E731
                                                backend="triton")
            else:
                be = PROVIDER_BACKEND[provider]
                f = lambda: chunk_retention(q, k, v, gamma, initial_state=s0, output_final_state=True,  # noqa: E731
                                            backend=be)
            ms = _do_bench(f, smoke=smoke)
            row = dict(provider=f"update:{provider}", T=T_new, B=N, H=H, D=D, dtype="bfloat16",
                       fwd_ms=ms, gbps_fwd=moved / (ms * 1e-3) / 1e9,
                       pct_copy_bw=100 * moved / (ms * 1e-3) / bw)
            rows.append(row)
            print_row(row, first=len(rows) == 1, cols=[("provider", "24s"), ("B", "7d"), ("T", "4d"),
                                                        ("fwd_ms", "9.3f"), ("gbps_fwd", "9.0f"),
                                                        ("pct_copy_bw", "12.1f")])
    return rows


# ------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--T", type=int, nargs="*", help="sequence lengths (default: 512..4096 cpu, 512..8192 cuda)")
    ap.add_argument("--B", type=int, default=None, help="batch (default 2 cpu, 8 cuda)")
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--budget", type=float, default=12.0, help="CPU seconds of timing per T (both providers)")
    ap.add_argument("--csv", default=None, help="output CSV (default benchmarks/results/retention_<device>.csv)")
    ap.add_argument("--_smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_memory-worker", nargs=5, metavar=("PROVIDER", "T", "B", "H", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_worker:
        p, T, B, H, D = args._memory_worker
        print(json.dumps(memory_worker(p, int(T), int(B), int(H), int(D))))
        return
    if args._smoke:   # exercise the GPU mode's code on the CPU before spending GPU time on it
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.device, args.B, args.H, args.D, args.T = "cuda", 1, 2, 32, args.T or [32, 64]
        args.csv = args.csv or os.devnull
    elif args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU here")

    t0 = time.time()
    rows = run_cpu(args) if args.device == "cpu" else run_gpu(args)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=args.device,
                device_name=(torch.cuda.get_device_name() if args.device == "cuda" and not args._smoke
                             else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                                  f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})"),
                commit=git_commit(), **versions())
    path = args.csv or os.path.join(ROOT, "benchmarks", "results", f"retention_{args.device}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(meta) + sorted({k for r in rows for k in r}, key=lambda k: (
        [c for c, _ in COLS_CPU + COLS_GPU].index(k) if k in [c for c, _ in COLS_CPU + COLS_GPU] else 99, k))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}})
    print(f"\nwrote {os.path.relpath(path)} ({len(rows)} rows) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
