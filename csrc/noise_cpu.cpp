// C++ CPU twin of the counter-noise kernel (noise.cu): the same hash chain from noise.cuh, so uniforms are
// bit-identical to kernels/reference.py's counter_uniform; Gumbel noise uses the C library's logf (within an ulp
// or so of torch's log).
#include <cstdint>
#include <vector>

#include "noise.cuh"

namespace diffuse {

namespace {

template <bool kGumbel>
void fill_rows(float* out, const std::int64_t* seed, const std::int64_t* step, const std::int64_t* position,
               std::int64_t rows, std::int64_t cols, std::uint32_t stream_id) {
  // Column hashes are row-independent: compute them once, then each element costs one hash.
  std::vector<std::uint32_t> col_hash(static_cast<std::size_t>(cols));
  for (std::int64_t c = 0; c < cols; ++c) col_hash[c] = noise::column_hash(static_cast<std::uint32_t>(c));
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint32_t key = noise::row_key(seed[r], step[r], position[r], stream_id);
    float* dst = out + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) dst[c] = noise::noise_value<kGumbel>(key, col_hash[c]);
  }
}

}  // namespace

void counter_noise_cpu(float* out, const std::int64_t* seed, const std::int64_t* step, const std::int64_t* position,
                       std::int64_t rows, std::int64_t cols, std::uint32_t stream_id, bool gumbel) {
  if (rows <= 0 || cols <= 0) return;
  if (gumbel) {
    fill_rows<true>(out, seed, step, position, rows, cols, stream_id);
  } else {
    fill_rows<false>(out, seed, step, position, rows, cols, stream_id);
  }
}

}  // namespace diffuse
