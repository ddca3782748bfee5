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

// One pipeline stage of a warp: U k-blocks x NT row tiles of packed weights (+ W3 hi words) and the
// raw sz words of the <= 2 groups each lane's span meets. Volatile loads keep their program order
// against the (volatile) mma, so a prefetched stage is in flight while the previous one is computed.
template <int B, int NT> struct Stage {
  uint4 w[GEMV_UNROLL][NT];
  uint2 h[GEMV_UNROLL][NT];
  u32 s0[GEMV_UNROLL][NT], s1[GEMV_UNROLL][NT];
};
__device__ __forceinline__ uint4 ld_stream_if(const u32* p, bool ok) {
  uint4 v = make_uint4(0, 0, 0, 0);
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %5, 0;\n @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4]; }"
               : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w) : "l"(p), "r"((int)ok));
  return v;
}
__device__ __forceinline__ uint2 ld_v2_if(const u32* p, bool ok) {
  uint2 v = make_uint2(0, 0);
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %3, 0;\n @p ld.global.nc.v2.u32 {%0, %1}, [%2]; }" : "+r"(v.x), "+r"(v.y) : "l"(p), "r"((int)ok));
  return v;
}
__device__ __forceinline__ u32 ld_u32_if(const u32* p, bool ok) {
  u32 v = 0;
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %2, 0;\n @p ld.global.nc.u32 %0, [%1]; }" : "+r"(v) : "l"(p), "r"((int)ok));
  return v;
}

