// Device memory, streams and copies with the engine's error reporting, and the bf16
// conversion weights go through at load.
#include "cuda/cuda_util.h"

#include <stdio.h>

extern "C" int fl_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); // clear the sticky "no driver" error
        return 0;
    }
    return n;
}

__global__ void f32_to_bf16_kernel(uint16_t *dst, const float *src, size_t n);

extern "C" int fl_cuda_device_probe(char *why, size_t cap) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaSuccess && n == 0) e = cudaErrorNoDevice;
    cudaDeviceProp p;
    if (e == cudaSuccess) e = cudaGetDeviceProperties(&p, 0);
    // A kernel of this file tells whether the build holds code the device can run (the
    // build targets CUDA_ARCH; an older GPU has no image to load).
    cudaFuncAttributes fa;
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, f32_to_bf16_kernel);
    if (e != cudaSuccess) {
        cudaGetLastError(); // clear a sticky "no driver" error
        int rt = 0;
        cudaRuntimeGetVersion(&rt);
        if (e == cudaErrorInsufficientDriver) // also what a machine without a driver reports
            snprintf(why, cap, "no CUDA driver, or one older than CUDA runtime %d.%d needs",
                     rt / 1000, rt % 1000 / 10);
        else
            snprintf(why, cap, "%s", cudaGetErrorString(e));
        return 0;
    }
    snprintf(why, cap, "%s, %.0f GiB, compute capability %d.%d", p.name,
             p.totalGlobalMem / 1073741824.0, p.major, p.minor);
    return n;
}

extern "C" int fl_cuda_mem_info(size_t *free_bytes, size_t *total_bytes) {
    return fl_cuda_check(cudaMemGetInfo(free_bytes, total_bytes), "memory info");
}

extern "C" void *fl_cuda_alloc(size_t bytes, const char *what) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError(); // an allocation failure is not sticky; do not leave it for the next
                            // check
        fl_error("CUDA allocating %zu bytes for %s: %s", bytes, what, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

extern "C" void fl_cuda_free(void *p) {
    if (p) cudaFree(p);
}

extern "C" int fl_cuda_upload(void *dst, const void *host_src, size_t bytes, void *stream) {
    return fl_cuda_check(
        cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream),
        "upload");
}

// Downloads end synchronised so the host can read the data at once.
extern "C" int fl_cuda_download(void *host_dst, const void *src, size_t bytes, void *stream) {
    if (fl_cuda_check(
            cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream),
            "download"))
        return -1;
    return fl_cuda_sync(stream);
}

extern "C" int fl_cuda_sync(void *stream) {
    return fl_cuda_check(cudaStreamSynchronize((cudaStream_t)stream), "stream synchronize");
}

extern "C" void *fl_cuda_stream_new(void) {
    cudaStream_t s = NULL;
    if (fl_cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream create"))
        return NULL;
    return s;
}

extern "C" void fl_cuda_stream_free(void *stream) {
    if (stream) cudaStreamDestroy((cudaStream_t)stream);
}

__global__ void f32_to_bf16_kernel(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = fl_f32_to_bf16_bits(src[i]);
}

extern "C" int fl_cuda_f32_to_bf16(uint16_t *dst, const float *src, size_t n, void *stream) {
    if (n == 0) return 0;
    f32_to_bf16_kernel<<<fl_cuda_blocks(n, 256), 256, 0, (cudaStream_t)stream>>>(dst, src, n);
    return fl_cuda_launched("f32_to_bf16");
}
