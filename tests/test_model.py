"""The USE model: architecture details, backends agree, stateful == whole, padded == packed."""
import math

import pytest
import torch
import torch.nn.functional as F

from use import USEConfig, USEModel
from use.model import rotate, rotation_angles

BACKENDS = ["reference", "torch", "triton"]


def tiny(backend="reference", **kw):
    cfg = dict(vocab_size=30, num_events=25, hidden_size=32, num_layers=2, num_heads=2, backend=backend, chunk_size=16)
    cfg.update(kw)
    torch.manual_seed(0)
    return USEModel(USEConfig(**cfg))


def ids_and_mask(B=3, T=21, lengths=(21, 14, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (B, T), generator=g)
    mask = torch.arange(T).view(1, T) < torch.tensor(lengths).view(B, 1)
    return ids.masked_fill(~mask, 3), mask


def assert_close(a, b, tol, what):
    diff = (a - b).abs()
    assert diff.max() <= tol, f"{what}: max abs diff {diff.max():.3e} (mean {diff.mean():.3e}) at {divmod(int(diff.argmax()), a.shape[-1])}"


def test_rotation_is_complex_multiplication():
    d = 8
    theta = rotation_angles(d)
    assert torch.allclose(theta[0::2], theta[1::2]) and theta[0] == 1.0
    assert torch.allclose(theta[-1], torch.tensor(1e-4))
    x = torch.randn(5, 3, d, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 100, 4000])
    got = rotate(x, pos, theta)
    z = torch.view_as_complex(x.reshape(5, 3, d // 2, 2).contiguous())
    ang = pos.double().view(5, 1, 1) * theta[0::2].double().view(1, 1, d // 2)
    want = torch.view_as_real(z * torch.exp(1j * ang)).reshape(5, 3, d)
    assert_close(got, want, 1e-12, "rotation")


def test_architecture_matches_spec():
    m = tiny()
    blk = m.layers[0]
    assert m.embed.padding_idx == 3 and torch.all(m.embed.weight[3] == 0)
    assert blk.ffn[0].out_features == 4 * 32 and isinstance(blk.ffn[1], torch.nn.GELU)
    for lin in (blk.msr.q_proj, blk.msr.k_proj, blk.msr.v_proj, blk.msr.g_proj, blk.msr.out_proj):
        assert lin.bias is not None and torch.all(lin.bias == 0)
    assert m.lm_head.bias is None and m.fep_head.out_features == 25
    assert m.sup_head[0].bias is None and m.sup_head[2].out_features == 128
    gamma = blk.msr.gamma
    assert math.isclose(float(gamma[0]), 1 - 1 / 32, rel_tol=1e-6) and math.isclose(float(gamma[-1]), 1 - 1 / 512, rel_tol=1e-6)
    std = m.layers[1].msr.q_proj.weight.std().item()
    assert 0.015 < std < 0.025


def test_block_equals_hand_written_spec():
    """One block computed from SPEC §2 formulas with the parallel retention written out here."""
    m = tiny(num_layers=1).double()
    ids, _ = ids_and_mask(B=1, T=9, lengths=(9,))
    x = m.embed(ids[0])                                                      # [T, h]
    msr, T, H, d = m.layers[0].msr, 9, 2, 16
    h = m.layers[0].ln1(x)
    q, k, v = (p(h).view(T, H, d) for p in (msr.q_proj, msr.k_proj, msr.v_proj))
    pos = torch.arange(T)
    q, k = rotate(q, pos, msr.theta), rotate(k, pos, msr.theta)
    gam = msr.gamma.double()
    tt = torch.arange(T).double()
    D = torch.where(tt.view(T, 1) >= tt.view(1, T), gam.view(H, 1, 1) ** (tt.view(T, 1) - tt.view(1, T)), torch.zeros(()))
    o = torch.einsum("thd,jhd,htj,jhe->the", q, k, D.double(), v) * d ** -0.5
    o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + 1e-6)
    r = msr.out_proj(o.reshape(T, H * d) * F.silu(msr.g_proj(h)))
    y = x + r
    y = y + m.layers[0].ffn(m.layers[0].ln2(y))
    out = m(ids)
    assert_close(out.hidden[0], y, 1e-12, "block vs SPEC formulas")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_reference(backend):
    ref = tiny("reference").double()
    m = tiny(backend)
    m.load_state_dict(ref.state_dict())
    ids, mask = ids_and_mask()
    want = ref(ids, mask)
    if backend == "triton":          # the Triton path runs float32 (interpreter on CPU)
        got = m.float()(ids, mask)
        tol = 2e-4
    else:
        got = m.double()(ids, mask)
        tol = 1e-12
    assert_close(got.hidden.double(), want.hidden, tol, f"{backend} hidden")
    for l in range(2):
        assert_close(got.states[l].double(), want.states[l], tol, f"{backend} state {l}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_padded_equals_alone_and_packed(backend):
    m = tiny(backend).double()
    ids, mask = ids_and_mask()
    out = m(ids, mask)
    lengths = mask.sum(1).tolist()
    for b, L in enumerate(lengths):
        alone = m(ids[b:b + 1, :L])
        assert_close(out.hidden[b, :L], alone.hidden[0], 1e-12, f"row {b} hidden")
        assert torch.all(out.hidden[b, L:] == 0)
        for l in range(2):
            assert_close(out.states[l][b], alone.states[l][0], 1e-12, f"row {b} state {l}")
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    packed = m(ids[mask], cu_seqlens=cu)
    assert_close(packed.hidden, out.hidden[mask], 1e-12, "packed vs padded")
    assert_close(packed.states[1], out.states[1], 1e-12, "packed vs padded states")


def test_left_padding_gives_the_same_states():
    m = tiny("torch").double()
    ids, mask = ids_and_mask(B=1, T=12, lengths=(12,))
    left_ids = torch.cat([torch.full((1, 4), 3), ids], 1)
    left_mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), mask], 1)
    a, b = m(ids), m(left_ids, left_mask)
    assert_close(a.hidden[0], b.hidden[0, 4:], 1e-12, "left padded")
    assert_close(a.states[0], b.states[0], 1e-12, "left padded state")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("cut", [1, 8, 13])
