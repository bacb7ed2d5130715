// Segment gathering, pure C++ core (no torch): the per-row input check, the error messages and the
// CPU fill of one segment. Included by the torch CPU op (gather_segments_cpu.cpp), the CUDA kernels
// (cuda/gather_segments.cu: the row check and the FEP bit logic run on the device too) and the
// CMake unit tests (tests/cpp), so the rules live in one place.
//
// Corpus (CSR): user u owns tokens[offsets[u] : offsets[u+1]]. A batch row b is the segment
// (users[b], starts[b], lengths[b]), start relative to the user's sequence.
// FEP, window W, E event types, token id = event_offset + e: for the token at absolute index p,
// label[e] = 1 iff some token in tokens[p+1 .. min(p+W, user_end-1)] is event e;
// fep_mask = (p + W < user_end): all W future tokens exist.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#if defined(__CUDACC__)
#define USE_KERNELS_HD __host__ __device__ __forceinline__
#else
#define USE_KERNELS_HD inline
#endif

namespace use_kernels {

struct Corpus {
  const int32_t* tokens;
  int64_t num_tokens;
  const int64_t* offsets;  // [num_users + 1]
  int64_t num_users;
};

struct Batch {
  const int64_t* users;
  const int64_t* starts;
  const int64_t* lengths;
  int64_t size;  // B
};

struct FepSpec {
  int64_t window = 0;      // W
  int64_t num_events = 0;  // E
  int64_t event_offset = 5;
  USE_KERNELS_HD bool enabled() const { return window > 0 && num_events > 0; }
};

// Codes of the per-row check. Rows are checked in this order, so the first failing rule is the one
// reported; on the GPU the smallest failing row wins, as on the CPU.
enum RowError : int32_t {
  kRowOk = 0,
  kUserOutOfRange = 1,
  kOffsetsDecreasing = 2,
  kOffsetsOutsideTokens = 3,
  kNegativeStart = 4,
  kNegativeLength = 5,
  kSegmentOutsideUser = 6,
  kLengthOverMaxLen = 7,
};

// Checks row b; max_len < 0 means "no limit" (packed layout). Only the offsets the row reads are
// checked (O(B) per call, not O(U)): that is what makes every read below in bounds.
// Overflow-safe: no start + length is formed before both are known to be in [0, user_len].
USE_KERNELS_HD int32_t check_row(const Corpus& c, const Batch& bt, int64_t b, int64_t max_len) {
  const int64_t u = bt.users[b];
  if (u < 0 || u >= c.num_users) return kUserOutOfRange;
  const int64_t lo = c.offsets[u], hi = c.offsets[u + 1];
  if (lo > hi) return kOffsetsDecreasing;
  if (lo < 0 || hi > c.num_tokens) return kOffsetsOutsideTokens;
  const int64_t s = bt.starts[b], n = bt.lengths[b];
  if (s < 0) return kNegativeStart;
  if (n < 0) return kNegativeLength;
  if (n > hi - lo || s > hi - lo - n) return kSegmentOutsideUser;
  if (max_len >= 0 && n > max_len) return kLengthOverMaxLen;
  return kRowOk;
}

// The values a row error message names (read on the host; on CUDA copied back for one row only).
struct RowValues {
  int64_t user = 0, start = 0, length = 0;
  int64_t off_lo = 0, off_hi = 0;  // offsets[user], offsets[user+1] when user is in range
};

inline RowValues read_row(const Corpus& c, const Batch& bt, int64_t b) {
  RowValues v;
  v.user = bt.users[b];
  v.start = bt.starts[b];
  v.length = bt.lengths[b];
  if (v.user >= 0 && v.user < c.num_users) {
    v.off_lo = c.offsets[v.user];
    v.off_hi = c.offsets[v.user + 1];
  }
  return v;
}

// "<op>: batch row b: ..." — the same text as the Python references (use_kernels/gather.py).
inline std::string describe_row_error(const char* op, int32_t code, int64_t b, const RowValues& v,
                                      int64_t num_users, int64_t num_tokens, int64_t max_len) {
  std::ostringstream m;
  m << op << ": batch row " << b << ": ";
  const int64_t u = v.user;
  switch (code) {
    case kUserOutOfRange:
      m << "users[" << b << "]=" << u << " is out of range for " << num_users << " users";
      break;
    case kOffsetsDecreasing:
      m << "offsets must be non-decreasing: offsets[" << u << "]=" << v.off_lo << " > offsets["
        << u + 1 << "]=" << v.off_hi;
      break;
    case kOffsetsOutsideTokens:
      m << "offsets[" << u << "]=" << v.off_lo << ", offsets[" << u + 1 << "]=" << v.off_hi
        << " lie outside tokens (" << num_tokens << " tokens)";
      break;
    case kNegativeStart:
      m << "starts[" << b << "]=" << v.start << " is negative";
      break;
    case kNegativeLength:
      m << "lengths[" << b << "]=" << v.length << " is negative";
      break;
    case kSegmentOutsideUser:
      // Both are >= 0 here; the sum in uint64 cannot wrap.
      m << "segment [" << v.start << ", "
        << static_cast<uint64_t>(v.start) + static_cast<uint64_t>(v.length) << ") is outside user " << u
        << "'s sequence of " << v.off_hi - v.off_lo << " tokens";
      break;
    case kLengthOverMaxLen:
      m << "max_len=" << max_len << " is smaller than lengths[" << b << "]=" << v.length;
      break;
    default:
      m << "unknown error code " << code;
  }
  return m.str();
}

// First failing row on the host, or -1; `code` receives its error.
inline int64_t first_bad_row(const Corpus& c, const Batch& bt, int64_t max_len, int32_t* code) {
  for (int64_t b = 0; b < bt.size; ++b) {
    const int32_t e = check_row(c, bt, b, max_len);
    if (e != kRowOk) {
      *code = e;
      return b;
    }
  }
  *code = kRowOk;
  return -1;
}

// Event type of a token, or -1 when the token is not an event (special tokens, out of range).
USE_KERNELS_HD int64_t event_of(int32_t token, const FepSpec& f) {
  const int64_t e = static_cast<int64_t>(token) - f.event_offset;
  return (e >= 0 && e < f.num_events) ? e : -1;
}

// All W future tokens exist: p + W < user_end, written without forming p + W (W may be huge).
USE_KERNELS_HD bool fep_full_window(int64_t p, int64_t user_end, int64_t window) {
  return window < user_end - p;
}

// Fills one segment tokens[begin, begin + n) of a user ending at user_end (absolute indices):
// ids[n]; with FEP also labels[n * E] and fep_mask[n]. `counts` is scratch for E int32.
//
// FEP uses a sliding window of per-event counts over (p, p+W]: each step removes tokens[p] and
// adds tokens[p+W], so the cost is O(n * E) for the label bytes plus O(n + W), independent of W
// per position (the published loop re-counts all W tokens at every position: O(n * W)).
inline void fill_segment(const int32_t* tokens, int64_t begin, int64_t n, int64_t user_end,
                         const FepSpec& fep, int64_t* ids, uint8_t* labels, bool* fep_mask,
                         int32_t* counts) {
  const int32_t* src = tokens + begin;
  for (int64_t i = 0; i < n; ++i) ids[i] = src[i];
  if (!fep.enabled() || n == 0) return;
  const int64_t E = fep.num_events, W = fep.window;
  std::fill(counts, counts + E, 0);
  // Window of p = begin: tokens (begin, begin + reach], reach = min(W, tokens left after p).
  const int64_t reach0 = std::min(W, user_end - 1 - begin);
  for (int64_t q = begin + 1; q <= begin + reach0; ++q) {
    const int64_t e = event_of(tokens[q], fep);
    if (e >= 0) ++counts[e];
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = begin + i;
    if (i > 0) {
      // Window moves from (p-1, p-1+W] to (p, p+W]: tokens[p] leaves, tokens[p+W] enters.
      const int64_t e_out = event_of(tokens[p], fep);
      if (e_out >= 0) --counts[e_out];
      if (W < user_end - p) {
        const int64_t e_in = event_of(tokens[p + W], fep);
        if (e_in >= 0) ++counts[e_in];
      }
    }
    uint8_t* row = labels + i * E;
    for (int64_t e = 0; e < E; ++e) row[e] = counts[e] != 0;
    fep_mask[i] = fep_full_window(p, user_end, W);
  }
}

// The CUDA kernel keeps one bit per event type for each row of a block in shared memory (48 KiB
// for at least one row): E up to 48 KiB * 8 bits.
constexpr int64_t kCudaMaxEvents = int64_t{48} * 1024 * 8;

// ---- CUDA launchers (cuda/gather_segments.cu; compiled only in CUDA builds). `stream` is a
// cudaStream_t; the return value is a cudaError_t (0 = success), see cuda_error_string.

// Device-side check of every row. status: one unsigned 64-bit word preset to all ones; the kernel
// atomicMin's (row << 8 | code) into it, so the host reads back the first failing row and its
// code in a single 8-byte copy.
int launch_check_rows(const Corpus& c, const Batch& bt, int64_t max_len, uint64_t* status,
                      void* stream);

struct GatherOutputs {
  int64_t* input_ids;        // [rows]
  bool* attention_mask;      // [rows] (padded layout) or nullptr
  int64_t* position_ids;     // [rows] (packed layout) or nullptr
  uint8_t* fep_labels;       // [rows, E] or nullptr
  bool* fep_mask;            // [rows] or nullptr
};

// Padded layout: rows = B * max_len, row r is (b = r / max_len, i = r % max_len), i >= length is
// padding (pad_id, mask 0, labels 0).
int launch_gather_padded(const Corpus& c, const Batch& bt, int64_t max_len, int64_t pad_id,
                         const FepSpec& fep, const GatherOutputs& out, void* stream);

// Packed layout: rows = total = cu_seqlens[B]; row r belongs to the b with
// cu_seqlens[b] <= r < cu_seqlens[b+1] (binary search), i = r - cu_seqlens[b].
int launch_gather_packed(const Corpus& c, const Batch& bt, const int32_t* cu_seqlens, int64_t total,
                         const FepSpec& fep, const GatherOutputs& out, void* stream);

const char* cuda_error_string(int err);

}  // namespace use_kernels
