// C++ CPU twin of the commit kernel (commit.cu): requests one after another; per request the revision, a stable
// sort of the rows by score descending (ties by row order, commit::ranks_before), k from the functions of
// commit.cuh, then the writes of the k best rows.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "commit.cuh"

namespace diffuse {

void commit_cpu(const CommitArgs& a) {
  std::vector<int> order;
  for (std::int64_t b = 0; b < a.num_requests; ++b) {
    std::int32_t remasked = 0;
    if (a.revise_offsets != nullptr) {
      std::int64_t rlo = 0, rhi = 0;
      commit::request_range(a.revise_offsets, b, a.num_revise, rlo, rhi);
      const float bound = a.remask_bound[b];
      for (std::int64_t j = rlo; j < rhi; ++j) {
        if (a.revise_score[j] < bound) {
          const std::int64_t idx = a.revise_index[j];
          if (idx >= 0 && idx < a.canvas_len) a.canvas[idx] = a.mask_id;
          ++remasked;
        }
      }
    }
    std::int64_t lo = 0, hi = 0;
    commit::request_range(a.row_offsets, b, a.num_rows, lo, hi);
    std::int32_t* ctr = a.counters + 3 * b;
    if (hi - lo > kCommitMaxRows) {  // the kernel's limit, kept here so that both backends agree
      ctr[0] = -1;
      ctr[1] = remasked;
      ctr[2] = -1;
      continue;
    }
    const int n = static_cast<int>(hi - lo);
    const float* s = a.score + lo;
    order.resize(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [s](int i, int j) { return commit::ranks_before(s[i], i, s[j], j); });
    int k = 0;
    if (n > 0) {
      switch (a.mode[b]) {
        case kCommitTopK:
          k = commit::topk_k(a.count[b], n);
          break;
        case kCommitThreshold: {
          const float t = a.threshold[b];
          int num_ge = 0;
          for (int i = 0; i < n; ++i) num_ge += s[i] >= t ? 1 : 0;
          k = commit::threshold_k(num_ge, n);
          break;
        }
        case kCommitFactor: {
          const int first = commit::factor_first(n, a.factor[b], [&](int r) { return s[order[r]]; });
          k = commit::factor_k(first, n);
          break;
        }
        case kCommitEntropy: {
          const float* h = a.entropy + lo;
          k = commit::entropy_k(n, a.eb_gamma[b], [&](int r) { return h[order[r]]; });
          break;
        }
        default:
          k = 0;
          break;
      }
    }
    for (int i = 0; i < n; ++i) a.committed[lo + i] = 0;
    for (int r = 0; r < k; ++r) {
      const std::int64_t row = lo + order[r];
      const std::int64_t idx = a.row_index[row];
      if (idx >= 0 && idx < a.canvas_len) a.canvas[idx] = a.token[row];
      a.committed[row] = 1;
    }
    ctr[0] = k;
    ctr[1] = remasked;
    ctr[2] = n - k + remasked;
  }
}

}  // namespace diffuse
