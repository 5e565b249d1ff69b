// group_norm_act: GroupNorm with optional affine, then * (1 + scale[b, c]) + shift[b, c], then an
// activation (ADM / diffusers ResBlocks: norm -> (FiLM) -> SiLU).
//
// x (B, C, H, W) as planes: plane (b, c) is HW contiguous elements at x + b*stride_xb + c*stride_xc.
// weight, bias (C,) or null; scale, shift contiguous (B, C) or null; all in the param dtype P.
// out contiguous (B, C, HW) in x's dtype T. activation: 0 none, 1 gelu (erf), 2 gelu_tanh, 3 silu.
//
// Bytes at (64, 256, 32, 32) bf16: one read and one write of 33.6 MB, 22 us at 3.0 TB/s.
//
// Why one block per (b, g) with a block reduction (and not a split reduction across blocks): the usual
// diffusion shapes give B*G in the thousands (64 x 32 = 2048 groups of 8 x 1024 elements), many blocks
// per SM, and a group of up to 512 threads x 8 vectors (32768 bf16 / 16384 fp32 elements) stays in
// registers, so x is read exactly once with no second kernel or global atomics. Larger groups (e.g.
// 16 channels x 64 x 64 = 65536) are streamed: one read for the statistics, one for the output, the
// second mostly from L2 (a 128 KB group is long gone from L1 but 50 MB of L2 holds hundreds of them).
// Small B*G (under ~2 blocks per SM) would prefer a split reduction; that is a known gap, rare at the
// batch sizes sampling runs at.
#include "common.cuh"

namespace eek {
namespace {

struct Params {
  const void* weight;
  const void* bias;
  const void* scale;
  const void* shift;
};

// Per-channel multiplier and offset: ((v - mean) * rstd * w + bias) * (1 + scale) + shift
//                                  = (v - mean) * a + c. Kept centred so a large mean cannot cancel.
template <typename P>
__device__ __forceinline__ void channel_coef(const Params& p, int64_t b, int64_t C, int64_t c, float rstd, float& a,
                                             float& off) {
  const float w = p.weight ? to_float<P>(static_cast<const P*>(p.weight)[c]) : 1.f;
  const float bi = p.bias ? to_float<P>(static_cast<const P*>(p.bias)[c]) : 0.f;
  const float sc = p.scale ? to_float<P>(static_cast<const P*>(p.scale)[b * C + c]) : 0.f;
  const float sh = p.shift ? to_float<P>(static_cast<const P*>(p.shift)[b * C + c]) : 0.f;
  a = rstd * w * (1.f + sc);
  off = bi * (1.f + sc) + sh;
}

// T: x dtype; P: param dtype; V: elements per vector (16 bytes, or 1 when HW or an address is not
// 16-byte aligned; a vector never straddles two channels since V divides HW); VPT: vectors per thread
// (0: stream the group). Vector indices are 32-bit: the launcher checks the group has < 2**31 elements.
template <typename T, typename P, int V, int VPT>
__global__ void __launch_bounds__(512)
group_norm_act_kernel(const T* __restrict__ x, Params p, T* __restrict__ out, int64_t C, int64_t HW, int64_t G,
                      int64_t sxb, int64_t sxc, float eps, int activation) {
  __shared__ float red[32];
  const int64_t b = blockIdx.x / G, g = blockIdx.x - b * G;
  const int64_t cg = C / G, c0 = g * cg;
  const unsigned vpc = unsigned(HW / V);  // vectors per channel plane
  const unsigned nvec = unsigned(cg) * vpc;
  const T* xg = x + b * sxb + c0 * sxc;
  T* og = out + (b * C + c0) * HW;  // out is contiguous: the group is one run of cg * HW elements
  const float inv_n = 1.f / float(cg * HW);
  auto x_at = [&](unsigned idx) {
    const unsigned cl = idx / vpc;
    return xg + cl * sxc + int64_t(idx - cl * vpc) * V;
  };

  if constexpr (VPT > 0) {
    Packed<T, V> v[VPT];  // the group, in x's dtype (half the registers of floats for bf16/fp16)
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const unsigned idx = threadIdx.x + unsigned(i) * blockDim.x;
      if (idx < nvec) {
        v[i].load(x_at(idx));
      } else {
        v[i].zero();
      }
    }
    float mean, rstd;
    register_row_stats<T, V, VPT>(v, nvec, inv_n, eps, red, mean, rstd);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const unsigned idx = threadIdx.x + unsigned(i) * blockDim.x;
      if (idx < nvec) {
        float a, off, o[V];
        channel_coef<P>(p, b, C, c0 + idx / vpc, rstd, a, off);
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = activate((v[i][j] - mean) * a + off, activation);
        store_f32<T, V>(og + int64_t(idx) * V, o);
      }
    }
  } else {
    // Shifted sums (by the group's first element) so E[x^2] - E[x]^2 does not cancel for |mean| >> std.
    const float k = to_float<T>(xg[0]);
    float sum = 0.f, sq = 0.f;
    for (unsigned idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      float v[V];
      load_f32<T, V>(x_at(idx), v);
#pragma unroll
      for (int j = 0; j < V; ++j) { const float d = v[j] - k; sum += d; sq += d * d; }
    }
    float mean, rstd;
    shifted_row_stats(sum, sq, k, inv_n, eps, red, mean, rstd);
    for (unsigned idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      float v[V], a, off, o[V];
      load_f32<T, V>(x_at(idx), v);
      channel_coef<P>(p, b, C, c0 + idx / vpc, rstd, a, off);
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = activate((v[j] - mean) * a + off, activation);
      store_f32<T, V>(og + int64_t(idx) * V, o);
    }
  }
}

