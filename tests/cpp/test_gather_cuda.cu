// The CUDA kernels (csrc/cuda/gather_segments.cu) against the host core (fill_segment, check_row)
// with raw cudaMalloc buffers, no torch. Built by CMake when a CUDA toolkit is found; exits 77
// (ctest: skipped) when no GPU is present.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "gather_segments.h"

using namespace use_kernels;

#define CUDA_OK(x)                                                                   \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      return 1;                                                                      \
    }                                                                                \
  } while (0)

template <typename T>
static T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, h.size()) * sizeof(T));
  if (!h.empty()) cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T>
static std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  if (n) cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937_64 rng(7);
  int failures = 0;
  const int64_t cases[][2] = {{5, 52}, {100, 52}, {1, 1}, {37, 70}, {3, 1000}};
  for (const auto& wc : cases) {
    const int64_t W = wc[0], E = wc[1];
    const FepSpec fep{W, E, 5};
    const int U = 40, B = 33;
    std::vector<int64_t> offsets{0};
    for (int u = 0; u < U; ++u) offsets.push_back(offsets.back() + static_cast<int64_t>(rng() % 600));
    std::vector<int32_t> tokens(offsets.back());
    for (auto& t : tokens) t = static_cast<int32_t>(rng() % (E + 8));
    std::vector<int64_t> users(B), starts(B), lengths(B);
    int64_t max_len = 0;
    for (int b = 0; b < B; ++b) {
      users[b] = static_cast<int64_t>(rng() % U);
      const int64_t len = offsets[users[b] + 1] - offsets[users[b]];
      lengths[b] = static_cast<int64_t>(rng() % (len + 1));
      starts[b] = (b % 3 == 0) ? len - lengths[b] : static_cast<int64_t>(rng() % (len - lengths[b] + 1));
      max_len = std::max(max_len, lengths[b]);
    }
    max_len += 3;
    int32_t* d_tok = to_device(tokens);
    int64_t *d_off = to_device(offsets), *d_u = to_device(users), *d_s = to_device(starts),
            *d_l = to_device(lengths);
    const Corpus c{d_tok, static_cast<int64_t>(tokens.size()), d_off, U};
    const Batch bt{d_u, d_s, d_l, B};

    // Row check: valid batch, then one bad row.
    uint64_t* d_status;
    CUDA_OK(cudaMalloc(&d_status, sizeof(uint64_t)));
    CUDA_OK(cudaMemset(d_status, 0xff, sizeof(uint64_t)));
    CUDA_OK(static_cast<cudaError_t>(launch_check_rows(c, bt, max_len, d_status, nullptr)));
    uint64_t status = to_host(d_status, 1)[0];
    if (status != ~uint64_t{0}) { std::printf("FAIL check_rows flagged a valid batch\n"); ++failures; }
    CUDA_OK(static_cast<cudaError_t>(launch_check_rows(c, bt, 0, d_status, nullptr)));
    status = to_host(d_status, 1)[0];
    int64_t first_long = -1;
    for (int b = B - 1; b >= 0; --b) if (lengths[b] > 0) first_long = b;
    if (status != ((static_cast<uint64_t>(first_long) << 8) | kLengthOverMaxLen)) {
      std::printf("FAIL check_rows status %llx\n", (unsigned long long)status); ++failures;
    }

    // Padded layout against the host core.
    const int64_t rows = B * max_len;
    int64_t *d_ids, *d_pos;
    bool *d_attn, *d_fmask;
    uint8_t* d_lab;
    CUDA_OK(cudaMalloc(&d_ids, rows * 8));
    CUDA_OK(cudaMalloc(&d_pos, rows * 8));
    CUDA_OK(cudaMalloc(&d_attn, rows));
    CUDA_OK(cudaMalloc(&d_fmask, rows));
    CUDA_OK(cudaMalloc(&d_lab, rows * E));
    CUDA_OK(static_cast<cudaError_t>(launch_gather_padded(
        c, bt, max_len, 3, fep, GatherOutputs{d_ids, d_attn, nullptr, d_lab, d_fmask}, nullptr)));
    CUDA_OK(cudaDeviceSynchronize());
    auto ids = to_host(d_ids, rows);
    auto lab = to_host(d_lab, rows * E);
    auto attn = to_host(reinterpret_cast<uint8_t*>(d_attn), rows);
    auto fmask = to_host(reinterpret_cast<uint8_t*>(d_fmask), rows);
    std::vector<int32_t> counts(E);
    for (int b = 0; b < B; ++b) {
      const int64_t n = lengths[b], begin = offsets[users[b]] + starts[b];
      std::vector<int64_t> want_ids(max_len, 3);
      std::vector<uint8_t> want_lab(max_len * E, 0);
      std::unique_ptr<bool[]> want_mask(new bool[max_len]());
      fill_segment(tokens.data(), begin, n, offsets[users[b] + 1], fep, want_ids.data(),
                   want_lab.data(), want_mask.get(), counts.data());
      for (int64_t i = 0; i < max_len; ++i) {
        const int64_t r = b * max_len + i;
        bool ok = ids[r] == want_ids[i] && attn[r] == (i < n) && fmask[r] == want_mask[i];
        for (int64_t e = 0; e < E; ++e) ok &= lab[r * E + e] == want_lab[i * E + e];
        if (!ok) { if (failures < 10) std::printf("FAIL padded W=%lld E=%lld row %d pos %lld\n",
                                                  (long long)W, (long long)E, b, (long long)i);
                   ++failures; }
      }
    }

    // Packed layout.
    std::vector<int32_t> cu{0};
    for (int b = 0; b < B; ++b) cu.push_back(cu.back() + static_cast<int32_t>(lengths[b]));
    int32_t* d_cu = to_device(cu);
    CUDA_OK(static_cast<cudaError_t>(launch_gather_packed(
        c, bt, d_cu, cu.back(), fep, GatherOutputs{d_ids, nullptr, d_pos, d_lab, d_fmask}, nullptr)));
    CUDA_OK(cudaDeviceSynchronize());
    ids = to_host(d_ids, cu.back());
    auto pos = to_host(d_pos, cu.back());
    lab = to_host(d_lab, cu.back() * E);
    fmask = to_host(reinterpret_cast<uint8_t*>(d_fmask), cu.back());
    for (int b = 0; b < B; ++b) {
      const int64_t n = lengths[b], begin = offsets[users[b]] + starts[b];
      std::vector<int64_t> want_ids(n);
      std::vector<uint8_t> want_lab(n * E);
      std::unique_ptr<bool[]> want_mask(new bool[n + 1]());
      fill_segment(tokens.data(), begin, n, offsets[users[b] + 1], fep, want_ids.data(),
                   want_lab.data(), want_mask.get(), counts.data());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = cu[b] + i;
        bool ok = ids[r] == want_ids[i] && pos[r] == i && fmask[r] == want_mask[i];
        for (int64_t e = 0; e < E; ++e) ok &= lab[r * E + e] == want_lab[i * E + e];
        if (!ok) { if (failures < 10) std::printf("FAIL packed W=%lld E=%lld row %d pos %lld\n",
                                                  (long long)W, (long long)E, b, (long long)i);
                   ++failures; }
      }
    }
    for (void* p : {(void*)d_tok, (void*)d_off, (void*)d_u, (void*)d_s, (void*)d_l, (void*)d_status,
                    (void*)d_ids, (void*)d_pos, (void*)d_attn, (void*)d_fmask, (void*)d_lab, (void*)d_cu})
      cudaFree(p);
  }
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
