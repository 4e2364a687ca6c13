// Row stats: logits row -> sampled token + confidence statistics in one pass over the vocabulary, the semantics of
// kernels/reference.py row_stats_reference. Shared by the CUDA kernel (row_stats.cu) and its C++ CPU twin
// (row_stats_cpu.cpp): the per-element update, the merge of two partial states and the final scores live here as
// host/device functions, so both backends compute the same thing. No torch, no CUDA runtime headers.
//
// Per selected row, with x = logits[rows[i]] in fp32 and T = temperature[i]:
//   z = x / T when T > 0, else x                          (IEEE division, as the reference)
//   token = argmax(z + G) when T > 0, else argmax(z)     G[col] = Gumbel noise of noise.cuh, stream STREAM_SAMPLE
//   c = x with the conf_exclude columns at -inf when raw_confidence[i], else z;   q = softmax(c)
//   prob = q[token], top1 = max q, margin = q1 - q2, neg_entropy = sum q log q (0 log 0 = 0)
// A row whose c holds NaN or +inf, or no finite entry, is invalid: token -1 and NaN scores.
//
// Partial state of a set of columns (merged exactly, in any grouping):
//   m  = max c over the finite entries (-inf when none); t2 = the second largest c (as a multiset; -inf when none)
//   s  = sum e^(c - m),  w = sum e^(c - m) (c - m)         (s = 0 exactly when no finite c was seen)
//   best, best_col, best_c = the winning perturbed score, its column and c at that column
// so that top1 = 1/s, prob = e^(best_c - m)/s, margin = (1 - e^(t2 - m))/s, neg_entropy = w/s - log s.
//
// The argmax follows torch.argmax: NaN beats every number (the first NaN wins), equal values go to the smallest
// column. It is a total order on (value, column), so the winner does not depend on how columns are grouped.
#pragma once

#include <cmath>
#include <cstdint>

#include "noise.cuh"

