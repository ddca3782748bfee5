// Weight-only W{2,3,4,8} x A16: a bandwidth-bound GEMV (M small) and a dequantizer
// (large M: dequantize once, then cuBLAS). Layouts: kernels/cuda/README.md.
// No CUDA headers are included so NVRTC (CuPy) and nvcc both compile this file as is.
typedef unsigned int u32;
typedef unsigned short u16;

struct F16 {};
struct BF16 {};

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u16 f2bf(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

template <class T> struct Cvt;
template <> struct Cvt<F16> {
  static __device__ __forceinline__ float load(u16 v) { return h2f(v); }
  static __device__ __forceinline__ u16 store(float f) { return f2h(f); }
};
template <> struct Cvt<BF16> {
  static __device__ __forceinline__ float load(u16 v) { return bf2f(v); }
  static __device__ __forceinline__ u16 store(float f) { return f2bf(f); }
};

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) { u32 r; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) { u32 r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) { u32 r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r; }
__device__ __forceinline__ u32 lop_and_or(u32 a, u32 b, u32 c) {  // (a & b) | c in one LOP3
  u32 r; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}
__device__ __forceinline__ float h2sum(u32 v) { return h2f((u16)(v & 0xffff)) + h2f((u16)(v >> 16)); }

// Pair j of a word holds codes (2j, 2j+1) at bits [B*j, B*j+B) and [16+B*j, ...): OR-ing them into
// the mantissa of fp16 1024.0 (0x6400) gives half2(1024+q0, 1024+q1) in one LOP3.
template <int B>
__device__ __forceinline__ u32 pair_codes(u32 word, int j) {
  const u32 mask = ((1u << B) - 1u) * 0x00010001u;
  return lop_and_or(word >> (B * j), mask, 0x64006400u);
}
// W3 = a 2-bit word (bits 0-1) + a 1-bit word holding bit 2 (the pair's bits at hj and 16+hj).
// hj is a compile-time constant after unrolling, so the shift below is a single instruction.
__device__ __forceinline__ u32 pair_codes3(u32 lo, u32 hi, int j, int hj) {
  const u32 hs = hj >= 2 ? (hi >> (hj - 2)) : (hi << (2 - hj));
  return lop_and_or(hs, 0x00040004u, pair_codes<2>(lo, j));
}

// Accumulates one packed word (C codes, one scale group) against x. fp16: dequantize and multiply
// in f16x2 (products are output-sized, so no overflow), flush each word to fp32. bf16: fp32 FMAs.
template <class T> struct WordDot;
template <> struct WordDot<F16> {
  static __device__ __forceinline__ float run(const u32* qpairs, int npairs, const u32* x, u32 sz) {
    const u32 zero2 = (sz >> 16) * 0x00010001u;            // half2(1024+z, 1024+z)
    const u32 scale2 = (sz & 0xffffu) * 0x00010001u;
    u32 acc = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) if (j < npairs) acc = hfma2(hmul2(hsub2(qpairs[j], zero2), scale2), x[j], acc);
    return h2sum(acc);
  }
};
template <> struct WordDot<BF16> {
  static __device__ __forceinline__ float run(const u32* qpairs, int npairs, const u32* x, u32 sz) {
    const u32 zero2 = (sz >> 16) * 0x00010001u;
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) if (j < npairs) {
      const u32 d = hsub2(qpairs[j], zero2);
      acc = fmaf(h2f((u16)(d & 0xffff)), bf2f((u16)(x[j] & 0xffff)), acc);
      acc = fmaf(h2f((u16)(d >> 16)), bf2f((u16)(x[j] >> 16)), acc);
    }
    return acc * h2f((u16)(sz & 0xffff));
  }
};

template <int B> struct Fmt { static const int C = 32 / B; static const int CHUNK = 4 * C; };  // codes per word / per 16 B
template <> struct Fmt<3> { static const int C = 16; static const int CHUNK = 64; };          // lo words of 16 codes

