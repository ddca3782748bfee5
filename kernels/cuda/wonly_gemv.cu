// Weight-only W{2,3,4,8} x A16: a bandwidth-bound GEMV (M small) and a dequantizer
// (large M: dequantize once, then cuBLAS). Layouts: kernels/cuda/README.md.
// No CUDA headers are included so NVRTC (CuPy) and nvcc both compile this file as is.
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct F16 {};
struct BF16 {};

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u16 f2bf(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

template <class T> struct Cvt;
template <> struct Cvt<F16> {
  static const bool f16 = true;
  static __device__ __forceinline__ float load(u16 v) { return h2f(v); }
  static __device__ __forceinline__ u16 store(float f) { return f2h(f); }
};
template <> struct Cvt<BF16> {
  static const bool f16 = false;
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

// Scales and zeros are stored as fp16 scales [N, G] and uint8 zeros [N, G] (3 bytes per group); the
// dequantizers take a group as one word sz = fp16 scale bits | fp16(1024 + zero) bits << 16, built on
// load: fp16(1024 + z) is 0x6400 | z for an integer 0 <= z < 1024 (ulp 1 in [1024, 2048)), so it is exact.
__device__ __forceinline__ u32 sz_word(u32 scale_bits, u32 zero) { return scale_bits | ((0x6400u | zero) << 16); }
__device__ __forceinline__ u32 ld_sz(const u16* scales, const u8* zeros, size_t i) { return sz_word(__ldg(scales + i), __ldg(zeros + i)); }
// A group's scale and zero as loaded into registers ahead of use (ld_sz_if); the word is built where it
// is used: built at the load, it waited for the load in the loop iteration that issued it (ptxas keeps
// it before the loop's back edge), which stalled the SIMT GEMV on the stage it had just issued.
struct Sz {
  u32 s, z;  // fp16 scale bits, zero (zero-extended)
  __device__ __forceinline__ u32 word() const { return sz_word(s, z); }
};

// B-operand pairs (q - z) * s in the activation type, from half2(1024 + q) codes. One group's
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

// One pipeline stage of a warp: U k-blocks x NT row tiles of packed weights (+ W3 hi words). Volatile
// loads keep their program order against the (volatile) mma, so a prefetched stage is in flight while
// the previous one is computed. The scales and zeros of the <= 2 groups each lane's span meets are
// prefetched into L1 with the stage and loaded where used (like x): held in registers, a group takes two
// (scale, zero), and the M16 instantiations spilled them right after their loads (waiting on them).
template <int B, int NT> struct Stage {
  uint4 w[GEMV_UNROLL][NT];
  uint2 h[GEMV_UNROLL][NT];
};
__device__ __forceinline__ void prefetch_sz_if(const u16* scales, const u8* zeros, size_t i, bool ok) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %2, 0;\n @p prefetch.global.L1 [%0];\n @p prefetch.global.L1 [%1]; }"
               :: "l"(scales + i), "l"(zeros + i), "r"((int)ok));
}
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
// Scale and zero of group i (2 + 1 byte loads); both 0 when !ok (word 0x64000000: scale 0).
__device__ __forceinline__ Sz ld_sz_if(const u16* scales, const u8* zeros, size_t i, bool ok) {
  Sz v = {0, 0};
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %4, 0;\n @p ld.global.nc.u16 %0, [%2];\n @p ld.global.nc.u8 %1, [%3]; }"
               : "+r"(v.s), "+r"(v.z) : "l"(scales + i), "l"(zeros + i), "r"((int)ok));
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
// Software pipeline: stage i+1 (U k-blocks of weights, 2 KB per warp, with an L1 prefetch of their
// scales and zeros) is issued before stage i is dequantized, so each warp always has U 16-byte loads
// in flight (Little's law: ~23 KB per SM at 3 TB/s x ~1 us; 16 warps/SM x 2 KB = 32 KB).
template <int B, int NT, bool M16, class T>
__global__ void __launch_bounds__(GEMV_WARPS * 32, 4) wonly_gemv(
    const u32* __restrict__ wq, const u32* __restrict__ whi, const u16* __restrict__ scales, const u8* __restrict__ zeros,
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
        prefetch_sz_if(scales, zeros, (size_t)rows[t] * G + g0, ok);
        if (SPAN > 32) prefetch_sz_if(scales, zeros, (size_t)rows[t] * G + g1, ok && g1 != g0);  // else g1 == g0
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
      const int g0 = min(kspan >> gshift, G - 1), g1 = min((kspan + SPAN - 1) >> gshift, G - 1);
      u32 sz0[NT], sz1[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        sz0[t] = ld_sz(scales, zeros, (size_t)rows[t] * G + g0);
        sz1[t] = SPAN > 32 ? ld_sz(scales, zeros, (size_t)rows[t] * G + g1) : sz0[t];
      }
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
          const Deq<T> dq(SPAN <= 32 || first ? sz0[t] : sz1[t]);
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

// ---- SIMT GEMV for small M (wonly_gemv_simt) ---------------------------------------------------
// Bandwidth design, per 16-byte weight word ("chunk", 4 data words = 4C codes of one row):
// lanes of a warp stream 32 consecutive chunks of a row (512 B, coalesced) for SIMT_R rows at once,
// U chunks apart per row, into two register buffers of a step each, each refilled two steps ahead as
// soon as it is computed (R*U*512 B always in flight per warp). x [MT, K] is staged once per block in
// shared memory, swizzled so that the lanes' x loads of one weight word are contiguous (no bank
// conflicts), and shared by the R rows. Per pair of codes: LOP3 (+ a shared SHF), one HSUB2/HFMA2
// giving the exact integers q - z in fp16, then one HFMA2 per x row into a half2 partial; the
// partial is flushed into fp32 (x the fp32 scale) once per chunk (or half chunk when group = 32).
// Unscaled partials are bounded: x is staged pre-scaled by 2^-e (per x row, e from max|x|) so that
// n * (2^b - 1) * max|x'| <= 2^15 for the n products a partial sums; y = 2^e * acc. bf16 x is
// staged the same way as fp16 (exact down to 2^-(13+L) of the row's max: fp16 holds bf16's 8-bit
// mantissa there), so both activation types run the same fp16 arithmetic.
// W warps per block (a template parameter): 8 (2 blocks per SM) for the plain GEMV, 16 (one block per
// SM) with the fused prologue, whose passes over x every block makes in full: one block per SM makes
// them once per SM. Both leave 128 registers per thread.
const int SIMT_R = 2, SIMT_PREFETCH = 4;

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) { u32 r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r; }
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) { u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel)); return r; }
__device__ __forceinline__ u32 f2h2(float lo, float hi) { u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
// per-half min / max of two fp16x2 (f16) or bf16x2 words: selections, so exact
__device__ __forceinline__ u32 hmin2(u32 a, u32 b, bool f16) {
  u32 r;
  if (f16) asm("min.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else asm("min.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ u32 hmax2(u32 a, u32 b, bool f16) {
  u32 r;
  if (f16) asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

__host__ __device__ constexpr int ilog2c(int n) { return n < 2 ? 0 : 1 + ilog2c(n >> 1); }
// fp16 bits of an integer 1 <= n < 2048, or of 2^-e; both exact
__host__ __device__ constexpr u32 f16_int(int n) { return ((u32)(ilog2c(n) + 15) << 10) | (((u32)n << (10 - ilog2c(n))) & 0x3ffu); }
__host__ __device__ constexpr u32 f16_pow2_neg(int e) { return (u32)(15 - e) << 10; }
// largest L with n * qmax * 2^L <= 2^15: the bound on |x'| that keeps an fp16 partial of n products finite
__host__ __device__ constexpr int xbound_log2(int n_qmax, int l = 0) { return (n_qmax << (l + 1)) <= 32768 ? xbound_log2(n_qmax, l + 1) : l; }

// Codes of a data word go into the fp16 mantissa of 1024.0 with one LOP3 and no shift while their
// field lies in bits [0, 10): pair p at bit BL*p reads 1024 + q * 2^(BL*p); HFMA2 by 2^-(BL*p) with
// nz[p] = 1024 - 1024*2^-(BL*p) - (1024 + z) gives q - z exactly. Pairs p >= PD come from word >> SH.
// W8 takes bytes with PRMT instead.
template <int B> struct SimtFmt {
  static const int BL = B == 3 ? 2 : B, C = Fmt<B>::C;
  static const int PD = B == 4 ? 2 : B == 2 ? 5 : B == 3 ? 4 : 1;  // W3: 3-bit fields (lo | hi << 2) fit for p < 4
  static const int SH = BL * PD;
  static const int PIECE = C < 8 ? C : 8;  // x codes per lane load (16 B, W8: 8 B)
};

template <int B> struct Zc {  // one row's group constants: exact q - z in fp16, fp32 scale
  u32 z2, nz[SimtFmt<B>::PD];
  float s;
};
template <int B> __device__ __forceinline__ Zc<B> zc_of(u32 sz) {
  typedef SimtFmt<B> F;
  Zc<B> z;
  z.z2 = prmt(sz, 0u, 0x3232u);  // half2(1024 + z)
#pragma unroll
  for (int p = 1; p < F::PD; ++p) z.nz[p] = hsub2(f16_int(1024 - (1024 >> (F::BL * p))) * 0x00010001u, z.z2);
  z.s = h2f((u16)(sz & 0xffffu));
  return z;
}

// The fields of pair p (codes 2p, 2p+1) of data word `word` in place, in an fp16 pair's mantissa: of
// 1024.0 (magic: half2(1024 + q * 2^at)) or of +0 (half2(q * 2^(at - 24)), subnormal). W3 takes bit 2
// from `hi`, whose pair (word parity)*8 + p holds it. p and par are compile-time after unrolling, so
// shifts are immediates.
template <int B> __device__ __forceinline__ int simt_at(int p) { return B == 8 ? 0 : SimtFmt<B>::BL * (p < SimtFmt<B>::PD ? p : p - SimtFmt<B>::PD); }
template <int B> __device__ __forceinline__ u32 simt_field(u32 word, u32 hi, int par, int p, bool magic) {
  typedef SimtFmt<B> F;
  if (B == 8) return prmt(word, magic ? 0x64646464u : 0u, p ? 0x4341u : 0x4240u);
  const int at = simt_at<B>(p);
  const u32 src = p < F::PD ? word : word >> F::SH;
  u32 v = lop_and_or(src, (((1u << F::BL) - 1u) << at) * 0x00010001u, magic ? 0x64006400u : 0u);
  if (B == 3) {
    const int hj = par * 8 + p, to = at + 2;
    v = lop_and_or(to >= hj ? hi << (to - hj) : hi >> (hj - to), (4u << at) * 0x00010001u, v);
  }
  return v;
}
// half2(q - z) of pair p
template <int B> __device__ __forceinline__ u32 simt_pair(u32 word, u32 hi, int par, int p, const Zc<B>& z) {
  const u32 v = simt_field<B>(word, hi, par, p, true);
  const int at = simt_at<B>(p);
  return B == 8 || at == 0 ? hsub2(v, z.z2) : hfma2(v, f16_pow2_neg(at) * 0x00010001u, z.nz[at / SimtFmt<B>::BL]);
}

// Asynchronous 16/8-byte global -> shared copy, zero-filled when !ok (src is not read then).
template <int N> __device__ __forceinline__ void cp_async_zfill(void* dst, const void* src, bool ok) {
  u32 d;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(d), "l"(src), "n"(N), "r"(ok ? N : 0) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

template <int B, int U, int NSEG> struct SimtStage {
  uint4 w[U][SIMT_R];
  uint2 h[U][SIMT_R];  // W3 hi words
  Sz s[U][SIMT_R][NSEG];
};

// Per-row reductions over the block (W warps) of NV values per row; every thread gets the results.
template <int W, int MT, int NV, class Op> __device__ __forceinline__ void block_reduce(float (&v)[NV][MT], Op op) {
  __shared__ float red[W][NV][MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int a = 0; a < NV; ++a)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int o = 16; o; o >>= 1) v[a][m] = op(a, v[a][m], __shfl_xor_sync(0xffffffffu, v[a][m], o));
      if (lane == 0) red[warp][a][m] = v[a][m];
    }
  __syncthreads();
#pragma unroll
  for (int a = 0; a < NV; ++a)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      v[a][m] = red[0][a][m];
#pragma unroll
      for (int w = 1; w < W; ++w) v[a][m] = op(a, v[a][m], red[w][a][m]);
    }
  __syncthreads();
}

// The ops a decoder runs between a linear's producer and its input, applied to the staged x rows
// (mv of them; the zero padding stays zero through every op) in the arithmetic of torch's eager ops
// (fp32 math, each op's result rounded to T), so the fused GEMV sees the values the unfused one would:
//   gated: x = silu(gate) * up (gate staged as x, up as MT more rows at uint4 offset `up`, ldx = 2K);
//   norm (its weight staged as one more row at offset `nw`): transformers' RMSNorm,
//   x = w * T(x * rsqrt(mean(x^2) + eps)) (the mean over K: the padding adds zeros);
//   abits: per-row asymmetric fake quantization (core.quantizer.fake_quant_per_token; scale =
//   max(hi - lo, 1e-8) * (1 / (2^b - 1)) as CUDA torch divides a tensor by a Python number).
// up and the norm weight are staged in x's swizzle, so the passes walk shared memory linearly (the
// swizzle is a permutation of k the ops do not see; walked in k order, 8 lanes hit one bank); each
// pass also gathers the statistics of its output for the next op. With abits, the quantization pass
// also gives each thread's max |x'| bits per row (amax; returns true), which the kernel needs next.
// CODES (abits, B <= 4): x is left as its integer codes q = c - zx instead (x' = q * sx), staged as fp16
// q * 2^(8 - at) for the pair field at bit `at` that meets it (simt_field, unnormalized: the product is
// q * code * 2^-16), with sx and sum_k q per row in code_scale / code_sum (shared memory).
template <int B, int W, int MT, class T, bool CODES>
__device__ bool simt_prologue(uint4* xsm, int XQ, int up, int nw, bool norm, int mv, int K, int gated, float eps, int abits,
                              u32 (&amax)[MT], float* code_scale, float* code_sum) {
  const int THREADS = W * 32;
  auto get = [&](int i, float (&v)[8]) {
    const uint4 t = xsm[i];
    const u32 w[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = Cvt<T>::load((u16)(w[e >> 1] >> (16 * (e & 1))));
  };
  auto put = [&](int i, const float (&v)[8]) {
    u32 o[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = (u32)Cvt<T>::store(v[2 * e]) | ((u32)Cvt<T>::store(v[2 * e + 1]) << 16);
    xsm[i] = make_uint4(o[0], o[1], o[2], o[3]);
  };
  float st[2][MT];  // per row: the sum of squares (norm) or (min, max) (quantization) of a pass's output
  // f(m, unit index within the row, v) on every unit of rows < mv, v written back when `write`
  auto each = [&](bool write, auto f) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= mv) break;
      for (int i = threadIdx.x; i < XQ; i += THREADS) {
        float v[8];
        get(m * XQ + i, v);
        f(m, i, v);
        if (write) put(m * XQ + i, v);
      }
    }
  };
  auto stats = [&](int m, const float (&v)[8], bool squares) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (squares) {
        st[0][m] = fmaf(v[e], v[e], st[0][m]);
      } else {
        st[0][m] = fminf(st[0][m], v[e]);
        st[1][m] = fmaxf(st[1][m], v[e]);
      }
    }
  };
  auto reset = [&]() {
#pragma unroll
    for (int m = 0; m < MT; ++m) st[0][m] = st[1][m] = 0.f;  // sums start at 0; quantization ranges include 0
  };
  auto rnd = [](float f) { return Cvt<T>::load(Cvt<T>::store(f)); };
  auto sum = [](int, float a, float b) { return a + b; };
  auto range = [](int a, float x, float y) { return a ? fmaxf(x, y) : fminf(x, y); };
  reset();
  if (gated) {
    each(true, [&](int m, int i, float (&v)[8]) {
      float u[8];
      get(up + m * XQ + i, u);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = rnd(rnd(v[e] / (1.f + expf(-v[e]))) * u[e]);
      if (norm || abits) stats(m, v, norm);
    });
  } else if (norm) {
    each(false, [&](int m, int, float (&v)[8]) { stats(m, v, true); });
  } else if (abits) {  // the range on the 16-bit pairs as staged: no conversions
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= mv) break;
      u32 lo = 0, hi = 0;  // +0 pairs: the range includes 0
      for (int i = threadIdx.x; i < XQ; i += THREADS) {
        const uint4 t = xsm[m * XQ + i];
        lo = hmin2(lo, hmin2(hmin2(t.x, t.y, Cvt<T>::f16), hmin2(t.z, t.w, Cvt<T>::f16), Cvt<T>::f16), Cvt<T>::f16);
        hi = hmax2(hi, hmax2(hmax2(t.x, t.y, Cvt<T>::f16), hmax2(t.z, t.w, Cvt<T>::f16), Cvt<T>::f16), Cvt<T>::f16);
      }
      st[0][m] = fminf(Cvt<T>::load((u16)(lo & 0xffffu)), Cvt<T>::load((u16)(lo >> 16)));
      st[1][m] = fmaxf(Cvt<T>::load((u16)(hi & 0xffffu)), Cvt<T>::load((u16)(hi >> 16)));
    }
  }
  if (norm) {
    block_reduce<W, MT, 1>(reinterpret_cast<float(&)[1][MT]>(st), sum);
    float r[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) r[m] = rsqrtf(st[0][m] / (float)K + eps);
    reset();
    each(true, [&](int m, int i, float (&v)[8]) {
      float w[8];
      get(nw + i, w);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = rnd(w[e] * rnd(v[e] * r[m]));
      if (abits) stats(m, v, false);
    });
  }
  if (!abits) {
    __syncthreads();
    return false;
  }
  block_reduce<W, MT, 2>(st, range);
  // x' = (clamp(rint(x / s) + z, 0, top) - z) * s = clamp(rint(x / s), -z, top - z) * s (integers: exact).
  // rint(x / s) is taken as rint(x * (1 / s)): |x / s| <= 2^b (the range includes 0), so the product is
  // within 2^b * 2^-23 <= 3.1e-5 of x / s and of its rounded quotient (2^-24 relative); the two round
  // alike unless x * (1 / s) lies within 1e-4 of a half integer, where the IEEE division decides.
  const float top = (float)((1 << abits) - 1);
  float qs[MT], qr[MT], qlo[MT], qhi[MT], qmax[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float s = fmaxf(st[1][m] - st[0][m], 1e-8f) * (1.f / top), z = fminf(fmaxf(rintf(-st[0][m] / s), 0.f), top);
    qs[m] = s;
    qr[m] = 1.f / s;
    qlo[m] = 0.f - z;  // +0 for z = 0, as (0 + z) - z gives
    qhi[m] = top - z;
    qmax[m] = 0.f;
  }
  float qsum[1][MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) qsum[0][m] = 0.f;
  const int NP = SimtFmt<B>::C / SimtFmt<B>::PIECE;
  each(!CODES, [&](int m, int i, float (&v)[8]) {
    u32 o[4];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float t = v[e] * qr[m];
      float q = rintf(t);
      if (fabsf(t - q) > 0.4999f) q = rintf(v[e] / qs[m]);
      q = fminf(fmaxf(q, qlo[m]), qhi[m]);
      if (CODES) {  // unit i is piece (i / 32) % NP of its data word: element e meets pair piece * 4 + e / 2
        qsum[0][m] += q;
        const u32 h = f2h(q * __int_as_float((135 - simt_at<B>(((i >> 5) % NP) * 4 + e / 2)) << 23));
        o[e / 2] = e & 1 ? o[e / 2] | h << 16 : h;
      } else {
        qmax[m] = fmaxf(qmax[m], fabsf(q));
        v[e] = q * qs[m];
      }
    }
    if (CODES) xsm[m * XQ + i] = make_uint4(o[0], o[1], o[2], o[3]);
  });
  if (CODES) {
    block_reduce<W, MT, 1>(qsum, sum);  // integers below 2^24: exact
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (threadIdx.x == m) {
        code_scale[m] = qs[m];
        code_sum[m] = qsum[0][m];
      }
  }
  // max |x'| = T(max |q| * s): the product and the rounding to T are monotone and odd (CODES: unused)
