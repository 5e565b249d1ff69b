// gated_residual_norm: x_out = x + gate[b] * y (or x + y), h = norm(x_out), in one pass.
//
// h = LN(x_out) * weight + bias, then * (1 + scale[b]) + shift[b]; each of weight, bias, scale, shift
// optional (null pointer). DiT passes shift/scale (adaLN), U-ViT's pre-norm blocks weight/bias.
// h is computed from x_out as stored, i.e. rounded to x's dtype, so that the fused op equals the
// unfused composition `x_out = x + gate * y; h = layer_norm(x_out)` exactly up to float32 rounding.
//
// x, y (B, N, D) with element strides (stride_*b, stride_*n, 1); gate/shift/scale contiguous (B, D),
// weight/bias contiguous (D,), all in the param dtype P; x_out, h contiguous (B, N, D) in x's dtype T.
//
// Bytes at DiT-XL/2, (64, 256, 1152) bf16: read x, y; write x_out, h: 4 x 37.7 MB = 151 MB, 50 us at
// 3.0 TB/s. Layout as modulated_layer_norm.cu: a warp (or block) per row, the row in registers.
#include "common.cuh"

namespace eek {
namespace {

constexpr int ROWS_PER_WARP_BLOCK = 4;

struct Params {
  const void* gate;
  const void* shift;
  const void* scale;
  const void* weight;
  const void* bias;
};

// The normalised value n at column offset `col` of row b, through the optional affine and modulation.
template <typename P, int V>
__device__ __forceinline__ void finish(const Params& p, int64_t b, int64_t D, int64_t col, float mean, float rstd,
                                       const float (&v)[V], float (&o)[V]) {
  float w[V], bi[V], sc[V], sh[V];
  load_param<P, V>(static_cast<const P*>(p.weight), col, 1.f, w);
  load_param<P, V>(static_cast<const P*>(p.bias), col, 0.f, bi);
  load_param<P, V>(static_cast<const P*>(p.scale), b * D + col, 0.f, sc);
  load_param<P, V>(static_cast<const P*>(p.shift), b * D + col, 0.f, sh);
#pragma unroll
  for (int j = 0; j < V; ++j) o[j] = ((v[j] - mean) * rstd * w[j] + bi[j]) * (1.f + sc[j]) + sh[j];
}

// x_out = x + gate * y for one vector, stored, and kept as stored (rounded to T).
template <typename T, typename P, int V>
__device__ __forceinline__ void residual(const T* xr, const T* yr, const P* gate_r, T* xo_r, int64_t col,
                                         Packed<T, V>& out) {
  Packed<T, V> a, b;
  float g[V];
  a.load(xr + col);
  b.load(yr + col);
  load_param<P, V>(gate_r, col, 1.f, g);
#pragma unroll
  for (int j = 0; j < V; ++j) out.s.e[j] = from_float<T>(a[j] + g[j] * b[j]);
  out.store(xo_r + col);
}

// T: x dtype; P: param dtype; V: elements per vector (16 bytes, or 1 for the scalar fallback); VPT:
// vectors per thread (0: stream the row, re-reading x_out from memory).
template <typename T, typename P, int V, int VPT>
__global__ void __launch_bounds__(512)
gated_residual_norm_kernel(const T* __restrict__ x, const T* __restrict__ y, Params p, T* __restrict__ x_out,
                           T* __restrict__ h, int64_t rows, int64_t N, int64_t D, int64_t sxb, int64_t sxn,
                           int64_t syb, int64_t syn, float eps) {
  __shared__ float red[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole warps only: with blockDim.x > 32 the grid has exactly one block per row
  const int64_t b = row / N, n = row - b * N;
  const T* xr = x + b * sxb + n * sxn;
  const T* yr = y + b * syb + n * syn;
  const P* gate_r = p.gate ? static_cast<const P*>(p.gate) + b * D : nullptr;
  T* xo_r = x_out + row * D;
  T* h_r = h + row * D;
  const int64_t nvec = D / V;
  const float inv_d = 1.f / float(D);

  if constexpr (VPT > 0) {
    Packed<T, V> v[VPT];  // x_out, in x's dtype: half the registers of a float copy for bf16/fp16
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t idx = threadIdx.x + int64_t(i) * blockDim.x;
      if (idx < nvec) {
        residual<T, P, V>(xr, yr, gate_r, xo_r, idx * V, v[i]);
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
        float vf[V], o[V];
#pragma unroll
        for (int j = 0; j < V; ++j) vf[j] = v[i][j];
        finish<P, V>(p, b, D, idx * V, mean, rstd, vf, o);
        store_f32<T, V>(h_r + idx * V, o);
      }
    }
  } else {
    // Rows too long for registers: write x_out, then read it back (each thread reads only what it
    // wrote, so no barrier is needed for visibility). Shifted sums as in modulated_layer_norm.cu.
    float k = 0.f;
    {
      float v0[1], a0[1], g0[1];
      load_f32<T, 1>(xr, v0);
      load_f32<T, 1>(yr, a0);
      load_param<P, 1>(gate_r, 0, 1.f, g0);
      k = round_to<T>(v0[0] + g0[0] * a0[0]);
    }
    float sum = 0.f, sq = 0.f;
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      Packed<T, V> v;
      residual<T, P, V>(xr, yr, gate_r, xo_r, idx * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) { const float d = v[j] - k; sum += d; sq += d * d; }
    }
    float mean, rstd;
    shifted_row_stats(sum, sq, k, inv_d, eps, red, mean, rstd);
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      float v[V], o[V];
      load_f32<T, V>(xo_r + idx * V, v);
      finish<P, V>(p, b, D, idx * V, mean, rstd, v, o);
      store_f32<T, V>(h_r + idx * V, o);
    }
  }
}

