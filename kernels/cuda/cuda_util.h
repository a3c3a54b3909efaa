/* Helpers shared by the CUDA kernel files (C++, included by .cu files only). */
#ifndef FL_CUDA_UTIL_H
#define FL_CUDA_UTIL_H

#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/cuda_ops.h"
extern "C" {
#include "fl_internal.h" /* fl_error: the engine's error message, C linkage */
}

/* 0, or -1 with fl_error naming the op and CUDA's reason. */
static inline int fl_cuda_check(cudaError_t e, const char *op) {
    if (e == cudaSuccess) return 0;
    return fl_error("CUDA %s: %s", op, cudaGetErrorString(e));
}

/* After a launch: a bad configuration shows here; faults inside the kernel show at
 * the next synchronising call. */
static inline int fl_cuda_launched(const char *op) { return fl_cuda_check(cudaGetLastError(), op); }

/* Enough blocks of `threads` for n elements in a grid-stride loop, capped so huge n
 * loops instead of overflowing the grid. */
static inline unsigned fl_cuda_blocks(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 65536 ? (b ? b : 1) : 65536);
}

__device__ __forceinline__ float fl_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float fl_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32), returned to every thread.
 * scratch holds 32 floats; the call ends synchronised so scratch can be reused. */
__device__ __forceinline__ float fl_block_sum(float v, float *scratch) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = fl_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; w++) total += scratch[w]; /* same order in every thread */
    __syncthreads();
    return total;
}

__device__ __forceinline__ float fl_bf16_bits_to_f32(uint16_t b) {
    return __uint_as_float((uint32_t)b << 16);
}

/* Round to nearest even, quiet NaN: bit for bit the CPU's fl_f32_to_bf16. */
__device__ __forceinline__ uint16_t fl_f32_to_bf16_bits(float f) {
    uint32_t bits = __float_as_uint(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#endif
