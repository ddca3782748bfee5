// One decode step of attention (one new token per sequence) over a static KV cache, with the
// rotary embedding and the cache store inside: the step's fused q|k|v projection goes in, the
// attention output [B, H*D] (o_proj's input layout) comes out. At batch 1 the transformers path
// costs ~5 kernels here (rotary, cache copy, SDPA with its reductions and fills, a transpose copy);
// this is one, split over the keys (flash-decoding) so that even short caches fill the GPU.
// No CUDA headers are included so NVRTC (CuPy) and nvcc both compile this file as is.
typedef unsigned int u32;
typedef unsigned short u16;

struct F16 {};
struct BF16 {};

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
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

const int ATT_THREADS = 128, ATT_WARPS = 4;
#define NEG_INF __int_as_float(0xff800000u)

template <class T> __device__ __forceinline__ void unpack2(u32 w, float* f) {
  f[0] = Cvt<T>::load((u16)(w & 0xffffu));
  f[1] = Cvt<T>::load((u16)(w >> 16));
}
template <class T> __device__ __forceinline__ void unpack8(uint4 v, float* f) {
  unpack2<T>(v.x, f);
  unpack2<T>(v.y, f + 2);
  unpack2<T>(v.z, f + 4);
  unpack2<T>(v.w, f + 6);
}

// x rotated as transformers' apply_rotary_pos_emb does (x * cos + rotate_half(x) * sin, rotate_half
// = cat(-x2, x1)), computed in fp32 and rounded once to T.
template <class T> __device__ __forceinline__ u16 rope(const u16* x, const u16* cosv, const u16* sinv, int d, int D) {
  const int h = D / 2;
  const float other = d < h ? -Cvt<T>::load(x[d + h]) : Cvt<T>::load(x[d - h]);
  return Cvt<T>::store(Cvt<T>::load(x[d]) * Cvt<T>::load(cosv[d]) + other * Cvt<T>::load(sinv[d]));
}

