// CUDA kernels of the segment-gathering ops. Raw pointers, no torch headers: this file compiles
// standalone with nvcc (CMake compile-checks it on machines without a GPU).
//
// One output row = one token position: padded row r = (b = r / max_len, i = r % max_len), packed
// row r = (b with cu_seqlens[b] <= r < cu_seqlens[b+1], i = r - cu_seqlens[b]). A block owns
// `rows_per_block` consecutive rows, so its slice of every output — including the [rows, E] label
// bytes — is contiguous and written coalesced.
//
// FEP per row p (absolute token index of the user ending at `end`):
//   bits[e] = OR_{q = p+1 .. min(p+W, end-1)} [tokens[q] == event_offset + e]
//   fep_mask = p + W < end
// Phase 1 (one thread per row) builds the row's E-bit set in shared memory from the W future tokens
// (read through the read-only cache; neighbouring rows share them). Phase 2 expands the bits to
// bytes with the whole block walking the contiguous [rows, E] byte range, so each warp stores 32
// consecutive bytes instead of 32 rows E bytes apart.
#include <cuda_runtime.h>

#include "../gather_segments.h"

namespace use_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSharedBytes = 48 * 1024;  // static limit without opting in to more

__global__ void check_rows_kernel(Corpus c, Batch bt, int64_t max_len,
                                  unsigned long long* status) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= bt.size) return;
  const int32_t code = check_row(c, bt, b, max_len);
  // Smallest failing row wins, as on the CPU (which reports the first row it meets).
  if (code != kRowOk)
    atomicMin(status, (static_cast<unsigned long long>(b) << 8) | static_cast<unsigned>(code));
}

// Last b in [0, B) with cu[b] <= r (skips empty segments, whose cu[b] == cu[b+1]).
__device__ __forceinline__ int64_t segment_of(const int32_t* cu, int64_t B, int64_t r) {
  int64_t lo = 0, hi = B;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu[mid] <= r) lo = mid; else hi = mid;
  }
  return lo;
}

template <bool kPacked>
__global__ void __launch_bounds__(kThreads)
gather_kernel(Corpus c, Batch bt, int64_t max_len, int64_t pad_id, const int32_t* cu,
              int64_t num_rows, FepSpec fep, int words, int rows_per_block, GatherOutputs out) {
  extern __shared__ uint32_t bits[];  // [rows_per_block, words]
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t rows_here = min(static_cast<int64_t>(rows_per_block), num_rows - r0);
  const bool with_fep = out.fep_labels != nullptr;  // uniform over the grid

  for (int64_t t = threadIdx.x; t < rows_here; t += blockDim.x) {
    const int64_t r = r0 + t;
    int64_t b, i;
    if (kPacked) {
      b = segment_of(cu, bt.size, r);
      i = r - cu[b];
    } else {
      b = r / max_len;
      i = r - b * max_len;
    }
    const bool real = kPacked || i < bt.lengths[b];
    uint32_t* my = bits + t * words;
    for (int w = 0; w < words; ++w) my[w] = 0;
    if (real) {
      const int64_t u = bt.users[b];
      const int64_t end = c.offsets[u + 1];
      const int64_t p = c.offsets[u] + bt.starts[b] + i;
      out.input_ids[r] = __ldg(c.tokens + p);
      if (with_fep) {
        const int64_t last = p + min(fep.window, end - 1 - p);
        for (int64_t q = p + 1; q <= last; ++q) {
          const int64_t e = event_of(__ldg(c.tokens + q), fep);
          if (e >= 0) my[e >> 5] |= 1u << (e & 31);
        }
        out.fep_mask[r] = fep_full_window(p, end, fep.window);
      }
    } else {
      out.input_ids[r] = pad_id;
      if (with_fep) out.fep_mask[r] = false;
    }
    if (kPacked) out.position_ids[r] = i;
    else out.attention_mask[r] = real;
  }
  if (!with_fep) return;
  __syncthreads();
  const int64_t E = fep.num_events;
  uint8_t* dst = out.fep_labels + r0 * E;
  const int64_t nbytes = rows_here * E;
  for (int64_t j = threadIdx.x; j < nbytes; j += blockDim.x) {
    const int64_t t = j / E, e = j - t * E;
    dst[j] = static_cast<uint8_t>((bits[t * words + (e >> 5)] >> (e & 31)) & 1u);
  }
}

template <bool kPacked>
int launch_gather(const Corpus& c, const Batch& bt, int64_t max_len, int64_t pad_id,
                  const int32_t* cu, int64_t num_rows, const FepSpec& fep,
                  const GatherOutputs& out, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  const int words = out.fep_labels != nullptr ? static_cast<int>((fep.num_events + 31) / 32) : 0;
  int rows_per_block = kThreads;
  if (words > 0) rows_per_block = min(kThreads, kMaxSharedBytes / (4 * words));
  if (rows_per_block < 1) return cudaErrorInvalidValue;  // E > kCudaMaxEvents, refused by the caller
  const int64_t blocks = (num_rows + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(rows_per_block) * words * sizeof(uint32_t);
  gather_kernel<kPacked><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      c, bt, max_len, pad_id, cu, num_rows, fep, words, rows_per_block, out);
  return cudaGetLastError();
}

}  // namespace

int launch_check_rows(const Corpus& c, const Batch& bt, int64_t max_len, uint64_t* status,
                      void* stream) {
  if (bt.size == 0) return cudaSuccess;
  const int64_t blocks = (bt.size + kThreads - 1) / kThreads;
  check_rows_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                      static_cast<cudaStream_t>(stream)>>>(
      c, bt, max_len, reinterpret_cast<unsigned long long*>(status));
  return cudaGetLastError();
}

int launch_gather_padded(const Corpus& c, const Batch& bt, int64_t max_len, int64_t pad_id,
                         const FepSpec& fep, const GatherOutputs& out, void* stream) {
  return launch_gather<false>(c, bt, max_len, pad_id, nullptr, bt.size * max_len, fep, out,
                              static_cast<cudaStream_t>(stream));
}

int launch_gather_packed(const Corpus& c, const Batch& bt, const int32_t* cu_seqlens, int64_t total,
                         const FepSpec& fep, const GatherOutputs& out, void* stream) {
  return launch_gather<true>(c, bt, -1, 0, cu_seqlens, total, fep, out,
                             static_cast<cudaStream_t>(stream));
}

const char* cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // namespace use_kernels
