// Host (C++20) stand-ins for the CUDA builtins and the inline-PTX helpers of kernels/cuda/wonly_gemv.cu
// and decode_attention.cu, so tests/kernels/test_simt_host.py and test_attention_host.py can run those
// kernels' own source on the CPU: one std::thread per CUDA thread, a std::barrier per block
// (__syncthreads) and per warp (shuffles); the blocks of a launch run one after another.
// fp16 arithmetic uses _Float16 with one rounding per PTX instruction, as the GPU does.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
using std::max;
using std::min;

struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct dim3 { unsigned x = 0, y = 0, z = 0; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
template <class P> inline P __ldg(const P* p) { return *p; }
template <class P> inline P __ldcg(const P* p) { return *p; }
inline float __expf(float x) { return std::exp2(x * 1.44269504f); }  // the GPU's ex2.approx(x * log2 e)
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
using std::fmaf;
using std::fmaxf;

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
uint4* emu_smem;  // the block's dynamic shared memory

struct EmuWarp {
  unsigned v[32];
  std::barrier<> bar{32};
};
std::barrier<>* emu_block_bar;
EmuWarp* emu_warps;
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
// Run one block: `threads` std::threads (warps of 32 with their shuffle barriers), body(t) on each
// with threadIdx.x = t; blockIdx and emu_smem are the caller's to set (inside body / before).
template <class F> void emu_block(unsigned threads, F body) {
  std::barrier<> bar(threads);
  emu_block_bar = &bar;
  std::unique_ptr<EmuWarp[]> warps(new EmuWarp[threads / 32]);
  emu_warps = warps.get();
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < threads; ++t)
    ts.emplace_back([=] {
      threadIdx.x = t;
      body();
    });
  for (auto& t : ts) t.join();
}
inline void __syncwarp(unsigned = 0xffffffffu) {}  // lanes only meet in shuffles here
// a 4-byte value of lane ^ o; with width < 32, a lane past the caller's width-lane segment gives its own value
template <class V> inline V __shfl_xor_sync(unsigned, V val, int o, int width = 32) {
  EmuWarp& w = emu_warps[threadIdx.x >> 5];
  const unsigned lane = threadIdx.x & 31, src = lane ^ o;
  std::memcpy(&w.v[lane], &val, 4);
  w.bar.arrive_and_wait();
  V r;
  std::memcpy(&r, &w.v[src <= (lane | (width - 1)) ? src : lane], 4);
  w.bar.arrive_and_wait();
  return r;
}

// ---- the helpers written in inline PTX in the kernel source (substituted by name) ----
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
struct Sz;  // a group's scale and zero as loaded (defined by the kernel source, after the helpers)
inline _Float16 emu_h(u32 bits) { u16 b = (u16)bits; _Float16 h; std::memcpy(&h, &b, 2); return h; }
inline u32 emu_bits(_Float16 h) { u16 b; std::memcpy(&b, &h, 2); return b; }
inline u32 emu_h2(u32 a, u32 b, _Float16 (*op)(_Float16, _Float16)) {
  return emu_bits(op(emu_h(a & 0xffff), emu_h(b & 0xffff))) | emu_bits(op(emu_h(a >> 16), emu_h(b >> 16))) << 16;
}
#define EMU_HELPERS                                                                                                     \
  inline float h2f(u16 h) { return (float)emu_h(h); }                                                                  \
  inline u16 f2h(float f) { return (u16)emu_bits((_Float16)f); }                                                       \
  inline u16 f2bf(float f) {                                                                                           \
    u32 b = (u32)__float_as_int(f);                                                                                    \
    if (std::isnan(f)) return 0x7fc0;                                                                                  \
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);                                                             \
  }                                                                                                                    \
  inline u32 hsub2(u32 a, u32 b) { return emu_h2(a, b, [](_Float16 x, _Float16 y) { return (_Float16)(x - y); }); }   \
  inline u32 hmul2(u32 a, u32 b) { return emu_h2(a, b, [](_Float16 x, _Float16 y) { return (_Float16)(x * y); }); }   \
  inline u32 hfma2(u32 a, u32 b, u32 c) {                                                                              \
    u32 r = 0;                                                                                                         \
    for (int s = 0; s < 32; s += 16)                                                                                   \
      r |= emu_bits((_Float16)((double)emu_h(a >> s) * (double)emu_h(b >> s) + (double)emu_h(c >> s))) << s;          \
    return r;                                                                                                          \
  }                                                                                                                    \
  inline u32 lop_and_or(u32 a, u32 b, u32 c) { return (a & b) | c; }                                                   \
  inline u32 prmt(u32 a, u32 b, u32 sel) {                                                                             \
    const unsigned long long bytes = (unsigned long long)b << 32 | a;                                                  \
    u32 r = 0;                                                                                                         \
    for (int i = 0; i < 4; ++i) {                                                                                      \
      const u32 n = (sel >> (4 * i)) & 0xf, byte = (u32)(bytes >> (8 * (n & 7))) & 0xff;                               \
      r |= (n & 8 ? (byte & 0x80 ? 0xffu : 0u) : byte) << (8 * i);                                                    \
    }                                                                                                                  \
    return r;                                                                                                          \
  }                                                                                                                    \
  inline u32 f2h2(float lo, float hi) { return (u32)f2h(lo) | (u32)f2h(hi) << 16; }                                    \
  inline float emu_half(u32 h, bool f16) { return f16 ? h2f((u16)h) : __uint_as_float(h << 16); }                      \
  inline u32 emu_select2(u32 a, u32 b, bool f16, bool mx) {                                                           \
    u32 r = 0;                                                                                                         \
    for (int s = 0; s < 32; s += 16) {                                                                                 \
      const u32 x = (a >> s) & 0xffffu, y = (b >> s) & 0xffffu;                                                        \
      const float fx = emu_half(x, f16), fy = emu_half(y, f16);                                                        \
      r |= (std::isnan(fx) ? y : std::isnan(fy) ? x : (mx ? fy > fx : fy < fx) ? y : x) << s;                          \
    }                                                                                                                  \
    return r;                                                                                                          \
  }                                                                                                                    \
  inline u32 hmin2(u32 a, u32 b, bool f16) { return emu_select2(a, b, f16, false); }                                  \
  inline u32 hmax2(u32 a, u32 b, bool f16) { return emu_select2(a, b, f16, true); }                                   \
  inline uint4 ld_stream_if(const u32* p, bool ok) { return ok ? *reinterpret_cast<const uint4*>(p) : uint4{0, 0, 0, 0}; } \
  inline uint2 ld_v2_if(const u32* p, bool ok) { return ok ? *reinterpret_cast<const uint2*>(p) : uint2{0, 0}; }      \
  template <class S = Sz> inline S ld_sz_if(const u16* scales, const u8* zeros, size_t i, bool ok) {                  \
    return ok ? S{scales[i], zeros[i]} : S{0, 0};                                                                      \
  }                                                                                                                    \
  template <int N> inline void cp_async_zfill(void* dst, const void* src, bool ok) {                                   \
    if (ok) std::memcpy(dst, src, N); else std::memset(dst, 0, N);                                                     \
  }                                                                                                                    \
  inline void cp_async16(void* dst, const void* src) { std::memcpy(dst, src, 16); }                                    \
  inline void prefetch_l2(const void*) {}                                                                              \
  inline void cp_async_wait_all() {}