// Asynchronous 16-byte global -> shared copy (L2 only: the cache is streamed once).
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  u32 d;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Grid (splits, B * Hkv); block (b, kv head kh) of split s handles keys [s * chunk, (s+1) * chunk)
// of the pos + 1 in the cache, for the G = H / Hkv query heads that share kh. Its keys and values are
// first copied into shared memory, all copies in flight at once (a register loop would wait one
// memory latency per key), while q is rotated; the block whose range holds `pos` rotates this step's
// k and stores it and v in the cache and in its copy. Then TPK = D / 8 lanes per key (16 bytes each)
// take the scores, a warp per head the softmax pieces, the same lanes the weighted values. With
// splits > 1 each block writes its unnormalized partial (acc, max, sum) to ws; the last block of
// (b, kh) to finish (a counter per (b, kh), reset by that block, so a CUDA graph can replay the
// launch) combines them.
// qkv [B, (H + 2 Hkv) D] (row stride qkv_stride), cos/sin [D] (of pos), caches [B, Hkv, L, D], out [B, H D],
// ws [B, H, splits, D + 2] fp32, counters [B * Hkv] u32 (zero). Dynamic shared memory:
// max(4 chunk D, 16 G D) + 4 G chunk bytes (decode_attention_smem).
template <int D, int G, class T>
__global__ void __launch_bounds__(ATT_THREADS, 4) decode_attention(
    const u16* __restrict__ qkv, int qkv_stride, const u16* __restrict__ cosv, const u16* __restrict__ sinv,
    u16* __restrict__ kc, u16* __restrict__ vc, const long long* __restrict__ pos, u16* __restrict__ out,
    float* __restrict__ ws, u32* __restrict__ counters, int H, int Hkv, int L, int chunk, int splits, float scale) {
  const int TPK = D / 8, KPW = 32 / TPK, KPI = ATT_WARPS * KPW, U = D / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane % TPK;
  const int split = blockIdx.x, bk = blockIdx.y, b = bk / Hkv, kh = bk % Hkv;
  const int p = (int)*pos;
  const int j0 = split * chunk, nj = max(min(chunk, p + 1 - j0), 0);  // keys j0 .. j0 + nj - 1
  const u16* row = qkv + (size_t)b * qkv_stride;
  u16* kcache = kc + (size_t)bk * L * D;
  u16* vcache = vc + (size_t)bk * L * D;

  extern __shared__ uint4 dyn[];
  uint4* ks = dyn;                  // [chunk][U] keys
  uint4* vs = dyn + chunk * U;      // [chunk][U] values
  float* red = reinterpret_cast<float*>(dyn);  // [ATT_WARPS][G][D], over ks / vs once they are used
  float* sc = reinterpret_cast<float*>(dyn) + max(chunk * D, 4 * G * D);  // [G][chunk]
  __shared__ float sq[G][D];
  __shared__ float sm[G], sl[G];
  __shared__ int last;

  for (int i = threadIdx.x; i < nj * U; i += ATT_THREADS) {
    const int j = i / U;
    if (j0 + j == p) continue;  // written below
    cp_async16(ks + i, kcache + (size_t)(j0 + j) * D + (i % U) * 8);
    cp_async16(vs + i, vcache + (size_t)(j0 + j) * D + (i % U) * 8);
  }
  for (int i = threadIdx.x; i < G * D; i += ATT_THREADS) {
    const int g = i / D, d = i % D;
    sq[g][d] = Cvt<T>::load(rope<T>(row + (size_t)(kh * G + g) * D, cosv, sinv, d, D));
  }
  if (p >= j0 && p < j0 + nj) {  // this step's key and value: into the cache and this block's copy
    const u16* k = row + (size_t)(H + kh) * D;
    const u16* v = row + (size_t)(H + Hkv + kh) * D;
    u16* kr = reinterpret_cast<u16*>(ks + (p - j0) * U);
    u16* vr = reinterpret_cast<u16*>(vs + (p - j0) * U);
    for (int d = threadIdx.x; d < D; d += ATT_THREADS) {
      const u16 kd = rope<T>(k, cosv, sinv, d, D), vd = v[d];
      kcache[(size_t)p * D + d] = kr[d] = kd;
      vcache[(size_t)p * D + d] = vr[d] = vd;
    }
  }
  cp_async_wait_all();
  __syncthreads();

  float qr[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[g][e] = sq[g][sub * 8 + e];

  // scores s[g][j] = scale * q_g . k_j (the loop bound is the warp's, so all lanes shuffle)
  for (int jw = warp * KPW; jw < nj; jw += KPI) {
    const int j = jw + lane / TPK;
    const bool ok = j < nj;
    float kf[8];
    unpack8<T>(ks[(ok ? j : 0) * U + sub], kf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) s = fmaf(qr[g][e], kf[e], s);
#pragma unroll
      for (int o = TPK / 2; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, TPK);
      if (ok && sub == 0) sc[g * chunk + j] = s * scale;
    }
  }
  __syncthreads();

  // softmax pieces per head: max and sum of exp over this split's keys (a warp per head)
  for (int g = warp; g < G; g += ATT_WARPS) {
    float m = NEG_INF;
    for (int j = lane; j < nj; j += 32) m = fmaxf(m, sc[g * chunk + j]);
#pragma unroll
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int j = lane; j < nj; j += 32) {
      const float e = __expf(sc[g * chunk + j] - m);
      sc[g * chunk + j] = e;
      l += e;
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) { sm[g] = m; sl[g] = l; }
  }
  __syncthreads();

  // acc[g][d] = sum_j p[g][j] v_j[d], then summed over the key slots of the block
  float acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  for (int j = warp * KPW + lane / TPK; j < nj; j += KPI) {
    float vf[8];
    unpack8<T>(vs[j * U + sub], vf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float w = sc[g * chunk + j];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(w, vf[e], acc[g][e]);
    }
  }
  __syncthreads();  // ks / vs are read: red may take their place
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float a = acc[g][e];
#pragma unroll
      for (int o = TPK; o < 32; o <<= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
      if (lane < TPK) red[(warp * G + g) * D + sub * 8 + e] = a;
    }
  }
  __syncthreads();

  if (splits == 1) {
    for (int i = threadIdx.x; i < G * D; i += ATT_THREADS) {
      const int g = i / D, d = i % D;
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < ATT_WARPS; ++w) a += red[(w * G + g) * D + d];
      out[(size_t)b * H * D + (size_t)(kh * G + g) * D + d] = Cvt<T>::store(a / sl[g]);
    }
    return;
  }
  const int W = D + 2;
  for (int i = threadIdx.x; i < G * W; i += ATT_THREADS) {
    const int g = i / W, d = i % W;
    float v;
    if (d < D) {
      v = 0.f;
#pragma unroll
      for (int w = 0; w < ATT_WARPS; ++w) v += red[(w * G + g) * D + d];
    } else {
      v = d == D ? sm[g] : sl[g];
    }
    ws[(((size_t)b * H + kh * G + g) * splits + split) * W + d] = v;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + bk, 1u) == (u32)(splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int nsplit = min(splits, (p + chunk) / chunk);  // splits past the keys hold nothing
  for (int i = threadIdx.x; i < G * D; i += ATT_THREADS) {
    const int g = i / D, d = i % D;
    const float* part = ws + ((size_t)b * H + kh * G + g) * splits * W;
    // one pass with a running max (the loads do not wait on the sums: unrolled, 8 splits' loads are in
    // flight at once, where a max pass then a sum pass waited two L2 round trips per split)
    float m = NEG_INF, l = 0.f, a = 0.f;
#pragma unroll 8
    for (int s = 0; s < nsplit; ++s) {
      const float ms = __ldcg(part + s * W + D), ls = __ldcg(part + s * W + D + 1), as = __ldcg(part + s * W + d);
      const float mn = fmaxf(m, ms), f0 = __expf(m - mn), f1 = __expf(ms - mn);
      l = fmaf(l, f0, ls * f1);
      a = fmaf(a, f0, as * f1);
      m = mn;
    }
    out[(size_t)b * H * D + (size_t)(kh * G + g) * D + d] = Cvt<T>::store(a / l);
  }
  if (threadIdx.x == 0) counters[bk] = 0u;
}