#pragma unroll
  for (int m = 0; m < MT; ++m) amax[m] = CODES ? 0u : Cvt<T>::store(qmax[m] * qs[m]) & 0x7fffu;
  __syncthreads();
  return true;
}

// y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g] + bias[n] for x rows m in slices of MT
// (block b: slice b % S, S = ceil(M / MT)). NSEG = 2 when a chunk spans two groups (C = 16, group 32).
// Warps own row groups of SIMT_R rows (gw, gw + TW, ...; TW = nblk * W); the step sequence
// (row group, k-step) is flat so the prefetch runs across row groups. Dynamic shared memory:
// MT * XP fp16 with XP = KI * 32U * 4C (row padded to whole steps, zeros beyond K). MODE: SIMT_PLAIN;
// SIMT_FUSED, with the fused prologue (simt_prologue; its operands staged after x) and the residual
// add; SIMT_CODES, the same with x quantized to its integer codes (abits, B <= 4, one group per row):
// each pair multiplies its unnormalized fields (one LOP3 instead of LOP3 + HFMA2), and the zero point
// comes off per row, y = sx * (s * sum q * code - s * z * sum q) (weight scale s, zero z).
// Separate instantiations, so that the plain GEMV's code is exactly the code without the others.
const int SIMT_PLAIN = 0, SIMT_FUSED = 1, SIMT_CODES = 2;
template <int B, int MT, int U, int NSEG, class T, int MODE, int W>
__global__ void __launch_bounds__(W * 32, 16 / W) wonly_gemv_simt(
    const u32* __restrict__ wq, const u32* __restrict__ whi, const u16* __restrict__ scales, const u8* __restrict__ zeros,
    const u16* __restrict__ x, const u16* __restrict__ bias, u16* y,
    int M, int N, int K, int row_words, int G, int gshift, int nblk,
    int ldx, int gated, const u16* __restrict__ norm_w, float eps, int abits, const u16* res) {
  typedef SimtFmt<B> F;
  const bool PRO = MODE != SIMT_PLAIN, CODES = MODE == SIMT_CODES && B <= 4;
  const int C = F::C, PIECE = F::PIECE, NP = C / PIECE, R = SIMT_R, THREADS = W * 32;
  const int WPS = 4 / NSEG;  // data words per segment (one scale)
  const int L = xbound_log2(WPS * (C / 2) * ((1 << B) - 1));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int S = (M + MT - 1) / MT, slice = blockIdx.x % S, blk = blockIdx.x / S;
  const int m0 = slice * MT, mv = min(MT, M - m0);
  const int nchunk = row_words >> 2, KI = (nchunk + 32 * U - 1) / (32 * U), XP = KI * 32 * U * 4 * C;
  const int nrg = (N + R - 1) / R, TW = nblk * W, gw = blk * W + warp;

  // Load cursor (row group, k-step). Addresses are clamped instead of bounds-checked: chunks past the
  // row end meet zero x (shared memory is zero-padded to whole steps) and rows past N are not stored,
  // so the clamped copies add no bytes (same 512 B span). Only a step past the warp's last row group
  // is switched off, by a predicate rather than a branch: ptxas hoisted the compute of the current
  // stage above a branched load block, which serialized loads and compute.
  int lrg = gw, lk = 0;
  auto load = [&](SimtStage<B, U, NSEG>& st) {
    const bool live = lrg < nrg;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const size_t row = min(lrg * R + r, N - 1);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = min((lk * U + u) * 32 + lane, nchunk - 1);
        st.w[u][r] = ld_stream_if(wq + row * row_words + c * 4, live);
        if (B == 3) st.h[u][r] = ld_v2_if(whi + row * (row_words >> 1) + c * 2, live);
#pragma unroll
        for (int sg = 0; sg < NSEG; ++sg) st.s[u][r][sg] = ld_sz_if(scales, zeros, row * G + min((c * 4 * C + sg * WPS * C) >> gshift, G - 1), live);
      }
    }
    if (++lk == KI) { lk = 0; lrg += TW; }
  };
  SimtStage<B, U, NSEG> sa, sb;
  load(sa);  // two steps of weights stream in while x is staged
  load(sb);
  if (PRO) {
    // and with a prologue, SIMT_PREFETCH more steps into L2 (a cache line per 8 lanes): the prologue's
    // passes outlast the two register stages, which then left the memory system idle
    int prg = lrg, pk = lk;
    for (int t = 0; t < SIMT_PREFETCH; ++t) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (prg < nrg && (lane & 7) == 0)
            prefetch_l2(wq + (size_t)min(prg * R + r, N - 1) * row_words + min((pk * U + u) * 32 + lane, nchunk - 1) * 4);
      if (++pk == KI) { pk = 0; prg += TW; }
    }
  }

  // Stage x rows m0.. swizzled: the x of (chunk c, word j, piece h) is unit ((c/32 * 4 + j) * NP + h) * 32
  // + c%32 of PIECE codes. cp.async puts every copy of the block in flight at once (a register loop
  // waited one L2 round trip per iteration, ~1 us per 4 KB of x per block); zero-filled past K.
  extern __shared__ uint4 xsm[];
  __shared__ u32 s_amax[W][MT];
  __shared__ int s_e[MT];
  const int XQ = XP / 8;  // uint4 per x row
  // the two 8-byte halves of x[m, k .. k + 8) in shared memory (W8: words j and j + 1 are 32 units apart)
  auto unit = [&](int m, int k, uint2*& lo, uint2*& hi) {
    const int c = k / (4 * C), j = (k / C) & 3;
    if (PIECE == 8) {
      lo = reinterpret_cast<uint2*>(xsm + m * XQ + (((c >> 5) * 4 + j) * NP + (k % C) / 8) * 32 + (c & 31));
      hi = lo + 1;
    } else {
      lo = reinterpret_cast<uint2*>(xsm + m * XQ) + ((c >> 5) * 4 + j) * 32 + (c & 31);
      hi = lo + 32;
    }
  };
  // the prologue's operands are staged with x, in x's swizzle: up (gated) as MT more rows, then the norm weight
  const int up = MT * XQ, nw = (PRO && gated ? 2 : 1) * MT * XQ;  // in uint4 units
  const int rows = PRO && gated ? 2 * MT : MT, units = rows * XQ + (PRO && norm_w ? XQ : 0);
  for (int i = threadIdx.x; i < units; i += THREADS) {
    const int r = i / XQ, k = (i - r * XQ) * 8, m = r < rows ? r % MT : 0;
    const bool ok = (r < rows ? m < mv : true) && k < K;
    const u16* src = !ok ? x : r >= rows ? norm_w + k : x + (size_t)(m0 + m) * ldx + (r >= MT ? K : 0) + k;
    const int base = 2 * (r >= rows ? nw : r >= MT ? up : 0);  // uint2 units
    uint2 *lo, *hi;
    unit(m, k, lo, hi);
    if (PIECE == 8) {
      cp_async_zfill<16>(lo + base, src, ok);
    } else {
      cp_async_zfill<8>(lo + base, src, ok);
      cp_async_zfill<8>(hi + base, src + 4, ok);
    }
  }
  cp_async_wait_all();
  __syncthreads();
  // x is used as fp16 * 2^-e[m]: e from max |x[m]|, taken on the bits (order-preserving for |x|);
  // CODES: as the prologue leaves it (e = 0)
  __shared__ float s_sx[MT], s_qsum[MT];
  u32 amax[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) amax[m] = 0;
  const bool gathered = PRO && simt_prologue<B, W, MT, T, CODES>(xsm, XQ, up, nw, norm_w != nullptr, mv, K, gated, eps, abits, amax,
                                                                  s_sx, s_qsum);
  if (!CODES) {
    if (!gathered) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        for (int i = threadIdx.x; i < XQ; i += THREADS) {
          const uint4 v = xsm[m * XQ + i];
          const u32 a = v.x & 0x7fff7fffu, b = v.y & 0x7fff7fffu, cc = v.z & 0x7fff7fffu, d = v.w & 0x7fff7fffu;
          amax[m] = max(amax[m], max(max(max(a & 0xffffu, a >> 16), max(b & 0xffffu, b >> 16)), max(max(cc & 0xffffu, cc >> 16), max(d & 0xffffu, d >> 16))));
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int o = 16; o; o >>= 1) amax[m] = max(amax[m], __shfl_xor_sync(0xffffffffu, amax[m], o));
      if (lane == 0) s_amax[warp][m] = amax[m];
    }
    __syncthreads();
    if (threadIdx.x < MT) {
      u32 a = 0;
#pragma unroll
      for (int w = 0; w < W; ++w) a = max(a, s_amax[w][threadIdx.x]);
      const float fa = Cvt<T>::load((u16)a);
      int e = fa > 0.f ? ((__float_as_int(fa) >> 23) & 0xff) - 127 + 1 - L : 0;  // |x| < 2^(e + L)
      if (Cvt<T>::f16) e = max(e, 0);  // fp16 x: never scale up (exact as is)
      s_e[threadIdx.x] = min(max(e, -100), 100);
    }
    __syncthreads();
    bool rescale = !Cvt<T>::f16;  // bf16 x always converts
