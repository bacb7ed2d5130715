// Unit tests of the torch-free core (csrc/gather_segments.h): the row check, the error messages
// (the same text as the Python reference) and fill_segment against a literal loop of the FEP
// definition on random corpora. Run by ctest (scripts/cpp_check.sh).
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gather_segments.h"

using namespace use_kernels;

static int g_failures = 0;
static int g_checks = 0;

#define EXPECT(cond, ...)                                      \
  do {                                                         \
    ++g_checks;                                                \
    if (!(cond)) {                                             \
      ++g_failures;                                            \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                \
      std::printf("\n");                                       \
    }                                                          \
  } while (0)

struct Fixture {
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets, users, starts, lengths;
  Corpus corpus() const {
    return {tokens.data(), static_cast<int64_t>(tokens.size()), offsets.data(),
            static_cast<int64_t>(offsets.size()) - 1};
  }
  Batch batch() const {
    return {users.data(), starts.data(), lengths.data(), static_cast<int64_t>(users.size())};
  }
};

// Users of 10, 0, 15, 5 tokens; the same fixture as tests/test_gather.py::_inputs.
static Fixture small() {
  Fixture f;
  for (int i = 0; i < 30; ++i) f.tokens.push_back(i % 11);
  f.offsets = {0, 10, 10, 25, 30};
  f.users = {0, 2, 3};
  f.starts = {0, 5, 1};
  f.lengths = {4, 10, 4};
  return f;
}

static std::string message_of(const Fixture& f, int64_t max_len) {
  int32_t code = kRowOk;
  const int64_t b = first_bad_row(f.corpus(), f.batch(), max_len, &code);
  if (b < 0) return "";
  return describe_row_error("gather_segments", code, b, read_row(f.corpus(), f.batch(), b),
                            f.corpus().num_users, f.corpus().num_tokens, max_len);
}

static void expect_message(const Fixture& f, int64_t max_len, const std::string& want, int line) {
  const std::string got = message_of(f, max_len);
  ++g_checks;
  if (got != want) {
    ++g_failures;
    std::printf("FAIL line %d:\n  got  '%s'\n  want '%s'\n", line, got.c_str(), want.c_str());
  }
}

static void test_row_checks() {
  const std::string p = "gather_segments: ";
  Fixture f = small();
  expect_message(f, 16, "", __LINE__);
  expect_message(f, -1, "", __LINE__);
  { Fixture g = f; g.users[1] = 4;
    expect_message(g, 16, p + "batch row 1: users[1]=4 is out of range for 4 users", __LINE__); }
  { Fixture g = f; g.users[0] = -1;
    expect_message(g, 16, p + "batch row 0: users[0]=-1 is out of range for 4 users", __LINE__); }
  { Fixture g = f; g.offsets[3] = 8;
    expect_message(g, 16, p + "batch row 1: offsets must be non-decreasing: offsets[2]=10 > offsets[3]=8", __LINE__); }
  { Fixture g = f; g.offsets[4] = 31;
    expect_message(g, 16, p + "batch row 2: offsets[3]=25, offsets[4]=31 lie outside tokens (30 tokens)", __LINE__); }
  { Fixture g = f; g.starts[2] = -1;
    expect_message(g, 16, p + "batch row 2: starts[2]=-1 is negative", __LINE__); }
  { Fixture g = f; g.lengths[0] = -3;
    expect_message(g, 16, p + "batch row 0: lengths[0]=-3 is negative", __LINE__); }
  { Fixture g = f; g.starts[1] = 6;
    expect_message(g, 16, p + "batch row 1: segment [6, 16) is outside user 2's sequence of 15 tokens", __LINE__); }
  { Fixture g = f; g.starts[0] = int64_t{1} << 62;  // start + length would not overflow-check naively
    expect_message(g, 16, p + "batch row 0: segment [4611686018427387904, 4611686018427387908) is "
                              "outside user 0's sequence of 10 tokens", __LINE__); }
  { Fixture g = f; g.lengths[2] = std::numeric_limits<int64_t>::max();
    EXPECT(check_row(g.corpus(), g.batch(), 2, -1) == kSegmentOutsideUser, "huge length"); }
  expect_message(f, 8, p + "batch row 1: max_len=8 is smaller than lengths[1]=10", __LINE__);
  { Fixture g = f; g.lengths = {4, -1, -1};  // the first bad row is reported
    expect_message(g, 16, p + "batch row 1: lengths[1]=-1 is negative", __LINE__); }
  { Fixture g = f; g.users = {1}; g.starts = {0}; g.lengths = {0};  // empty user, empty segment
    expect_message(g, 0, "", __LINE__); }
}

