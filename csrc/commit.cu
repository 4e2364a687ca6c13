// Commit on the GPU: per request, re-mask the revise slots below the bound, rank the candidate rows, compute k per
// mode and write the k best tokens into the canvas (semantics: kernels/reference.py commit_reference; rank order
// and k rules in commit.cuh, shared with the C++ twin).
//
// One block of kThreads threads per request. The request's scores are loaded into shared memory; each thread ranks
// its rows by counting (rank of row i = #{j ranking before i}: O(n^2 / kThreads) shared-memory reads, broadcasts)
// and stores the row at its rank position (s_order), with its entropy (s_h) for the ENTROPY rule. THRESHOLD counts
// rows >= threshold and FACTOR takes the smallest stopping rank with shared-memory atomics; ENTROPY runs the
// reference's sequential fp64 prefix loop in one thread over s_h (it stops at the first rank over the budget). The
// block then writes the k rows of ranks 0..k-1 and the counters. Revision writes precede the commits of the same
// request (a __syncthreads separates them); requests run concurrently, so their canvas slots must be disjoint.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "commit.cuh"

namespace diffuse {

namespace {

constexpr int kThreads = 256;

// Grid: one block per request (blockIdx.x = b < num_requests). Arguments: see CommitArgs in commit.cuh.
__global__ void __launch_bounds__(kThreads) commit_kernel(const CommitArgs a) {
  __shared__ float s_score[kCommitMaxRows];
  __shared__ int s_order[kCommitMaxRows];
  __shared__ float s_h[kCommitMaxRows];
  __shared__ int s_remasked;
  __shared__ int s_num_ge;
  __shared__ int s_first;
  __shared__ int s_k;

  const std::int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  if (tid == 0) {
    s_remasked = 0;
    s_num_ge = 0;
    s_first = INT_MAX;
  }
  __syncthreads();

  if (a.revise_offsets != nullptr) {
    std::int64_t rlo = 0, rhi = 0;
    commit::request_range(a.revise_offsets, b, a.num_revise, rlo, rhi);
    const float bound = a.remask_bound[b];
    int low = 0;
    for (std::int64_t j = rlo + tid; j < rhi; j += kThreads) {
      if (a.revise_score[j] < bound) {
        const std::int64_t idx = a.revise_index[j];
        if (idx >= 0 && idx < a.canvas_len) a.canvas[idx] = a.mask_id;
        ++low;
      }
    }
    if (low) atomicAdd(&s_remasked, low);
  }

  std::int64_t lo = 0, hi = 0;
  commit::request_range(a.row_offsets, b, a.num_rows, lo, hi);
  std::int32_t* ctr = a.counters + 3 * b;
  if (hi - lo > kCommitMaxRows) {  // the same for every thread of the block
    __syncthreads();
    if (tid == 0) {
      ctr[0] = -1;
      ctr[1] = s_remasked;
      ctr[2] = -1;
    }
    return;
  }
  const int n = static_cast<int>(hi - lo);
  const int mode = a.mode[b];
  for (int i = tid; i < n; i += kThreads) s_score[i] = a.score[lo + i];
  __syncthreads();  // scores loaded; the revision writes are done before any commit write below

  const float threshold = a.threshold[b];
  const float factor = a.factor[b];
  int num_ge = 0;
  int first = INT_MAX;
  for (int i = tid; i < n; i += kThreads) {
    const float si = s_score[i];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += commit::ranks_before(s_score[j], j, si, i) ? 1 : 0;
    s_order[rank] = i;
    if (mode == kCommitEntropy) s_h[rank] = a.entropy[lo + i];
    if (mode == kCommitThreshold) num_ge += si >= threshold ? 1 : 0;
    if (mode == kCommitFactor && rank >= 1 && rank < first && commit::factor_stops(si, rank, factor)) first = rank;
  }
  if (num_ge) atomicAdd(&s_num_ge, num_ge);
  if (first != INT_MAX) atomicMin(&s_first, first);
  __syncthreads();

  if (tid == 0) {
    int k = 0;
    if (n > 0) {
      switch (mode) {
        case kCommitTopK:
          k = commit::topk_k(a.count[b], n);
          break;
        case kCommitThreshold:
          k = commit::threshold_k(s_num_ge, n);
          break;
        case kCommitFactor:
          k = commit::factor_k(s_first == INT_MAX ? n - 1 : s_first, n);
          break;
        case kCommitEntropy:
          k = commit::entropy_k(n, a.eb_gamma[b], [&](int r) { return s_h[r]; });
          break;
        default:
          k = 0;
          break;
      }
    }
    s_k = k;
    ctr[0] = k;
    ctr[1] = s_remasked;
    ctr[2] = n - k + s_remasked;
  }
  __syncthreads();

  const int k = s_k;
  for (int r = tid; r < n; r += kThreads) {
    const std::int64_t row = lo + s_order[r];
    if (r < k) {
      const std::int64_t idx = a.row_index[row];
      if (idx >= 0 && idx < a.canvas_len) a.canvas[idx] = a.token[row];
      a.committed[row] = 1;
    } else {
      a.committed[row] = 0;
    }
  }
}

}  // namespace

int commit_cuda(const CommitArgs& args, std::uintptr_t cuda_stream) {
  if (args.num_requests <= 0) return static_cast<int>(cudaSuccess);
  if (args.num_requests >= (std::int64_t{1} << 31)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(cuda_stream);
  commit_kernel<<<static_cast<unsigned>(args.num_requests), kThreads, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace diffuse