// y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g] + bias[n] for M <= 16, on tensor cores.
// A block owns NT tiles of 8 rows; its GEMV_WARPS warps split K. Per k-block (4 lanes x 16 B of one
// row = 16*C codes) lane (gid, tig) streams the 16 B of row n0 + gid holding codes k-block*16C +
// tig*4C + [0, 4C), which are exactly its B fragments of 4C/16 m16n8k16 steps if the mma's k index
// is permuted (step t: logical k {2tig, 2tig+1, 2tig+8, 2tig+9} = codes 4t..4t+3 of the lane's span;
// A takes the same permutation, so the dot product is unchanged). The A fragment is x rows gid and
// gid + 8 (M16) at the same codes, read through L1; absent rows are zero registers, not loads.
// Each 16-byte weight load feeds NT * 4C/16 mma for all M rows at once: M = 16 costs ~ M = 1.
// Software pipeline: stage i+1 (U k-blocks of weights and scales, 2 KB per warp) is issued before
// stage i is dequantized, so each warp always has U 16-byte loads in flight (Little's law: ~23 KB
// per SM at 3 TB/s x ~1 us; 16 warps/SM x 2 KB = 32 KB).
template <int B, int NT, bool M16, class T>
__global__ void __launch_bounds__(GEMV_WARPS * 32, 4) wonly_gemv(
    const u32* __restrict__ wq, const u32* __restrict__ whi, const u32* __restrict__ sz,
    const u16* __restrict__ x, const u16* __restrict__ bias, u16* __restrict__ y,
    int M, int N, int K, int row_words, int G, int gshift) {
  const int C = Fmt<B>::C, SPAN = 4 * C, U = GEMV_UNROLL, STEP = GEMV_WARPS * U;
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

  auto load = [&](Stage<B, NT>& st, int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * GEMV_WARPS;
      const int kspan = c * 4 * SPAN + tig * SPAN;
      const int g0 = min(kspan >> gshift, G - 1), g1 = min((kspan + SPAN - 1) >> gshift, G - 1);  // K padding: clamp
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const bool ok = rok[t] && c < nblk;
        st.w[u][t] = ld_stream_if(wq + (size_t)rows[t] * row_words + c * 16 + tig * 4, ok);
        if (B == 3) st.h[u][t] = ld_v2_if(whi + (size_t)rows[t] * (row_words >> 1) + c * 8 + tig * 2, ok);
        st.s0[u][t] = ld_u32_if(sz + (size_t)rows[t] * G + g0, ok);
        if (SPAN > 32) st.s1[u][t] = ld_u32_if(sz + (size_t)rows[t] * G + g1, ok && g1 != g0);  // else g1 == g0
      }
    }
  };

  Stage<B, NT> cur;
  load(cur, warp);
  for (int c0 = warp; c0 < nblk; c0 += STEP) {
    Stage<B, NT> nxt;
    load(nxt, c0 + STEP);  // all predicated off past the row's end
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * GEMV_WARPS;
      if (c >= nblk) break;
      const int kspan = c * 4 * SPAN + tig * SPAN;
      const int g0 = min(kspan >> gshift, G - 1);
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {
        const int k0 = kspan + wi * C;
        const bool kin = k0 < K;
        u32 xa[C / 2], xb[C / 2];
        load_x<C>(xa, xp0 + k0, x0 && kin);
        if (M16) load_x<C>(xb, xp1 + k0, x1 && kin);
        const bool first = min(k0 >> gshift, G - 1) == g0;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const Deq<T> dq(SPAN <= 32 || first ? cur.s0[u][t] : cur.s1[u][t]);
          const u32 word = (&cur.w[u][t].x)[wi];
#pragma unroll
          for (int st = 0; st < C / 4; ++st) {
            u32 q0, q1;
            if (B == 3) {
              const u32 hi = (&cur.h[u][t].x)[wi >> 1];
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
    cur = nxt;
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

// Dequantizes one packed word (C codes) per thread into w[n, k] = (q - z) * s, written as 8- or
// 16-byte vectors (scalar 2-byte stores made this kernel 10x slower than its bandwidth).
template <int B, class T>
__global__ void wonly_dequant(const u32* __restrict__ wq, const u32* __restrict__ whi, const u32* __restrict__ sz,
                              u16* __restrict__ w, int N, int K, int row_words, int G, int gshift) {
  const int C = Fmt<B>::C;
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int n = (int)(idx / (size_t)row_words), wi = (int)(idx % (size_t)row_words);
  const int k0 = wi * C;
  if (n >= N || k0 >= K) return;
  const u32 word = __ldg(wq + (size_t)n * row_words + wi);
  const Deq<T> dq(__ldg(sz + (size_t)n * G + (k0 >> gshift)));
  u32 hi = 0;
  if (B == 3) hi = __ldg(whi + (size_t)n * (row_words >> 1) + (wi >> 1));
  u32 out[C / 2];
#pragma unroll
  for (int j = 0; j < C / 2; ++j)
    out[j] = dq((B == 3) ? pair_codes3(word, hi, j, (wi & 1) * 8 + j) : pair_codes<(B == 3 ? 2 : B)>(word, j));
  u32* dst = reinterpret_cast<u32*>(w + (size_t)n * K + k0);  // 2C-byte aligned: K % 32 == 0
  if (C == 4) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(out[0], out[1 % (C / 2)]);
  } else {
#pragma unroll
    for (int i = 0; i < C / 8; ++i)
      reinterpret_cast<uint4*>(dst)[i] = make_uint4(out[4 * i], out[(4 * i + 1) % (C / 2)], out[(4 * i + 2) % (C / 2)], out[(4 * i + 3) % (C / 2)]);
  }
}

#ifdef QTOOL_INSTANTIATE  // offline nvcc compile check and SASS inspection; CuPy instantiates by name
#define GEMV(B, NT, M16, T) template __global__ void wonly_gemv<B, NT, M16, T>(const u32*, const u32*, const u32*, const u16*, const u16*, u16*, int, int, int, int, int, int);
GEMV(4, 1, false, F16)
GEMV(2, 1, false, F16)
GEMV(3, 1, true, BF16)
GEMV(4, 2, true, F16)
GEMV(8, 2, true, F16)
template __global__ void wonly_dequant<3, F16>(const u32*, const u32*, const u32*, u16*, int, int, int, int, int);
template __global__ void wonly_dequant<2, F16>(const u32*, const u32*, const u32*, u16*, int, int, int, int, int);
template __global__ void wonly_dequant<8, F16>(const u32*, const u32*, const u32*, u16*, int, int, int, int, int);
template __global__ void wonly_dequant<4, BF16>(const u32*, const u32*, const u32*, u16*, int, int, int, int, int);
#endif