#ifdef QTOOL_INSTANTIATE
template __global__ void decode_attention<64, 1, F16>(const u16*, int, const u16*, const u16*, u16*, u16*, const long long*, u16*, float*, u32*, int, int, int, int, int, float);
template __global__ void decode_attention<64, 3, F16>(const u16*, int, const u16*, const u16*, u16*, u16*, const long long*, u16*, float*, u32*, int, int, int, int, int, float);
template __global__ void decode_attention<128, 1, F16>(const u16*, int, const u16*, const u16*, u16*, u16*, const long long*, u16*, float*, u32*, int, int, int, int, int, float);
template __global__ void decode_attention<128, 4, F16>(const u16*, int, const u16*, const u16*, u16*, u16*, const long long*, u16*, float*, u32*, int, int, int, int, int, float);
template __global__ void decode_attention<128, 8, F16>(const u16*, int, const u16*, const u16*, u16*, u16*, const long long*, u16*, float*, u32*, int, int, int, int, int, float);
template __global__ void decode_attention<128, 7, BF16>(const u16*, int, const u16*, const u16*, u16*, u16*, const long long*, u16*, float*, u32*, int, int, int, int, int, float);
template __global__ void decode_attention<256, 2, F16>(const u16*, int, const u16*, const u16*, u16*, u16*, const long long*, u16*, float*, u32*, int, int, int, int, int, float);
template __global__ void decode_attention<64, 5, BF16>(const u16*, int, const u16*, const u16*, u16*, u16*, const long long*, u16*, float*, u32*, int, int, int, int, int, float);
#endif