def test_stateful_segments_equal_whole(backend, cut):
    m = tiny(backend).double()
    ids, _ = ids_and_mask(B=2, T=20, lengths=(20, 20))
    whole = m(ids)
    a = m(ids[:, :cut])
    b = m(ids[:, cut:], states=a.states, offset=cut)
    assert_close(b.hidden, whole.hidden[:, cut:], 1e-12, "second segment")
    for l in range(2):
        assert_close(b.states[l], whole.states[l], 1e-12, f"final state {l}")


def test_per_sequence_offsets_in_a_packed_batch():
    m = tiny("torch").double()
    ids, _ = ids_and_mask(B=2, T=16, lengths=(16, 16))
    whole = m(ids)
    a = m(ids[:, :10])
    # second pieces of different lengths: row 0 resumes at 10, row 1 only gets 3 more tokens
    cu = torch.tensor([0, 6, 9], dtype=torch.int32)
    packed = torch.cat([ids[0, 10:], ids[1, 10:13]])
    b = m(packed, cu_seqlens=cu, states=a.states, offset=torch.tensor([10, 10]))
    assert_close(b.hidden[:6], whole.hidden[0, 10:], 1e-12, "row 0 continued")
    assert_close(b.states[1][0], whole.states[1][0], 1e-12, "row 0 state")
    part = m(ids[1:, :13])
    assert_close(b.hidden[6:], part.hidden[0, 10:], 1e-12, "row 1 continued")


def test_bad_inputs_have_clear_errors():
    m = tiny()
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match="attention_mask shape"):
        m(ids, mask[:, :5])
    with pytest.raises(ValueError, match="states has 1 layers, the model has 2"):
        m(ids, mask, states=[torch.zeros(3, 2, 16, 16)])
    with pytest.raises(TypeError, match="integer"):
        m(ids.float())
    with pytest.raises(ValueError, match="divisible by 8"):
        USEConfig(vocab_size=10, num_events=5, hidden_size=24, num_heads=2)
    with pytest.raises(ValueError, match="unknown backend"):
        USEConfig(vocab_size=10, num_events=5, hidden_size=32, num_heads=2, backend="cuda")


def test_gradients_flow_through_every_used_parameter():
    m = tiny("torch")
    ids, mask = ids_and_mask()
    out = m(ids, mask, heads=("lm", "fep"))
    (out.lm_logits.sum() + out.fep_logits.sum() + m.sup_projection(m.segment_embedding(out, mask, "joint")).sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == [], missing


def test_recurrent_retention_path_equals_chunk_path():
    m = tiny("torch").double()
    ids, mask = ids_and_mask()
    a = m(ids[:, :10])
    b_chunk = m(ids[:, 10:14], states=a.states, offset=10)
    b_rec = m(ids[:, 10:14], states=a.states, offset=10, retention="recurrent")
    assert_close(b_rec.hidden, b_chunk.hidden, 1e-12, "recurrent vs chunk")
    assert_close(b_rec.states[1], b_chunk.states[1], 1e-12, "recurrent vs chunk state")
    with pytest.raises(ValueError, match="retention must be"):
        m(ids, retention="parallel")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_model_on_cuda_triton_matches_reference_and_trains_in_bf16():
    ref = tiny("reference").double()
    m = tiny("triton").cuda()
    m.load_state_dict(ref.state_dict())
    ids, mask = ids_and_mask()
    want = ref(ids, mask)
    got = m(ids.cuda(), mask.cuda())
    assert_close(got.hidden.double().cpu(), want.hidden, 2e-4, "cuda triton hidden")
    assert_close(got.states[1].double().cpu(), want.states[1], 2e-4, "cuda triton state")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(ids.cuda(), mask.cuda(), heads=("fep",))
        loss = out.fep_logits.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_decays_and_angles_stay_float32_in_low_precision_models():
    m = tiny().to(torch.bfloat16)
    msr = m.layers[0].msr
    assert msr.gamma.dtype == torch.float32 and msr.theta.dtype == torch.float32
    assert float(msr.gamma[-1]) < 1.0 and msr.gamma.unique().numel() == 2
    m.double()
    assert msr.gamma.dtype == torch.float32


@pytest.mark.parametrize("cu, message", [
    ([0, 3, 9], "end at the number of tokens"),
    ([0, 5, 3, 10], "must not decrease: cu_seqlens\\[2\\]=3"),
    ([1, 10], "start at 0"),
])
def test_bad_cu_seqlens_are_named(cu, message):
    m = tiny()
    with pytest.raises(ValueError, match=message):
        m(torch.randint(5, 30, (10,)), cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_recurrent_triton_path_matches_the_reference_model():
    """The path the store takes for short updates, with the real Triton recurrent kernel."""
    ref = tiny("reference").double()
    m = tiny("triton")
    m.load_state_dict(ref.state_dict())
    ids, _ = ids_and_mask(B=2, T=14, lengths=(14, 14))
    a = ref(ids[:, :10])
    want = ref(ids[:, 10:], states=a.states, offset=10)
    got = m(ids[:, 10:], states=[s.float() for s in a.states], offset=10, retention="recurrent")
    assert_close(got.hidden.double(), want.hidden, 2e-4, "triton recurrent hidden")
    assert_close(got.states[1].double(), want.states[1], 2e-4, "triton recurrent state")
