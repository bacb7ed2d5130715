"""Loss math against values computed by hand (SPEC §3)."""
import math

import pytest
import torch

from use.losses import clm_loss, fep_loss, fep_weights, objective_parts, sup_loss


def test_clm_ignores_padding_and_shifts():
    V = 4
    logits = torch.zeros(1, 3, V)
    logits[0, 0, 2] = math.log(3.0)      # p(token 2 | pos 0) = 3/6
    ids = torch.tensor([[1, 2, 0]])
    mask = torch.tensor([[True, True, False]])
    # only position 0 → target 2 is scored: -log(3/6)
    assert clm_loss(logits, ids, mask).item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_fep_weights_context_every_and_masks():
    fm = torch.ones(1, 8, dtype=torch.bool)
    fm[0, 7] = False
    am = torch.ones(1, 8, dtype=torch.bool)
    am[0, 6:] = False
    w = fep_weights(fm, am, context=2, every=2)
    assert w.tolist() == [[0, 0, 1, 0, 1, 0, 0, 0]]


def test_fep_loss_by_hand():
    logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0], [5.0, 5.0]]])
    labels = torch.tensor([[[1, 0], [0, 1], [1, 1]]], dtype=torch.uint8)
    fm = torch.tensor([[True, True, False]])
    am = torch.ones(1, 3, dtype=torch.bool)

    def bce(x, y):
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
    p0 = (bce(0.0, 1) + bce(2.0, 0)) / 2
    p1 = (bce(1.0, 0) + bce(-1.0, 1)) / 2
    assert fep_loss(logits, labels, fm, am).item() == pytest.approx((p0 + p1) / 2, rel=1e-6)
    assert fep_loss(logits, labels, fm, am, context=1).item() == pytest.approx(p1, rel=1e-6)


def _z():
    z_a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    z_b = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.2]]), dim=1)
    return z_a, z_b


def _ce_rows(sim):
    return sum(-math.log(math.exp(sim[i][i]) / sum(math.exp(x) for x in sim[i])) for i in range(len(sim))) / len(sim)


def test_sup_orig_and_symmetric_by_hand():
    z_a, z_b = _z()
    tau = 0.07
    sim = (z_a @ z_b.t() / tau).tolist()
    simt = [list(r) for r in zip(*sim)]
    assert sup_loss(z_a, z_b, variant="orig").item() == pytest.approx(_ce_rows(sim), rel=1e-5)
    assert sup_loss(z_a, z_b, variant="symmetric").item() == pytest.approx((_ce_rows(sim) + _ce_rows(simt)) / 2, rel=1e-5)


def test_sup_hardneg_by_hand():
    z_a, z_b = _z()
    tau, beta = 0.07, 1.0
    sim = (z_a @ z_b.t() / tau).tolist()
    n, total = 3, 0.0
    for i in range(n):
        negs = [sim[i][j] for j in range(n) if j != i]
        w = [math.exp(beta * s) for s in negs]
        w = [x / sum(w) * (n - 1) for x in w]
        denom = math.exp(sim[i][i]) + sum(wj * math.exp(s) for wj, s in zip(w, negs))
        total += -math.log(math.exp(sim[i][i]) / denom)
    assert sup_loss(z_a, z_b, variant="hardneg").item() == pytest.approx(total / n, rel=1e-5)
    # beta = 0 gives uniform weights: exactly the orig loss
    assert sup_loss(z_a, z_b, variant="hardneg", hardneg_beta=0.0).item() == pytest.approx(
        sup_loss(z_a, z_b, variant="orig").item(), rel=1e-6)


def test_errors():
    z_a, z_b = _z()
    with pytest.raises(ValueError, match="unknown SUP variant 'x'"):
        sup_loss(z_a, z_b, variant="x")
    with pytest.raises(ValueError, match="at least 2 users"):
        sup_loss(z_a[:1], z_b[:1])
    with pytest.raises(ValueError, match="unknown objective 'fepsup'"):
        objective_parts("fepsup")
    assert objective_parts("clm_fep_sup") == ("clm", "fep", "sup")
