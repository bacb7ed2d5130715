// Torch-side entry points of the segment-gathering ops (the CPU and CUDA implementations that
// bindings.cpp registers), plus the checks and output allocation both devices share.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "gather_segments.h"

namespace use_kernels {

// (input_ids, attention_mask, fep_labels, fep_mask)
using PaddedOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (input_ids, cu_seqlens, position_ids, fep_labels, fep_mask)
using PackedOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Inputs made contiguous once, with raw views for the core.
struct Inputs {
  at::Tensor tokens, offsets, users, starts, lengths;
  Corpus corpus() const;
  Batch batch() const;
};

// Everything but the per-row rules: dtypes, ranks, devices, batch sizes, scalar arguments.
// max_len < 0 is "no max_len" (packed). Messages match the Python references.
Inputs check_inputs(const char* op, const at::Tensor& tokens, const at::Tensor& offsets,
                    const at::Tensor& users, const at::Tensor& starts, const at::Tensor& lengths,
                    int64_t max_len, int64_t fep_window, int64_t num_events, bool packed);

// Outputs on the device of `like`. Without FEP, fep_labels is [.., 0] and fep_mask is [0]
// (the Python wrappers return None for both). The packed outputs take the already filled
// cu_seqlens [B+1] int32: `total` is only known once it exists.
PaddedOut empty_padded(const at::Tensor& like, int64_t B, int64_t max_len, const FepSpec& fep);
PackedOut empty_packed(const at::Tensor& like, const at::Tensor& cu_seqlens, int64_t total,
                       const FepSpec& fep);

PaddedOut gather_segments_cpu(const at::Tensor& tokens, const at::Tensor& offsets,
                              const at::Tensor& users, const at::Tensor& starts,
                              const at::Tensor& lengths, int64_t max_len, int64_t pad_id,
                              int64_t fep_window, int64_t num_events, int64_t event_offset);
PackedOut gather_segments_packed_cpu(const at::Tensor& tokens, const at::Tensor& offsets,
                                     const at::Tensor& users, const at::Tensor& starts,
                                     const at::Tensor& lengths, int64_t fep_window,
                                     int64_t num_events, int64_t event_offset);

#ifdef USE_KERNELS_WITH_CUDA
PaddedOut gather_segments_cuda(const at::Tensor& tokens, const at::Tensor& offsets,
                               const at::Tensor& users, const at::Tensor& starts,
                               const at::Tensor& lengths, int64_t max_len, int64_t pad_id,
                               int64_t fep_window, int64_t num_events, int64_t event_offset);
PackedOut gather_segments_packed_cuda(const at::Tensor& tokens, const at::Tensor& offsets,
                                      const at::Tensor& users, const at::Tensor& starts,
                                      const at::Tensor& lengths, int64_t fep_window,
                                      int64_t num_events, int64_t event_offset);
#endif

}  // namespace use_kernels