#pragma unroll
    for (int m = 0; m < MT; ++m) rescale |= s_e[m] != 0;
    if (rescale) {
      for (int i = threadIdx.x; i < MT * XQ; i += THREADS) {
        const int m = i / XQ;
        const float f = __int_as_float((127 - s_e[m]) << 23);
        uint4 v = xsm[i];
        u32* q = &v.x;
#pragma unroll
        for (int t = 0; t < 4; ++t) q[t] = f2h2(Cvt<T>::load((u16)(q[t] & 0xffffu)) * f, Cvt<T>::load((u16)(q[t] >> 16)) * f);
        xsm[i] = v;
      }
      __syncthreads();
    }
  }

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
  int crg = gw, ck = 0;  // compute cursor
  auto compute = [&](const SimtStage<B, U, NSEG>& st) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int cb = ck * U + u;  // this k-block of 32 chunks
#pragma unroll
      for (int sg = 0; sg < NSEG; ++sg) {
        Zc<B> zc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) zc[r] = zc_of<B>(st.s[u][r][sg].word());
        u32 part[R][MT];
#pragma unroll
        for (int jj = 0; jj < WPS; ++jj) {
          const int j = sg * WPS + jj;
#pragma unroll
          for (int h = 0; h < NP; ++h) {
            u32 xv[MT][PIECE / 2];
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              if (PIECE == 8) {
                const uint4 t = xsm[m * XQ + ((cb * 4 + j) * NP + h) * 32 + lane];
                xv[m][0] = t.x; xv[m][1 % (PIECE / 2)] = t.y; xv[m][2 % (PIECE / 2)] = t.z; xv[m][3 % (PIECE / 2)] = t.w;
              } else {
                const uint2 t = reinterpret_cast<const uint2*>(xsm + m * XQ)[(cb * 4 + j) * 32 + lane];
                xv[m][0] = t.x; xv[m][1] = t.y;
              }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const u32 word = (&st.w[u][r].x)[j], hi = B == 3 ? (&st.h[u][r].x)[j >> 1] : 0u;
#pragma unroll
              for (int i = 0; i < PIECE / 2; ++i) {
                const int p = h * (PIECE / 2) + i;
                const u32 d = CODES ? simt_field<B>(word, hi, j & 1, p, false) : simt_pair<B>(word, hi, j & 1, p, zc[r]);
#pragma unroll
                for (int m = 0; m < MT; ++m)
                  part[r][m] = jj == 0 && h == 0 && i == 0 ? hmul2(xv[m][i], d) : hfma2(xv[m][i], d, part[r][m]);
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int m = 0; m < MT; ++m)
            acc[r][m] = fmaf(h2f((u16)(part[r][m] >> 16)), zc[r].s, fmaf(h2f((u16)(part[r][m] & 0xffffu)), zc[r].s, acc[r][m]));
      }
    }
    if (ck == KI - 1) {  // row group done: sum the lanes, write R x mv outputs
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          float v = acc[r][m];
#pragma unroll
          for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          const int row = crg * R + r;
          if (lane == r * MT + m && m < mv && row < N) {
            const size_t at = (size_t)(m0 + m) * N + row;
            const float b = bias ? Cvt<T>::load(bias[row]) : 0.f;
            u16 out;
            if (CODES) {  // v = s * sum q * code * 2^-16 (one group: the last chunk's scale and zero are the row's)
              const Sz sz = st.s[U - 1][r][NSEG - 1];
              out = Cvt<T>::store(fmaf(fmaf(v, 65536.f, -h2f((u16)sz.s) * (float)sz.z * s_qsum[m]), s_sx[m], b));
            } else {
              out = Cvt<T>::store(fmaf(v, __int_as_float((127 + s_e[m]) << 23), b));
            }
            if (PRO && res) out = Cvt<T>::store(Cvt<T>::load(res[at]) + Cvt<T>::load(out));  // residual + y, as torch adds
            y[at] = out;
          }
          acc[r][m] = 0.f;
        }
      ck = 0;
      crg += TW;
    } else {
      ++ck;
    }
  };

  // Ping-pong: a buffer is refilled (two steps ahead) as soon as it is computed, so one step is always
  // in flight during a compute, and the buffers are never copied. __syncwarp fences ptxas's scheduling:
  // without it, it sank some loads into the next compute (shorter register live ranges, W2/W3), which
  // shortens the time those loads have in flight.
  const int steps = (gw < nrg ? (nrg - 1 - gw) / TW + 1 : 0) * KI;
