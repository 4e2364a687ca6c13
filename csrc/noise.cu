// Counter-based noise on the GPU: out[r, c] = uniform or Gumbel noise of (seed[r], step[r], position[r], stream, c),
// bit-identical uniforms to kernels/reference.py counter_uniform (hash chain in noise.cuh).
//
// The op is a pure write of rows * cols * 4 bytes (M = 1024, V = 126464: 518 MB), so the kernel is shaped for store
// bandwidth: one launch over a 2-D grid (x: tiles of kTileCols columns, y: groups of kRowsPerBlock rows), each warp
// storing contiguous 512-byte runs (float4 per thread when cols % 4 == 0 and out is 16-byte aligned). Per element it
// costs one lowbias32 hash: the column half of the hash is computed once per thread and reused for every row of the
// block, and the row keys (five hashes each) are computed once per block into shared memory.
#include <cuda_runtime.h>

#include <cstdint>

#include "noise.cuh"

namespace diffuse {

namespace {

constexpr int kThreads = 256;
constexpr int kColsPerThread = 4;
constexpr int kTileCols = kThreads * kColsPerThread;  // 1024 columns per block
constexpr int kRowsPerBlock = 4;
constexpr unsigned kMaxGridY = 65535;

// Arguments:
//   out       [rows, cols] fp32, row-major contiguous (16-byte aligned when kVec)
//   seed      [rows] int64 (uint64 bit patterns); step, position [rows] int64 (low 32 bits used)
//   rows, cols sizes (cols < 2**31)
//   stream_id the noise stream word (STREAM_* of kernels/reference.py)
// kGumbel: write -log(-log(u)) instead of u. kVec: cols % 4 == 0 and out aligned, so each thread stores one float4
// of 4 adjacent columns; otherwise thread t stores columns t, t + 256, t + 512, t + 768 of the tile (scalar stores,
// still coalesced per warp).
template <bool kGumbel, bool kVec>
__global__ void __launch_bounds__(kThreads)
    counter_noise_kernel(float* __restrict__ out, const std::int64_t* __restrict__ seed,
                         const std::int64_t* __restrict__ step, const std::int64_t* __restrict__ position,
                         std::int64_t rows, std::int64_t cols, std::uint32_t stream_id) {
  __shared__ std::uint32_t keys[kRowsPerBlock];

  const std::int64_t tile = static_cast<std::int64_t>(blockIdx.x) * kTileCols;
  std::int64_t col[kColsPerThread];
  std::uint32_t col_hash[kColsPerThread];
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) {
    col[j] = kVec ? tile + threadIdx.x * kColsPerThread + j : tile + j * kThreads + threadIdx.x;
    col_hash[j] = noise::column_hash(static_cast<std::uint32_t>(col[j]));
  }

  for (std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * kRowsPerBlock; row0 < rows;
       row0 += static_cast<std::int64_t>(gridDim.y) * kRowsPerBlock) {
    if (threadIdx.x < kRowsPerBlock && row0 + threadIdx.x < rows) {
      const std::int64_t r = row0 + threadIdx.x;
      keys[threadIdx.x] = noise::row_key(seed[r], step[r], position[r], stream_id);
    }
    __syncthreads();
    const std::int64_t rows_here = rows - row0 < kRowsPerBlock ? rows - row0 : kRowsPerBlock;
#pragma unroll
    for (int i = 0; i < kRowsPerBlock; ++i) {
      if (i < rows_here) {
        const std::uint32_t key = keys[i];
        float* dst = out + (row0 + i) * cols;
        float v[kColsPerThread];
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) v[j] = noise::noise_value<kGumbel>(key, col_hash[j]);
        if (kVec) {
          // cols % 4 == 0, so the 4 columns are either all inside the row or all past its end.
          if (col[0] < cols) *reinterpret_cast<float4*>(dst + col[0]) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) {
            if (col[j] < cols) dst[col[j]] = v[j];
          }
        }
      }
    }
    __syncthreads();  // keys are rewritten by the next row group
  }
}

template <bool kGumbel>
cudaError_t launch(float* out, const std::int64_t* seed, const std::int64_t* step, const std::int64_t* position,
                   std::int64_t rows, std::int64_t cols, std::uint32_t stream_id, cudaStream_t stream) {
  const std::int64_t tiles = (cols + kTileCols - 1) / kTileCols;
  const std::int64_t groups = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(groups < kMaxGridY ? groups : kMaxGridY));
  const bool vec = cols % kColsPerThread == 0 && reinterpret_cast<std::uintptr_t>(out) % sizeof(float4) == 0;
  if (vec) {
    counter_noise_kernel<kGumbel, true><<<grid, kThreads, 0, stream>>>(out, seed, step, position, rows, cols,
                                                                       stream_id);
  } else {
    counter_noise_kernel<kGumbel, false><<<grid, kThreads, 0, stream>>>(out, seed, step, position, rows, cols,
                                                                        stream_id);
  }
  return cudaGetLastError();
}

}  // namespace

int counter_noise_cuda(float* out, const std::int64_t* seed, const std::int64_t* step, const std::int64_t* position,
                       std::int64_t rows, std::int64_t cols, std::uint32_t stream_id, bool gumbel,
                       std::uintptr_t cuda_stream) {
  if (rows <= 0 || cols <= 0) return static_cast<int>(cudaSuccess);
  if (cols >= (std::int64_t{1} << 31)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(cuda_stream);
  const cudaError_t err = gumbel ? launch<true>(out, seed, step, position, rows, cols, stream_id, stream)
                                 : launch<false>(out, seed, step, position, rows, cols, stream_id, stream);
  return static_cast<int>(err);
}

}  // namespace diffuse
