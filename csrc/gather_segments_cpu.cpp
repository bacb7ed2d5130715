// CPU implementation of the segment-gathering ops (+ the checks and allocation shared with CUDA).
// Parallel over the batch with at::parallel_for (OpenMP); each segment is one pass of
// fill_segment (gather_segments.h) with its own FEP count scratch.
#include "gather_segments_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <limits>
#include <string>
#include <vector>

namespace use_kernels {

Corpus Inputs::corpus() const {
  return {tokens.data_ptr<int32_t>(), tokens.numel(), offsets.data_ptr<int64_t>(),
          offsets.numel() - 1};
}

Batch Inputs::batch() const {
  return {users.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
          users.numel()};
}

static std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

Inputs check_inputs(const char* op, const at::Tensor& tokens, const at::Tensor& offsets,
                    const at::Tensor& users, const at::Tensor& starts, const at::Tensor& lengths,
                    int64_t max_len, int64_t fep_window, int64_t num_events, bool packed) {
  struct Arg { const char* name; const at::Tensor& t; at::ScalarType dtype; };
  const Arg args[] = {{"tokens", tokens, at::kInt}, {"offsets", offsets, at::kLong},
                      {"users", users, at::kLong}, {"starts", starts, at::kLong},
                      {"lengths", lengths, at::kLong}};
  for (const Arg& a : args) {
    TORCH_CHECK(a.t.scalar_type() == a.dtype, op, ": ", a.name, " must be ", dtype_name(a.dtype),
                ", got ", dtype_name(a.t.scalar_type()));
    TORCH_CHECK(a.t.dim() == 1, op, ": ", a.name, " must be 1-D, got shape ", a.t.sizes());
    TORCH_CHECK(a.t.device() == tokens.device(), op, ": ", a.name, " is on ", a.t.device(),
                " but tokens is on ", tokens.device(), "; all inputs must be on the same device");
  }
  TORCH_CHECK(offsets.numel() >= 1, op, ": offsets must have at least one element (it is [U+1])");
  TORCH_CHECK(users.numel() == starts.numel() && users.numel() == lengths.numel(), op,
              ": users, starts and lengths must have the same length, got ", users.numel(), ", ",
              starts.numel(), ", ", lengths.numel());
  TORCH_CHECK(packed || max_len >= 0, op, ": max_len must be >= 0, got ", max_len);
  TORCH_CHECK(fep_window >= 0, op, ": fep_window must be >= 0, got ", fep_window);
  TORCH_CHECK(num_events >= 0, op, ": num_events must be >= 0, got ", num_events);
  return {tokens.contiguous(), offsets.contiguous(), users.contiguous(), starts.contiguous(),
          lengths.contiguous()};
}

PaddedOut empty_padded(const at::Tensor& like, int64_t B, int64_t max_len, const FepSpec& fep) {
  const auto o = like.options();
  const int64_t E = fep.enabled() ? fep.num_events : 0;
  return {at::empty({B, max_len}, o.dtype(at::kLong)), at::empty({B, max_len}, o.dtype(at::kBool)),
          at::empty({B, max_len, E}, o.dtype(at::kByte)),
          fep.enabled() ? at::empty({B, max_len}, o.dtype(at::kBool))
                        : at::empty({0}, o.dtype(at::kBool))};
}

PackedOut empty_packed(const at::Tensor& like, const at::Tensor& cu_seqlens, int64_t total,
                       const FepSpec& fep) {
  const auto o = like.options();
  const int64_t E = fep.enabled() ? fep.num_events : 0;
  return {at::empty({total}, o.dtype(at::kLong)), cu_seqlens,
          at::empty({total}, o.dtype(at::kLong)), at::empty({total, E}, o.dtype(at::kByte)),
          at::empty({fep.enabled() ? total : 0}, o.dtype(at::kBool))};
}

// Host-side row check (CPU tensors): the first bad row raises with its numbers.
static void check_rows_cpu(const char* op, const Corpus& c, const Batch& bt, int64_t max_len) {
  int32_t code = kRowOk;
  const int64_t b = first_bad_row(c, bt, max_len, &code);
  TORCH_CHECK(b < 0, describe_row_error(op, code, b, b < 0 ? RowValues{} : read_row(c, bt, b),
                                        c.num_users, c.num_tokens, max_len));
}

// Segments per parallel task: at least 2 MiB of output (~0.4 ms on one core) each. A batch below
// that runs on one thread: waking a second one saves at most ~0.2 ms, but on a loaded machine the
// end-of-region barrier waits for a descheduled thread for milliseconds (measured: 64 x 512, E=52
// took 0.4 ms on 1 thread and 7 ms on 2 threads with another process busy on the 2 cores).
static int64_t grain_for(int64_t bytes_per_segment) {
  return std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, bytes_per_segment));
}

