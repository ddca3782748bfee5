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
__device__ __forceinline__ u32 lop_and_or(u32 a, u32 b, u32 c) {  // (a & b) | c in one LOP3
  u32 r; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}

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

// 16-byte streaming load of packed weights: read once, so keep them out of L1.
__device__ __forceinline__ uint4 ld_stream(const u32* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// B-operand pairs (q - z) * s in the activation type, from half2(1024 + q) codes. One word's
// constants are set once (`Deq d(sz)`), then 2 (fp16: HSUB2, HMUL2) or 5 (bf16) instructions per pair.
template <class T> struct Deq;
template <> struct Deq<F16> {
  u32 zero2, scale2;
  Deq() = default;
  __device__ __forceinline__ explicit Deq(u32 sz) : zero2((sz >> 16) * 0x00010001u), scale2((sz & 0xffffu) * 0x00010001u) {}
  __device__ __forceinline__ u32 operator()(u32 q) const { return hmul2(hsub2(q, zero2), scale2); }
};
template <> struct Deq<BF16> {
  u32 zero2; float scale;
  Deq() = default;
  __device__ __forceinline__ explicit Deq(u32 sz) : zero2((sz >> 16) * 0x00010001u), scale(h2f((u16)(sz & 0xffffu))) {}
  __device__ __forceinline__ u32 operator()(u32 q) const {
    const u32 d = hsub2(q, zero2);  // exact integers q - z in fp16
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(h2f((u16)(d >> 16)) * scale), "f"(h2f((u16)(d & 0xffff)) * scale));
    return r;
  }
};