namespace diffuse {

// Logits element types (the dtype code passed through the bindings).
enum RowStatsDtype : int { kRowStatsF32 = 0, kRowStatsF16 = 1, kRowStatsBF16 = 2 };

constexpr int kRowStatsMaxExclude = 4;  // conf_exclude columns per row

namespace row_stats {

constexpr std::uint32_t kStreamSample = 1;           // STREAM_SAMPLE of kernels/reference.py
constexpr int kNoColumn = 0x7FFFFFFF;                // best_col of a state that has seen no column
// Upper bound of the Gumbel noise: u <= 1 - 2**-24 gives G <= -log(-log(1 - 2**-24)) = 16.6355 (fp32, within an ulp
// of the exact value), so fl(z + G) <= fl(z + 17) for every column. A column with fl(z + 17) < an achieved perturbed
// score can neither win nor tie, and its noise need not be computed (exact pruning; see accumulate()).
constexpr float kGumbelBound = 17.0f;

DIFFUSE_HOST_DEVICE float inf() { return noise::bits_as_float(0x7F800000u); }
DIFFUSE_HOST_DEVICE float nan() { return noise::bits_as_float(0x7FC00000u); }

// fp16 / bf16 bit patterns -> fp32 (exact). On the device fp16 uses the hardware conversion.
DIFFUSE_HOST_DEVICE float bf16_bits_to_float(std::uint16_t b) {
  return noise::bits_as_float(static_cast<std::uint32_t>(b) << 16);
}

DIFFUSE_HOST_DEVICE float fp16_bits_to_float(std::uint16_t h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  const std::uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return noise::bits_as_float(sign | 0x7F800000u | (mant << 13));  // inf, NaN (payload kept)
  if (exp == 0) {  // zero or subnormal: mant * 2**-24, exact in fp32
    const float mag = static_cast<float>(mant) * 0x1p-24f;
    return sign ? -mag : mag;
  }
  return noise::bits_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

// Per-row constants.
struct RowParams {
  float temperature;
  bool hot;   // temperature > 0 (false for NaN, as the reference's `temperature > 0`)
  bool raw;   // raw_confidence: c = x with the excluded columns at -inf
  int exclude[kRowStatsMaxExclude];  // excluded columns; -1 = unused (never equal to a column)
  std::uint32_t key;                 // noise::row_key of (seed, step, position, STREAM_SAMPLE)
};

// conf_exclude entries < 0 or >= vocab are unused (a column outside the row cannot be excluded).
DIFFUSE_HOST_DEVICE RowParams make_params(std::int64_t i, const float* temperature, const std::int64_t* seed,
                                          const std::int64_t* step, const std::int64_t* position,
                                          const std::uint8_t* raw_confidence, const std::int64_t* conf_exclude,
                                          std::int64_t exclude_k, std::int64_t vocab) {
  RowParams p;
  p.temperature = temperature[i];
  p.hot = p.temperature > 0.0f;
  p.raw = raw_confidence != nullptr && raw_confidence[i] != 0;
  for (int k = 0; k < kRowStatsMaxExclude; ++k) {
    const std::int64_t e = (p.raw && k < exclude_k) ? conf_exclude[i * exclude_k + k] : -1;
    p.exclude[k] = (e >= 0 && e < vocab) ? static_cast<int>(e) : -1;
  }
  p.key = p.hot ? noise::row_key(seed[i], step[i], position[i], kStreamSample) : 0u;
  return p;
}

struct RowState {
  float m;
  float t2;
  float s;
  float w;
  float best;
  int best_col;
  float best_c;
  int bad;  // a NaN or +inf was seen in c
};

DIFFUSE_HOST_DEVICE RowState empty_state() {
  RowState st;
  st.m = -inf();
  st.t2 = -inf();
  st.s = 0.0f;
  st.w = 0.0f;
  st.best = -inf();
  st.best_col = kNoColumn;
  st.best_c = -inf();
  st.bad = 0;
  return st;
}

// Does (v, col) beat (bv, bcol) in torch.argmax's order?
DIFFUSE_HOST_DEVICE bool beats(float v, int col, float bv, int bcol) {
  const bool vn = v != v;
  const bool bn = bv != bv;
  if (vn || bn) return vn && (!bn || col < bcol);
  return v > bv || (v == bv && col < bcol);
}

// The larger of two pruning bounds; a NaN operand only weakens the bound (a comparison with NaN never prunes).
DIFFUSE_HOST_DEVICE float max_bound(float a, float b) { return b > a ? b : a; }

// One finite-or-not confidence logit c into (m, t2, s, w). The state is rescaled when the maximum grows, so each
// element costs one exp.
DIFFUSE_HOST_DEVICE void add_confidence(RowState& st, float c) {
  if (c != c || c == inf()) {
    st.bad = 1;
    return;
  }
  if (c > st.m) {
    if (st.s > 0.0f) {
      const float d = st.m - c;  // < 0
      const float a = expf(d);
      st.w = a * (st.w + d * st.s);
      st.s = st.s * a + 1.0f;
    } else {
      st.w = 0.0f;
      st.s = 1.0f;
    }
    st.t2 = st.m;
    st.m = c;
  } else if (c > -inf()) {
    const float d = c - st.m;  // <= 0
    const float e = expf(d);
    st.s += e;
    st.w += e * d;
    if (c > st.t2) st.t2 = c;
  }
}

DIFFUSE_HOST_DEVICE void consider(RowState& st, float v, int col, float c) {
  if (beats(v, col, st.best, st.best_col)) {
    st.best = v;
    st.best_col = col;
    st.best_c = c;
  }
}

// Column `col` with logit x (fp32). `bound` is any perturbed score already achieved in this row (or -inf): columns
// that cannot reach it skip the noise (see kGumbelBound); the statistics of c see every column.
DIFFUSE_HOST_DEVICE void accumulate(RowState& st, const RowParams& p, int col, float x, float bound) {
  const float z = p.hot ? x / p.temperature : x;
  float c = z;
  if (p.raw) {
    bool excluded = false;
    for (int k = 0; k < kRowStatsMaxExclude; ++k) excluded |= col == p.exclude[k];
    c = excluded ? -inf() : x;
  }
  add_confidence(st, c);
  if (p.hot) {
    if (z + kGumbelBound < max_bound(bound, st.best)) return;
    const float g = noise::noise_value<true>(p.key, noise::column_hash(static_cast<std::uint32_t>(col)));
    consider(st, z + g, col, c);
  } else {
    consider(st, z, col, c);
  }
}

// a <- a merged with b (b's columns disjoint from a's). Exact up to fp32 rounding of s and w; the winner is exact.
DIFFUSE_HOST_DEVICE void merge(RowState& a, const RowState& b) {
  if (b.s > 0.0f) {
    if (a.s > 0.0f) {
      const float m = a.m > b.m ? a.m : b.m;
      const float da = a.m - m;
      const float db = b.m - m;
      const float ea = expf(da);
      const float eb = expf(db);
      a.w = ea * (a.w + da * a.s) + eb * (b.w + db * b.s);
      a.s = ea * a.s + eb * b.s;
      const float lo = a.m < b.m ? a.m : b.m;
      const float t2 = a.t2 > b.t2 ? a.t2 : b.t2;
      a.t2 = lo > t2 ? lo : t2;
      a.m = m;
    } else {
      a.m = b.m;
      a.t2 = b.t2;
      a.s = b.s;
      a.w = b.w;
    }
  }
  a.bad |= b.bad;
  consider(a, b.best, b.best_col, b.best_c);
}

struct RowResult {
  std::int64_t token;
  float prob;
  float top1;
  float margin;
  float neg_entropy;
  std::int32_t invalid;
};

DIFFUSE_HOST_DEVICE RowResult invalid_result() {
  RowResult r;
  r.token = -1;
  r.prob = r.top1 = r.margin = r.neg_entropy = nan();
  r.invalid = 1;
  return r;
}

DIFFUSE_HOST_DEVICE RowResult finalize(const RowState& st) {
  if (st.bad || !(st.s > 0.0f) || st.best_col == kNoColumn) return invalid_result();
  RowResult r;
  r.token = st.best_col;
  r.top1 = 1.0f / st.s;
  r.prob = expf(st.best_c - st.m) / st.s;
  r.margin = r.top1 - expf(st.t2 - st.m) / st.s;
  r.neg_entropy = st.w / st.s - logf(st.s);
  r.invalid = 0;
  return r;
}

}  // namespace row_stats

// Arguments of both entry points (all pointers on the same device; sizes in elements):
//   logits          [logit_rows, row_stride] of dtype (RowStatsDtype), the first `vocab` entries of a row used
//   rows            [num_rows] int64 indices into the logits rows; an index outside [0, logit_rows) gives an
//                   invalid row (a guard: callers must pass indices in range)
//   temperature     [num_rows] fp32; seed, step, position [num_rows] int64 (noise key)
//   raw_confidence  [num_rows] uint8 (nonzero = true) or null (all false)
//   conf_exclude    [num_rows, exclude_k] int64 (entries < 0 unused) or null; exclude_k <= kRowStatsMaxExclude
//   token [num_rows] int64; prob, top1, margin, neg_entropy [num_rows] fp32; invalid [num_rows] int32 (outputs)
// vocab in [1, 2**31 - 1]; row_stride >= vocab.
struct RowStatsArgs {
  const void* logits;
  int dtype;
  std::int64_t logit_rows;
  std::int64_t row_stride;
  std::int64_t vocab;
  const std::int64_t* rows;
  std::int64_t num_rows;
  const float* temperature;
  const std::int64_t* seed;
  const std::int64_t* step;
  const std::int64_t* position;
  const std::uint8_t* raw_confidence;
  const std::int64_t* conf_exclude;
  std::int64_t exclude_k;
  std::int64_t* token;
  float* prob;
  float* top1;
  float* margin;
  float* neg_entropy;
  std::int32_t* invalid;
};

// CPU twin; blocking. Each row is processed in tiles of `tile_cols` columns (partial states merged with merge()),
// which bounds the fp32 summation error of s and w; the token does not depend on tile_cols.
void row_stats_cpu(const RowStatsArgs& args, std::int64_t tile_cols);

// One asynchronous launch on `cuda_stream` (a cudaStream_t as an integer; 0 = legacy default stream) of the current
// device. Returns the cudaError_t of the launch as an int (0 = success).
int row_stats_cuda(const RowStatsArgs& args, std::uintptr_t cuda_stream);

}  // namespace diffuse
