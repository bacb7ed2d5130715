// CUDA entry points of the segment-gathering ops: checks, allocation, one small read-back, and the
// kernel launches (cuda/gather_segments.cu, raw pointers, no torch). Compiled in CUDA builds only.
#ifdef USE_KERNELS_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "gather_segments_ops.h"

namespace use_kernels {

namespace {

void check_launch(const char* op, int err) {
  TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cuda_error_string(err));
}

void check_events(const char* op, const FepSpec& fep) {
  TORCH_CHECK(!fep.enabled() || fep.num_events <= kCudaMaxEvents, op, ": num_events=",
              fep.num_events, " is more than the CUDA kernel supports (", kCudaMaxEvents, ")");
}

// Validates every row on the device, and (packed) computes cu_seqlens there too; then reads back
// [first bad (row << 8 | code) or -1, total] in ONE 16-byte copy: the op's only host sync. Only on
// the error path are the offending row's numbers copied back, to name them in the message.
int64_t check_rows_cuda(const char* op, const Inputs& in, const Corpus& c, const Batch& bt,
                        int64_t max_len, const at::Tensor* cu_seqlens, cudaStream_t stream) {
  auto status = at::full({2}, -1, in.lengths.options());  // all ones = "no error"
  check_launch(op, launch_check_rows(c, bt, max_len,
                                     reinterpret_cast<uint64_t*>(status.data_ptr<int64_t>()), stream));
  if (cu_seqlens != nullptr) {
    // cu_seqlens[0] = 0, cu_seqlens[1:] = cumsum(lengths) (int64 scan, then narrowed; the total is
    // checked against int32 below before anything trusts it).
    auto cu64 = at::cumsum(in.lengths, 0);
    cu_seqlens->narrow(0, 0, 1).zero_();
    if (bt.size > 0) {
      cu_seqlens->narrow(0, 1, bt.size).copy_(cu64);
      status.narrow(0, 1, 1).copy_(cu64.narrow(0, bt.size - 1, 1));
    } else {
      status.narrow(0, 1, 1).zero_();
    }
  }
  const auto host = status.cpu();
  const int64_t key = host[0].item<int64_t>();
  if (key != -1) {
    const int64_t b = static_cast<int64_t>(static_cast<uint64_t>(key) >> 8);
    const int32_t code = static_cast<int32_t>(key & 0xff);
    RowValues v;
    v.user = in.users[b].item<int64_t>();
    v.start = in.starts[b].item<int64_t>();
    v.length = in.lengths[b].item<int64_t>();
    if (v.user >= 0 && v.user < c.num_users) {
      v.off_lo = in.offsets[v.user].item<int64_t>();
      v.off_hi = in.offsets[v.user + 1].item<int64_t>();
    }
    TORCH_CHECK(false, describe_row_error(op, code, b, v, c.num_users, c.num_tokens, max_len));
  }
  return host[1].item<int64_t>();
}

}  // namespace

PaddedOut gather_segments_cuda(const at::Tensor& tokens, const at::Tensor& offsets,
                               const at::Tensor& users, const at::Tensor& starts,
                               const at::Tensor& lengths, int64_t max_len, int64_t pad_id,
                               int64_t fep_window, int64_t num_events, int64_t event_offset) {
  const char* op = "gather_segments";
  const Inputs in = check_inputs(op, tokens, offsets, users, starts, lengths, max_len, fep_window,
                                 num_events, /*packed=*/false);
  const FepSpec fep{fep_window, num_events, event_offset};
  check_events(op, fep);
  const c10::cuda::CUDAGuard guard(tokens.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Corpus c = in.corpus();
  const Batch bt = in.batch();
  check_rows_cuda(op, in, c, bt, max_len, nullptr, stream);

  auto out = empty_padded(in.tokens, bt.size, max_len, fep);
  const GatherOutputs o{std::get<0>(out).data_ptr<int64_t>(), std::get<1>(out).data_ptr<bool>(),
                        nullptr, fep.enabled() ? std::get<2>(out).data_ptr<uint8_t>() : nullptr,
                        fep.enabled() ? std::get<3>(out).data_ptr<bool>() : nullptr};
  check_launch(op, launch_gather_padded(c, bt, max_len, pad_id, fep, o, stream));
  return out;
}

PackedOut gather_segments_packed_cuda(const at::Tensor& tokens, const at::Tensor& offsets,
                                      const at::Tensor& users, const at::Tensor& starts,
                                      const at::Tensor& lengths, int64_t fep_window,
                                      int64_t num_events, int64_t event_offset) {
  const char* op = "gather_segments_packed";
  const Inputs in = check_inputs(op, tokens, offsets, users, starts, lengths, -1, fep_window,
                                 num_events, /*packed=*/true);
  const FepSpec fep{fep_window, num_events, event_offset};
  check_events(op, fep);
  const c10::cuda::CUDAGuard guard(tokens.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Corpus c = in.corpus();
  const Batch bt = in.batch();
  auto cu_seqlens = at::empty({bt.size + 1}, in.lengths.options().dtype(at::kInt));
  const int64_t total = check_rows_cuda(op, in, c, bt, -1, &cu_seqlens, stream);
  TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(), op, ": total length ", total,
              " does not fit cu_seqlens (int32)");

  auto out = empty_packed(in.tokens, cu_seqlens, total, fep);
  const GatherOutputs o{std::get<0>(out).data_ptr<int64_t>(), nullptr,
                        std::get<2>(out).data_ptr<int64_t>(),
                        fep.enabled() ? std::get<3>(out).data_ptr<uint8_t>() : nullptr,
                        fep.enabled() ? std::get<4>(out).data_ptr<bool>() : nullptr};
  check_launch(op, launch_gather_packed(c, bt, cu_seqlens.data_ptr<int32_t>(), total, fep, o,
                                        stream));
  return out;
}

}  // namespace use_kernels

#endif  // USE_KERNELS_WITH_CUDA
