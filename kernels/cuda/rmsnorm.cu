// RMSNorm forward: one block per row, a block-wide sum of squares in fp32.
#include "cuda/cuda_ops.h"

#include <cuda_runtime.h>

extern "C" int fl_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); // clear the sticky "no driver" error
        return 0;
    }
    return n;
}

__global__ void rmsnorm_forward_kernel(float *y, const float *x, const float *w, int dim,
                                       float eps) {
    __shared__ float partial[32];
    const float *xr = x + (size_t)blockIdx.x * dim;
    float *yr = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_down_sync(0xffffffffu, ss, off);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        ss = lane < (int)(blockDim.x / 32) ? partial[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) ss += __shfl_down_sync(0xffffffffu, ss, off);
        if (lane == 0) partial[0] = rsqrtf(ss / dim + eps);
    }
    __syncthreads();
    float rinv = partial[0];
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = w[i] * (xr[i] * rinv);
}

extern "C" int fl_cuda_rmsnorm_forward(float *y, const float *x, const float *w, int n, int dim,
                                       float eps, void *stream) {
    if (n <= 0) return 0;
    rmsnorm_forward_kernel<<<n, 256, 0, (cudaStream_t)stream>>>(y, x, w, dim, eps);
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
}
