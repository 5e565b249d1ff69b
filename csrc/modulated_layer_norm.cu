// modulated_layer_norm: out = LN(x) * (1 + scale[b]) + shift[b] over the last dim (DiT's adaLN, no affine).
//
// x (B, N, D) with element strides (stride_xb, stride_xn, 1); shift, scale contiguous (B, D) in the
// param dtype P (x's dtype or float32); out contiguous (B, N, D) in x's dtype T.
//
// Bytes at DiT-XL/2, (64, 256, 1152) bf16: x read once and out written once, 2 x 37.7 MB; shift/scale
// (0.3 MB each) come from L2. At the 3.0 TB/s an H100 copies at that is 25 us.
//
// Layout: a row is reduced by one warp when it fits (4 rows per 128-thread block, shuffles only), else
// by a block of up to 512 threads. The row stays in registers (VPT 16-byte vectors per thread), so x
// is read once; statistics are two-pass (mean, then centred squares) from those registers in float32.
//
// Measured on an H100 against a device-to-device copy of the same bytes: benchmarks/RESULTS.md §1. ncu there:
// latency-bound (64 registers -> 50% occupancy), L2 busy since each warp re-reads its sample's shift/scale.
// Next: stage shift/scale in shared memory per block and cap registers for 12+ blocks per SM.
#include "common.cuh"

namespace eek {
namespace {

constexpr int ROWS_PER_WARP_BLOCK = 4;

// T: x/out dtype; P: shift/scale dtype; V: elements per vector (16 bytes, or 1 for the scalar fallback
// when D or an address is not 16-byte aligned); VPT: vectors per thread (0: stream the row from memory).
template <typename T, typename P, int V, int VPT>
__global__ void __launch_bounds__(512)
modulated_layer_norm_kernel(const T* __restrict__ x, const P* __restrict__ shift, const P* __restrict__ scale,
                            T* __restrict__ out, int64_t rows, int64_t N, int64_t D, int64_t stride_xb,
                            int64_t stride_xn, float eps) {
  __shared__ float red[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole warps only: with blockDim.x > 32 the grid has exactly one block per row
  const int64_t b = row / N, n = row - b * N;
  const T* xr = x + b * stride_xb + n * stride_xn;  // int64 offsets: B*N*D passes 2**31 at large batch
  const P* shift_r = shift + b * D;
  const P* scale_r = scale + b * D;
  T* out_r = out + row * D;
  const int64_t nvec = D / V;
  const float inv_d = 1.f / float(D);

  if constexpr (VPT > 0) {
    Packed<T, V> v[VPT];  // the row, in x's dtype: 20 registers for 5 bf16 vectors instead of 40
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t idx = threadIdx.x + int64_t(i) * blockDim.x;  // strided by the row's threads: coalesced
      if (idx < nvec) {
        v[i].load(xr + idx * V);
      } else {
        v[i].zero();
      }
    }
    float mean, rstd;
    register_row_stats<T, V, VPT>(v, nvec, inv_d, eps, red, mean, rstd);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t idx = threadIdx.x + int64_t(i) * blockDim.x;
      if (idx < nvec) {
        float sh[V], sc[V], o[V];
        load_f32<P, V>(shift_r + idx * V, sh);
        load_f32<P, V>(scale_r + idx * V, sc);
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = (v[i][j] - mean) * rstd * (1.f + sc[j]) + sh[j];
        store_f32<T, V>(out_r + idx * V, o);
      }
    }
  } else {
    // Rows too long for registers (D past 512 threads x 8 vectors): two reads. Sums are shifted by the
    // row's first element so that E[x^2] - E[x]^2 does not cancel when |mean| >> std.
    const float k = to_float<T>(xr[0]);
    float sum = 0.f, sq = 0.f;
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      float v[V];
      load_f32<T, V>(xr + idx * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) { const float d = v[j] - k; sum += d; sq += d * d; }
    }
    float mean, rstd;
    shifted_row_stats(sum, sq, k, inv_d, eps, red, mean, rstd);
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      float v[V], sh[V], sc[V], o[V];
      load_f32<T, V>(xr + idx * V, v);
      load_f32<P, V>(shift_r + idx * V, sh);
      load_f32<P, V>(scale_r + idx * V, sc);
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = (v[j] - mean) * rstd * (1.f + sc[j]) + sh[j];
      store_f32<T, V>(out_r + idx * V, o);
    }
  }
}

template <typename T, typename P, int V>
void launch(const T* x, const P* shift, const P* scale, T* out, int64_t B, int64_t N, int64_t D, int64_t sxb,
            int64_t sxn, float eps, cudaStream_t stream) {
  const int64_t rows = B * N;
  const RowPlan plan = plan_row(D / V, V == 1);
  const dim3 block = plan.threads == 32 ? dim3(32, ROWS_PER_WARP_BLOCK) : dim3(plan.threads, 1);
  const int64_t grid = (rows + block.y - 1) / block.y;
  if (grid > 0x7fffffff) throw std::invalid_argument("modulated_layer_norm: too many rows (B*N) for one launch");
  dispatch_vpt<V == 1>(plan.vpt, [&](auto vpt) {
    modulated_layer_norm_kernel<T, P, V, decltype(vpt)::value>
        <<<unsigned(grid), block, 0, stream>>>(x, shift, scale, out, rows, N, D, sxb, sxn, eps);
  });
}

}  // namespace

void modulated_layer_norm(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale, std::uintptr_t out,
                          int64_t B, int64_t N, int64_t D, int64_t stride_xb, int64_t stride_xn, double eps,
                          int x_dtype, int param_dtype, std::uintptr_t stream) {
  constexpr const char* OP = "modulated_layer_norm";
  if (B < 0 || N < 0 || D < 0) throw std::invalid_argument("modulated_layer_norm: B, N, D must be >= 0");
  if (B * N * D == 0) return;
  if (!x || !shift || !scale || !out) throw std::invalid_argument("modulated_layer_norm: x, shift, scale, out must be non-null");
  if (!(eps > 0)) throw std::invalid_argument("modulated_layer_norm: eps must be > 0");
  DeviceGuard guard(reinterpret_cast<const void*>(x));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtypes(OP, x_dtype, param_dtype, [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    constexpr int V = 16 / sizeof(T);
    auto* xp = reinterpret_cast<const T*>(x);
    auto* op = reinterpret_cast<T*>(out);
    auto* shp = reinterpret_cast<const P*>(shift);
    auto* scp = reinterpret_cast<const P*>(scale);
    const bool vec = D % V == 0 && stride_xb % V == 0 && stride_xn % V == 0 && aligned16(xp) && aligned16(op) &&
                     aligned16(shp) && aligned16(scp);
    if (vec)
      launch<T, P, V>(xp, shp, scp, op, B, N, D, stride_xb, stride_xn, float(eps), s);
    else
      launch<T, P, 1>(xp, shp, scp, op, B, N, D, stride_xb, stride_xn, float(eps), s);
  });
  check_launch(OP);
}

}  // namespace eek
