// Counter-based noise: the lowbias32 hash chain of kernels/reference.py (module docstring), shared by the CUDA
// kernel (noise.cu) and its C++ CPU twin (noise_cpu.cpp). No torch, no CUDA runtime headers: every function
// here is plain integer/float arithmetic that compiles for host and device alike.
//
// Every value is a pure function of (seed, step, position, stream, column):
//   h = H(seed_lo); h = H(h ^ seed_hi); h = H(h ^ step); h = H(h ^ position); h = H(h ^ stream)
//   bits(column) = H(h ^ H(column ^ 0xA511E9B3))
//   u = ((bits >> 9) + 0.5) * 2**-23            in (0, 1), exact in fp32
//   gumbel = -log(-log(u))                       fp32
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DIFFUSE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DIFFUSE_HOST_DEVICE inline
#endif

namespace diffuse {
namespace noise {

constexpr std::uint32_t kColumnSalt = 0xA511E9B3u;

// lowbias32 (a 32-bit integer finaliser); unsigned arithmetic wraps mod 2**32 as the reference requires.
DIFFUSE_HOST_DEVICE std::uint32_t lowbias32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Per-row hash state. `seed` holds a uint64 as an int64 bit pattern; `step` and `position` contribute their low
// 32 bits (the reference masks them with 0xFFFFFFFF); `stream` is already a 32-bit word.
DIFFUSE_HOST_DEVICE std::uint32_t row_key(std::int64_t seed, std::int64_t step, std::int64_t position,
                                          std::uint32_t stream) {
  const std::uint64_t s = static_cast<std::uint64_t>(seed);
  std::uint32_t h = lowbias32(static_cast<std::uint32_t>(s));
  h = lowbias32(h ^ static_cast<std::uint32_t>(s >> 32));
  h = lowbias32(h ^ static_cast<std::uint32_t>(static_cast<std::uint64_t>(step)));
  h = lowbias32(h ^ static_cast<std::uint32_t>(static_cast<std::uint64_t>(position)));
  return lowbias32(h ^ stream);
}

// Row-independent half of a column's hash: computed once per column and reused for every row.
DIFFUSE_HOST_DEVICE std::uint32_t column_hash(std::uint32_t column) { return lowbias32(column ^ kColumnSalt); }

DIFFUSE_HOST_DEVICE float bits_as_float(std::uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// ((bits >> 9) + 0.5) * 2**-23 without an int-to-float conversion (a quarter-rate instruction on the GPU):
// x = 1 + m * 2**-23 (m = bits >> 9 as the mantissa of a float in [1, 2)), then x - (1 - 2**-24). Both operands lie
// within a factor of 2 of each other (Sterbenz), so the subtraction is exact: (m + 0.5) * 2**-23, bit-identical to
// the reference's int -> fp32 conversion, with no rounding-mode or FMA-contraction dependence.
DIFFUSE_HOST_DEVICE float bits_to_uniform(std::uint32_t bits) {
  return bits_as_float(0x3F800000u | (bits >> 9)) - 0x1.fffffep-1f;
}

// u <= 1 - 2**-24, so -log(u) >= 5.96e-8 > 0 and neither log reaches 0 or infinity.
DIFFUSE_HOST_DEVICE float uniform_to_gumbel(float u) { return -logf(-logf(u)); }

template <bool kGumbel>
DIFFUSE_HOST_DEVICE float noise_value(std::uint32_t key, std::uint32_t col_hash) {
  const float u = bits_to_uniform(lowbias32(key ^ col_hash));
  return kGumbel ? uniform_to_gumbel(u) : u;
}

}  // namespace noise

// Entry points (defined in noise_cpu.cpp and noise.cu, bound in bindings.cpp). Pointers: out [rows, cols] fp32
// row-major contiguous; seed, step, position [rows] int64. Columns are numbered 0..cols-1 (cols < 2**31).

// CPU twin; blocking.
void counter_noise_cpu(float* out, const std::int64_t* seed, const std::int64_t* step, const std::int64_t* position,
                       std::int64_t rows, std::int64_t cols, std::uint32_t stream_id, bool gumbel);

// One asynchronous launch on `cuda_stream` (a cudaStream_t as an integer; 0 = legacy default stream) on the current
// device. Returns the cudaError_t of the launch as an int (0 = success).
int counter_noise_cuda(float* out, const std::int64_t* seed, const std::int64_t* step, const std::int64_t* position,
                       std::int64_t rows, std::int64_t cols, std::uint32_t stream_id, bool gumbel,
                       std::uintptr_t cuda_stream);

}  // namespace diffuse