PaddedOut gather_segments_cpu(const at::Tensor& tokens, const at::Tensor& offsets,
                              const at::Tensor& users, const at::Tensor& starts,
                              const at::Tensor& lengths, int64_t max_len, int64_t pad_id,
                              int64_t fep_window, int64_t num_events, int64_t event_offset) {
  const char* op = "gather_segments";
  const Inputs in = check_inputs(op, tokens, offsets, users, starts, lengths, max_len, fep_window,
                                 num_events, /*packed=*/false);
  const Corpus c = in.corpus();
  const Batch bt = in.batch();
  check_rows_cpu(op, c, bt, max_len);

  const FepSpec fep{fep_window, num_events, event_offset};
  const int64_t E = fep.enabled() ? num_events : 0;
  auto out = empty_padded(in.tokens, bt.size, max_len, fep);
  int64_t* ids = std::get<0>(out).data_ptr<int64_t>();
  bool* attn = std::get<1>(out).data_ptr<bool>();
  uint8_t* labels = std::get<2>(out).data_ptr<uint8_t>();
  bool* fmask = std::get<3>(out).data_ptr<bool>();

  at::parallel_for(0, bt.size, grain_for(max_len * (10 + E)), [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> counts(E);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t u = bt.users[b], n = bt.lengths[b];
      const int64_t row = b * max_len;
      fill_segment(c.tokens, c.offsets[u] + bt.starts[b], n, c.offsets[u + 1], fep, ids + row,
                   labels + row * E, fep.enabled() ? fmask + row : nullptr, counts.data());
      // Right padding: every output byte is written exactly once (outputs come from at::empty).
      std::fill(ids + row + n, ids + row + max_len, pad_id);
      std::fill(attn + row, attn + row + n, true);
      std::fill(attn + row + n, attn + row + max_len, false);
      if (fep.enabled()) {
        std::memset(labels + (row + n) * E, 0, static_cast<size_t>((max_len - n) * E));
        std::fill(fmask + row + n, fmask + row + max_len, false);
      }
    }
  });
  return out;
}

PackedOut gather_segments_packed_cpu(const at::Tensor& tokens, const at::Tensor& offsets,
                                     const at::Tensor& users, const at::Tensor& starts,
                                     const at::Tensor& lengths, int64_t fep_window,
                                     int64_t num_events, int64_t event_offset) {
  const char* op = "gather_segments_packed";
  const Inputs in = check_inputs(op, tokens, offsets, users, starts, lengths, -1, fep_window,
                                 num_events, /*packed=*/true);
  const Corpus c = in.corpus();
  const Batch bt = in.batch();
  check_rows_cpu(op, c, bt, -1);

  // Prefix sum in int64 first: every length is <= its user's length, so no overflow here.
  std::vector<int64_t> cu(bt.size + 1, 0);
  for (int64_t b = 0; b < bt.size; ++b) cu[b + 1] = cu[b] + bt.lengths[b];
  const int64_t total = cu[bt.size];
  TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(), op, ": total length ", total,
              " does not fit cu_seqlens (int32)");
  auto cu_seqlens = at::empty({bt.size + 1}, in.lengths.options().dtype(at::kInt));
  int32_t* cu32 = cu_seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b <= bt.size; ++b) cu32[b] = static_cast<int32_t>(cu[b]);

  const FepSpec fep{fep_window, num_events, event_offset};
  const int64_t E = fep.enabled() ? num_events : 0;
  auto out = empty_packed(in.tokens, cu_seqlens, total, fep);
  int64_t* ids = std::get<0>(out).data_ptr<int64_t>();
  int64_t* pos = std::get<2>(out).data_ptr<int64_t>();
  uint8_t* labels = std::get<3>(out).data_ptr<uint8_t>();
  bool* fmask = std::get<4>(out).data_ptr<bool>();

  const int64_t avg_len = bt.size ? total / bt.size + 1 : 1;
  at::parallel_for(0, bt.size, grain_for(avg_len * (17 + E)), [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> counts(E);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t u = bt.users[b], n = bt.lengths[b], row = cu[b];
      fill_segment(c.tokens, c.offsets[u] + bt.starts[b], n, c.offsets[u + 1], fep, ids + row,
                   labels + row * E, fep.enabled() ? fmask + row : nullptr, counts.data());
      for (int64_t i = 0; i < n; ++i) pos[row + i] = i;
    }
  });
  return out;
}

}  // namespace use_kernels