// Threads and vectors per thread for a group of nvec vectors: the fewest threads with at most 4
// vectors each (several 16-byte loads in flight per thread, modest registers), else 512 threads with
// up to 8, else stream. The scalar fallback takes 8 per thread (as plan_row: fewer instantiations).
RowPlan plan_group(int64_t nvec, bool scalar) {
  for (int threads = 32; threads <= 512; threads *= 2) {
    const int64_t vpt = (nvec + threads - 1) / threads;
    if (vpt <= (scalar ? MAX_VPT : 4)) return {threads, scalar ? MAX_VPT : int(vpt < 1 ? 1 : vpt)};
  }
  const int64_t vpt = (nvec + 511) / 512;
  return vpt <= MAX_VPT ? RowPlan{512, int(vpt)} : RowPlan{512, 0};
}

template <typename T, typename P, int V>
void launch(const T* x, const Params& p, T* out, int64_t B, int64_t C, int64_t HW, int64_t G, int64_t sxb,
            int64_t sxc, float eps, int activation, cudaStream_t stream) {
  const RowPlan plan = plan_group((C / G) * HW / V, V == 1);
  dispatch_vpt<V == 1>(plan.vpt, [&](auto vpt) {
    group_norm_act_kernel<T, P, V, decltype(vpt)::value>
        <<<unsigned(B * G), plan.threads, 0, stream>>>(x, p, out, C, HW, G, sxb, sxc, eps, activation);
  });
}

}  // namespace

void group_norm_act(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t scale,
                    std::uintptr_t shift, std::uintptr_t out, int64_t B, int64_t C, int64_t HW, int64_t G,
                    int64_t stride_xb, int64_t stride_xc, double eps, int activation, int x_dtype, int param_dtype,
                    std::uintptr_t stream) {
  constexpr const char* OP = "group_norm_act";
  if (B < 0 || C < 0 || HW < 0) throw std::invalid_argument("group_norm_act: B, C, HW must be >= 0");
  if (G <= 0 || C % G != 0)
    throw std::invalid_argument("group_norm_act: G must be positive and divide C, got C=" + std::to_string(C) +
                                " G=" + std::to_string(G));
  if (activation < 0 || activation > 3)
    throw std::invalid_argument("group_norm_act: activation must be 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (silu), got " +
                                std::to_string(activation));
  if (B * C * HW == 0) return;
  if (!x || !out) throw std::invalid_argument("group_norm_act: x and out must be non-null");
  if (!(eps > 0)) throw std::invalid_argument("group_norm_act: eps must be > 0");
  if ((C / G) * HW >= (int64_t(1) << 31)) throw std::invalid_argument("group_norm_act: a group must hold < 2**31 elements");
  if (B * G > 0x7fffffff) throw std::invalid_argument("group_norm_act: too many groups (B*G) for one launch");
  DeviceGuard guard(reinterpret_cast<const void*>(x));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto as_ptr = [](std::uintptr_t v) { return reinterpret_cast<const void*>(v); };
  const Params p{as_ptr(weight), as_ptr(bias), as_ptr(scale), as_ptr(shift)};
  dispatch_dtypes(OP, x_dtype, param_dtype, [&](auto t, auto pt) {
    using T = typename decltype(t)::type;
    using P = typename decltype(pt)::type;
    constexpr int V = 16 / sizeof(T);
    auto* xp = reinterpret_cast<const T*>(x);
    auto* op = reinterpret_cast<T*>(out);
    const bool vec = HW % V == 0 && stride_xb % V == 0 && stride_xc % V == 0 && aligned16(xp) && aligned16(op);
    if (vec)
      launch<T, P, V>(xp, p, op, B, C, HW, G, stride_xb, stride_xc, float(eps), activation, s);
    else
      launch<T, P, 1>(xp, p, op, B, C, HW, G, stride_xb, stride_xc, float(eps), activation, s);
  });
  check_launch(OP);
}

}  // namespace eek
