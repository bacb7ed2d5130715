"""Compile the retention kernels for a GPU target without a GPU (`python -m use_kernels.retention._compile_check`).

The Triton interpreter that runs the kernels on CPU tensors is far more permissive than the real
compiler (operand dtypes of tl.dot, layouts, constexpr handling), so a kernel can pass every CPU
test and still fail to build on the GPU machine. This compiles each kernel down to a cubin for
sm_90 with the ptxas that ships in the triton wheel. Must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import chunk_triton as ct
from . import recurrent as rc

# (dtype, D_k, D_v, varlen + initial state + dgamma flags on)
CONFIGS = [("bf16", 64, 64, True), ("bf16", 64, 64, False), ("fp16", 40, 24, True), ("fp32", 40, 24, True),
           ("bf16", 256, 256, True), ("fp32", 128, 128, True)]
SMEM_LIMIT = 232448     # bytes of shared memory one block may use on sm_90 (227 KiB)


def _compile(fn, types: dict, consts: dict, num_warps: int, num_stages: int, arch: int):
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    t0 = time.time()
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    return time.time() - t0, k.metadata.shared


def check(arch: int = 90, H: int = 12, BT: int = 64) -> bool:
    ok = True
    for dt, K, V, on in CONFIGS:
        prec = "tf32x3" if dt == "fp32" else "tf32"
        ptr = {n: f"*{dt}" for n in ("q", "k", "v", "o", "do", "dq", "dv")}
        f32 = {n: "*fp32" for n in ("g", "h0", "ht", "dh0", "dht", "dlg")}
        scalars = {"scale": "fp32", "T": "i32", "stride_dk_nv": "i64", "cu_seqlens": "*i32"}
        BK = ct._pow2(K)
        BV = min(ct._pow2(V), max(16, ct._MAX_STATE_TILE // BK))
        BV_Q = ct._pow2(V)
        BK_Q = min(ct._pow2(K), max(16, ct._MAX_STATE_TILE // BV_Q))
        NV = triton.cdiv(V, BV)
        RBV = min(ct._pow2(V), max(16, rc._MAX_STATE_TILE // BK))
        el = 4 if dt == "fp32" else 2
        jobs = [
            ("chunk fwd", ct._chunk_retention_fwd_kernel, {**ptr, **f32, **scalars},
             dict(H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_INITIAL_STATE=on, STORE_FINAL_STATE=True,
                  IS_VARLEN=on, DOT_PREC=prec, EMU=False), ct._num_warps(BK, BV), ct._num_stages(BT, BK, BV, el)),
            ("chunk bwd", ct._chunk_retention_bwd_kernel,
             {**ptr, **f32, **scalars, "dk": f"*{dt}" if NV == 1 else "*fp32"},
             dict(H=H, K=K, V=V, BT=BT, NK=triton.cdiv(K, BK_Q), BK_Q=BK_Q, BV_Q=BV_Q, BK_KV=BK, BV_KV=BV,
                  USE_INITIAL_STATE=on, STORE_DH0=on, USE_FINAL_STATE_GRAD=on, IS_VARLEN=on, DGAMMA=on,
                  DOT_PREC=prec, EMU=False), ct._num_warps(max(BK_Q, BK), max(BV_Q, BV)),
             ct._num_stages(BT, max(BK_Q, BK), max(BV_Q, BV), el)),
            ("recurrent fwd", rc._recurrent_retention_fwd_kernel, {**ptr, **f32, **scalars},
             dict(H=H, K=K, V=V, BK=BK, BV=RBV, USE_INITIAL_STATE=on, STORE_FINAL_STATE=True, IS_VARLEN=on,
                  EMU=False), 1 if BK * RBV <= 1024 else 4, 3),
        ]
        for name, fn, types, consts, warps, stages in jobs:
            try:
                s, smem = _compile(fn, types, consts, warps, stages, arch)
                if smem > SMEM_LIMIT:
                    raise RuntimeError(f"needs {smem} B of shared memory (limit {SMEM_LIMIT}): would not launch")
                print(f"ok    {name:13s} {dt} D_k={K} D_v={V} flags={on}: {s:.1f} s, {smem // 1024} KiB smem, "
                      f"{stages} stages", flush=True)
            except Exception as e:   # report every failure, not only the first
                ok = False
                print(f"FAIL  {name:13s} {dt} D_k={K} D_v={V} flags={on}: {type(e).__name__}: {e}", flush=True)
    return ok


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this check compiles")
    sys.exit(0 if check() else 1)
