// A CPU stand-in for the CUDA features the kvshard kernels use, so that their source (the same strings NVRTC
// compiles on a GPU) runs here under g++: one std::thread per CUDA thread, blocks one after another, warp
// shuffles / votes / mma.sync / movmatrix as exchanges through per-warp slots between two barriers.
// Fragment layouts follow the PTX ISA (mma.m16n8k16 .f16 -> .f32; movmatrix.m8n8.trans.b16).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __grid_constant__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace cuda::std {
using ::std::numeric_limits;
template <typename T, ::std::size_t N>
struct array {
  T v[N];
  T operator[](::std::size_t i) const { return v[i]; }
};
}  // namespace cuda::std

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

using __half = _Float16;
struct __half2 {
  _Float16 x, y;
};
inline __half2 __floats2half2_rn(float lo, float hi) { return {static_cast<_Float16>(lo), static_cast<_Float16>(hi)}; }
struct float2 {
  float x, y;
};
inline float2 __half22float2(__half2 h) { return {static_cast<float>(h.x), static_cast<float>(h.y)}; }
inline __half __float2half(float v) { return static_cast<_Float16>(v); }

namespace emu {
inline dim3 gridDim_, blockIdx_, blockDim_;
inline thread_local dim3 threadIdx_;
inline unsigned char shared_memory[1 << 18] __attribute__((aligned(16)));

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32][12];
};
inline std::vector<std::unique_ptr<Warp>> warps;
inline std::unique_ptr<std::barrier<>> block_barrier;

inline Warp& my_warp() { return *warps[threadIdx_.x / 32]; }
inline int my_lane() { return threadIdx_.x % 32; }

// Every lane publishes n words, then reads what it needs from the others.
template <typename F>
inline void exchange(const uint64_t* mine, int n, F&& read) {
  Warp& w = my_warp();
  std::memcpy(w.slot[my_lane()], mine, n * sizeof(uint64_t));
  w.bar.arrive_and_wait();
  read(w.slot);
  w.bar.arrive_and_wait();
}

inline void launch(dim3 grid, int threads, const std::function<void()>& kernel) {
  gridDim_ = grid;
  blockDim_ = {static_cast<unsigned>(threads), 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx_ = {x, y, z};
        warps.clear();
        for (int i = 0; i < (threads + 31) / 32; ++i) warps.push_back(std::make_unique<Warp>());
        block_barrier = std::make_unique<std::barrier<>>(threads);
        std::vector<std::thread> pool;
        for (int i = 0; i < threads; ++i)
          pool.emplace_back([i, &kernel] {
            threadIdx_ = {static_cast<unsigned>(i), 0, 0};
            kernel();
          });
        for (auto& th : pool) th.join();
      }
}
}  // namespace emu

#define threadIdx (emu::threadIdx_)
#define blockIdx (emu::blockIdx_)
#define gridDim (emu::gridDim_)
#define blockDim (emu::blockDim_)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::my_warp().bar.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Lane `from(lane)`'s value of v, for every lane of the warp.
template <typename T, typename F>
inline T emu_shuffle(T v, F&& from) {
  uint64_t mine = 0;
  std::memcpy(&mine, &v, sizeof(T));
  T out;
  const int source = from(emu::my_lane());
  emu::exchange(&mine, 1, [&](uint64_t (*slot)[12]) { std::memcpy(&out, &slot[source][0], sizeof(T)); });
  return out;
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  return emu_shuffle(v, [&](int lane) { return lane ^ mask; });
}

template <typename T>
inline T __shfl_down_sync(unsigned, T v, int delta) {
  // As on hardware: lanes past the end keep their own value.
  return emu_shuffle(v, [&](int lane) { return lane + delta < 32 ? lane + delta : lane; });
}

inline bool __any_sync(unsigned, bool pred) {
  const uint64_t mine = pred;
  bool any = false;
  emu::exchange(&mine, 1, [&](uint64_t (*slot)[12]) {
    for (int i = 0; i < 32; ++i) any = any || slot[i][0];
  });
  return any;
}

inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

inline float __expf(float x) { return std::exp(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// prmt (default mode): output byte n is byte (s >> 4n) & 7 of {y, x}, or its sign replicated if bit 3 is set.
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t src = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t out = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t sel = (s >> (4 * n)) & 15;
    uint32_t byte = (src >> (8 * (sel & 7))) & 0xFF;
    if (sel & 8) byte = (byte & 0x80) ? 0xFF : 0x00;
    out |= byte << (8 * n);
  }
  return out;
}

namespace emu {
inline float half_lo(uint32_t w) {
  _Float16 h;
  const uint16_t bits = w & 0xFFFF;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}
inline float half_hi(uint32_t w) { return half_lo(w >> 16); }
}  // namespace emu

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, D = A·B + C in place. Lane 4g+t holds
// A: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B: {(k 2t..2t+1, n g), (k 2t+8.., n g)};
// C: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
inline void kvs_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const uint64_t mine[6] = {a0, a1, a2, a3, b0, b1};
  const int lane = emu::my_lane(), g = lane / 4, t = lane % 4;
  float out[4];
  emu::exchange(mine, 6, [&](uint64_t (*slot)[12]) {
    auto A = [&](int row, int k) {
      const int src = (row % 8) * 4 + (k % 8) / 2;
      const int reg = (row / 8) + 2 * (k / 8);
      const uint32_t w = static_cast<uint32_t>(slot[src][reg]);
      return k % 2 ? emu::half_hi(w) : emu::half_lo(w);
    };
    auto B = [&](int k, int n) {
      const int src = n * 4 + (k % 8) / 2;
      const uint32_t w = static_cast<uint32_t>(slot[src][4 + k / 8]);
      return k % 2 ? emu::half_hi(w) : emu::half_lo(w);
    };
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
      float acc = d[i];
      for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
      out[i] = acc;
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// movmatrix.sync.aligned.m8n8.trans.b16: lane 4g+t gets (row g, columns 2t, 2t+1) of the transpose.
inline uint32_t kvs_transpose8x8(uint32_t x) {
  const uint64_t mine = x;
  const int lane = emu::my_lane(), g = lane / 4, t = lane % 4;
  uint32_t out = 0;
  emu::exchange(&mine, 1, [&](uint64_t (*slot)[12]) {
    for (int i = 0; i < 2; ++i) {
      const int row = 2 * t + i, col = g;  // element (row, col) of the original
      const uint32_t w = static_cast<uint32_t>(slot[row * 4 + col / 2][0]);
      const uint32_t half = col % 2 ? (w >> 16) : (w & 0xFFFF);
      out |= half << (16 * i);
    }
  });
  return out;
}

inline float kvs_exp2(float x) { return std::exp2(x); }
