// Row stats on the GPU: one pass over the vocabulary per selected row -> sampled token, prob, top1, margin, exact
// negative entropy, invalid flag (semantics: kernels/reference.py row_stats_reference; per-element update and merge
// in row_stats.cuh, shared with the C++ twin).
//
// The op reads num_rows * vocab elements once and writes 28 bytes per row (M = 1024, V = 126464, bf16: 259 MB, the
// floor). One block of kThreads threads per selected row: every thread strides over the row in 16-byte vector loads
// (8 bf16/fp16 or 4 fp32 values; two loads in flight per iteration), keeping a partial RowState; a scalar head brings
// the vector part to a 16-byte boundary (any vocab, any row offset) and a scalar tail finishes it. The states are
// then merged within each warp by shuffles and across the warps through shared memory.
//
// Sampling rows (T > 0) need two logs and a hash per column for the Gumbel noise, more arithmetic than the load
// costs. A column whose z + 17 (an upper bound of the noise) is below a perturbed score already achieved in the row
// cannot win, so its noise is skipped: threads publish their best score to a shared-memory maximum (an atomicMax on
// an order-preserving integer encoding) and read it once per vector. The bound is only ever an achieved score, so
// a stale read weakens the pruning but never changes the winner: the token is the same for any timing.
#include <cuda_runtime.h>

#include <cstdint>

#include "row_stats.cuh"

namespace diffuse {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Logits element readers: scalar loads and the unpacking of one 16-byte vector into fp32 values.
template <int kDtype>
struct Elem;

template <>
struct Elem<kRowStatsF32> {
  using T = float;
  static constexpr int kPerVec = kVecBytes / sizeof(T);
  __device__ static float scalar(const T* x, int col) { return __ldg(x + col); }
  __device__ static void unpack(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
};

template <>
struct Elem<kRowStatsBF16> {
  using T = std::uint16_t;
  static constexpr int kPerVec = kVecBytes / sizeof(T);
  __device__ static float scalar(const T* x, int col) {
    return row_stats::bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(x) + col));
  }
  // Little endian: the lower-addressed element is the low half of each 32-bit word.
  __device__ static void unpack(const uint4& v, float* f) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = __uint_as_float(w[k] << 16);
      f[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
    }
  }
};

template <>
struct Elem<kRowStatsF16> {
  using T = std::uint16_t;
  static constexpr int kPerVec = kVecBytes / sizeof(T);
  __device__ static float scalar(const T* x, int col) {
    return row_stats::fp16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(x) + col));
  }
  __device__ static void unpack(const uint4& v, float* f) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = row_stats::fp16_bits_to_float(static_cast<std::uint16_t>(w[k] & 0xFFFFu));
      f[2 * k + 1] = row_stats::fp16_bits_to_float(static_cast<std::uint16_t>(w[k] >> 16));
    }
  }
};

// Order-preserving float <-> int encoding (for atomicMax): non-negative floats keep their bits, negative floats get
// their magnitude bits flipped. Not used for NaN.
__device__ __forceinline__ int order_key(float f) {
  const int b = __float_as_int(f);
  return b >= 0 ? b : b ^ 0x7FFFFFFF;
}

__device__ __forceinline__ float from_order_key(int k) { return __int_as_float(k >= 0 ? k : k ^ 0x7FFFFFFF); }

__device__ __forceinline__ row_stats::RowState shuffle_down(const row_stats::RowState& st, int offset) {
  row_stats::RowState o;
  o.m = __shfl_down_sync(kFullMask, st.m, offset);
  o.t2 = __shfl_down_sync(kFullMask, st.t2, offset);
  o.s = __shfl_down_sync(kFullMask, st.s, offset);
  o.w = __shfl_down_sync(kFullMask, st.w, offset);
  o.best = __shfl_down_sync(kFullMask, st.best, offset);
  o.best_col = __shfl_down_sync(kFullMask, st.best_col, offset);
  o.best_c = __shfl_down_sync(kFullMask, st.best_c, offset);
  o.bad = __shfl_down_sync(kFullMask, st.bad, offset);
  return o;
}

// Lane 0 ends with the merge of the warp's 32 states (a fixed tree: deterministic).
__device__ __forceinline__ void warp_merge(row_stats::RowState& st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const row_stats::RowState o = shuffle_down(st, offset);
    row_stats::merge(st, o);
  }
}

__device__ __forceinline__ void write_result(const RowStatsArgs& a, std::int64_t i, const row_stats::RowResult& r) {
  a.token[i] = r.token;
  a.prob[i] = r.prob;
  a.top1[i] = r.top1;
  a.margin[i] = r.margin;
  a.neg_entropy[i] = r.neg_entropy;
  a.invalid[i] = r.invalid;
}

