// Low-bit x low-bit GEMMs on tensor cores, both with the same segment-aware epilogue:
//   bitplane_gemm: any W p-bit x A q-bit via mma m16n8k256 b1 AND+POPC on bit-planes,
//   u8_gemm:       W<=4-bit x A<=8-bit via mma m16n8k32 u8.u8 (unsigned codes, no offset folding).
// K is cut into segments (weight groups and activation clusters both); each segment is padded to
// whole k-tiles, so a tile never straddles a segment and the integer dot is flushed per segment:
//   y[m,n] += Xa*Wa*dot - Xb*Wb - Xc*Wc     (Xa=sx, Xb=sx*sum qx, Xc=sx*zx; Wa=sw, Wb=sw*zw,
//                                           Wc=sw*sum qw - sw*zw*Kseg; see kernels/cuda/README.md)
typedef unsigned int u32;
typedef unsigned short u16;

struct F16 {};
struct BF16 {};
template <class T> struct Cvt;
template <> struct Cvt<F16> {
  static __device__ __forceinline__ float load(u16 v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
  static __device__ __forceinline__ u16 store(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
};
template <> struct Cvt<BF16> {
  static __device__ __forceinline__ float load(u16 v) { return __uint_as_float(((u32)v) << 16); }
  static __device__ __forceinline__ u16 store(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
};

__device__ __forceinline__ void mma_b1(int* d, const u32* a, const u32* b) {
  asm volatile("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_u8(int* d, const u32* a, const u32* b) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

struct Epilogue {
  const float* sx; const float* zx; const int* sumx; const int* seg_cluster;
  const float* wterms; const int* seg_ptile;
  int M, N, C, S;
  // Adds one segment's contribution for output (r, c); `first` says this run began at the
  // segment's first tile, so the constant terms are added exactly once per segment.
  __device__ __forceinline__ float term(int r, int c, int seg, float dot, bool first) const {
    if (r >= M || c >= N) return 0.f;
    const int cl = seg_cluster[seg];
    const float a = sx[(size_t)r * C + cl];
    float v = a * __ldg(wterms + (size_t)seg * N + c) * dot;
    if (first) {
      const float xb = a * (float)sumx[(size_t)r * S + seg], xc = a * zx[(size_t)r * C + cl];
      v -= xb * __ldg(wterms + ((size_t)S + seg) * N + c) + xc * __ldg(wterms + ((size_t)2 * S + seg) * N + c);
    }
    return v;
  }
};

// Sums the KSPLIT warps' partial tiles through shared memory and writes y = acc + bias.
template <int WM, int WN, int KSPLIT, class T>
__device__ __forceinline__ void reduce_store(float (&out)[WM][WN][4], int m0, int n0, int M, int N,
                                             const u16* bias, u16* y) {
  __shared__ float red[KSPLIT][WM * 16][WN * 8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int wm = 0; wm < WM; ++wm)
#pragma unroll
    for (int wn = 0; wn < WN; ++wn)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[warp][wm * 16 + gid + (e >> 1) * 8][wn * 8 + tig * 2 + (e & 1)] = out[wm][wn][e];
  __syncthreads();
  for (int i = threadIdx.x; i < WM * 16 * WN * 8; i += blockDim.x) {
    const int rr = i / (WN * 8), cc = i % (WN * 8), r = m0 + rr, c = n0 + cc;
    if (r >= M || c >= N) continue;
    float v = bias ? Cvt<T>::load(bias[c]) : 0.f;
#pragma unroll
    for (int w = 0; w < KSPLIT; ++w) v += red[w][rr][cc];
    y[(size_t)r * N + c] = Cvt<T>::store(v);
  }
}

// The tiles [t_begin, t_end) of one warp in a KSPLIT-way split of the segments' tiles. Pass
// seg_ptile[S], not ntiles: the u8 layout's alignment tail (tile_seg == -1) must never be visited.
__device__ __forceinline__ void warp_tile_range(int ntiles, int& t_begin, int& t_end) {
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  t_begin = (int)((long long)ntiles * warp / nw);
  t_end = (int)((long long)ntiles * (warp + 1) / nw);
}

// Bit-planes: xp[j][m][words], wp[i][n][words]; per 256-bit tile, words stored in the order
// 0,4,1,5,2,6,3,7 so lane (gid, tig) fetches its fragment words (tig, 4+tig) with one 8-byte load.
template <int P, int Q, int WM, int WN, int KSPLIT, class T>
__global__ void __launch_bounds__(KSPLIT * 32) bitplane_gemm(
    const u32* __restrict__ xp, const u32* __restrict__ wp, const int* __restrict__ tile_seg,
    const float* sx, const float* zx, const int* sumx, const int* seg_cluster, const float* wterms,
    const int* seg_ptile, int M, int N, int C, int S, const u16* __restrict__ bias, u16* __restrict__ y, int ntiles) {
  const Epilogue ep{sx, zx, sumx, seg_cluster, wterms, seg_ptile, M, N, C, S};
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.y * 16 * WM, n0 = blockIdx.x * 8 * WN;
  const size_t words = (size_t)ntiles * 8;
  float out[WM][WN][4];
  int acc[P + Q - 1][WM][WN][4];
#pragma unroll
  for (int wm = 0; wm < WM; ++wm)
#pragma unroll
    for (int wn = 0; wn < WN; ++wn)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[wm][wn][e] = 0.f;
  int t, t_end;
  warp_tile_range(seg_ptile[S], t, t_end);
  while (t < t_end) {
    const int seg = tile_seg[t];
    const bool first = t == ep.seg_ptile[seg];
    const int stop = min(t_end, ep.seg_ptile[seg + 1]);
#pragma unroll
    for (int s = 0; s < P + Q - 1; ++s)
#pragma unroll
      for (int wm = 0; wm < WM; ++wm)
#pragma unroll
        for (int wn = 0; wn < WN; ++wn)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[s][wm][wn][e] = 0;
#pragma unroll 2
    for (; t < stop; ++t) {
      u32 a[Q][WM][4], b[P][WN][2];
#pragma unroll
      for (int j = 0; j < Q; ++j)
#pragma unroll
        for (int wm = 0; wm < WM; ++wm)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = m0 + wm * 16 + gid + 8 * h;
            const uint2 v = r < M ? __ldg(reinterpret_cast<const uint2*>(xp + ((size_t)j * M + r) * words + (size_t)t * 8) + tig)
                                  : make_uint2(0, 0);
            a[j][wm][h] = v.x; a[j][wm][2 + h] = v.y;
          }
#pragma unroll
      for (int i = 0; i < P; ++i)
#pragma unroll
        for (int wn = 0; wn < WN; ++wn) {
          const int c = n0 + wn * 8 + gid;
          const uint2 v = c < N ? __ldg(reinterpret_cast<const uint2*>(wp + ((size_t)i * N + c) * words + (size_t)t * 8) + tig)
                                : make_uint2(0, 0);
          b[i][wn][0] = v.x; b[i][wn][1] = v.y;
        }
#pragma unroll
      for (int i = 0; i < P; ++i)
#pragma unroll
        for (int j = 0; j < Q; ++j)
#pragma unroll
          for (int wm = 0; wm < WM; ++wm)
#pragma unroll
            for (int wn = 0; wn < WN; ++wn) mma_b1(acc[i + j][wm][wn], a[j][wm], b[i][wn]);
    }
#pragma unroll
    for (int wm = 0; wm < WM; ++wm)
#pragma unroll
      for (int wn = 0; wn < WN; ++wn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float dot = 0.f;
#pragma unroll
          for (int s = 0; s < P + Q - 1; ++s) dot += (float)acc[s][wm][wn][e] * (float)(1 << s);
          out[wm][wn][e] += ep.term(m0 + wm * 16 + gid + (e >> 1) * 8, n0 + wn * 8 + tig * 2 + (e & 1), seg, dot, first);
        }
  }
  reduce_store<WM, WN, KSPLIT, T>(out, m0, n0, M, N, bias, y);
}

// Decode (M <= MT <= 16) bit-plane GEMV on CUDA cores: one warp per output row n, lanes over the
// 32-bit words of the padded K axis, dot = sum_{i,j} 2^(i+j) popc(X_j & W_i) per word, epilogue per
// word (it is linear in dot; a segment's constants go with its first word). An mma tile would waste
// 15/16 of its rows here. Words wholly in a segment's tile padding are zero in both operands and are
// skipped, so no bandwidth is spent on padding (stored slot s of a tile holds logical word (s&1)*4 + s/2).
template <int P, int Q, int MT, class T>
__global__ void __launch_bounds__(128) bitplane_gemv(
    const u32* __restrict__ xp, const u32* __restrict__ wp, const int* __restrict__ tile_seg,
    const float* sx, const float* zx, const int* sumx, const int* seg_cluster, const float* wterms,
    const int* seg_ptile, const int* __restrict__ seg_k, int M, int N, int C, int S,
    const u16* __restrict__ bias, u16* __restrict__ y, int ntiles) {
  const Epilogue ep{sx, zx, sumx, seg_cluster, wterms, seg_ptile, M, N, C, S};
  const int lane = threadIdx.x & 31, n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const size_t words = (size_t)ntiles * 8;
  const int nw = seg_ptile[S] * 8;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
#pragma unroll 4
  for (int wd = lane; wd < nw; wd += 32) {
    const int t = wd >> 3, seg = __ldg(tile_seg + t), first_word = __ldg(seg_ptile + seg) * 8;
    const int logical = (wd - first_word) & ~7 | ((wd & 1) * 4 + ((wd & 7) >> 1));
    if (logical * 32 >= __ldg(seg_k + seg + 1) - __ldg(seg_k + seg)) continue;
    u32 wv[P];
#pragma unroll
    for (int i = 0; i < P; ++i) wv[i] = __ldg(wp + ((size_t)i * N + n) * words + wd);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= M) break;
      int dot = 0;
#pragma unroll
      for (int j = 0; j < Q; ++j) {
        const u32 xw = __ldg(xp + ((size_t)j * M + m) * words + wd);
        int dj = 0;
#pragma unroll
        for (int i = 0; i < P; ++i) dj += __popc(xw & wv[i]) << i;
        dot += dj << j;
      }
      acc[m] += ep.term(m, n, seg, (float)dot, wd == first_word);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && m < M) y[(size_t)m * N + n] = Cvt<T>::store(v + (bias ? Cvt<T>::load(bias[n]) : 0.f));
  }
}

// u8 codes: xa[m][k] bytes, per 32-code tile the 4-byte words stored in the order 0,4,1,5,2,6,3,7.
// Weights: one word per (n, tile, tig) whose byte i holds code k=4*tig+i (low nibble) and
// k=16+4*tig+i (high nibble): the two B fragment registers are (w & 0x0f0f0f0f, (w >> 4) & ...).
template <int WM, int WN, int KSPLIT, class T>
__global__ void __launch_bounds__(KSPLIT * 32) u8_gemm(
    const u32* __restrict__ xa, const u32* __restrict__ wn4, const int* __restrict__ tile_seg,
    const float* sx, const float* zx, const int* sumx, const int* seg_cluster, const float* wterms,
    const int* seg_ptile, int M, int N, int C, int S, const u16* __restrict__ bias, u16* __restrict__ y, int ntiles) {
  const Epilogue ep{sx, zx, sumx, seg_cluster, wterms, seg_ptile, M, N, C, S};
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.y * 16 * WM, n0 = blockIdx.x * 8 * WN;
  const size_t words = (size_t)ntiles * 8;
  float out[WM][WN][4];
  int acc[WM][WN][4];
#pragma unroll
  for (int wm = 0; wm < WM; ++wm)
#pragma unroll
    for (int wn = 0; wn < WN; ++wn)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[wm][wn][e] = 0.f;
  int t, t_end;
  warp_tile_range(seg_ptile[S], t, t_end);
  while (t < t_end) {
    const int seg = tile_seg[t];
    const bool first = t == ep.seg_ptile[seg];
    const int stop = min(t_end, ep.seg_ptile[seg + 1]);
#pragma unroll
    for (int wm = 0; wm < WM; ++wm)
#pragma unroll
      for (int wn = 0; wn < WN; ++wn)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[wm][wn][e] = 0;
#pragma unroll 4
    for (; t < stop; ++t) {
      u32 a[WM][4], b[WN][2];
#pragma unroll
      for (int wm = 0; wm < WM; ++wm)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = m0 + wm * 16 + gid + 8 * h;
          const uint2 v = r < M ? __ldg(reinterpret_cast<const uint2*>(xa + (size_t)r * words + (size_t)t * 8) + tig)
                                : make_uint2(0, 0);
          a[wm][h] = v.x; a[wm][2 + h] = v.y;
        }
#pragma unroll
      for (int wn = 0; wn < WN; ++wn) {
        const int c = n0 + wn * 8 + gid;
        const u32 v = c < N ? __ldg(wn4 + ((size_t)c * ntiles + t) * 4 + tig) : 0u;
        b[wn][0] = v & 0x0f0f0f0fu; b[wn][1] = (v >> 4) & 0x0f0f0f0fu;
      }
#pragma unroll
      for (int wm = 0; wm < WM; ++wm)
#pragma unroll
        for (int wn = 0; wn < WN; ++wn) mma_u8(acc[wm][wn], a[wm], b[wn]);
    }
#pragma unroll
    for (int wm = 0; wm < WM; ++wm)
#pragma unroll
      for (int wn = 0; wn < WN; ++wn)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          out[wm][wn][e] += ep.term(m0 + wm * 16 + gid + (e >> 1) * 8, n0 + wn * 8 + tig * 2 + (e & 1), seg,
                                    (float)acc[wm][wn][e], first);
  }
  reduce_store<WM, WN, KSPLIT, T>(out, m0, n0, M, N, bias, y);
}

// ---- u8 tiled GEMM for M > 16 ---------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(u32* smem, const u32* g, bool ok) {  // zero-fills when !ok
  u32 s;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(s) : "l"(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(g), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
// Exact int -> float for 0 <= v < 2^22 with one IADD + FADD (I2F runs at quarter rate).
__device__ __forceinline__ float small_i2f(int v) { return __int_as_float(v + 0x4B400000) - 12582912.f; }

const int U8T_BM = 64, U8T_BN = 64, U8T_TILES = 4, U8T_STAGES = 3;  // CTA tile, k-tiles per stage, stages
const int U8T_AW = 40, U8T_BW = 20;  // smem row strides in words: 160 B / 80 B rows make fragment reads bank-conflict free
const int U8T_FLUSH = 32;            // tiles per int32 run: 32 tiles * 32 codes * 15 * 255 < 2^22

// A 64x64 output tile per CTA of 4 warps (2 x 2 warp tiles of 32 x 32), all of K: stages of 4 k-tiles
// (128 codes) of activations and weights are copied to shared memory with cp.async, 3 stages in flight.
// Fragments are read with LDS.64 (A: words tig, 4+tig of the stored order) and LDS.32 (B nibble word).
// The int32 dot is converted and scaled (Xa*Wa) whenever the segment changes or every 32 tiles; the
// segment's constant terms are added when it ends (the CTA sees every tile, so exactly once).
template <class T>
__global__ void __launch_bounds__(128) u8_gemm_tiled(
    const u32* __restrict__ xa, const u32* __restrict__ wn4, const int* __restrict__ tile_seg,
    const float* __restrict__ sx, const float* __restrict__ zx, const int* __restrict__ sumx,
    const int* __restrict__ seg_cluster, const float* __restrict__ wterms, const int* __restrict__ seg_ptile,
    int M, int N, int C, int S, const u16* __restrict__ bias, u16* __restrict__ y, int ntiles) {
  __shared__ __align__(16) u32 As[U8T_STAGES][U8T_BM * U8T_AW];
  __shared__ __align__(16) u32 Bs[U8T_STAGES][U8T_BN * U8T_BW];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.y * U8T_BM, n0 = blockIdx.x * U8T_BN, wm0 = (warp >> 1) * 32, wn0 = (warp & 1) * 32;
  const size_t words = (size_t)ntiles * 8;
  const int tend = seg_ptile[S], nst = (tend + U8T_TILES - 1) / U8T_TILES;  // ntiles % 4 == 0: whole stages stay in bounds

  auto load_stage = [&](int buf, int st) {
    const int t0 = st * U8T_TILES;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // A: 64 rows x 8 chunks of 16 B
      const int idx = tid + i * 128, row = idx >> 3, ch = idx & 7, r = m0 + row;
      cp_async16(&As[buf][row * U8T_AW + ch * 4], xa + (size_t)min(r, M - 1) * words + (size_t)t0 * 8 + ch * 4, r < M);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // B: 64 rows x 4 tiles of 16 B
      const int idx = tid + i * 128, row = idx >> 2, ch = idx & 3, c = n0 + row;
      cp_async16(&Bs[buf][row * U8T_BW + ch * 4], wn4 + ((size_t)min(c, N - 1) * ntiles + t0 + ch) * 4, c < N);
    }
  };

  int acc[2][4][4];
  float out[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) { acc[i][j][e] = 0; out[i][j][e] = 0.f; }

  // rows (wm, h) and columns (wn, e & 1) of this lane's accumulators
  auto flush = [&](int seg, bool fin) {
    const int cl = __ldg(seg_cluster + seg);
    float ar[2][2], xb[2][2], xc[2][2], wa[4][2], wb[4][2], wc[4][2];
#pragma unroll
    for (int wm = 0; wm < 2; ++wm)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + wm0 + wm * 16 + gid + 8 * h;
        const bool ok = r < M;
        ar[wm][h] = ok ? __ldg(sx + (size_t)r * C + cl) : 0.f;
        xb[wm][h] = fin && ok ? ar[wm][h] * (float)__ldg(sumx + (size_t)r * S + seg) : 0.f;
        xc[wm][h] = fin && ok ? ar[wm][h] * __ldg(zx + (size_t)r * C + cl) : 0.f;
      }
#pragma unroll
    for (int wn = 0; wn < 4; ++wn)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = n0 + wn0 + wn * 8 + tig * 2 + e;
        const bool ok = c < N;
        wa[wn][e] = ok ? __ldg(wterms + (size_t)seg * N + c) : 0.f;
        wb[wn][e] = fin && ok ? __ldg(wterms + ((size_t)S + seg) * N + c) : 0.f;
        wc[wn][e] = fin && ok ? __ldg(wterms + ((size_t)2 * S + seg) * N + c) : 0.f;
      }
#pragma unroll
    for (int wm = 0; wm < 2; ++wm)
#pragma unroll
      for (int wn = 0; wn < 4; ++wn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1, ce = e & 1;
          float v = fmaf(ar[wm][h] * wa[wn][ce], small_i2f(acc[wm][wn][e]), out[wm][wn][e]);
          if (fin) v -= xb[wm][h] * wb[wn][ce] + xc[wm][h] * wc[wn][ce];
          out[wm][wn][e] = v;
          acc[wm][wn][e] = 0;
        }
  };