// The FEP definition, literally.
static void fep_by_definition(const Fixture& f, int64_t b, const FepSpec& fep,
                              std::vector<uint8_t>* labels, std::vector<bool>* mask) {
  const int64_t u = f.users[b], n = f.lengths[b], end = f.offsets[u + 1];
  labels->assign(n * fep.num_events, 0);
  mask->assign(n, false);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = f.offsets[u] + f.starts[b] + i;
    for (int64_t q = p + 1; q <= p + fep.window && q < end; ++q) {
      const int64_t e = static_cast<int64_t>(f.tokens[q]) - fep.event_offset;
      if (e >= 0 && e < fep.num_events) (*labels)[i * fep.num_events + e] = 1;
    }
    (*mask)[i] = p + fep.window < end;
  }
}

static void test_fill_segment_random() {
  std::mt19937_64 rng(1234);
  const int64_t windows[] = {1, 2, 5, 17, 100, 1000};
  const int64_t events[] = {1, 3, 52, 70};
  for (int64_t W : windows) {
    for (int64_t E : events) {
      for (int rep = 0; rep < 3; ++rep) {
        Fixture f;
        const int U = 12;
        f.offsets.push_back(0);
        for (int u = 0; u < U; ++u) {
          const int64_t len = (rng() % 5 == 0) ? 0 : static_cast<int64_t>(rng() % 200);
          f.offsets.push_back(f.offsets.back() + len);
        }
        for (int64_t q = 0; q < f.offsets.back(); ++q)
          f.tokens.push_back(static_cast<int32_t>(rng() % (5 + E + 3)));  // specials + out of range
        for (int b = 0; b < 20; ++b) {
          const int64_t u = static_cast<int64_t>(rng() % U);
          const int64_t len = f.offsets[u + 1] - f.offsets[u];
          const int64_t n = static_cast<int64_t>(rng() % (len + 1));
          const int64_t s = (b % 3 == 0) ? len - n : static_cast<int64_t>(rng() % (len - n + 1));
          f.users.push_back(u); f.starts.push_back(s); f.lengths.push_back(n);
        }
        const FepSpec fep{W, E, 5};
        std::vector<int32_t> counts(E);
        for (int64_t b = 0; b < 20; ++b) {
          const int64_t u = f.users[b], n = f.lengths[b];
          const int64_t begin = f.offsets[u] + f.starts[b];
          std::vector<int64_t> ids(n, -7);
          std::vector<uint8_t> labels(n * E, 9);
          std::unique_ptr<bool[]> mask(new bool[n + 1]);
          fill_segment(f.tokens.data(), begin, n, f.offsets[u + 1], fep, ids.data(), labels.data(),
                       mask.get(), counts.data());
          std::vector<uint8_t> want_labels;
          std::vector<bool> want_mask;
          fep_by_definition(f, b, fep, &want_labels, &want_mask);
          bool ids_ok = true, labels_ok = labels == want_labels, mask_ok = true;
          for (int64_t i = 0; i < n; ++i) {
            ids_ok &= ids[i] == f.tokens[begin + i];
            mask_ok &= mask[i] == want_mask[i];
          }
          EXPECT(ids_ok, "ids W=%lld E=%lld row %lld", (long long)W, (long long)E, (long long)b);
          EXPECT(labels_ok, "labels W=%lld E=%lld row %lld", (long long)W, (long long)E, (long long)b);
          EXPECT(mask_ok, "fep_mask W=%lld E=%lld row %lld", (long long)W, (long long)E, (long long)b);
        }
      }
    }
  }
}

static void test_fill_segment_hand_example() {
  // tokens of user 0: [7 5 1 6 9 5], E = 3 (ids 5, 6, 7), W = 2; the segment is [1, 4).
  const int32_t tokens[] = {7, 5, 1, 6, 9, 5, 8, 8};
  const FepSpec fep{2, 3, 5};
  int64_t ids[3];
  uint8_t labels[9];
  bool mask[3];
  int32_t counts[3];
  fill_segment(tokens, 1, 3, 6, fep, ids, labels, mask, counts);
  const uint8_t want[9] = {0, 1, 0, 0, 1, 0, 1, 0, 0};
  EXPECT(ids[0] == 5 && ids[1] == 1 && ids[2] == 6, "ids");
  EXPECT(std::equal(labels, labels + 9, want), "labels");
  EXPECT(mask[0] && mask[1] && mask[2], "mask");
  // W far past everything, no overflow in p + W.
  const FepSpec huge{std::numeric_limits<int64_t>::max(), 3, 5};
  fill_segment(tokens, 3, 3, 6, huge, ids, labels, mask, counts);
  const uint8_t want2[9] = {1, 0, 0, 1, 0, 0, 0, 0, 0};  // futures {9,5}, {5}, {}
  EXPECT(std::equal(labels, labels + 9, want2), "labels huge W");
  EXPECT(!mask[0] && !mask[1] && !mask[2], "mask huge W");
  // No FEP: only ids are written.
  const FepSpec none{0, 0, 5};
  fill_segment(tokens, 0, 2, 6, none, ids, nullptr, nullptr, nullptr);
  EXPECT(ids[0] == 7 && ids[1] == 5, "ids without fep");
}

int main() {
  test_row_checks();
  test_fill_segment_hand_example();
  test_fill_segment_random();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