#pragma unroll 1
  for (int s = 0; s < steps; s += 2) {
    compute(sa);
    load(sa);
    __syncwarp();
    if (s + 1 == steps) break;
    compute(sb);
    load(sb);
    __syncwarp();
  }
}

// Dequantizes one packed word (C codes) per thread into w[n, k] = (q - z) * s, written as 8- or
// 16-byte vectors (scalar 2-byte stores made this kernel 10x slower than its bandwidth).
template <int B, class T>
__global__ void wonly_dequant(const u32* __restrict__ wq, const u32* __restrict__ whi, const u16* __restrict__ scales,
                              const u8* __restrict__ zeros, u16* __restrict__ w, int N, int K, int row_words, int G, int gshift) {
  const int C = Fmt<B>::C;
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int n = (int)(idx / (size_t)row_words), wi = (int)(idx % (size_t)row_words);
  const int k0 = wi * C;
  if (n >= N || k0 >= K) return;
  const u32 word = __ldg(wq + (size_t)n * row_words + wi);
  const Deq<T> dq(ld_sz(scales, zeros, (size_t)n * G + (k0 >> gshift)));
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

#ifdef __CUDACC__  // nvcc and NVRTC; the host tests build this file with g++ and leave this part out
// ---- Hopper GEMM for M > 16 (wonly_wgmma, sm_90a) -----------------------------------------------
// y^T = W x^T on wgmma: the dequantized weights are the A operand (registers), x the B operand (shared
// memory), so a warpgroup's m64 covers 64 weight rows and NT (16..128) x rows. A block of two
// warpgroups owns 128 weight rows and NT x rows; K is split over gridDim.z blocks (fp32 partials,
// wonly_splitk_reduce) so short shapes fill the SMs. Each stage (WG_BK = 128 codes) of the weight
// rows (as packed, + W3 hi words) and of x is copied by every thread with cp.async, WG_STAGES deep.
// x sits in wgmma's no-swizzle K-major layout: 8x8 core matrices of 128 contiguous bytes, the two
// k-octets of a k16 step 128 B apart (leading byte offset), 8-row groups 256 B apart (stride offset).
// Weight rows are padded by 16 B so the 8 rows a warp reads at once meet distinct banks. Lane (gid,
// tig) of warp w takes rows 16w + gid (+8) and codes {2tig, 2tig+1 | 2tig+8, 2tig+9} of each k16 step
// (pair tig of the octet's word: one SHF + LOP3 more than the GEMV), dequantized as in the GEMV.
typedef unsigned long long u64;
enum { WG_BK = 128, WG_ROWS = 128, WG_STAGES = 4, WG_THREADS = 256 };

template <int B> struct WgFmt {  // bytes of one weight row per stage, with the 16-byte pad
  static const int ROW = WG_BK * (B == 3 ? 2 : B) / 8, PITCH = ROW + 16, HI = B == 3 ? WG_BK / 8 : 0;
};
template <int B, int NT> struct WgStage {
  static const int X = NT * WG_BK * 2, W = WG_ROWS * WgFmt<B>::PITCH, H = WG_ROWS * WgFmt<B>::HI;
  static const int BYTES = (X + W + H + 127) / 128 * 128;
};

template <int NT, class T> __device__ __forceinline__ void wgmma_rs(float* d, const u32* a, u64 desc);
template <> __device__ __forceinline__ void wgmma_rs<16, F16>(float* d, const u32* a, u64 desc) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %13, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<16, BF16>(float* d, const u32* a, u64 desc) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %13, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<32, F16>(float* d, const u32* a, u64 desc) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %21, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<32, BF16>(float* d, const u32* a, u64 desc) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %21, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<64, F16>(float* d, const u32* a, u64 desc) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %37, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<64, BF16>(float* d, const u32* a, u64 desc) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %37, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<128, F16>(float* d, const u32* a, u64 desc) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<128, BF16>(float* d, const u32* a, u64 desc) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void cp_async_commit_group() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 d;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(p));
  return d;
}
// No-swizzle K-major descriptor: start >> 4, leading byte offset (k-octets) 128 >> 4, stride (8-row groups) 256 >> 4.
__device__ __forceinline__ u64 wg_desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)(256 >> 4) << 32);
}

