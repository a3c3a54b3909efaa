// Device memory, streams and copies with the engine's error reporting, and the bf16
// conversion weights go through at load.
#include "cuda/cuda_util.h"

extern "C" int fl_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); // clear the sticky "no driver" error
        return 0;
    }
    return n;
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
