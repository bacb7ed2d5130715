"""USE objectives (SPEC §3): CLM, FEP and SUP (SimCLR variants), and their combination.

Every loss takes padded tensors with an attention mask; padding never contributes.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = {
    "clm": ("clm",),
    "fep": ("fep",),
    "sup": ("sup",),
    "fep_sup": ("fep", "sup"),
    "clm_fep_sup": ("clm", "fep", "sup"),
}
SUP_VARIANTS = ("orig", "hardneg", "symmetric")


def objective_parts(objective: str) -> tuple:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective]


def clm_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token cross-entropy. logits [B, T, V]; the target of position t is token t+1 when both are real."""
    target = input_ids[:, 1:]                                                    # [B, T-1]
    valid = attention_mask[:, 1:] & attention_mask[:, :-1]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")  # [B, T-1]
    w = valid.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1)


def fep_weights(fep_mask: Tensor, attention_mask: Tensor, *, context: int = 0, every: int = 1) -> Tensor:
    """Which positions are scored: W real future tokens exist, the token is real, position ≥ context,
    and (position - context) is a multiple of `every`. Returns float [B, T]."""
    if every < 1 or context < 0:
        raise ValueError(f"FEP needs every >= 1 and context >= 0, got every={every}, context={context}")
    T = fep_mask.shape[1]
    pos = torch.arange(T, device=fep_mask.device)
    keep = (pos >= context) & ((pos - context) % every == 0)                     # [T]
    return (fep_mask & attention_mask & keep.unsqueeze(0)).float()


def fep_loss(logits: Tensor, labels: Tensor, fep_mask: Tensor, attention_mask: Tensor, *,
             context: int = 0, every: int = 1) -> Tensor:
    """Masked multi-label BCE: mean over scored positions of the mean over the E event types.

    logits [B, T, E]; labels [B, T, E] (0/1, any dtype); fep_mask, attention_mask [B, T] bool.
    """
    w = fep_weights(fep_mask, attention_mask, context=context, every=every)      # [B, T]
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(-1)
    return (bce * w).sum() / w.sum().clamp(min=1)


def sup_loss(z_a: Tensor, z_b: Tensor, *, variant: str = "orig", temperature: float = 0.07,
             hardneg_beta: float = 1.0) -> Tensor:
    """SimCLR on L2-normalised segment projections z_a, z_b [N, D]; row i of both is the same user.

    - orig: view-a anchors against view-b candidates (as the USE code): CE(z_a z_bᵀ / τ, i).
    - symmetric: the mean of orig in both directions (as the paper describes).
    - hardneg: like orig, but each anchor's negatives are re-weighted by w_j ∝ exp(β·s_j/τ),
      normalised so the weights of the N-1 negatives sum to N-1 (β=0 recovers orig):
      loss = -log(e^{s_pos/τ} / (e^{s_pos/τ} + Σ_j w_j e^{s_j/τ})).
    """
    if variant not in SUP_VARIANTS:
        raise ValueError(f"unknown SUP variant {variant!r}; expected one of {', '.join(SUP_VARIANTS)}")
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"SUP needs two [N, D] views of the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    n = z_a.shape[0]
    if n < 2:
        raise ValueError(f"SUP needs at least 2 users in a batch for in-batch negatives, got {n}")
    sim = z_a.float() @ z_b.float().t() / temperature                            # [N, N]
    target = torch.arange(n, device=sim.device)
    if variant == "orig":
        return F.cross_entropy(sim, target)
    if variant == "symmetric":
        return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target))
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    pos = sim.diagonal()                                                         # [N]
    neg = sim.masked_fill(eye, float("-inf"))
    # Weights need no gradient path of their own (importance weights, as in hard-negative sampling).
    w = torch.softmax((hardneg_beta * sim.detach()).masked_fill(eye, float("-inf")), dim=1) * (n - 1)              # [N, N], 0 on the diagonal
    log_neg = torch.logsumexp(neg + torch.log(w.clamp(min=1e-30)), dim=1)        # log Σ_j w_j e^{s_j}
    return (torch.logaddexp(pos, log_neg) - pos).mean()


def total_loss(parts: Dict[str, Tensor]) -> Tensor:
    """The objective is the plain sum of its parts (SPEC §3)."""
    return sum(parts.values())