// Codes (2j', 2j'+1) of a k16 step for lane tig, as half2(1024 + q): lo = k {2tig, 2tig+1}, hi = +8.
// `w` is the stage's weight row (words), `h` its W3 hi words, s the step (0..WG_BK/16).
template <int B>
__device__ __forceinline__ void wg_codes(const u32* w, const u32* h, int s, int tig, u32& lo, u32& hi) {
  if (B == 4) {
    lo = pair_codes<4>(w[2 * s], tig);
    hi = pair_codes<4>(w[2 * s + 1], tig);
  } else if (B == 8) {
    lo = pair_codes<8>(w[4 * s + (tig >> 1)], tig & 1);
    hi = pair_codes<8>(w[4 * s + 2 + (tig >> 1)], tig & 1);
  } else {
    const u32 word = w[s];
    lo = pair_codes<2>(word, tig);
    hi = pair_codes<2>(word, tig + 4);
    if (B == 3) {
      const u32 hw = h[s >> 1], hj = (s & 1) * 8 + tig;
      lo = lop_and_or((hw >> hj) << 2, 0x00040004u, lo);
      hi = lop_and_or((hw >> (hj + 4)) << 2, 0x00040004u, hi);
    }
  }
}

template <int B, int NT, class T>
__global__ void __launch_bounds__(WG_THREADS, 1) wonly_wgmma(
    const u32* __restrict__ wq, const u32* __restrict__ whi, const u16* __restrict__ scales, const u8* __restrict__ zeros,
    const u16* __restrict__ x, const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ partial,
    int M, int N, int K, int row_words, int G, int gshift, int x_stride, int tiles_per_split) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  typedef WgFmt<B> F;
  typedef WgStage<B, NT> S;
  extern __shared__ __align__(128) unsigned char wg_smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
  const int n0 = blockIdx.x * WG_ROWS, m0 = blockIdx.y * NT;
  const int ktiles = (K + WG_BK - 1) / WG_BK;
  const int kt0 = blockIdx.z * tiles_per_split, nk = min(ktiles, kt0 + tiles_per_split) - kt0;
  const int C = Fmt<B>::C, WPT = WG_BK / C;  // data words per row and stage
  const int hi_words = row_words >> 1;

  auto load_stage = [&](int buf, int kt) {
    unsigned char* st = wg_smem + buf * S::BYTES;
    for (int i = tid; i < NT * (WG_BK / 8); i += WG_THREADS) {  // x: 8 consecutive threads fill one core matrix
      const int r = i & 7, oct = (i >> 3) % (WG_BK / 8), g = (i >> 3) / (WG_BK / 8);
      const int m = m0 + g * 8 + r, k = kt * WG_BK + oct * 8;
      const bool ok = m < M && k < K;
      cp_async_zfill<16>(st + ((oct >> 1) * (NT / 8) + g) * 256 + (oct & 1) * 128 + r * 16,
                         x + (ok ? (size_t)m * x_stride + k : 0), ok);
    }
    for (int i = tid; i < WG_ROWS * (F::ROW / 16); i += WG_THREADS) {
      const int r = i / (F::ROW / 16), c = i % (F::ROW / 16);
      const int word = kt * WPT + c * 4;
      const bool ok = n0 + r < N && word < row_words;
      cp_async_zfill<16>(st + S::X + r * F::PITCH + c * 16, wq + (ok ? (size_t)(n0 + r) * row_words + word : 0), ok);
    }
    if (B == 3) {
      for (int i = tid; i < WG_ROWS; i += WG_THREADS) {
        const int word = kt * (WG_BK / 32);
        const bool ok = n0 + i < N && word < hi_words;
        cp_async_zfill<16>(st + S::X + S::W + i * F::HI, whi + (ok ? (size_t)(n0 + i) * hi_words + word : 0), ok);
      }
    }
  };

  // this lane's two rows within the block; the scale/zero of each quarter (32 codes) of a stage
  const int wr = warp * 16 + gid;  // warps 0-3: warpgroup 0 rows 0-63, warps 4-7: warpgroup 1 rows 64-127
  const int rA = min(n0 + wr, N - 1), rB = min(n0 + wr + 8, N - 1);
  float acc[NT / 2];
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) acc[i] = 0.f;

