// C++ CPU twin of the row-stats kernel (row_stats.cu): the per-element update, merge and scores of row_stats.cuh,
// one row after another. A row is cut into tiles of `tile_cols` columns whose partial states are merged, as the
// kernel merges its threads' states: the summation error of s and w then grows with tile_cols + vocab / tile_cols
// rather than with vocab, and the merge path is the one the kernel relies on.
#include <cstdint>

#include "row_stats.cuh"

namespace diffuse {

namespace {

template <typename T>
float load(const T* x, std::int64_t col);

template <>
float load<float>(const float* x, std::int64_t col) {
  return x[col];
}

template <>
float load<std::uint16_t>(const std::uint16_t* x, std::int64_t col) {
  return row_stats::bf16_bits_to_float(x[col]);
}

// fp16 rows are read as raw 16-bit words too; a tag type tells the two 16-bit formats apart.
struct Fp16Word {
  std::uint16_t bits;
};

template <>
float load<Fp16Word>(const Fp16Word* x, std::int64_t col) {
  return row_stats::fp16_bits_to_float(x[col].bits);
}

template <typename T>
void run_rows(const RowStatsArgs& a, std::int64_t tile_cols) {
  const T* logits = static_cast<const T*>(a.logits);
  const int vocab = static_cast<int>(a.vocab);
  const int tile = static_cast<int>(tile_cols < a.vocab ? tile_cols : a.vocab);
  for (std::int64_t i = 0; i < a.num_rows; ++i) {
    const std::int64_t r = a.rows[i];
    row_stats::RowResult res;
    if (r < 0 || r >= a.logit_rows) {
      res = row_stats::invalid_result();
    } else {
      const T* x = logits + r * a.row_stride;
      const row_stats::RowParams p = row_stats::make_params(i, a.temperature, a.seed, a.step, a.position,
                                                            a.raw_confidence, a.conf_exclude, a.exclude_k, a.vocab);
      row_stats::RowState acc = row_stats::empty_state();
      for (int c0 = 0; c0 < vocab; c0 += tile) {
        const int c1 = vocab - c0 > tile ? c0 + tile : vocab;
        row_stats::RowState st = row_stats::empty_state();
        for (int c = c0; c < c1; ++c) row_stats::accumulate(st, p, c, load<T>(x, c), acc.best);
        row_stats::merge(acc, st);
      }
      res = row_stats::finalize(acc);
    }
    a.token[i] = res.token;
    a.prob[i] = res.prob;
    a.top1[i] = res.top1;
    a.margin[i] = res.margin;
    a.neg_entropy[i] = res.neg_entropy;
    a.invalid[i] = res.invalid;
  }
}

}  // namespace

void row_stats_cpu(const RowStatsArgs& args, std::int64_t tile_cols) {
  if (args.num_rows <= 0 || args.vocab <= 0) return;
  if (tile_cols < 1) tile_cols = 1;
  switch (args.dtype) {
    case kRowStatsF32:
      run_rows<float>(args, tile_cols);
      break;
    case kRowStatsF16:
      run_rows<Fp16Word>(args, tile_cols);
      break;
    case kRowStatsBF16:
      run_rows<std::uint16_t>(args, tile_cols);
      break;
    default:
      break;
  }
}

}  // namespace diffuse
