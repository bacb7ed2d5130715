"""The USE model (SPEC §2): a RetNet over event tokens, with CLM, FEP and SUP heads.

Reads top to bottom: rotation → multi-scale retention → block → model → heads.

Every batch is run *packed* inside the model: padded inputs are unpadded by their attention mask
into one variable-length batch (`cu_seqlens`), so padding never enters a retention state and a
padded batch gives exactly the numbers of the packed one. Positions continue from `offset`, so a
segment can be run from carried states (stateful embedding) and match the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from use_kernels import chunk_retention, default_decay, recurrent_retention

from .config import USEConfig


# ----------------------------------------------------------------------------- position rotation
def rotation_angles(head_dim: int, device=None) -> Tensor:
    """θ = repeat_interleave(10000 ** -linspace(0, 1, d/2), 2): [d] float32."""
    theta = 10000.0 ** -torch.linspace(0, 1, head_dim // 2, dtype=torch.float64, device=device)
    return theta.repeat_interleave(2).float()


def rotate(x: Tensor, positions: Tensor, theta: Tensor) -> Tensor:
    """Multiply each (even, odd) pair of x by exp(i·n·θ_j).

    x: [N, H, d]; positions: [N] int64 (absolute, 0-based); theta: [d].
    Angles are computed in float64 so positions in the tens of thousands keep full precision.
    """
    ang = positions.to(torch.float64).unsqueeze(-1) * theta.to(torch.float64)  # [N, d]
    dt = x.dtype if x.dtype == torch.float64 else torch.float32
    cos, sin = ang.cos().to(dt).unsqueeze(1), ang.sin().to(dt).unsqueeze(1)      # [N, 1, d]
    xf = x.to(dt)
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]                                # [N, H, d/2]
    swapped = torch.stack((-x_odd, x_even), dim=-1).flatten(-2)                 # [N, H, d]: (-x_o, x_e)
    return (xf * cos + swapped * sin).to(x.dtype)


# ----------------------------------------------------------------------------- packing helpers
@dataclass
class Packing:
    """How a batch maps to the packed token stream the model runs on."""

    cu_seqlens: Tensor                  # [N+1] int32
    positions: Tensor                   # [total] int64, absolute positions (offset included)
    index: Optional[Tensor] = None      # [total] flat indices into [B*T] when unpadded from a mask
    batch_shape: Optional[tuple] = None # (B, T) of the padded input, if any


def _offsets(offset: Union[int, Tensor], n: int, device) -> Tensor:
    if isinstance(offset, Tensor):
        off = offset.to(device=device, dtype=torch.int64).reshape(-1)
        if off.numel() == 1:
            off = off.expand(n)
        if off.numel() != n:
            raise ValueError(f"offset has {off.numel()} entries for {n} sequences")
        return off
    return torch.full((n,), int(offset), dtype=torch.int64, device=device)


def _check_cu_seqlens(cu_seqlens: Tensor, total: int) -> None:
    """cu_seqlens must be 1-D integers, start at 0, never decrease and end at the token count.
    Checked on the host (the model's packing needs the lengths there anyway)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [N+1] with N >= 1, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens ({total}), got {cu[0]}..{cu[-1]}")
    bad = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must not decrease: cu_seqlens[{bad}]={cu[bad]} < cu_seqlens[{bad - 1}]={cu[bad - 1]}")


def make_packing(input_ids: Tensor, attention_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                 offset: Union[int, Tensor]) -> Packing:
    dev = input_ids.device
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("pass either attention_mask (padded batch) or cu_seqlens (packed batch), not both")
        total = input_ids.numel()
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, input_ids must be packed: [total] or [1, total], got {tuple(input_ids.shape)}")
        _check_cu_seqlens(cu_seqlens, total)
        cu = cu_seqlens.to(device=dev, dtype=torch.int32)
        lengths = (cu[1:] - cu[:-1]).long()
        n = lengths.numel()
        seq_id = torch.repeat_interleave(torch.arange(n, device=dev), lengths, output_size=total)
        local = torch.arange(total, device=dev) - cu[:-1].long()[seq_id]
        return Packing(cu, _offsets(offset, n, dev)[seq_id] + local)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T] without cu_seqlens, got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    off = _offsets(offset, B, dev)
    if attention_mask is None:
        cu = torch.arange(0, (B + 1) * T, T, device=dev, dtype=torch.int32)
        pos = (off.view(B, 1) + torch.arange(T, device=dev).view(1, T)).reshape(-1)
        return Packing(cu, pos, None, (B, T))
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(1)                                                        # [B]
    cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    local = torch.cumsum(mask.long(), 1) - 1                                     # position among real tokens
    pos = (off.view(B, 1) + local).reshape(-1)
    index = mask.reshape(-1).nonzero().squeeze(1)                                # [total]
    return Packing(cu, pos[index], index, (B, T))