#pragma unroll
  for (int i = 0; i < WG_STAGES - 1; ++i) {
    if (i < nk) load_stage(i, kt0 + i);
    cp_async_commit_group();
  }
  for (int i = 0; i < nk; ++i) {
    const int kt = kt0 + i;
    u32 szA[4], szB[4];  // issued before the wait: L1/L2 latency hides behind it
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int g = min((kt * WG_BK + 32 * q) >> gshift, G - 1);
      szA[q] = ld_sz(scales, zeros, (size_t)rA * G + g);
      szB[q] = ld_sz(scales, zeros, (size_t)rB * G + g);
    }
    cp_async_wait_group<WG_STAGES - 2>();
    fence_proxy_async();
    __syncthreads();  // stage i is in shared memory, and every warpgroup is done with stage i - 1
    if (i + WG_STAGES - 1 < nk) load_stage((i + WG_STAGES - 1) % WG_STAGES, kt + WG_STAGES - 1);
    cp_async_commit_group();

    const unsigned char* st = wg_smem + (i % WG_STAGES) * S::BYTES;
    const u32* wA = reinterpret_cast<const u32*>(st + S::X + wr * F::PITCH);
    const u32* wB = reinterpret_cast<const u32*>(st + S::X + (wr + 8) * F::PITCH);
    const u32* hA = reinterpret_cast<const u32*>(st + S::X + S::W + wr * F::HI);
    const u32* hB = reinterpret_cast<const u32*>(st + S::X + S::W + (wr + 8) * F::HI);
    u32 a[WG_BK / 16][4];
