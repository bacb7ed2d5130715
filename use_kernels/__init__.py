"""use_kernels: fused retention kernels and the segment-gathering extension for USE.

- Retention (SPEC §1): `chunk_retention`, `recurrent_retention`, references `retention_ref`
  (the recurrence, float64 ground truth) and `parallel_retention_ref` (the published O(T²) way),
  `default_decay`.
- Segment gathering (SPEC §4): `gather_segments`, `gather_segments_packed` (C++/CUDA op
  `torch.ops.use_kernels.*`), `gather_segments_ref`, and the NumPy samplers
  `sample_segments`, `sample_sup_pairs`.
"""
from .retention import (chunk_retention, default_decay, parallel_retention_ref, recurrent_retention,
                        retention_ref)
from .gather import (PackedSegments, PaddedSegments, gather_segments, gather_segments_packed,
                     gather_segments_packed_ref, gather_segments_ref)
from .sampler import sample_segments, sample_sup_pairs

__all__ = [
    "chunk_retention", "recurrent_retention", "retention_ref", "parallel_retention_ref", "default_decay",
    "gather_segments", "gather_segments_packed", "gather_segments_ref", "gather_segments_packed_ref",
    "PaddedSegments", "PackedSegments", "sample_segments", "sample_sup_pairs",
]
__version__ = "0.1.0"