#pragma unroll
  for (int st = 0; st < U8T_STAGES - 1; ++st) {
    if (st < nst) load_stage(st, st);
    cp_async_commit();
  }
  int cur = -1, run = 0;  // segment held in acc, tiles accumulated since its last conversion
  for (int kt = 0; kt < nst; ++kt) {
    cp_async_wait<U8T_STAGES - 2>();
    __syncthreads();  // stage kt landed for all threads; buffer (kt - 1) % STAGES is free again
    if (kt + U8T_STAGES - 1 < nst) load_stage((kt + U8T_STAGES - 1) % U8T_STAGES, kt + U8T_STAGES - 1);
    cp_async_commit();
    const u32* as = As[kt % U8T_STAGES];
    const u32* bs = Bs[kt % U8T_STAGES];
#pragma unroll
    for (int j = 0; j < U8T_TILES; ++j) {
      const int t = kt * U8T_TILES + j;
      if (t >= tend) break;
      const int seg = __ldg(tile_seg + t);
      if (seg != cur || run == U8T_FLUSH) {
        if (cur >= 0) flush(cur, seg != cur);
        cur = seg;
        run = 0;
      }
      ++run;
      u32 a[2][4], b[4][2];
#pragma unroll
      for (int wm = 0; wm < 2; ++wm)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint2 v = *reinterpret_cast<const uint2*>(as + (wm0 + wm * 16 + gid + 8 * h) * U8T_AW + j * 8 + tig * 2);
          a[wm][h] = v.x; a[wm][2 + h] = v.y;
        }
#pragma unroll
      for (int wn = 0; wn < 4; ++wn) {
        const u32 v = bs[(wn0 + wn * 8 + gid) * U8T_BW + j * 4 + tig];
        b[wn][0] = v & 0x0f0f0f0fu; b[wn][1] = (v >> 4) & 0x0f0f0f0fu;
      }
#pragma unroll
      for (int wm = 0; wm < 2; ++wm)
#pragma unroll
        for (int wn = 0; wn < 4; ++wn) mma_u8(acc[wm][wn], a[wm], b[wn]);
    }
  }
  cp_async_wait<0>();
  if (cur >= 0) flush(cur, true);