// y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g] + bias[n].
// Each warp owns R rows; each lane streams 16-byte chunks of those rows (U chunks in flight per row);
// the MT activation rows are read through L1; lanes are reduced with shuffles at the end.
template <int B, int MT, class T>
__global__ void __launch_bounds__(256) wonly_gemv(
    const u32* __restrict__ wq, const u32* __restrict__ whi, const u32* __restrict__ sz,
    const u16* __restrict__ x, const u16* __restrict__ bias, u16* __restrict__ y,
    int M, int N, int K, int row_words, int G, int gshift) {
  const int R = 2, U = 4;
  const int C = Fmt<B>::C, NP = C / 2;
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
  const int m0 = blockIdx.y * MT;
  if (row0 >= N) return;
  const int nchunks = row_words >> 2;
  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  for (int c0 = lane; c0 < nchunks; c0 += 32 * U) {
    uint4 w[U][R];
    uint2 h[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int c = c0 + 32 * u, n = row0 + r;
        const bool ok = c < nchunks && n < N;
        w[u][r] = ok ? __ldg(reinterpret_cast<const uint4*>(wq + (size_t)n * row_words) + c) : make_uint4(0, 0, 0, 0);
        if (B == 3) h[u][r] = ok ? __ldg(reinterpret_cast<const uint2*>(whi + (size_t)n * (row_words >> 1)) + c) : make_uint2(0, 0);
      }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c >= nchunks) break;
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {
        const int k0 = c * Fmt<B>::CHUNK + wi * C;
        if (k0 >= K) break;
        const int g = k0 >> gshift;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int n = row0 + r;
          if (n >= N) break;
          const u32 word = (&w[u][r].x)[wi];
          u32 q[8];
          if (B == 3) {
            const u32 hi = (&h[u][r].x)[wi >> 1];
#pragma unroll
            for (int j = 0; j < NP; ++j) q[j] = pair_codes3(word, hi, j, (wi & 1) * 8 + j);
          } else {
#pragma unroll
            for (int j = 0; j < NP; ++j) q[j] = pair_codes<(B == 3 ? 2 : B)>(word, j);
          }
          const u32 s = __ldg(sz + (size_t)n * G + g);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (m0 + m >= M) break;
            u32 xv[8];
            const u32* xp = reinterpret_cast<const u32*>(x + (size_t)(m0 + m) * K + k0);
            if (NP == 2) { const uint2 v = __ldg(reinterpret_cast<const uint2*>(xp)); xv[0] = v.x; xv[1] = v.y; }
            else {
#pragma unroll
              for (int v4 = 0; v4 < NP / 4; ++v4) {
                const uint4 v = __ldg(reinterpret_cast<const uint4*>(xp) + v4);
                xv[4 * v4] = v.x; xv[4 * v4 + 1] = v.y; xv[4 * v4 + 2] = v.z; xv[4 * v4 + 3] = v.w;
              }
            }
            acc[m][r] += WordDot<T>::run(q, NP, xv, s);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      const int n = row0 + r;
      if (lane == 0 && n < N && m0 + m < M)
        y[(size_t)(m0 + m) * N + n] = Cvt<T>::store(v + (bias ? Cvt<T>::load(bias[n]) : 0.f));
    }
}

// Dequantizes one packed word (C codes) per thread into w[n, k] = (q - z) * s.
template <int B, class T>
__global__ void wonly_dequant(const u32* __restrict__ wq, const u32* __restrict__ whi, const u32* __restrict__ sz,
                              u16* __restrict__ w, int N, int K, int row_words, int G, int gshift) {
  const int C = Fmt<B>::C;
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int n = (int)(idx / (size_t)row_words), wi = (int)(idx % (size_t)row_words);
  const int k0 = wi * C;
  if (n >= N || k0 >= K) return;
  const u32 word = wq[(size_t)n * row_words + wi];
  const u32 s = sz[(size_t)n * G + (k0 >> gshift)];
  const float scale = h2f((u16)(s & 0xffff)), zero = h2f((u16)(s >> 16)) - 1024.f;
  u32 hi = 0;
  if (B == 3) hi = whi[(size_t)n * (row_words >> 1) + (wi >> 1)];
#pragma unroll
  for (int j = 0; j < C / 2; ++j) {
    const u32 q = (B == 3) ? pair_codes3(word, hi, j, (wi & 1) * 8 + j) : pair_codes<(B == 3 ? 2 : B)>(word, j);
    const float q0 = h2f((u16)(q & 0xffff)) - 1024.f, q1 = h2f((u16)(q >> 16)) - 1024.f;
    w[(size_t)n * K + k0 + 2 * j] = Cvt<T>::store((q0 - zero) * scale);
    w[(size_t)n * K + k0 + 2 * j + 1] = Cvt<T>::store((q1 - zero) * scale);
  }
}

#ifdef QTOOL_INSTANTIATE  // offline nvcc compile check and SASS inspection; CuPy instantiates by name
template __global__ void wonly_gemv<4, 1, F16>(const u32*, const u32*, const u32*, const u16*, const u16*, u16*, int, int, int, int, int, int);
template __global__ void wonly_gemv<2, 1, F16>(const u32*, const u32*, const u32*, const u16*, const u16*, u16*, int, int, int, int, int, int);
template __global__ void wonly_gemv<3, 4, BF16>(const u32*, const u32*, const u32*, const u16*, const u16*, u16*, int, int, int, int, int, int);
template __global__ void wonly_gemv<8, 2, F16>(const u32*, const u32*, const u32*, const u16*, const u16*, u16*, int, int, int, int, int, int);
template __global__ void wonly_dequant<3, F16>(const u32*, const u32*, const u32*, u16*, int, int, int, int, int);
template __global__ void wonly_dequant<4, BF16>(const u32*, const u32*, const u32*, u16*, int, int, int, int, int);
#endif