template <class T> __device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<F16>(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<BF16>(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// C codes of x row `xp` starting at k0 (C/2 u32 of halves); zeros when the row is absent or k0 >= K.
// K % 32 == 0 and C | 32, so a word's codes are all inside K or all outside.
template <int C>
__device__ __forceinline__ void load_x(u32 (&v)[C / 2], const u16* xp, bool ok) {
  if (C == 4) {
    const uint2 t = ok ? __ldg(reinterpret_cast<const uint2*>(xp)) : make_uint2(0, 0);
    v[0] = t.x; v[1] = t.y;
  } else {
#pragma unroll
    for (int i = 0; i < C / 8; ++i) {
      const uint4 t = ok ? __ldg(reinterpret_cast<const uint4*>(xp) + i) : make_uint4(0, 0, 0, 0);
      v[4 * i] = t.x; v[4 * i + 1] = t.y; v[4 * i + 2] = t.z; v[4 * i + 3] = t.w;
    }
  }
}

template <int B> struct Fmt { static const int C = 32 / B; };   // codes per data word
template <> struct Fmt<3> { static const int C = 16; };          // W3: 2-bit lo words + 1-bit hi words
const int GEMV_WARPS = 4, GEMV_UNROLL = 4;

// y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g] + bias[n] for M <= 16, on tensor cores.
// A block owns NT tiles of 8 rows; its GEMV_WARPS warps split K. Per k-block (4 lanes x 16 B of one
// row = 16*C codes) lane (gid, tig) streams the 16 B of row n0 + gid holding codes k-block*16C +
// tig*4C + [0, 4C), which are exactly its B fragments of 4C/16 m16n8k16 steps if the mma's k index
// is permuted (step t: logical k {2tig, 2tig+1, 2tig+8, 2tig+9} = codes 4t..4t+3 of the lane's span;
// A takes the same permutation, so the dot product is unchanged). The A fragment is x rows gid and
// gid + 8 (M16) at the same codes, read through L1; absent rows are zero registers, not loads.
// Each 16-byte weight load feeds NT * 4C/16 mma for all M rows at once: M = 16 costs ~ M = 1.
template <int B, int NT, bool M16, class T>
__global__ void __launch_bounds__(GEMV_WARPS * 32) wonly_gemv(
    const u32* __restrict__ wq, const u32* __restrict__ whi, const u32* __restrict__ sz,
    const u16* __restrict__ x, const u16* __restrict__ bias, u16* __restrict__ y,
    int M, int N, int K, int row_words, int G, int gshift) {
  const int C = Fmt<B>::C, SPAN = 4 * C, U = GEMV_UNROLL;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int nblk = row_words >> 4;
  int rows[NT];
  bool rok[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    rows[t] = (blockIdx.x * NT + t) * 8 + gid;
    rok[t] = rows[t] < N;
    if (!rok[t]) rows[t] = 0;
  }
  const bool x0 = gid < M, x1 = M16 && gid + 8 < M;
  const u16* xp0 = x + (size_t)(x0 ? gid : 0) * K;
  const u16* xp1 = x + (size_t)(x1 ? gid + 8 : 0) * K;
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;

  for (int c0 = warp; c0 < nblk; c0 += GEMV_WARPS * U) {
    uint4 w[U][NT];
    uint2 h[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int c = c0 + u * GEMV_WARPS;
        const bool ok = rok[t] && c < nblk;
        w[u][t] = ok ? ld_stream(wq + (size_t)rows[t] * row_words + c * 16 + tig * 4) : make_uint4(0, 0, 0, 0);
        if (B == 3)
          h[u][t] = ok ? __ldg(reinterpret_cast<const uint2*>(whi + (size_t)rows[t] * (row_words >> 1) + c * 8) + tig)
                       : make_uint2(0, 0);
      }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * GEMV_WARPS;
      if (c >= nblk) break;
      const int kspan = c * 4 * SPAN + tig * SPAN;
      // the lane's span (<= 64 codes) meets at most two groups (groups are >= 32 and aligned)
      const int g0 = min(kspan >> gshift, G - 1), g1 = min((kspan + SPAN - 1) >> gshift, G - 1);  // K padding: clamp
      Deq<T> d0[NT], d1[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const u32 s0 = __ldg(sz + (size_t)rows[t] * G + g0);
        d0[t] = Deq<T>(s0);
        d1[t] = Deq<T>(g1 == g0 ? s0 : __ldg(sz + (size_t)rows[t] * G + g1));
      }
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {
        const int k0 = kspan + wi * C;
        const bool kin = k0 < K;
        u32 xa[C / 2], xb[C / 2];
        load_x<C>(xa, xp0 + k0, x0 && kin);
        if (M16) load_x<C>(xb, xp1 + k0, x1 && kin);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const Deq<T>& dq = min(k0 >> gshift, G - 1) == g0 ? d0[t] : d1[t];
          const u32 word = (&w[u][t].x)[wi];
#pragma unroll
          for (int st = 0; st < C / 4; ++st) {
            u32 q0, q1;
            if (B == 3) {
              const u32 hi = (&h[u][t].x)[wi >> 1];
              q0 = pair_codes3(word, hi, 2 * st, (wi & 1) * 8 + 2 * st);
              q1 = pair_codes3(word, hi, 2 * st + 1, (wi & 1) * 8 + 2 * st + 1);
            } else {
              q0 = pair_codes<(B == 3 ? 2 : B)>(word, 2 * st);
              q1 = pair_codes<(B == 3 ? 2 : B)>(word, 2 * st + 1);
            }
            mma16816<T>(acc[t], xa[2 * st], M16 ? xb[2 * st] : 0u, xa[2 * st + 1], M16 ? xb[2 * st + 1] : 0u, dq(q0), dq(q1));
          }
        }
      }
    }
  }
  // reduce the warps' K slices: c0, c1 = (row gid, cols 2tig, 2tig+1), c2, c3 = row gid + 8
  __shared__ float red[GEMV_WARPS][NT][4][32];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][t][e][lane] = acc[t][e];
  __syncthreads();
  for (int i = threadIdx.x; i < NT * 4 * 32; i += blockDim.x) {
    const int t = i >> 7, e = (i >> 5) & 3, l = i & 31;
    const int m = (l >> 2) + 8 * (e >> 1), n = (blockIdx.x * NT + t) * 8 + 2 * (l & 3) + (e & 1);
    if (m >= M || n >= N) continue;
    float v = bias ? Cvt<T>::load(bias[n]) : 0.f;
#pragma unroll
    for (int wp = 0; wp < GEMV_WARPS; ++wp) v += red[wp][t][e][l];
    y[(size_t)m * N + n] = Cvt<T>::store(v);
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
#define GEMV(B, NT, M16, T) template __global__ void wonly_gemv<B, NT, M16, T>(const u32*, const u32*, const u32*, const u16*, const u16*, u16*, int, int, int, int, int, int);
GEMV(4, 1, false, F16)
GEMV(2, 1, false, F16)
GEMV(3, 2, true, BF16)
GEMV(8, 2, true, F16)
template __global__ void wonly_dequant<3, F16>(const u32*, const u32*, const u32*, u16*, int, int, int, int, int);
template __global__ void wonly_dequant<4, BF16>(const u32*, const u32*, const u32*, u16*, int, int, int, int, int);
#endif