#pragma unroll
  for (int wm = 0; wm < 2; ++wm)
#pragma unroll
    for (int wn = 0; wn < 4; ++wn)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = m0 + wm0 + wm * 16 + gid + 8 * (e >> 1), c = n0 + wn0 + wn * 8 + tig * 2 + (e & 1);
        if (r < M && c < N) y[(size_t)r * N + c] = Cvt<T>::store(out[wm][wn][e] + (bias ? Cvt<T>::load(bias[c]) : 0.f));
      }
}

#ifdef QTOOL_INSTANTIATE  // offline nvcc compile check and SASS inspection; CuPy instantiates by name
template __global__ void bitplane_gemv<2, 8, 1, F16>(const u32*, const u32*, const int*, const float*, const float*, const int*, const int*, const float*, const int*, const int*, int, int, int, int, const u16*, u16*, int);
template __global__ void bitplane_gemv<3, 5, 16, BF16>(const u32*, const u32*, const int*, const float*, const float*, const int*, const int*, const float*, const int*, const int*, int, int, int, int, const u16*, u16*, int);
template __global__ void bitplane_gemm<2, 8, 1, 1, 8, F16>(const u32*, const u32*, const int*, const float*, const float*, const int*, const int*, const float*, const int*, int, int, int, int, const u16*, u16*, int);
template __global__ void bitplane_gemm<2, 2, 2, 4, 4, BF16>(const u32*, const u32*, const int*, const float*, const float*, const int*, const int*, const float*, const int*, int, int, int, int, const u16*, u16*, int);
template __global__ void u8_gemm<1, 1, 8, F16>(const u32*, const u32*, const int*, const float*, const float*, const int*, const int*, const float*, const int*, int, int, int, int, const u16*, u16*, int);
template __global__ void u8_gemm_tiled<F16>(const u32*, const u32*, const int*, const float*, const float*, const int*, const int*, const float*, const int*, int, int, int, int, const u16*, u16*, int);
template __global__ void u8_gemm_tiled<BF16>(const u32*, const u32*, const int*, const float*, const float*, const int*, const int*, const float*, const int*, int, int, int, int, const u16*, u16*, int);
#endif
