// The native module diffuse_engine._C: every CUDA kernel launcher and C++ CPU twin of csrc/, bound with pybind11.
// No torch headers: functions take raw data pointers (Python ints from tensor.data_ptr()), sizes, and for CUDA the
// stream as an integer (torch.cuda.current_stream().cuda_stream). The Python launchers in diffuse_engine/native.py
// validate the tensors; the checks here only guard against calls that would crash the process.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "commit.cuh"
#include "noise.cuh"
#include "row_stats.cuh"

namespace py = pybind11;

namespace {

// 0 when there is no driver or no device (cudaGetDeviceCount then returns an error, which is cleared).
int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

void require_device(const char* op) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    const std::string why = err != cudaSuccess ? cudaGetErrorString(err) : "no device found";
    throw std::runtime_error(std::string(op) + ": no CUDA device/driver is available (cudaGetDeviceCount: " + why +
                             ").");
  }
}

void check_cuda(const char* op, int status) {
  const auto err = static_cast<cudaError_t>(status);
  if (err == cudaSuccess) return;
  std::string msg = std::string(op) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    msg += " (the module was compiled for other GPU architectures: rebuild with DIFFUSE_CUDA_ARCHS set for this GPU)";
  }
  throw std::runtime_error(msg + ".");
}

void check_noise_args(const char* op, std::uintptr_t out, std::uintptr_t seed, std::uintptr_t step,
                      std::uintptr_t position, std::int64_t rows, std::int64_t cols) {
  if (rows < 0 || cols < 0) throw std::invalid_argument(std::string(op) + ": rows and cols must be >= 0.");
  if (cols >= (std::int64_t{1} << 31)) throw std::invalid_argument(std::string(op) + ": cols must be < 2**31.");
  if (rows > 0 && cols > 0 && (out == 0 || seed == 0 || step == 0 || position == 0)) {
    throw std::invalid_argument(std::string(op) + ": a data pointer is null.");
  }
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Row stats: the pointers and sizes as the Python launcher passes them, checked against what would crash the
// process (null pointers, sizes out of range); the tensors themselves are validated in diffuse_engine/native.py.
diffuse::RowStatsArgs row_stats_args(const char* op, std::uintptr_t logits, int dtype, std::int64_t logit_rows,
                                     std::int64_t row_stride, std::int64_t vocab, std::uintptr_t rows,
                                     std::int64_t num_rows, std::uintptr_t temperature, std::uintptr_t seed,
                                     std::uintptr_t step, std::uintptr_t position, std::uintptr_t raw_confidence,
                                     std::uintptr_t conf_exclude, std::int64_t exclude_k, std::uintptr_t token,
                                     std::uintptr_t prob, std::uintptr_t top1, std::uintptr_t margin,
                                     std::uintptr_t neg_entropy, std::uintptr_t invalid) {
  const std::string name(op);
  if (dtype != diffuse::kRowStatsF32 && dtype != diffuse::kRowStatsF16 && dtype != diffuse::kRowStatsBF16) {
    throw std::invalid_argument(name + ": dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                std::to_string(dtype) + ".");
  }
  if (vocab < 1 || vocab >= (std::int64_t{1} << 31)) {
    throw std::invalid_argument(name + ": V must be in [1, 2**31 - 1].");
  }
  if (logit_rows < 0 || num_rows < 0 || num_rows >= (std::int64_t{1} << 31)) {
    throw std::invalid_argument(name + ": R must be >= 0 and M in [0, 2**31 - 1].");
  }
  if (row_stride < vocab) throw std::invalid_argument(name + ": row_stride must be >= V.");
  if (exclude_k < 0 || exclude_k > diffuse::kRowStatsMaxExclude) {
    throw std::invalid_argument(name + ": K must be in [0, " + std::to_string(diffuse::kRowStatsMaxExclude) + "].");
  }
  if (num_rows > 0) {
    if ((logit_rows > 0 && logits == 0) || rows == 0 || temperature == 0 || seed == 0 || step == 0 ||
        position == 0 || token == 0 || prob == 0 || top1 == 0 || margin == 0 || neg_entropy == 0 || invalid == 0) {
      throw std::invalid_argument(name + ": a data pointer is null.");
    }
    if (exclude_k > 0 && conf_exclude == 0) {
      throw std::invalid_argument(name + ": conf_exclude_ptr is null but K > 0.");
    }
  }
  diffuse::RowStatsArgs a;
  a.logits = ptr<const void>(logits);
  a.dtype = dtype;
  a.logit_rows = logit_rows;
  a.row_stride = row_stride;
  a.vocab = vocab;
  a.rows = ptr<const std::int64_t>(rows);
  a.num_rows = num_rows;
  a.temperature = ptr<const float>(temperature);
  a.seed = ptr<const std::int64_t>(seed);
  a.step = ptr<const std::int64_t>(step);
  a.position = ptr<const std::int64_t>(position);
  a.raw_confidence = ptr<const std::uint8_t>(raw_confidence);
  a.conf_exclude = exclude_k > 0 ? ptr<const std::int64_t>(conf_exclude) : nullptr;
  a.exclude_k = exclude_k;
  a.token = ptr<std::int64_t>(token);
  a.prob = ptr<float>(prob);
  a.top1 = ptr<float>(top1);
  a.margin = ptr<float>(margin);
  a.neg_entropy = ptr<float>(neg_entropy);
  a.invalid = ptr<std::int32_t>(invalid);
  return a;
}

// Commit: the pointers and sizes as the Python launcher passes them, checked against what would crash the process
// (null pointers, negative sizes, a partial revision set); the tensors themselves are validated in
// diffuse_engine/native.py.
diffuse::CommitArgs commit_args(const char* op, std::uintptr_t canvas, std::int64_t canvas_len,
                                std::uintptr_t row_offsets, std::int64_t num_requests, std::uintptr_t row_index,
                                std::uintptr_t token, std::uintptr_t score, std::uintptr_t entropy,
                                std::int64_t num_rows, std::uintptr_t mode, std::uintptr_t count,
                                std::uintptr_t threshold, std::uintptr_t factor, std::uintptr_t eb_gamma,
                                std::int64_t mask_id, std::uintptr_t revise_offsets, std::uintptr_t revise_index,
                                std::uintptr_t revise_score, std::uintptr_t remask_bound, std::int64_t num_revise,
                                std::uintptr_t committed, std::uintptr_t counters) {
  const std::string name(op);
  if (canvas_len < 0 || num_requests < 0 || num_rows < 0 || num_revise < 0) {
    throw std::invalid_argument(name + ": canvas_len, B, M and R must be >= 0.");
  }
  if (num_requests >= (std::int64_t{1} << 31)) throw std::invalid_argument(name + ": B must be < 2**31.");
  const bool revise = revise_offsets != 0 || revise_index != 0 || revise_score != 0 || remask_bound != 0;
  if (num_requests > 0) {
    if (row_offsets == 0 || mode == 0 || count == 0 || threshold == 0 || factor == 0 || eb_gamma == 0 ||
        counters == 0) {
      throw std::invalid_argument(name + ": a data pointer is null.");
    }
    if (num_rows > 0 && (canvas == 0 || row_index == 0 || token == 0 || score == 0 || entropy == 0 ||
                         committed == 0)) {
      throw std::invalid_argument(name + ": a data pointer is null.");
    }
    if (revise && (revise_offsets == 0 || remask_bound == 0 ||
                   (num_revise > 0 && (canvas == 0 || revise_index == 0 || revise_score == 0)))) {
      throw std::invalid_argument(name + ": the revision pointers must be all set or all null.");
    }
  }
  diffuse::CommitArgs a;
  a.canvas = ptr<std::int64_t>(canvas);
  a.canvas_len = canvas_len;
  a.row_offsets = ptr<const std::int64_t>(row_offsets);
  a.num_requests = num_requests;
  a.row_index = ptr<const std::int64_t>(row_index);
  a.token = ptr<const std::int64_t>(token);
  a.score = ptr<const float>(score);
  a.entropy = ptr<const float>(entropy);
  a.num_rows = num_rows;
  a.mode = ptr<const std::int32_t>(mode);
  a.count = ptr<const std::int32_t>(count);
  a.threshold = ptr<const float>(threshold);
  a.factor = ptr<const float>(factor);
  a.eb_gamma = ptr<const float>(eb_gamma);
  a.mask_id = mask_id;
  a.revise_offsets = revise ? ptr<const std::int64_t>(revise_offsets) : nullptr;
  a.revise_index = revise ? ptr<const std::int64_t>(revise_index) : nullptr;
  a.revise_score = revise ? ptr<const float>(revise_score) : nullptr;
  a.remask_bound = revise ? ptr<const float>(remask_bound) : nullptr;
  a.num_revise = revise ? num_revise : 0;
  a.committed = ptr<std::uint8_t>(committed);
  a.counters = ptr<std::int32_t>(counters);
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffuse-engine native kernels (CUDA) and their C++ CPU twins; pointer-based, no torch.";

  m.def(
      "counter_noise_cpu",
      [](std::uintptr_t out, std::uintptr_t seed, std::uintptr_t step, std::uintptr_t position, std::int64_t rows,
         std::int64_t cols, std::uint32_t stream_id, bool gumbel) {
        check_noise_args("counter_noise_cpu", out, seed, step, position, rows, cols);
        py::gil_scoped_release release;
        diffuse::counter_noise_cpu(ptr<float>(out), ptr<const std::int64_t>(seed), ptr<const std::int64_t>(step),
                                   ptr<const std::int64_t>(position), rows, cols, stream_id, gumbel);
      },
      py::arg("out_ptr"), py::arg("seed_ptr"), py::arg("step_ptr"), py::arg("pos_ptr"), py::arg("M"), py::arg("V"),
      py::arg("stream_id"), py::arg("gumbel"),
      "Fill host memory out[M, V] (fp32) with counter-based uniforms (or Gumbel noise when gumbel) for int64 "
      "seed/step/position [M] and a 32-bit stream id. Blocking; releases the GIL.");

  m.def(
      "counter_noise_cuda",
      [](std::uintptr_t out, std::uintptr_t seed, std::uintptr_t step, std::uintptr_t position, std::int64_t rows,
         std::int64_t cols, std::uint32_t stream_id, bool gumbel, std::uintptr_t cuda_stream) {
        check_noise_args("counter_noise_cuda", out, seed, step, position, rows, cols);
        require_device("counter_noise_cuda");
        const int status = diffuse::counter_noise_cuda(ptr<float>(out), ptr<const std::int64_t>(seed),
                                                       ptr<const std::int64_t>(step),
                                                       ptr<const std::int64_t>(position), rows, cols, stream_id,
                                                       gumbel, cuda_stream);
        check_cuda("counter_noise_cuda", status);
      },
      py::arg("out_ptr"), py::arg("seed_ptr"), py::arg("step_ptr"), py::arg("pos_ptr"), py::arg("M"), py::arg("V"),
      py::arg("stream_id"), py::arg("gumbel"), py::arg("cuda_stream"),
      "Launch the counter-noise kernel writing device memory out[M, V] (fp32) on the given cudaStream_t (an int; 0 "
      "is the default stream) of the current device. Asynchronous; raises RuntimeError when no CUDA device or "
      "driver is available or the launch fails.");

  m.def(
      "row_stats_cpu",
      [](std::uintptr_t logits, int dtype, std::int64_t logit_rows, std::int64_t row_stride, std::int64_t vocab,
         std::uintptr_t rows, std::int64_t num_rows, std::uintptr_t temperature, std::uintptr_t seed,
         std::uintptr_t step, std::uintptr_t position, std::uintptr_t raw_confidence, std::uintptr_t conf_exclude,
         std::int64_t exclude_k, std::uintptr_t token, std::uintptr_t prob, std::uintptr_t top1, std::uintptr_t margin,
         std::uintptr_t neg_entropy, std::uintptr_t invalid, std::int64_t tile_cols) {
        if (tile_cols < 1) throw std::invalid_argument("row_stats_cpu: tile_cols must be >= 1.");
        const diffuse::RowStatsArgs a = row_stats_args("row_stats_cpu", logits, dtype, logit_rows, row_stride, vocab,
                                                       rows, num_rows, temperature, seed, step, position,
                                                       raw_confidence, conf_exclude, exclude_k, token, prob, top1,
                                                       margin, neg_entropy, invalid);
        py::gil_scoped_release release;
        diffuse::row_stats_cpu(a, tile_cols);
      },
      py::arg("logits_ptr"), py::arg("dtype"), py::arg("R"), py::arg("row_stride"), py::arg("V"), py::arg("rows_ptr"),
      py::arg("M"), py::arg("temperature_ptr"), py::arg("seed_ptr"), py::arg("step_ptr"), py::arg("pos_ptr"),
      py::arg("raw_confidence_ptr"), py::arg("conf_exclude_ptr"), py::arg("K"), py::arg("token_ptr"),
      py::arg("prob_ptr"), py::arg("top1_ptr"), py::arg("margin_ptr"), py::arg("neg_entropy_ptr"),
      py::arg("invalid_ptr"), py::arg("tile_cols") = 256,
      "Row stats of host memory: logits [R, row_stride] (dtype 0 fp32, 1 fp16, 2 bf16; the first V columns used), "
      "rows [M] int64, temperature [M] fp32, seed/step/position [M] int64, raw_confidence [M] uint8 (0 = none), "
      "conf_exclude [M, K] int64 (0 = none) -> token [M] int64, prob/top1/margin/neg_entropy [M] fp32, invalid [M] "
      "int32. Each row is merged from tiles of tile_cols columns. Blocking; releases the GIL.");

  m.def(
      "row_stats_cuda",
      [](std::uintptr_t logits, int dtype, std::int64_t logit_rows, std::int64_t row_stride, std::int64_t vocab,
         std::uintptr_t rows, std::int64_t num_rows, std::uintptr_t temperature, std::uintptr_t seed,
         std::uintptr_t step, std::uintptr_t position, std::uintptr_t raw_confidence, std::uintptr_t conf_exclude,
         std::int64_t exclude_k, std::uintptr_t token, std::uintptr_t prob, std::uintptr_t top1, std::uintptr_t margin,
         std::uintptr_t neg_entropy, std::uintptr_t invalid, std::uintptr_t cuda_stream) {
        const diffuse::RowStatsArgs a = row_stats_args("row_stats_cuda", logits, dtype, logit_rows, row_stride,
                                                       vocab, rows, num_rows, temperature, seed, step, position,
                                                       raw_confidence, conf_exclude, exclude_k, token, prob, top1,
                                                       margin, neg_entropy, invalid);
        require_device("row_stats_cuda");
        int status = 0;
        {
          py::gil_scoped_release release;
          status = diffuse::row_stats_cuda(a, cuda_stream);
        }
        check_cuda("row_stats_cuda", status);
      },
      py::arg("logits_ptr"), py::arg("dtype"), py::arg("R"), py::arg("row_stride"), py::arg("V"), py::arg("rows_ptr"),
      py::arg("M"), py::arg("temperature_ptr"), py::arg("seed_ptr"), py::arg("step_ptr"), py::arg("pos_ptr"),
      py::arg("raw_confidence_ptr"), py::arg("conf_exclude_ptr"), py::arg("K"), py::arg("token_ptr"),
      py::arg("prob_ptr"), py::arg("top1_ptr"), py::arg("margin_ptr"), py::arg("neg_entropy_ptr"),
      py::arg("invalid_ptr"), py::arg("cuda_stream"),
      "Launch the row-stats kernel on device memory (arguments as row_stats_cpu; one block per selected row) on the "
      "given cudaStream_t (an int; 0 is the default stream) of the current device. Asynchronous; raises "
      "RuntimeError when no CUDA device or driver is available or the launch fails.");

  m.def(
      "commit_cpu",
      [](std::uintptr_t canvas, std::int64_t canvas_len, std::uintptr_t row_offsets, std::int64_t num_requests,
         std::uintptr_t row_index, std::uintptr_t token, std::uintptr_t score, std::uintptr_t entropy,
         std::int64_t num_rows, std::uintptr_t mode, std::uintptr_t count, std::uintptr_t threshold,
         std::uintptr_t factor, std::uintptr_t eb_gamma, std::int64_t mask_id, std::uintptr_t revise_offsets,
         std::uintptr_t revise_index, std::uintptr_t revise_score, std::uintptr_t remask_bound,
         std::int64_t num_revise, std::uintptr_t committed, std::uintptr_t counters) {
        const diffuse::CommitArgs a = commit_args("commit_cpu", canvas, canvas_len, row_offsets, num_requests,
                                                  row_index, token, score, entropy, num_rows, mode, count, threshold,
                                                  factor, eb_gamma, mask_id, revise_offsets, revise_index,
                                                  revise_score, remask_bound, num_revise, committed, counters);
        py::gil_scoped_release release;
        diffuse::commit_cpu(a);
      },
      py::arg("canvas_ptr"), py::arg("canvas_len"), py::arg("row_offsets_ptr"), py::arg("B"), py::arg("row_index_ptr"),
      py::arg("token_ptr"), py::arg("score_ptr"), py::arg("entropy_ptr"), py::arg("M"), py::arg("mode_ptr"),
      py::arg("count_ptr"), py::arg("threshold_ptr"), py::arg("factor_ptr"), py::arg("eb_gamma_ptr"),
      py::arg("mask_id"), py::arg("revise_offsets_ptr"), py::arg("revise_index_ptr"), py::arg("revise_score_ptr"),
      py::arg("remask_bound_ptr"), py::arg("R"), py::arg("committed_ptr"), py::arg("counters_ptr"),
      "Commit (and re-mask) in place on host memory: canvas [canvas_len] int64, row_offsets [B+1] int64, "
      "row_index/token [M] int64, score/entropy [M] fp32, mode/count [B] int32, threshold/factor/eb_gamma [B] fp32, "
      "revise_offsets [B+1] int64, revise_index [R] int64, revise_score [R] fp32, remask_bound [B] fp32 (all four "
      "0 for no revision) -> committed [M] uint8, counters [B, 3] int32. Blocking; releases the GIL.");

  m.def(
      "commit_cuda",
      [](std::uintptr_t canvas, std::int64_t canvas_len, std::uintptr_t row_offsets, std::int64_t num_requests,
         std::uintptr_t row_index, std::uintptr_t token, std::uintptr_t score, std::uintptr_t entropy,
         std::int64_t num_rows, std::uintptr_t mode, std::uintptr_t count, std::uintptr_t threshold,
         std::uintptr_t factor, std::uintptr_t eb_gamma, std::int64_t mask_id, std::uintptr_t revise_offsets,
         std::uintptr_t revise_index, std::uintptr_t revise_score, std::uintptr_t remask_bound,
         std::int64_t num_revise, std::uintptr_t committed, std::uintptr_t counters, std::uintptr_t cuda_stream) {
        const diffuse::CommitArgs a = commit_args("commit_cuda", canvas, canvas_len, row_offsets, num_requests,
                                                  row_index, token, score, entropy, num_rows, mode, count, threshold,
                                                  factor, eb_gamma, mask_id, revise_offsets, revise_index,
                                                  revise_score, remask_bound, num_revise, committed, counters);
        require_device("commit_cuda");
        int status = 0;
        {
          py::gil_scoped_release release;
          status = diffuse::commit_cuda(a, cuda_stream);
        }
        check_cuda("commit_cuda", status);
      },
      py::arg("canvas_ptr"), py::arg("canvas_len"), py::arg("row_offsets_ptr"), py::arg("B"), py::arg("row_index_ptr"),
      py::arg("token_ptr"), py::arg("score_ptr"), py::arg("entropy_ptr"), py::arg("M"), py::arg("mode_ptr"),
      py::arg("count_ptr"), py::arg("threshold_ptr"), py::arg("factor_ptr"), py::arg("eb_gamma_ptr"),
      py::arg("mask_id"), py::arg("revise_offsets_ptr"), py::arg("revise_index_ptr"), py::arg("revise_score_ptr"),
      py::arg("remask_bound_ptr"), py::arg("R"), py::arg("committed_ptr"), py::arg("counters_ptr"),
      py::arg("cuda_stream"),
      "Launch the commit kernel on device memory (arguments as commit_cpu; one block per request) on the given "
      "cudaStream_t (an int; 0 is the default stream) of the current device. Asynchronous; raises RuntimeError when "
      "no CUDA device or driver is available or the launch fails.");

  m.def("cuda_device_count", &device_count,
        "Number of visible CUDA devices; 0 (never an exception) without a driver or a device.");
}
