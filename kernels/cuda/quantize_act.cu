// Activation quantize-and-pack: per token (row) and per contiguous K-cluster, asymmetric q-bit
// codes q = clamp(rint(x / s) + z, 0, 2^q - 1) with s = max((max - min) / (2^q - 1), 1e-8),
// z = clamp(rint(-min / s), 0, 2^q - 1), where the range [min, max] is widened to include 0 (as the
// fake quantizer of qtool's stages does, so packed models reproduce their stage). Output in the segment-padded K order of the GEMMs
// (bit-planes or u8 bytes) plus per-segment code sums for the zero-point correction.
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct F16 {};
struct BF16 {};
template <class T> struct Cvt;
template <> struct Cvt<F16> {
  static __device__ __forceinline__ float load(u16 v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
};
template <> struct Cvt<BF16> {
  static __device__ __forceinline__ float load(u16 v) { return __uint_as_float(((u32)v) << 16); }
};

// One block per token row. PLANES: out is u32 planes [bits][M][P/32] (tile word order 0,4,1,5,2,6,3,7
// within each 256-bit tile); otherwise out is u8 codes [M][P] (same word order within 32-code tiles).
// Dynamic shared memory: 2*C floats + S ints.
template <bool PLANES, class T>
__global__ void __launch_bounds__(256) quantize_act(
    const u16* __restrict__ x, int M, int K, int bits,
    const int* __restrict__ cluster_bounds, int C,
    const int* __restrict__ chunk_seg, const int* __restrict__ seg_k, const int* __restrict__ seg_p,
    const int* __restrict__ seg_cluster, int S, int P,
    void* __restrict__ out, float* __restrict__ scale, float* __restrict__ zero, int* __restrict__ seg_sum) {
  extern __shared__ float smem[];
  float* s_scale = smem;
  float* s_zero = smem + C;
  int* s_sum = reinterpret_cast<int*>(smem + 2 * C);
  const int m = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const float qmax = (float)((1 << bits) - 1);
  const u16* xr = x + (size_t)m * K;

  for (int c = warp; c < C; c += nw) {
    float lo = 3.0e38f, hi = -3.0e38f;
    for (int k = cluster_bounds[c] + lane; k < cluster_bounds[c + 1]; k += 32) {
      const float v = Cvt<T>::load(xr[k]);
      lo = fminf(lo, v); hi = fmaxf(hi, v);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    lo = fminf(lo, 0.f); hi = fmaxf(hi, 0.f);
    if (lane == 0) {
      // explicit round-to-nearest ops (no contraction, no reciprocal): the torch reference
      // (quantize_codes) performs the same IEEE fp32 operations, so scales and codes match bit for bit
      const float s = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), qmax), 1e-8f);
      const float z = fminf(fmaxf(rintf(__fdiv_rn(-lo, s)), 0.f), qmax);
      s_scale[c] = s; s_zero[c] = z;
      scale[(size_t)m * C + c] = s; zero[(size_t)m * C + c] = z;
    }
  }
  for (int i = threadIdx.x; i < S; i += blockDim.x) s_sum[i] = 0;
  __syncthreads();

  for (int chunk = warp; chunk < P / 32; chunk += nw) {
    const int p = chunk * 32 + lane, seg = chunk_seg[chunk];
    u32 code = 0;
    if (seg >= 0) {
      const int k = seg_k[seg] + (p - seg_p[seg]);
      if (k < seg_k[seg + 1]) {
        const int cl = seg_cluster[seg];
        const float q = __fadd_rn(rintf(__fdiv_rn(Cvt<T>::load(xr[k]), s_scale[cl])), s_zero[cl]);
        code = (u32)fminf(fmaxf(q, 0.f), qmax);
      }
    }
    if (PLANES) {
      // word `chunk` of its 256-bit tile is stored at slot (w % 4) * 2 + w / 4
      const int w = chunk & 7, slot = (chunk & ~7) + (w & 3) * 2 + (w >> 2);
      for (int j = 0; j < bits; ++j) {
        const u32 word = __ballot_sync(0xffffffffu, (code >> j) & 1u);
        if (lane == j) reinterpret_cast<u32*>(out)[((size_t)j * M + m) * (P / 32) + slot] = word;
      }
    } else {
      const int w = lane >> 2, slot = (w & 3) * 2 + (w >> 2);
      reinterpret_cast<u8*>(out)[(size_t)m * P + chunk * 32 + slot * 4 + (lane & 3)] = (u8)code;
    }
    u32 total = code;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    if (lane == 0 && seg >= 0) atomicAdd(&s_sum[seg], (int)total);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < S; i += blockDim.x) seg_sum[(size_t)m * S + i] = s_sum[i];
}

#ifdef QTOOL_INSTANTIATE  // offline nvcc compile check; CuPy instantiates by name
template __global__ void quantize_act<true, F16>(const u16*, int, int, int, const int*, int, const int*, const int*, const int*, const int*, int, int, void*, float*, float*, int*);
template __global__ void quantize_act<false, BF16>(const u16*, int, int, int, const int*, int, const int*, const int*, const int*, const int*, int, int, void*, float*, float*, int*);
#endif