template <typename T, typename P, int V>
void launch(const T* x, const T* y, const Params& p, T* x_out, T* h, int64_t B, int64_t N, int64_t D, int64_t sxb,
            int64_t sxn, int64_t syb, int64_t syn, float eps, cudaStream_t stream) {
  const int64_t rows = B * N;
  // A warp per row at D=1152 bf16 (5 vectors per lane, 82 registers): the GPU-tested configuration
  // (benchmarks/RESULTS.md §1). Two warps per row (plan_row(D / V, V == 1, 4)) timed faster in a harness but
  // was never checked for correctness on the GPU, so it is not enabled.
  const RowPlan plan = plan_row(D / V, V == 1);
  const dim3 block = plan.threads == 32 ? dim3(32, ROWS_PER_WARP_BLOCK) : dim3(plan.threads, 1);
  const int64_t grid = (rows + block.y - 1) / block.y;
  if (grid > 0x7fffffff) throw std::invalid_argument("gated_residual_norm: too many rows (B*N) for one launch");
  dispatch_vpt<V == 1>(plan.vpt, [&](auto vpt) {
    gated_residual_norm_kernel<T, P, V, decltype(vpt)::value>
        <<<unsigned(grid), block, 0, stream>>>(x, y, p, x_out, h, rows, N, D, sxb, sxn, syb, syn, eps);
  });
}

}  // namespace

void gated_residual_norm(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate, std::uintptr_t shift,
                         std::uintptr_t scale, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t x_out,
                         std::uintptr_t h, int64_t B, int64_t N, int64_t D, int64_t stride_xb, int64_t stride_xn,
                         int64_t stride_yb, int64_t stride_yn, double eps, int x_dtype, int param_dtype,
                         std::uintptr_t stream) {
  constexpr const char* OP = "gated_residual_norm";
  if (B < 0 || N < 0 || D < 0) throw std::invalid_argument("gated_residual_norm: B, N, D must be >= 0");
  if (B * N * D == 0) return;
  if (!x || !y || !x_out || !h) throw std::invalid_argument("gated_residual_norm: x, y, x_out, h must be non-null");
  if (!(eps > 0)) throw std::invalid_argument("gated_residual_norm: eps must be > 0");
  DeviceGuard guard(reinterpret_cast<const void*>(x));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto as_ptr = [](std::uintptr_t v) { return reinterpret_cast<const void*>(v); };
  const Params p{as_ptr(gate), as_ptr(shift), as_ptr(scale), as_ptr(weight), as_ptr(bias)};
  dispatch_dtypes(OP, x_dtype, param_dtype, [&](auto t, auto pt) {
    using T = typename decltype(t)::type;
    using P = typename decltype(pt)::type;
    constexpr int V = 16 / sizeof(T);
    auto* xp = reinterpret_cast<const T*>(x);
    auto* yp = reinterpret_cast<const T*>(y);
    auto* xo = reinterpret_cast<T*>(x_out);
    auto* hp = reinterpret_cast<T*>(h);
    bool vec = D % V == 0 && stride_xb % V == 0 && stride_xn % V == 0 && stride_yb % V == 0 && stride_yn % V == 0;
    for (const void* q : {as_ptr(x), as_ptr(y), as_ptr(x_out), as_ptr(h)}) vec = vec && aligned16(q);
    for (const void* q : {p.gate, p.shift, p.scale, p.weight, p.bias}) vec = vec && (q == nullptr || aligned16(q));
    if (vec)
      launch<T, P, V>(xp, yp, p, xo, hp, B, N, D, stride_xb, stride_xn, stride_yb, stride_yn, float(eps), s);
    else
      launch<T, P, 1>(xp, yp, p, xo, hp, B, N, D, stride_xb, stride_xn, stride_yb, stride_yn, float(eps), s);
  });
  check_launch(OP);
}

}  // namespace eek
