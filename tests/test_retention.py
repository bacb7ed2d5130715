"""Retention (SPEC §1): every backend against the float64 recurrence `retention_ref`.

Backends: "torch" and "reference" run in float64 here and must match to ~1e-12; "triton" runs
its kernels on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py) in float32, compared
with the float64 truth at a float32 tolerance. The triton cases are a curated set that covers
every value of each axis (T, chunk size, D, H, initial state) rather than the full product, so
this file stays within a few minutes on 2 cores. On a GPU the same tests run the real kernels.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from use_kernels.retention import (chunk_retention, default_decay, parallel_retention_ref,
                                   recurrent_retention, retention_ref)
from use_kernels.retention import ops as retention_ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAVE_TRITON = DEV == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton cases carry the `cuda` marker too: on a GPU machine `pytest -m cuda` runs them on the real
# kernels; here they run under the interpreter.
needs_triton = [pytest.mark.skipif(not HAVE_TRITON, reason="triton needs CUDA or TRITON_INTERPRET=1"),
                pytest.mark.cuda]


def triton_only(fn):
    for m in needs_triton:
        fn = m(fn)
    return fn

# One table of tolerances: max |got - truth| / max(1, max |truth|), by the dtype the backend ran in.
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}
TOL_DGAMMA = {torch.float64: 1e-9, torch.float32: 2e-4}   # a sum over all tokens: more rounding


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    diff = (got - ref).abs()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = diff.max().item() / scale if diff.numel() else 0.0
    if not err <= tol:   # also catches NaN
        bad = (diff > tol * scale) | diff.isnan()
        first = tuple(bad.nonzero()[0].tolist()) if bad.any() else None
        raise AssertionError(f"{name}: max abs diff {diff.max().item():.3e} (relative {err:.3e} > {tol:.1e}), "
                             f"mean abs diff {diff.mean().item():.3e}, first mismatch at {first}: "
                             f"got {got[first].item() if first else None}, want {ref[first].item() if first else None}")


def make_inputs(B, T, H, D_k, D_v, *, N=None, h0=True, seed=0, gamma="random", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D_k, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, D_k, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, H, D_v, generator=g, dtype=torch.float64)
    if gamma == "default":
        gam = default_decay(H).double()
    else:   # spread over (0.5, 0.999): fast and slow heads
        gam = 0.5 + 0.499 * torch.rand(H, generator=g, dtype=torch.float64)
    s0 = torch.randn(N or B, H, D_k, D_v, generator=g, dtype=torch.float64) if h0 else None
    cast = lambda x: None if x is None else x.to(dtype)   # noqa: E731
    return cast(q), cast(k), cast(v), gam, s0


@functools.lru_cache(maxsize=None)
def truth_fwd(B, T, H, D_k, D_v, h0, seed):
    q, k, v, g, s0 = make_inputs(B, T, H, D_k, D_v, h0=h0, seed=seed)
    return retention_ref(q, k, v, g, initial_state=s0, output_final_state=True)


# ---------------------------------------------------------------------------------------------
# forward: outputs and final states against the recurrence
# ---------------------------------------------------------------------------------------------
def test_default_decay():
    g = default_decay(12)
    assert g.dtype == torch.float32 and g.shape == (12,)
    x = torch.linspace(torch.log(torch.tensor(1 / 32.)).item(), torch.log(torch.tensor(1 / 512.)).item(), 12)
    assert torch.allclose(g, 1 - torch.exp(x), atol=1e-7)
    assert abs(g[0].item() - (1 - 1 / 32)) < 1e-6 and abs(g[-1].item() - (1 - 1 / 512)) < 1e-6
    assert bool(((g > 0) & (g < 1)).all())


def test_references_agree():
    q, k, v, g, s0 = make_inputs(2, 37, 3, 16, 8, seed=5)
    o1, f1 = retention_ref(q, k, v, g, initial_state=s0, output_final_state=True)
    o2, f2 = parallel_retention_ref(q, k, v, g, initial_state=s0, output_final_state=True)
    assert_close("o", o2, o1, 1e-13)
    assert_close("final", f2, f1, 1e-13)


@pytest.mark.parametrize("h0", [False, True], ids=["zero_state", "init_state"])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("D", [16, 40, 64])
@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
def test_torch_matches_recurrence(T, C, D, H, h0):
    q, k, v, g, s0 = make_inputs(2, T, H, D, D, h0=h0, seed=T)
    o_ref, f_ref = truth_fwd(2, T, H, D, D, h0, T)
    o, f = chunk_retention(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=C, backend="torch")
    assert o.dtype == torch.float64 and f.dtype == torch.float64
    assert_close("o", o, o_ref, TOL[torch.float64])
    assert_close("final", f, f_ref, TOL[torch.float64])


@pytest.mark.parametrize("h0", [False, True], ids=["zero_state", "init_state"])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("D", [16, 40, 64])
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
def test_reference_backend_matches_recurrence(T, D, H, h0):
    q, k, v, g, s0 = make_inputs(2, T, H, D, D, h0=h0, seed=T)
    o_ref, f_ref = truth_fwd(2, T, H, D, D, h0, T)
    o, f = chunk_retention(q, k, v, g, initial_state=s0, output_final_state=True, backend="reference")
    assert_close("o", o, o_ref, TOL[torch.float64])
    assert_close("final", f, f_ref, TOL[torch.float64])


# (T, C, D_k, D_v, H, h0): every T, C, D, H and h0 value appears; odd sizes and D_k != D_v too.
TRITON_CASES = [
    (1, 16, 16, 16, 1, True),
    (2, 32, 40, 40, 3, False),
    (63, 64, 64, 64, 1, True),
    (64, 16, 40, 40, 3, True),
    (64, 64, 16, 16, 1, False),
    (65, 32, 64, 64, 3, True),
    (65, 16, 16, 16, 3, False),
    (200, 64, 40, 40, 1, True),
    (200, 16, 64, 64, 3, False),
    (200, 32, 16, 16, 3, True),
    (70, 16, 40, 24, 3, True),     # D_k != D_v, both non-powers of two
    (33, 16, 24, 72, 1, True),     # D_v > D_k
]


@triton_only
@pytest.mark.parametrize("T,C,D_k,D_v,H,h0", TRITON_CASES,
                         ids=[f"T{c[0]}-C{c[1]}-Dk{c[2]}-Dv{c[3]}-H{c[4]}-{'h0' if c[5] else 'zero'}"
                              for c in TRITON_CASES])
def test_triton_matches_recurrence(T, C, D_k, D_v, H, h0):
    q, k, v, g, s0 = make_inputs(2, T, H, D_k, D_v, h0=h0, seed=T)
    o_ref, f_ref = truth_fwd(2, T, H, D_k, D_v, h0, T)
    f32 = lambda x: None if x is None else x.float().to(DEV)   # noqa: E731
    o, f = chunk_retention(f32(q), f32(k), f32(v), f32(g), initial_state=f32(s0), output_final_state=True,
                           chunk_size=C, backend="triton")
    assert o.dtype == torch.float32 and f.dtype == torch.float32
    assert_close("o", o, o_ref, TOL[torch.float32])
    assert_close("final", f, f_ref, TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("T,D_k,D_v,h0", [(1, 16, 16, True), (5, 40, 40, False), (63, 64, 32, True),
                                          (130, 16, 24, True)])
def test_recurrent_matches_recurrence(backend, T, D_k, D_v, h0):
    H = 3
    q, k, v, g, s0 = make_inputs(2, T, H, D_k, D_v, h0=h0, seed=T + 1)
    o_ref, f_ref = truth_fwd(2, T, H, D_k, D_v, h0, T + 1)
    dt = torch.float64 if backend == "torch" else torch.float32
    cast = lambda x: None if x is None else x.to(dt).to(DEV if backend == "triton" else "cpu")   # noqa: E731
    o, f = recurrent_retention(cast(q), cast(k), cast(v), cast(g), initial_state=cast(s0),
                               output_final_state=True, backend=backend)
    assert_close("o", o, o_ref, TOL[dt])
    assert_close("final", f, f_ref, TOL[dt])


def test_torch_any_chunk_size_and_scale():
    """The torch path takes any chunk size (not only powers of two) and a custom scale."""
    q, k, v, g, s0 = make_inputs(1, 50, 2, 8, 12, seed=3)
    o_ref, f_ref = retention_ref(q, k, v, g, scale=0.3, initial_state=s0, output_final_state=True)
    for C in (1, 7, 24, 50, 128):
        o, f = chunk_retention(q, k, v, g, scale=0.3, initial_state=s0, output_final_state=True,
                               chunk_size=C, backend="torch")
        assert_close(f"o C={C}", o, o_ref, TOL[torch.float64])
        assert_close(f"final C={C}", f, f_ref, TOL[torch.float64])


def test_output_final_state_flag_and_dtypes():
    q, k, v, g, _ = make_inputs(1, 10, 2, 8, 8, h0=False, seed=4)
    for backend in ("torch", "reference"):
        o, f = chunk_retention(q, k, v, g, backend=backend)
        assert f is None and o.dtype == torch.float64
        o, f = chunk_retention(q.float(), k.float(), v.float(), g, output_final_state=True, backend=backend)
        assert o.dtype == torch.float32 and f.dtype == torch.float32 and f.shape == (1, 2, 8, 8)
        o, f = chunk_retention(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, output_final_state=True,
                               backend=backend)
        assert o.dtype == torch.bfloat16 and f.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", marks=needs_triton)])
def test_empty_sequence_keeps_state(backend):
    """T = 0 (and zero-length varlen pieces): the final state is the initial state."""
    dt = torch.float64 if backend != "triton" else torch.float32
    dev = DEV if backend == "triton" else "cpu"
    q, k, v, g, s0 = make_inputs(2, 0, 2, 16, 16, seed=1, dtype=dt)
    to = lambda x: x.to(dev)   # noqa: E731
    o, f = chunk_retention(to(q), to(k), to(v), to(g.to(dt)), initial_state=to(s0), output_final_state=True,
                           backend=backend)
    assert o.shape == (2, 0, 2, 16)
    assert_close("final", f, s0, TOL[dt])


# ---------------------------------------------------------------------------------------------
# state carrying and variable length
# ---------------------------------------------------------------------------------------------
SPLIT_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton),
                  pytest.param("triton-recurrent", marks=needs_triton)]


def _run(backend, q, k, v, g, chunk_size=16, **kw):
    if backend == "triton-recurrent":
        return recurrent_retention(q, k, v, g, backend="triton", **kw)
    if backend == "torch-recurrent":
        return recurrent_retention(q, k, v, g, backend="torch", **kw)
    return chunk_retention(q, k, v, g, backend=backend, chunk_size=chunk_size, **kw)


def _cast_for(backend):
    dt = torch.float64 if backend.startswith("torch") or backend == "reference" else torch.float32
    dev = DEV if backend.startswith("triton") else "cpu"
    return dt, (lambda x: None if x is None else x.to(dt).to(dev))


@pytest.mark.parametrize("backend", SPLIT_BACKENDS)
@pytest.mark.parametrize("cuts", [[1], [16, 17], [5, 5, 40], [31, 32, 33, 90]], ids=lambda c: "-".join(map(str, c)))
def test_split_and_carry_state(backend, cuts):
    """Cutting the sequence into pieces and carrying the state gives the whole-sequence result."""
    T = 100
    dt, cast = _cast_for(backend)
    q, k, v, g, s0 = (cast(x) for x in make_inputs(2, T, 2, 24, 16, seed=7))
    o_ref, f_ref = truth_fwd(2, T, 2, 24, 16, True, 7)
    bounds = [0] + cuts + [T]
    outs, state = [], s0
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, state = _run(backend, q[:, a:b], k[:, a:b], v[:, a:b], g, initial_state=state, output_final_state=True)
        outs.append(o)
    assert_close("o", torch.cat(outs, 1), o_ref, TOL[dt])
    assert_close("final", state, f_ref, TOL[dt])


VARLEN_BACKENDS = ["torch", "reference", pytest.param("triton", marks=needs_triton),
                   pytest.param("triton-recurrent", marks=needs_triton), "torch-recurrent"]


@pytest.mark.parametrize("lens", [[5, 0, 70, 1, 16, 33], [1, 2, 1, 0, 3, 1, 2, 1, 1, 2, 1, 300]],
                         ids=["mixed", "uneven"])   # "uneven": the torch path's sequential scan
@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
def test_varlen_equals_each_sequence_alone(backend, lens):
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total, N, H = int(cu[-1]), len(lens), 3
    dt, cast = _cast_for(backend)
    q, k, v, g, s0 = (cast(x) for x in make_inputs(1, total, H, 24, 40, N=N, seed=11))
    o, f = _run(backend, q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cast(cu).int())
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        o_n, f_n = retention_ref(q[:, a:b].double().cpu(), k[:, a:b].double().cpu(), v[:, a:b].double().cpu(),
                                 g.double().cpu(), initial_state=s0[n:n + 1].double().cpu(), output_final_state=True)
        assert_close(f"o[seq {n}]", o[:, a:b], o_n, TOL[dt])
        assert_close(f"final[seq {n}]", f[n:n + 1], f_n, TOL[dt])


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
def test_varlen_isolation(backend):
    """No token of one sequence (nor chunk padding) reaches another's outputs or state: NaNs in
    sequence 1 leave sequences 0 and 2 exactly as they were."""
    cu = torch.tensor([0, 20, 37, 60], dtype=torch.int32)
    dt, cast = _cast_for(backend)
    q, k, v, g, s0 = (cast(x) for x in make_inputs(1, 60, 2, 16, 16, N=3, seed=12))
    o1, f1 = _run(backend, q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cast(cu).int())
    for x in (q, k, v):
        x[:, 20:37] = float("nan")
    o2, f2 = _run(backend, q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cast(cu).int())
    for sl in (slice(0, 20), slice(37, 60)):
        assert torch.equal(o1[:, sl], o2[:, sl]), f"{backend}: output changed outside the NaN sequence"
    assert torch.equal(f1[[0, 2]], f2[[0, 2]]), f"{backend}: a final state changed outside the NaN sequence"
    assert f2[1].isnan().all()


# ---------------------------------------------------------------------------------------------
# gradients: q, k, v, gamma, initial_state against autograd through the float64 recurrence
# ---------------------------------------------------------------------------------------------
GRAD_BACKENDS = ["torch", "reference", "torch-recurrent", pytest.param("triton", marks=needs_triton),
                 pytest.param("triton-recurrent", marks=needs_triton)]
GRAD_CASES = {  # name: (B, T, H, D_k, D_v, cu_seqlens, h0, final)
    "regular": (2, 70, 3, 40, 24, None, True, True),
    "varlen": (1, 150, 2, 16, 32, [0, 3, 40, 40, 150], True, True),   # last sequence: 2 chunks
    "no_state": (2, 33, 2, 16, 16, None, False, False),
    "wide": (1, 40, 1, 160, 200, None, True, True),   # D > 128: state tiles split over blocks
}


@functools.lru_cache(maxsize=None)
def truth_grads(case):
    B, T, H, D_k, D_v, cu, h0, final = GRAD_CASES[case]
    N = B if cu is None else len(cu) - 1
    q, k, v, g, s0 = make_inputs(B, T, H, D_k, D_v, N=N, h0=h0, seed=21)
    gen = torch.Generator().manual_seed(22)
    w_o = torch.randn(B, T, H, D_v, generator=gen, dtype=torch.float64)
    w_f = torch.randn(N, H, D_k, D_v, generator=gen, dtype=torch.float64)
    return (q, k, v, g, s0, w_o, w_f), _grads(retention_ref, (q, k, v, g, s0), w_o, w_f, cu, final)


def _grads(fn, inputs, w_o, w_f, cu, final, **kw):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, s0 = leaves
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=q.device)
    o, f = fn(q, k, v, g, initial_state=s0, output_final_state=final, cu_seqlens=cu_t, **kw)
    loss = (o.double() * w_o.to(o.device)).sum()
    if final:
        loss = loss + (f.double() * w_f.to(f.device)).sum()
    loss.backward()
    return [o, f] + [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("case", list(GRAD_CASES))
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gradients(backend, case):
    inputs, want = truth_grads(case)
    *_, cu, _, final = GRAD_CASES[case]
    w_o, w_f = inputs[5:]
    dt, cast = _cast_for(backend)
    # chunk 64 (the recurrent backward's too): the gradient cases span 1-2 chunks, and on a GPU
    # both Triton paths then share one compiled backward (compile time is the GPU check's budget)
    fn = functools.partial(_run, backend, chunk_size=64)
    got = _grads(fn, [cast(x) for x in inputs[:5]], w_o, w_f, cu, final)
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "dgamma", "dh0"], got, want):
        if b is None:
            assert a is None, f"{name}: expected None"
            continue
        assert a is not None, f"{name}: missing"
        assert_close(name, a, b, TOL_DGAMMA[dt] if name == "dgamma" else TOL[dt])


@triton_only
def test_triton_gradient_of_final_state_only():
    """Loss on the final state alone (o unused): dq is zero, dk/dv/dh0/dgamma still exact."""
    q, k, v, g, s0 = (x.float().to(DEV) for x in make_inputs(1, 40, 2, 16, 16, seed=31))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, s0)]
    _, f = chunk_retention(*leaves[:4], initial_state=leaves[4], output_final_state=True, chunk_size=16,
                           backend="triton")
    f.square().sum().backward()
    ref = [x.double().cpu().requires_grad_() for x in (q, k, v, g, s0)]
    _, f_r = retention_ref(*ref[:4], initial_state=ref[4], output_final_state=True)
    f_r.square().sum().backward()
    assert ref[0].grad is None and not leaves[0].grad.any()     # q only reaches o
    for name, a, b in zip(["dk", "dv", "dgamma", "dh0"], leaves[1:], ref[1:]):
        assert_close(name, a.grad, b.grad, TOL_DGAMMA[torch.float32])


# ---------------------------------------------------------------------------------------------
# bf16 / fp16: error against float64 at most 2x that of plain PyTorch in the same dtype
# ---------------------------------------------------------------------------------------------
def plain_lowp(q, k, v, gamma, initial_state, scale):
    """Plain PyTorch for low-precision q, k, v, as SPEC §1 defines the op (states are float32).

    "Plain" means: the T×T parallel form in q's dtype wherever only low-precision inputs meet
    (A = (q kᵀ) ⊙ sΓ with sΓ rounded to that dtype, then A v: two matmuls in bf16/fp16), and float32
    wherever the state takes part, since the state is float32 by contract:
        o   = (A v).float() + γ^{t+1} ⊙ (q.float() @ S_0), rounded once to q's dtype
        S_T = γ^T S_0 + (k.float() ⊙ sγ^{T-1-t})ᵀ v.float()                (float32)
    The decay powers come from the float64 γ. Gradients are what autograd makes of this graph.
    Rounding S_0 or S_T to bf16 here would make the baseline's state error ~1e-2 and the 2x rule
    meaningless for states and d(initial_state).
    """
    dt = q.dtype
    B, T, H, _ = q.shape
    qf, kf, vf = (x.transpose(1, 2) for x in (q, k, v))                   # [B, H, T, D]
    g = gamma.view(H, 1, 1)
    idx = torch.arange(T, device=q.device)
    diff = idx.view(T, 1) - idx.view(1, T)
    decay = torch.where(diff >= 0, g ** diff.clamp(min=0) * scale, torch.zeros((), dtype=g.dtype)).to(dt)
    o_intra = ((qf @ kf.transpose(-1, -2)) * decay) @ vf                   # [B, H, T, D_v] in dt
    o_inter = (g ** (idx + 1).view(1, T, 1)).float() * (qf.float() @ initial_state)
    o = (o_intra.float() + o_inter).to(dt)
    w = (g ** (T - 1 - idx).view(1, T, 1) * scale).float()                # [H, T, 1]
    final = (kf.float() * w).transpose(-1, -2) @ vf.float() + (g ** T).float() * initial_state
    return o.transpose(1, 2), final


LOWP_NAMES = ["o", "final", "dq", "dk", "dv", "dgamma", "dh0"]


def lowp_errors(backend, dtype):
    """Max abs error against float64 of (backend, plain PyTorch) for every quantity in LOWP_NAMES."""
    B, T, H, D = 2, 100, 2, 32
    q, k, v, g, s0 = make_inputs(B, T, H, D, D, seed=41, gamma="default")
    q, k, v = (x.to(dtype) for x in (q, k, v))           # the truth sees the same rounded inputs
    s0 = s0.float()                                      # ... and the same float32 initial state
    gen = torch.Generator().manual_seed(42)
    # d o arrives in o's dtype: round it here so the truth sees the same d o (otherwise that
    # rounding, common to every backend, dominates each gradient's error and hides the kernels')
    w_o = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).to(dtype).double()
    w_f = torch.randn(B, H, D, D, generator=gen, dtype=torch.float64)
    truth = _grads(retention_ref, [x.double() for x in (q, k, v, g, s0)], w_o, w_f, None, True)
    plain = _grads(lambda q, k, v, g, initial_state, scale=D ** -0.5, **_: plain_lowp(q, k, v, g, initial_state, scale),
                   [q, k, v, g, s0], w_o, w_f, None, True)
    dev = DEV if backend.startswith("triton") else "cpu"
    got = _grads(functools.partial(_run, backend),
                 [q.to(dev), k.to(dev), v.to(dev), g.float().to(dev), s0.to(dev)], w_o, w_f, None, True)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert plain[0].dtype == dtype and plain[1].dtype == torch.float32
    return {name: ((got[i].double().cpu() - truth[i]).abs().max().item(),
                   (plain[i].double() - truth[i]).abs().max().item())
            for i, name in enumerate(LOWP_NAMES)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", marks=needs_triton),
                                     pytest.param("triton-recurrent", marks=needs_triton)])
def test_low_precision_error_within_2x_plain(backend, dtype):
    errs = lowp_errors(backend, dtype)
    assert all(p > 0 for _, p in errs.values()), errs
    over = [f"{name}: error {e:.3e} > 2 x plain PyTorch {p:.3e}"
            for name, (e, p) in errs.items() if not e <= 2 * p]
    assert not over, f"{backend} ({dtype}): " + "; ".join(over)


# ---------------------------------------------------------------------------------------------
# torch.compile and torch.library
# ---------------------------------------------------------------------------------------------
@triton_only
def test_compile_fullgraph_triton():
    q, k, v, g, s0 = (x.float().to(DEV) for x in make_inputs(1, 40, 2, 16, 16, N=3, seed=51))
    cu = torch.tensor([0, 10, 10, 40], dtype=torch.int32, device=DEV)

    def f(q, k, v, s0):
        o, s = chunk_retention(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                               chunk_size=16, backend="triton")
        o2, s2 = recurrent_retention(q, k, v, g, initial_state=s, output_final_state=True, cu_seqlens=cu,
                                     backend="triton")
        return (o * o2).sum() + s2.square().sum()

    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    eager = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    loss_e = f(*eager)
    loss_e.backward()
    assert_close("loss", loss, loss_e, 1e-6)
    for a, b in zip(leaves, eager):
        assert_close("grad", a.grad, b.grad, 1e-6)


@triton_only
def test_opcheck():
    import use_kernels.retention.chunk_triton  # noqa: F401  (registers the ops)
    import use_kernels.retention.recurrent     # noqa: F401
    q, k, v, g, s0 = (x.float().to(DEV) for x in make_inputs(1, 20, 2, 16, 16, N=2, seed=61))
    q, k, v, s0 = (x.requires_grad_() for x in (q, k, v, s0))
    g = g.float().to(DEV).requires_grad_()
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEV)
    ops = torch.ops.use_kernels
    torch.library.opcheck(ops.retention_chunk_fwd.default, (q, k, v, g, 0.25, s0, cu, 16, True))
    torch.library.opcheck(ops.retention_chunk_fwd.default, (q, k, v, g, 0.25, None, None, 16, False))
    torch.library.opcheck(ops.retention_recurrent_fwd.default, (q, k, v, g, 0.25, s0, cu, True))
    do = torch.randn_like(v)
    torch.library.opcheck(ops.retention_bwd.default, (q.detach(), k.detach(), v.detach(), do, g.detach(), 0.25,
                                                      s0.detach(), None, cu, 16, True, True))


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _ok(**over):
    q, k, v, g, s0 = make_inputs(1, 12, 2, 8, 8, seed=71, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, gamma=g.float(), initial_state=s0.float(), cu_seqlens=None, backend="torch")
    args.update(over)
    return args


def _call(fn=chunk_retention, **over):
    a = _ok(**over)
    return fn(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("gamma"), **a)


@pytest.mark.parametrize("fn", [chunk_retention, recurrent_retention], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("over,err,msg", [
    (dict(q=torch.randn(1, 12, 2)), ValueError, "must be \\[B, T, H, D\\]"),
    (dict(k=torch.randn(1, 12, 2, 4)), ValueError, "q and k must have the same shape"),
    (dict(v=torch.randn(1, 11, 2, 8)), ValueError, "v must be"),
    (dict(v=torch.randn(1, 12, 2, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(q=torch.ones(1, 12, 2, 8, dtype=torch.int32), k=torch.ones(1, 12, 2, 8, dtype=torch.int32),
          v=torch.ones(1, 12, 2, 8, dtype=torch.int32)), TypeError, "dtype must be one of"),
    (dict(gamma=torch.tensor([0.9, 0.9, 0.9])), ValueError, "gamma must be a float tensor \\[H=2\\]"),
    (dict(gamma=torch.tensor([0.9, 1.0])), ValueError, "gamma must lie in \\(0, 1\\)"),
    (dict(gamma=torch.tensor([0.0, 0.5])), ValueError, "gamma must lie in \\(0, 1\\)"),
    (dict(gamma=torch.tensor([0.5, float("nan")])), ValueError, "gamma must lie in \\(0, 1\\)"),
    (dict(gamma=torch.tensor([9, 9])), ValueError, "gamma must be a float tensor"),
    (dict(gamma=torch.tensor([0.5, 0.5], device="meta")), ValueError, "must be on one device"),
    (dict(initial_state=torch.zeros(1, 2, 8, 7)), ValueError, "initial_state must be a float tensor"),
    (dict(initial_state=torch.zeros(2, 2, 8, 8)), ValueError, "initial_state must be a float tensor \\[N=1"),
    (dict(cu_seqlens=torch.tensor([0, 5, 12.0])), ValueError, "cu_seqlens must be an int32"),
    (dict(cu_seqlens=torch.tensor([[0, 12]], dtype=torch.int32)), ValueError, "cu_seqlens must be an int32"),
    (dict(cu_seqlens=torch.tensor([0, 5, 11], dtype=torch.int32), initial_state=None), ValueError, "end at T=12"),
    (dict(cu_seqlens=torch.tensor([1, 5, 12], dtype=torch.int32), initial_state=None), ValueError, "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 7, 5, 12], dtype=torch.int32), initial_state=None), ValueError,
     "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32)), ValueError, "initial_state must be .*N=2"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_argument_errors(fn, over, err, msg):
    with pytest.raises(err, match=msg):
        _call(fn, **over)


def test_argument_errors_batch_and_chunk():
    q, k, v, g, _ = make_inputs(2, 12, 2, 8, 8, h0=False, seed=72)
    with pytest.raises(ValueError, match="B == 1"):
        chunk_retention(q, k, v, g, cu_seqlens=torch.tensor([0, 12], dtype=torch.int32), backend="torch")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunk_retention(q, k, v, g, chunk_size=0, backend="torch")
    with pytest.raises(TypeError, match="float64"):
        chunk_retention(q, k, v, g, backend="triton")
    if HAVE_TRITON:
        f = lambda x: x.float().to(DEV)   # noqa: E731
        with pytest.raises(ValueError, match="power-of-two chunk_size in \\[16, 128\\]"):
            chunk_retention(f(q), f(k), f(v), f(g), chunk_size=24, backend="triton")
        with pytest.raises(ValueError, match="D_k, D_v <= 256"):
            chunk_retention(f(torch.randn(1, 4, 1, 300)), f(torch.randn(1, 4, 1, 300)), f(torch.randn(1, 4, 1, 8)),
                            f(g[:1]), backend="triton")


def test_debug_flag_toggles():
    """Value checks are always on for CPU tensors; the flag extends them to CUDA (a host sync)."""
    before = retention_ops.debug_checks_enabled()
    try:
        retention_ops.set_debug_checks(False)
        with pytest.raises(ValueError, match="gamma must lie"):
            _call(gamma=torch.tensor([0.5, 1.5]))
        retention_ops.set_debug_checks(True)
        assert retention_ops.debug_checks_enabled()
    finally:
        retention_ops.set_debug_checks(before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_value_checks_only_in_debug_mode():
    q, k, v, g, _ = make_inputs(1, 12, 2, 8, 8, h0=False, seed=73, dtype=torch.float32)
    q, k, v, g = (x.float().cuda() for x in (q, k, v, g))
    bad_cu = torch.tensor([0, 5, 11], dtype=torch.int32, device="cuda")
    before = retention_ops.debug_checks_enabled()
    try:
        retention_ops.set_debug_checks(True)
        with pytest.raises(ValueError, match="end at T=12"):
            chunk_retention(q, k, v, g, cu_seqlens=bad_cu)
    finally:
        retention_ops.set_debug_checks(before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_forward_has_no_host_sync():
    """The triton forward (chunk and recurrent, varlen) never waits for the device: CUDA graphs
    and asynchronous pipelines depend on it. set_sync_debug_mode('error') raises on any sync."""
    q, k, v, g, s0 = (x.float().cuda() for x in make_inputs(1, 100, 2, 32, 32, N=3, seed=81))
    cu = torch.tensor([0, 30, 30, 100], dtype=torch.int32, device="cuda")
    kw = dict(initial_state=s0, output_final_state=True, cu_seqlens=cu, backend="triton")
    chunk_retention(q, k, v, g, **kw)          # warm-up: compile outside the checked region
    recurrent_retention(q, k, v, g, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chunk_retention(q, k, v, g, **kw)
        recurrent_retention(q, k, v, g, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90(tmp_path):
    """The interpreter forgives what the compiler does not (dot operand dtypes, layouts): build every
    kernel to an sm_90 cubin here, in a subprocess without TRITON_INTERPRET and with an empty cache."""
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-m", "use_kernels.retention._compile_check"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("ok ") == 18, res.stdout
