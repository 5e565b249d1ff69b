// Host-side entry points of the eekernels CUDA kernels, shared by the kernels (csrc/*.cu) and the
// pybind11 bindings (csrc/module.cpp). Plain C++: no CUDA or torch headers, so the bindings compile
// with the host compiler alone.
//
// Conventions: pointers and the stream are integers (std::uintptr_t; 0 means "absent" for optional
// tensors and "default stream" for the stream); sizes and strides are int64 and in elements; dtype
// codes are 0 float32, 1 float16, 2 bfloat16. Bad arguments throw std::invalid_argument (Python
// ValueError); CUDA errors throw std::runtime_error (Python RuntimeError).
#pragma once

#include <cstdint>

namespace eek {

enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

void modulated_layer_norm(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale, std::uintptr_t out,
                          int64_t B, int64_t N, int64_t D, int64_t stride_xb, int64_t stride_xn, double eps,
                          int x_dtype, int param_dtype, std::uintptr_t stream);

void gated_residual_norm(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate, std::uintptr_t shift,
                         std::uintptr_t scale, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t x_out,
                         std::uintptr_t h, int64_t B, int64_t N, int64_t D, int64_t stride_xb, int64_t stride_xn,
                         int64_t stride_yb, int64_t stride_yn, double eps, int x_dtype, int param_dtype,
                         std::uintptr_t stream);

void group_norm_act(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t scale,
                    std::uintptr_t shift, std::uintptr_t out, int64_t B, int64_t C, int64_t HW, int64_t G,
                    int64_t stride_xb, int64_t stride_xc, double eps, int activation, int x_dtype, int param_dtype,
                    std::uintptr_t stream);

}  // namespace eek