#pragma unroll
    for (int s = 0; s < WG_BK / 16; ++s) {
      const Deq<T> dA(szA[s >> 1]), dB(szB[s >> 1]);
      u32 la, ha, lb, hb;
      wg_codes<B>(wA, hA, s, tig, la, ha);
      wg_codes<B>(wB, hB, s, tig, lb, hb);
      a[s][0] = dA(la); a[s][1] = dB(lb); a[s][2] = dA(ha); a[s][3] = dB(hb);
    }
    const u32 xs = smem_addr(st);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < WG_BK / 16; ++s) wgmma_rs<NT, T>(acc, a[s], wg_desc(xs + s * NT * 32));
    wgmma_commit();
    wgmma_wait0();  // dequantizing the next stage during this group measured no faster (a wash on H100)
  }
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) asm volatile("" : "+f"(acc[i])::"memory");

  // acc[4j + e]: weight row wr (+8 for e >= 2), x row m0 + 8j + 2tig + (e & 1)
#pragma unroll
  for (int j = 0; j < NT / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = n0 + wr + (e >> 1) * 8, m = m0 + 8 * j + 2 * tig + (e & 1);
      if (n >= N || m >= M) continue;
      if (gridDim.z > 1) {
        partial[((size_t)blockIdx.z * M + m) * N + n] = acc[4 * j + e];
      } else {
        const float v = acc[4 * j + e] + (bias ? Cvt<T>::load(bias[n]) : 0.f);
        y[(size_t)m * N + n] = Cvt<T>::store(v);
      }
    }
