// Device helpers shared by the eekernels CUDA kernels: dtype conversion, 16-byte vector I/O, reductions,
// compile-time dispatch, launch checks. No torch: tensors arrive as raw pointers, sizes and strides.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "ops.h"

namespace eek {

// --------------------------------------------------------------------------------------------------
// Scalar conversion: every kernel computes in float32 and rounds once on store.
// --------------------------------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round v to T and back: what a value stored in T reads as (gated_residual_norm normalises the stored x_out).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

// --------------------------------------------------------------------------------------------------
// Vector I/O. N elements of T at p, converted to/from float. When N * sizeof(T) is a multiple of 16 the
// access is done as 16-byte words (LDG.128 / STG.128); callers guarantee p is then 16-byte aligned.
// Otherwise (the scalar fallback, N == 1) it is element by element.
// --------------------------------------------------------------------------------------------------
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[N]) {
  constexpr int BYTES = N * int(sizeof(T));
  if constexpr (BYTES % 16 == 0) {
    constexpr int PER_WORD = 16 / int(sizeof(T));
#pragma unroll
    for (int w = 0; w < BYTES / 16; ++w) {
      union { uint4 raw; T e[PER_WORD]; } u;
      u.raw = reinterpret_cast<const uint4*>(p)[w];
#pragma unroll
      for (int j = 0; j < PER_WORD; ++j) out[w * PER_WORD + j] = to_float<T>(u.e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float<T>(p[j]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float (&in)[N]) {
  constexpr int BYTES = N * int(sizeof(T));
  if constexpr (BYTES % 16 == 0) {
    constexpr int PER_WORD = 16 / int(sizeof(T));
#pragma unroll
    for (int w = 0; w < BYTES / 16; ++w) {
      union { uint4 raw; T e[PER_WORD]; } u;
#pragma unroll
      for (int j = 0; j < PER_WORD; ++j) u.e[j] = from_float<T>(in[w * PER_WORD + j]);
      reinterpret_cast<uint4*>(p)[w] = u.raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = from_float<T>(in[j]);
  }
}

// N elements of T kept in registers in their storage type (bf16/fp16 two per 32-bit register): half the
// registers of a float copy, hence more resident warps for a row held in registers. 16-byte words when
// N * sizeof(T) is a multiple of 16 (the same alignment contract as load_f32).
template <typename T, int N>
struct Packed {
  static constexpr bool WORDS = (N * sizeof(T)) % 16 == 0;
  union Storage {
    uint4 w[WORDS ? N * sizeof(T) / 16 : 1];
    T e[N];
  } s;
  __device__ __forceinline__ float operator[](int j) const { return to_float<T>(s.e[j]); }
  __device__ __forceinline__ void load(const T* __restrict__ p) {
    if constexpr (WORDS) {
#pragma unroll
      for (int k = 0; k < int(N * sizeof(T) / 16); ++k) s.w[k] = reinterpret_cast<const uint4*>(p)[k];
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) s.e[j] = p[j];
    }
  }
  __device__ __forceinline__ void store(T* __restrict__ p) const {
    if constexpr (WORDS) {
#pragma unroll
      for (int k = 0; k < int(N * sizeof(T) / 16); ++k) reinterpret_cast<uint4*>(p)[k] = s.w[k];
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) p[j] = s.e[j];
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < N; ++j) s.e[j] = from_float<T>(0.f);
  }
};

// Optional per-element parameter (gate, shift, weight, ...): `fallback` where the pointer is null.
template <typename P, int N>
__device__ __forceinline__ void load_param(const P* __restrict__ p, int64_t offset, float fallback, float (&out)[N]) {
  if (p != nullptr) {
    load_f32<P, N>(p + offset, out);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = fallback;
  }
}

// --------------------------------------------------------------------------------------------------
// Reductions. A row (or group) is reduced by blockDim.x threads: one warp (shuffles only) or the whole
// block (shuffles, then one float per warp through shared memory). `red` holds 32 floats.
// --------------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the blockDim.x threads of this threadIdx.y. With blockDim.x > 32 the block must be one row
// (blockDim.y == 1) and every thread must call it (it synchronises).
__device__ __forceinline__ float row_sum(float v, float* red) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, num_warps = blockDim.x >> 5;
  __syncthreads();  // an earlier call may still be reading red
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return warp_sum(lane < num_warps ? red[lane] : 0.f);
}

// --------------------------------------------------------------------------------------------------
// Normalization statistics of one row (or group) of n elements, reduced by the row's threads (row_sum):
// mean and 1 / sqrt(var + eps) in float32. Used by every kernel here.
// --------------------------------------------------------------------------------------------------
// The row held in registers: VPT vectors of V per thread, vector i at index threadIdx.x + i * blockDim.x
// (zeroed at and past nvec). Two passes over the registers, so no E[x^2] - E[x]^2 cancellation.
template <typename T, int V, int VPT, typename I>
__device__ __forceinline__ void register_row_stats(const Packed<T, V> (&v)[VPT], I nvec, float inv_n, float eps,
                                                   float* red, float& mean, float& rstd) {
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
#pragma unroll
    for (int j = 0; j < V; ++j) sum += v[i][j];
  }
  mean = row_sum(sum, red) * inv_n;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if (threadIdx.x + I(i) * blockDim.x < nvec) {
#pragma unroll
      for (int j = 0; j < V; ++j) sq += (v[i][j] - mean) * (v[i][j] - mean);
    }
  }
  rstd = rsqrtf(row_sum(sq, red) * inv_n + eps);
}

