"""PLACEHOLDER (owned by the gather work): typed wrappers over torch.ops.use_kernels.gather_segments*."""
from typing import NamedTuple, Optional

from torch import Tensor


class PaddedSegments(NamedTuple):
    input_ids: Tensor                 # [B, max_len] int64
    attention_mask: Tensor            # [B, max_len] bool
    fep_labels: Optional[Tensor]      # [B, max_len, E] uint8
    fep_mask: Optional[Tensor]        # [B, max_len] bool


class PackedSegments(NamedTuple):
    input_ids: Tensor                 # [total] int64
    cu_seqlens: Tensor                # [B+1] int32
    position_ids: Tensor              # [total] int64
    fep_labels: Optional[Tensor]      # [total, E] uint8
    fep_mask: Optional[Tensor]        # [total] bool


def gather_segments(*a, **k):
    raise NotImplementedError


gather_segments_packed = gather_segments_ref = gather_segments_packed_ref = gather_segments