# ----------------------------------------------------------------------------- layers
class MultiScaleRetention(nn.Module):
    """MSR: rotated q, k; retention with per-head decay; per-head GroupNorm; swish gate; out proj."""

    def __init__(self, cfg: USEConfig):
        super().__init__()
        h, self.H, self.d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.g_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.eps = cfg.groupnorm_eps
        self.register_buffer("gamma", default_decay(self.H), persistent=False)      # [H]
        self.register_buffer("theta", rotation_angles(self.d), persistent=False)    # [d]

    def _apply(self, fn, *args, **kwargs):
        # Decays and angles stay float32 whatever the module dtype: in bf16, 1 - 1/512 rounds to
        # exactly 1 (no decay at all) and neighbouring heads collapse onto one γ.
        out = super()._apply(fn, *args, **kwargs)
        dev = self.q_proj.weight.device
        self.gamma = default_decay(self.H).to(dev)
        self.theta = rotation_angles(self.d).to(dev)
        return out

    def forward(self, x: Tensor, pk: Packing, state: Optional[Tensor], backend: str, chunk_size: int,
                retention: str = "chunk"):
        N = x.shape[0]                                                             # x: [total, h]
        q = self.q_proj(x).view(N, self.H, self.d)                                 # [total, H, d]
        k = self.k_proj(x).view(N, self.H, self.d)
        v = self.v_proj(x).view(N, self.H, self.d)
        q, k = rotate(q, pk.positions, self.theta), rotate(k, pk.positions, self.theta)
        if retention == "recurrent":      # token by token: cheapest for a few new events per user
            o, final = recurrent_retention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), self.gamma,
                                           initial_state=state, output_final_state=True,
                                           cu_seqlens=pk.cu_seqlens, backend=backend)
        else:
            o, final = chunk_retention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), self.gamma,
                                       initial_state=state, output_final_state=True,
                                       cu_seqlens=pk.cu_seqlens, chunk_size=chunk_size, backend=backend)
        o = o.squeeze(0)                                                           # [total, H, d]
        of = o.float() if o.dtype in (torch.float16, torch.bfloat16) else o
        o = F.layer_norm(of, (self.d,), eps=self.eps).to(o.dtype)                  # GroupNorm, H groups, no affine
        o = o.reshape(N, self.H * self.d) * F.silu(self.g_proj(x))                 # [total, h]
        return self.out_proj(o), final


class Block(nn.Module):
    def __init__(self, cfg: USEConfig):
        super().__init__()
        h = cfg.hidden_size
        self.ln1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.msr = MultiScaleRetention(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(h, cfg.ffn_mult * h), nn.GELU(), nn.Linear(cfg.ffn_mult * h, h))

    def forward(self, x, pk, state, backend, chunk_size, retention="chunk"):
        r, final = self.msr(self.ln1(x), pk, state, backend, chunk_size, retention)
        y = x + self.drop(r)
        return y + self.ffn(self.ln2(y)), final


@dataclass
class USEOutput:
    hidden: Tensor                  # last-layer token states: [B, T, h] (padded input) or [total, h] (packed)
    states: List[Tensor]            # per layer final retention state [N, H, d, d] (float32; float64 for float64 models)
    lengths: Tensor                 # [N] number of real tokens per sequence
    lm_logits: Optional[Tensor] = None
    fep_logits: Optional[Tensor] = None


