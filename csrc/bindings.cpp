// The native module diffuse_engine._C: every CUDA kernel launcher and C++ CPU twin of csrc/, bound with pybind11.
// No torch headers: functions take raw data pointers (Python ints from tensor.data_ptr()), sizes, and for CUDA the
// stream as an integer (torch.cuda.current_stream().cuda_stream). The Python launchers in diffuse_engine/native.py
// validate the tensors; the checks here only guard against calls that would crash the process.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "noise.cuh"

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

  m.def("cuda_device_count", &device_count,
        "Number of visible CUDA devices; 0 (never an exception) without a driver or a device.");
}
