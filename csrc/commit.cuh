// Commit (and optional re-mask) of a batch of requests in place on a flat canvas of token ids, the semantics of
// kernels/reference.py commit_reference. Shared by the CUDA kernel (commit.cu) and its C++ CPU twin
// (commit_cpu.cpp): the rank order and the number k of rows to commit per mode live here as host/device functions,
// so both backends compute the same thing. No torch, no CUDA runtime headers.
//
// Request b owns the candidate rows [row_offsets[b], row_offsets[b+1]) (n rows). Rows are ranked by score
// descending, ties by row order (ranks_before). With c_r / H_r the score / entropy of the row of rank r:
//   TOPK       k = min(count, n)                      (count < 0 counts as 0)
//   THRESHOLD  k = max(1, #{rows with score >= threshold})
//   FACTOR     i* = the first i >= 1 with c_i < 1 - factor / (i + 2) (in fp64, as the reference), else n - 1;
//              k = n when i* = n - 1, else i*
//   ENTROPY    the k >= 1 where the reference's loop stops: k grows while sum(H_0..H_k) - max(H_0..H_k) <= gamma
//              (sums left to right in fp64, as the reference's Python floats)
// and k = 0 when n = 0 (any mode) or the mode is unknown. Revision first: the request's revise slots with
// revise_score < remask_bound are set to mask_id; then canvas[row_index] = token for the k best rows.
// counters[b] = (k, remasked, n - k + remasked).
//
// Contract (checked by the Python launcher for CPU tensors, guarded in the kernel): row_offsets non-decreasing in
// [0, M]; revise_offsets likewise in [0, R]; canvas indices in [0, canvas_len) (out-of-range writes are skipped);
// scores not NaN; row_index distinct across the batch and disjoint from revise_index of other requests (requests
// run concurrently on the GPU); at most kCommitMaxRows rows per request (the kernel keeps a request's rows in shared
// memory; a larger request commits nothing and gets counters (-1, remasked, -1)).
#pragma once

#include <cstdint>

#include "noise.cuh"  // DIFFUSE_HOST_DEVICE

namespace diffuse {

enum CommitMode : int { kCommitTopK = 0, kCommitThreshold = 1, kCommitFactor = 2, kCommitEntropy = 3 };

constexpr int kCommitMaxRows = 2048;  // candidate rows per request

namespace commit {

// Does row i (score a) rank before row j (score b)? Score descending, ties by row order (-0.0 ties with 0.0).
DIFFUSE_HOST_DEVICE bool ranks_before(float a, std::int64_t i, float b, std::int64_t j) {
  return a > b || (a == b && i < j);
}

// A request's range [lo, hi) from an offsets array, clamped into [0, total] with hi >= lo (a guard: callers pass
// non-decreasing offsets in range).
DIFFUSE_HOST_DEVICE void request_range(const std::int64_t* offsets, std::int64_t b, std::int64_t total,
                                       std::int64_t& lo, std::int64_t& hi) {
  lo = offsets[b];
  hi = offsets[b + 1];
  lo = lo < 0 ? 0 : (lo > total ? total : lo);
  hi = hi < lo ? lo : (hi > total ? total : hi);
}

DIFFUSE_HOST_DEVICE int topk_k(std::int32_t count, int n) {
  if (count < 0) return 0;
  return count < n ? static_cast<int>(count) : n;
}

// num_ge = #{rows with score >= threshold}; n >= 1.
DIFFUSE_HOST_DEVICE int threshold_k(int num_ge, int n) {
  (void)n;
  return num_ge > 1 ? num_ge : 1;
}

// Does the row of rank i >= 1 (score c) stop the factor rule? c_i < 1 - factor / (i + 2), in fp64.
DIFFUSE_HOST_DEVICE bool factor_stops(float c, int i, float factor) {
  return static_cast<double>(c) < 1.0 - static_cast<double>(factor) / static_cast<double>(i + 2);
}

// first = the smallest rank i >= 1 with factor_stops, or n - 1 (also when n = 1) if none; n >= 1.
DIFFUSE_HOST_DEVICE int factor_k(int first, int n) { return first >= n - 1 ? n : first; }

// ENTROPY: h(r) = the entropy of the row of rank r (any accessor); n >= 1.
template <typename H>
DIFFUSE_HOST_DEVICE int entropy_k(int n, float gamma, const H& h) {
  const double g = static_cast<double>(gamma);
  double sum = static_cast<double>(h(0));
  double mx = sum;
  int k = 1;
  while (k < n) {
    const double v = static_cast<double>(h(k));
    sum += v;
    if (v > mx) mx = v;
    if (!(sum - mx <= g)) break;
    ++k;
  }
  return k;
}

// The factor rule sequentially over an accessor c(r) of the rank-ordered scores; n >= 1.
template <typename C>
DIFFUSE_HOST_DEVICE int factor_first(int n, float factor, const C& c) {
  for (int i = 1; i < n; ++i) {
    if (factor_stops(c(i), i, factor)) return i;
  }
  return n - 1;
}

}  // namespace commit

// Arguments of both entry points (all pointers on the same device; sizes in elements):
//   canvas          [canvas_len] int64, modified in place
//   row_offsets     [num_requests + 1] int64; row_index, token [num_rows] int64; score, entropy [num_rows] fp32
//   mode, count     [num_requests] int32; threshold, factor, eb_gamma [num_requests] fp32
//   revise_offsets  [num_requests + 1] int64, revise_index [num_revise] int64, revise_score [num_revise] fp32,
//                   remask_bound [num_requests] fp32: all four null for no revision
//   committed       [num_rows] uint8 (output; rows of a request get 0/1; rows outside every request untouched)
//   counters        [num_requests, 3] int32 (output)
struct CommitArgs {
  std::int64_t* canvas;
  std::int64_t canvas_len;
  const std::int64_t* row_offsets;
  std::int64_t num_requests;
  const std::int64_t* row_index;
  const std::int64_t* token;
  const float* score;
  const float* entropy;
  std::int64_t num_rows;
  const std::int32_t* mode;
  const std::int32_t* count;
  const float* threshold;
  const float* factor;
  const float* eb_gamma;
  std::int64_t mask_id;
  const std::int64_t* revise_offsets;
  const std::int64_t* revise_index;
  const float* revise_score;
  const float* remask_bound;
  std::int64_t num_revise;
  std::uint8_t* committed;
  std::int32_t* counters;
};

// CPU twin; blocking; requests in order.
void commit_cpu(const CommitArgs& args);

// One asynchronous launch on `cuda_stream` (a cudaStream_t as an integer; 0 = legacy default stream) of the current
// device: one block per request. Returns the cudaError_t of the launch as an int (0 = success).
int commit_cuda(const CommitArgs& args, std::uintptr_t cuda_stream);

}  // namespace diffuse
