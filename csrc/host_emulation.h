// Test-only: lets a host C++20 compiler build the kernels of csrc/ and run them on the CPU, so
// tests/test_csrc.py checks their indexing, reductions and numerics on a machine without a GPU.
// Included by common.cuh (after the CUDA headers) only when WAM_HOST_EMULATION is defined; nvcc
// builds never see it.
//
// Every CUDA thread of a block is a std::thread; blocks run one after another. __syncthreads is a
// block barrier, __shfl_xor_sync a warp barrier around a slot exchange, __shared__ a static (one
// copy, used by one block at a time). A thread that returns drops out of its barriers, as an
// exited CUDA thread does. What the GPU would fault on or garble and the host would not notice is
// recorded as an error (wam_emu_errors()): a shuffle reading the slot of an exited lane or with a
// partial mask, a block that is not whole warps, a wide load or store off its natural alignment.
#pragma once

#ifndef WAM_HOST_EMULATION
#error "host_emulation.h is for the host emulation build only"
#endif
#if defined(__CUDACC__)
#error "host_emulation.h must be compiled by a host compiler, not nvcc"
#endif

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

// CUDA keywords as plain C++ (the CUDA headers above defined them as attributes for host code).
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace wam_emu {

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  float slots[32] = {};
  std::atomic<bool> exited[32] = {};
};

struct Block {
  explicit Block(int threads) : barrier(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>(32));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* current_block = nullptr;
inline std::atomic<int> error_count{0};

inline Warp& current_warp() { return *current_block->warps[threadIdx.x / 32]; }

inline void record_error() { error_count.fetch_add(1); }

// A 2/4/8/16-byte access on the GPU faults unless aligned; the host might not notice (or crash on
// an aligned SSE move: the message then says why).
inline void check_aligned(const void* p, int bytes) {
  if (reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) != 0) {
    std::fprintf(stderr, "wam_emu: misaligned %d-byte access at %p\n", bytes, p);
    record_error();
  }
}

template <typename Args>
cudaError_t launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  if (block.x == 0 || block.x % 32 != 0 || block.x > 1024 || block.y != 1 || block.z != 1) {
    record_error();
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    record_error();
    return cudaErrorInvalidConfiguration;
  }
  // blockDim.x threads live for the whole launch and run the blocks one after another (the
  // __shared__ statics are reused); each block has fresh barriers, as exited threads drop out.
  const size_t num_blocks = size_t(grid.x) * grid.y * grid.z;
  std::vector<std::unique_ptr<Block>> blocks;
  blocks.reserve(num_blocks);
  for (size_t i = 0; i < num_blocks; ++i) blocks.push_back(std::make_unique<Block>(int(block.x)));
  std::barrier<> between_blocks(int(block.x));
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t]() {
      size_t i = 0;
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x, ++i) {
            threadIdx = make_uint3(t, 0, 0);
            blockIdx = make_uint3(x, y, z);
            blockDim = block;
            gridDim = grid;
            current_block = blocks[i].get();
            kernel(args);
            // An exited thread no longer takes part in its block's barriers.
            Warp& warp = current_warp();
            warp.exited[t % 32].store(true);
            warp.barrier.arrive_and_drop();
            current_block->barrier.arrive_and_drop();
            between_blocks.arrive_and_wait();
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  return cudaSuccess;
}

}  // namespace wam_emu

inline void __syncthreads() { wam_emu::current_block->barrier.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) wam_emu::record_error();
  wam_emu::Warp& warp = wam_emu::current_warp();
  const int lane = int(threadIdx.x % 32);
  const int src = lane ^ lane_mask;
  warp.slots[lane] = v;
  warp.barrier.arrive_and_wait();
  if (src >= 32 || warp.exited[src].load()) wam_emu::record_error();
  const float out = warp.slots[src & 31];
  warp.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return out;
}

template <typename T>
inline T __ldg(const T* p) {
  wam_emu::check_aligned(p, int(alignof(T)));
  return *p;
}

// Round-to-nearest IEEE operations on the host (compile without -ffast-math and with
// -ffp-contract=off so they stay separate roundings).
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
}