class USEModel(nn.Module):
    """USE: token embedding → RetNet blocks (no final LayerNorm) → heads."""

    def __init__(self, cfg: USEConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, h, padding_idx=cfg.pad_id)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.fep_head = nn.Linear(h, max(cfg.num_events, 1))
        self.sup_head = nn.Sequential(nn.Linear(h, h, bias=False), nn.ReLU(), nn.Linear(h, cfg.sup_dim, bias=False))
        d = cfg.head_dim
        # SUP 'state' embedding: one d²→d map shared by the heads, then the heads concatenated.
        self.state_proj = nn.Linear(d * d, d, bias=False)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    # ------------------------------------------------------------------ core
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                cu_seqlens: Optional[Tensor] = None, states: Optional[Sequence[Tensor]] = None,
                offset: Union[int, Tensor] = 0, heads: Sequence[str] = (), retention: str = "chunk") -> USEOutput:
        """Runs the RetNet.

        input_ids: [B, T] (with optional attention_mask [B, T]; any padding layout) or packed
        [total] / [1, total] with cu_seqlens [N+1]. states: per layer [N, H, d, d] carried from an
        earlier segment (None = start fresh). offset: absolute position of each sequence's first
        token (int or [N]). heads: any of 'lm', 'fep' to also return those logits. retention:
        "chunk" (chunkwise kernel, for long inputs) or "recurrent" (token-by-token kernel, for short
        updates of many users); both give the same numbers.
        """
        if retention not in ("chunk", "recurrent"):
            raise ValueError(f"retention must be 'chunk' or 'recurrent', got {retention!r}")
        cfg = self.config
        if states is not None and len(states) != cfg.num_layers:
            raise ValueError(f"states has {len(states)} layers, the model has {cfg.num_layers}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        pk = make_packing(input_ids, attention_mask, cu_seqlens, offset)
        flat = input_ids.reshape(-1)
        if pk.index is not None:
            flat = flat[pk.index]
        x = self.embed(flat)                                                       # [total, h]
        finals = []
        for i, layer in enumerate(self.layers):
            x, f = layer(x, pk, None if states is None else states[i], cfg.backend, cfg.chunk_size, retention)
            finals.append(f)
        if cu_seqlens is None:                                                     # back to [B, T, h]
            B, T = pk.batch_shape
            if pk.index is None:
                hidden = x.view(B, T, -1)
            else:
                hidden = x.new_zeros(B * T, x.shape[-1]).index_copy(0, pk.index, x).view(B, T, -1)
        else:
            hidden = x.view(*input_ids.shape, -1)
        out = USEOutput(hidden, finals, (pk.cu_seqlens[1:] - pk.cu_seqlens[:-1]).long())
        if "lm" in heads:
            out.lm_logits = self.lm_head(hidden)
        if "fep" in heads:
            out.fep_logits = self.fep_head(hidden)
        return out

    # ------------------------------------------------------------------ embeddings
    @staticmethod
    def token_mean(hidden: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """Masked mean of last-layer token states: [B, T, h] → [B, h]."""
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)                        # [B, T, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def state_embedding(self, last_state: Tensor) -> Tensor:
        """Projection of the last layer's final retention state: [N, H, d, d] → [N, h]."""
        N, H, d, _ = last_state.shape
        z = self.state_proj(last_state.to(self.state_proj.weight.dtype).reshape(N, H, d * d))  # [N, H, d]
        return z.reshape(N, H * d)

    def segment_embedding(self, out: USEOutput, attention_mask: Optional[Tensor], kind: Optional[str] = None) -> Tensor:
        kind = kind or self.config.sup_embedding
        if kind == "token":
            return self.token_mean(out.hidden, attention_mask)
        if kind == "state":
            return self.state_embedding(out.states[-1])
        return 0.5 * (self.token_mean(out.hidden, attention_mask) + self.state_embedding(out.states[-1]))

    def sup_projection(self, emb: Tensor) -> Tensor:
        """SUP head: Linear → ReLU → Linear(h, 128), L2-normalised. [N, h] → [N, 128]."""
        return F.normalize(self.sup_head(emb), dim=-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
