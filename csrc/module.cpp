// eekernels._C: pybind11 bindings over the torch-free CUDA kernels.
//
// Tensors cross as integers (device pointers, element sizes and strides, dtype codes, the stream
// handle), so this module links neither libtorch nor any torch header and one build serves every torch.
// The signatures here are the contract eekernels/ops/*.py calls; see csrc/ops.h for the conventions.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "ops.h"

namespace py = pybind11;

// Baked in by setup.py at compile time.
#ifndef EEK_ARCHS
#define EEK_ARCHS "unknown"
#endif
#ifndef EEK_NVCC_VERSION
#define EEK_NVCC_VERSION "unknown"
#endif

namespace {

std::vector<std::string> kernel_names() { return {"modulated_layer_norm", "gated_residual_norm", "group_norm_act"}; }

std::string host_compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict d;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  d["nvcc_version"] = EEK_NVCC_VERSION;
  std::vector<std::string> archs;
  std::string all = EEK_ARCHS;
  for (size_t start = 0; start <= all.size();) {
    const size_t end = all.find(';', start);
    const std::string a = all.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!a.empty()) archs.push_back(a);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  d["archs"] = archs;
  d["host_compiler"] = host_compiler();
  d["cudart"] = "static";
  d["torch"] = "none (torch-free: pointers, sizes, strides and the stream are passed as integers)";
  d["kernels"] = kernel_names();
  return d;
}

// Never raises: without a driver or GPU the versions/count read 0 (for `eekernels info`).
py::dict runtime_info() {
  int runtime = 0, driver = 0, devices = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  cudaGetLastError();  // leave no sticky "no device" error for the next kernel launch check
  py::dict d;
  d["runtime_version"] = runtime;
  d["driver_version"] = driver;
  d["device_count"] = devices;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "eekernels torch-free CUDA kernels: tensors are passed as device pointers, sizes, strides and a stream";

  m.def("modulated_layer_norm", &eek::modulated_layer_norm,
        "out = LN(x) * (1 + scale[b]) + shift[b]; x (B, N, D) strided rows, shift/scale (B, D), out contiguous",
        py::arg("x"), py::arg("shift"), py::arg("scale"), py::arg("out"), py::arg("B"), py::arg("N"), py::arg("D"),
        py::arg("stride_xb"), py::arg("stride_xn"), py::arg("eps"), py::arg("x_dtype"), py::arg("param_dtype"),
        py::arg("stream"));

  m.def("gated_residual_norm", &eek::gated_residual_norm,
        "x_out = x + gate[b] * y; h = (LN(x_out) * weight + bias) * (1 + scale[b]) + shift[b] (each optional, 0 = absent)",
        py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("shift"), py::arg("scale"), py::arg("weight"),
        py::arg("bias"), py::arg("x_out"), py::arg("h"), py::arg("B"), py::arg("N"), py::arg("D"),
        py::arg("stride_xb"), py::arg("stride_xn"), py::arg("stride_yb"), py::arg("stride_yn"), py::arg("eps"),
        py::arg("x_dtype"), py::arg("param_dtype"), py::arg("stream"));

  m.def("group_norm_act", &eek::group_norm_act,
        "act((GroupNorm(x) * weight + bias) * (1 + scale[b, c]) + shift[b, c]); x planes (b, c) of HW contiguous elements",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("out"),
        py::arg("B"), py::arg("C"), py::arg("HW"), py::arg("G"), py::arg("stride_xb"), py::arg("stride_xc"),
        py::arg("eps"), py::arg("activation"), py::arg("x_dtype"), py::arg("param_dtype"), py::arg("stream"));

  m.def("kernels", &kernel_names, "Names of the kernels in this build");
  m.def("build_info", &build_info, "CUDA version, archs and compilers this module was built with");
  m.def("runtime_info", &runtime_info, "CUDA runtime/driver versions and device count (0s without a driver/GPU)");
}