// Grid: one block per selected row (blockIdx.x = i < num_rows). Arguments: see RowStatsArgs in row_stats.cuh.
template <int kDtype>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const RowStatsArgs a) {
  using E = Elem<kDtype>;
  using T = typename E::T;
  constexpr int kPerVec = E::kPerVec;
  __shared__ row_stats::RowState warp_states[kWarps];
  __shared__ int shared_bound;  // order_key of the best perturbed score published by any thread

  const std::int64_t i = blockIdx.x;
  const int tid = threadIdx.x;
  const std::int64_t r = a.rows[i];
  if (r < 0 || r >= a.logit_rows) {  // the same for every thread of the block
    if (tid == 0) write_result(a, i, row_stats::invalid_result());
    return;
  }
  const row_stats::RowParams p = row_stats::make_params(i, a.temperature, a.seed, a.step, a.position,
                                                        a.raw_confidence, a.conf_exclude, a.exclude_k, a.vocab);
  const float neg_inf = -row_stats::inf();
  if (tid == 0) shared_bound = order_key(neg_inf);
  __syncthreads();

  const T* x = static_cast<const T*>(a.logits) + r * a.row_stride;
  const int vocab = static_cast<int>(a.vocab);
  row_stats::RowState st = row_stats::empty_state();

  // Scalar head up to the first 16-byte boundary (rows start anywhere when vocab * sizeof(T) % 16 != 0).
  const int misalign = static_cast<int>(reinterpret_cast<std::uintptr_t>(x) % kVecBytes) / static_cast<int>(sizeof(T));
  const int head = misalign == 0 ? 0 : (kPerVec - misalign < vocab ? kPerVec - misalign : vocab);
  if (tid < head) row_stats::accumulate(st, p, tid, E::scalar(x, tid), neg_inf);

  const int num_vec = (vocab - head) / kPerVec;
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  int published = order_key(neg_inf);
  auto process = [&](const uint4& v, int col0) {
    float f[kPerVec];
    E::unpack(v, f);
    const float bound = p.hot ? from_order_key(*static_cast<volatile int*>(&shared_bound)) : neg_inf;
#pragma unroll
    for (int j = 0; j < kPerVec; ++j) row_stats::accumulate(st, p, col0 + j, f[j], bound);
    if (p.hot && st.best == st.best) {
      const int k = order_key(st.best);
      if (k > published) {
        atomicMax(&shared_bound, k);
        published = k;
      }
    }
  };
  for (int v0 = tid; v0 < num_vec; v0 += 2 * kThreads) {
    const int v1 = v0 + kThreads;
    const uint4 w0 = __ldg(xv + v0);
    const uint4 w1 = v1 < num_vec ? __ldg(xv + v1) : make_uint4(0u, 0u, 0u, 0u);
    process(w0, head + v0 * kPerVec);
    if (v1 < num_vec) process(w1, head + v1 * kPerVec);
  }
  for (std::int64_t c = head + static_cast<std::int64_t>(num_vec) * kPerVec + tid; c < vocab; c += kThreads) {
    row_stats::accumulate(st, p, static_cast<int>(c), E::scalar(x, static_cast<int>(c)), neg_inf);
  }

  const int lane = tid % 32;
  const int warp = tid / 32;
  warp_merge(st);
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_states[lane] : row_stats::empty_state();
    warp_merge(st);
    if (lane == 0) write_result(a, i, row_stats::finalize(st));
  }
}

}  // namespace

int row_stats_cuda(const RowStatsArgs& args, std::uintptr_t cuda_stream) {
  if (args.num_rows <= 0) return static_cast<int>(cudaSuccess);
  if (args.vocab <= 0 || args.vocab >= (std::int64_t{1} << 31) || args.num_rows >= (std::int64_t{1} << 31) ||
      args.row_stride < args.vocab || args.exclude_k < 0 || args.exclude_k > kRowStatsMaxExclude) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(cuda_stream);
  const dim3 grid(static_cast<unsigned>(args.num_rows));
  switch (args.dtype) {
    case kRowStatsF32:
      row_stats_kernel<kRowStatsF32><<<grid, kThreads, 0, stream>>>(args);
      break;
    case kRowStatsF16:
      row_stats_kernel<kRowStatsF16><<<grid, kThreads, 0, stream>>>(args);
      break;
    case kRowStatsBF16:
      row_stats_kernel<kRowStatsBF16><<<grid, kThreads, 0, stream>>>(args);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace diffuse