#else
  __trap();  // sm_90a only: the dispatch runs this path on compute capability 9.0
#endif
}

// y = sum over the K splits of partial [splits, M, N] fp32, + bias, in the activation type.
template <class T>
__global__ void wonly_splitk_reduce(const float* __restrict__ partial, const u16* __restrict__ bias, u16* __restrict__ y,
                                    int M, int N, int splits) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, MN = (size_t)M * N;
  if (i >= MN) return;
  float v = bias ? Cvt<T>::load(bias[i % N]) : 0.f;
  for (int z = 0; z < splits; ++z) v += partial[z * MN + i];
  y[i] = Cvt<T>::store(v);
}
#endif  // __CUDACC__

#ifdef QTOOL_INSTANTIATE  // offline nvcc compile check and SASS inspection; CuPy instantiates by name
// (tests/kernels/test_nvcc_compile.py checks every SIMT instantiation the dispatch can reach for spills)
#define GEMV(B, NT, M16, T) template __global__ void wonly_gemv<B, NT, M16, T>(const u32*, const u32*, const u16*, const u8*, const u16*, const u16*, u16*, int, int, int, int, int, int);
GEMV(4, 1, false, F16)
GEMV(2, 1, false, F16)
GEMV(3, 1, true, BF16)
GEMV(4, 2, true, F16)
GEMV(8, 2, true, F16)
#define SIMT_MODE(B, MT, U, NSEG, T, MODE, W) template __global__ void wonly_gemv_simt<B, MT, U, NSEG, T, MODE, W>(const u32*, const u32*, const u16*, const u8*, const u16*, const u16*, u16*, int, int, int, int, int, int, int, int, int, const u16*, float, int, const u16*);
#define SIMT(B, MT, U, NSEG, T) SIMT_MODE(B, MT, U, NSEG, T, SIMT_PLAIN, 8)
SIMT(4, 1, 2, 1, F16)
SIMT(2, 1, 2, 1, F16)
SIMT_MODE(2, 1, 2, 1, F16, SIMT_FUSED, 16)
SIMT_MODE(2, 1, 2, 1, F16, SIMT_CODES, 16)
SIMT_MODE(4, 4, 2, 1, BF16, SIMT_CODES, 16)
SIMT(3, 1, 2, 1, F16)
SIMT(8, 1, 2, 1, F16)
SIMT(4, 4, 2, 1, F16)
SIMT(2, 3, 1, 2, BF16)
SIMT(3, 3, 1, 2, F16)
SIMT(8, 4, 2, 1, BF16)
template __global__ void wonly_dequant<3, F16>(const u32*, const u32*, const u16*, const u8*, u16*, int, int, int, int, int);
template __global__ void wonly_dequant<2, F16>(const u32*, const u32*, const u16*, const u8*, u16*, int, int, int, int, int);
template __global__ void wonly_dequant<8, F16>(const u32*, const u32*, const u16*, const u8*, u16*, int, int, int, int, int);
template __global__ void wonly_dequant<4, BF16>(const u32*, const u32*, const u16*, const u8*, u16*, int, int, int, int, int);
#define WGMMA(B, NT, T) template __global__ void wonly_wgmma<B, NT, T>(const u32*, const u32*, const u16*, const u8*, const u16*, const u16*, u16*, float*, int, int, int, int, int, int, int, int);
WGMMA(4, 64, F16)
WGMMA(2, 128, F16)
WGMMA(3, 32, BF16)
WGMMA(8, 16, F16)
template __global__ void wonly_splitk_reduce<F16>(const float*, const u16*, u16*, int, int, int);
#endif