// A streamed row (too long for registers): each thread's sums of d = x - k and d * d, shifted by k (the
// row's first element) so that E[x^2] - E[x]^2 does not cancel when |mean| >> std.
__device__ __forceinline__ void shifted_row_stats(float sum, float sq, float k, float inv_n, float eps, float* red,
                                                  float& mean, float& rstd) {
  const float mean_k = row_sum(sum, red) * inv_n;
  const float var = fmaxf(row_sum(sq, red) * inv_n - mean_k * mean_k, 0.f);
  mean = k + mean_k;
  rstd = rsqrtf(var + eps);
}

// --------------------------------------------------------------------------------------------------
// Activations (group_norm_act): codes as in eekernels.ops (0 none, 1 gelu (erf), 2 gelu_tanh, 3 silu).
// --------------------------------------------------------------------------------------------------
__device__ __forceinline__ float activate(float v, int activation) {
  switch (activation) {
    case 1: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case 2: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case 3: return v / (1.f + __expf(-v));
    default: return v;
  }
}

// --------------------------------------------------------------------------------------------------
// Host side: compile-time dispatch over dtypes and over the per-thread register tile, launch checks.
// --------------------------------------------------------------------------------------------------
template <typename T> struct Tag { using type = T; };

// f(Tag<T>{}, Tag<P>{}) for x dtype T and parameter dtype P in {T, float}.
template <typename F>
void dispatch_dtypes(const char* op, int x_dtype, int param_dtype, F&& f) {
  const bool same = param_dtype == x_dtype;
  if (!same && param_dtype != kFloat32)
    throw std::invalid_argument(std::string(op) + ": param_dtype must equal x_dtype or be 0 (float32), got " +
                                std::to_string(param_dtype));
  switch (x_dtype) {
    case kFloat32: return f(Tag<float>{}, Tag<float>{});
    case kFloat16: return same ? f(Tag<__half>{}, Tag<__half>{}) : f(Tag<__half>{}, Tag<float>{});
    case kBFloat16:
      return same ? f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{}) : f(Tag<__nv_bfloat16>{}, Tag<float>{});
    default:
      throw std::invalid_argument(std::string(op) + ": x_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                  std::to_string(x_dtype));
  }
}

// Vectors held in registers per thread: 1..MAX_VPT; 0 selects the streaming kernel (re-reads global memory).
constexpr int MAX_VPT = 8;

// SCALAR: the scalar fallback, compiled only for MAX_VPT and streaming (see plan_row).
template <bool SCALAR, typename F>
void dispatch_vpt(int vpt, F&& f) {
  if constexpr (SCALAR) {
    if (vpt == 0) return f(std::integral_constant<int, 0>{});
    if (vpt == MAX_VPT) return f(std::integral_constant<int, MAX_VPT>{});
  } else {
    switch (vpt) {
      case 0: return f(std::integral_constant<int, 0>{});
      case 1: return f(std::integral_constant<int, 1>{});
      case 2: return f(std::integral_constant<int, 2>{});
      case 3: return f(std::integral_constant<int, 3>{});
      case 4: return f(std::integral_constant<int, 4>{});
      case 5: return f(std::integral_constant<int, 5>{});
      case 6: return f(std::integral_constant<int, 6>{});
      case 7: return f(std::integral_constant<int, 7>{});
      case 8: return f(std::integral_constant<int, 8>{});
      default: break;
    }
  }
  throw std::logic_error("eekernels: vectors per thread out of range: " + std::to_string(vpt));
}

// Launch on the device that owns the data: the caller's current device may be another GPU. Looked up
// only when several devices are visible, so single-GPU calls (and graph captures) pay nothing for it.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* ptr) {
    static const int count = [] {
      int n = 0;
      if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); n = 0; }
      return n;
    }();
    if (count <= 1) return;
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) { cudaGetLastError(); return; }
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && attr.device >= 0 && attr.device != current &&
        cudaSetDevice(attr.device) == cudaSuccess)
      previous_ = current;
  }
  ~DeviceGuard() { if (previous_ >= 0) cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
}

// Threads per row and vectors per thread for a row of `nvec` vectors: the fewest threads (one warp
// first, since a warp reduces with shuffles alone) that keep the row in at most MAX_VPT vectors per
// thread; past 512 threads x MAX_VPT the row is streamed (vpt 0). 512, not 1024: kernels declare
// __launch_bounds__(512) so that an 8-vector tile keeps its ~80 registers instead of spilling at 64.
// The scalar fallback (odd D, misaligned views) always takes 8 elements per thread: a few predicated
// registers are cheaper than compiling every tile size twice (build time on 2-core CI).
// `max_vpt` lowers the cap for kernels that hold more per vector (gated_residual_norm: x, y, gate).
struct RowPlan { int threads; int vpt; };
inline RowPlan plan_row(int64_t nvec, bool scalar, int max_vpt = MAX_VPT) {
  for (int threads = 32; threads <= 512; threads *= 2) {
    const int64_t vpt = (nvec + threads - 1) / threads;
    if (vpt <= max_vpt) return {threads, scalar ? MAX_VPT : int(vpt < 1 ? 1 : vpt)};
  }
  const int64_t vpt = (nvec + 511) / 512;
  return {512, vpt <= MAX_VPT ? (scalar ? MAX_VPT : int(vpt)) : 0};
}

}  // namespace eek
