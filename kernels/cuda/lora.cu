// Multi-LoRA forward for a batch whose tokens use different adapters: a shrink launch
// (u = x @ A^T) and an expand launch (y += scale * u @ B^T), each over all tokens, every
// token reading its own adapter's matrices (BGMV). Tokens of one adapter read the same
// A and B, which stay in L2 across the batch.
#include "cuda/cuda_util.h"

#define LORA_THREADS 256
#define LORA_U_CHUNK 1024 // u values staged in shared memory at a time by the expand

// One block per token, a warp per rank row: lanes stride over `in`, then a warp sum.
__global__ void lora_shrink_kernel(float *u, const float *x, const fl_cuda_lora *adapters,
                                   int n_adapters, const int32_t *tok_adapter, int in,
                                   int u_stride) {
    int t = blockIdx.x, a = tok_adapter[t];
    if (a < 0) return;
    float *ut = u + (size_t)t * u_stride;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (a >= n_adapters) {
        for (int j = threadIdx.x; j < u_stride; j += blockDim.x) ut[j] = __int_as_float(0x7fc00000);
        return;
    }
    fl_cuda_lora ad = adapters[a];
    if (!ad.A) return;
    const float *xt = x + (size_t)t * in;
    for (int j = warp; j < ad.rank; j += warps) {
        const float *aj = ad.A + (size_t)j * in;
        float s = 0.0f;
        for (int i = lane; i < in; i += 32) s += xt[i] * aj[i];
        s = fl_warp_sum(s);
        if (lane == 0) ut[j] = s;
    }
}

// Grid (token, block of outputs): thread o dots u[t] (staged in shared memory a chunk at a
// time) with row o of B.
__global__ void lora_expand_kernel(float *y, const float *u, const fl_cuda_lora *adapters,
                                   int n_adapters, const int32_t *tok_adapter, int out,
                                   int u_stride) {
    __shared__ float us[LORA_U_CHUNK];
    int t = blockIdx.x, a = tok_adapter[t];
    if (a < 0) return;
    int o = blockIdx.y * blockDim.x + threadIdx.x;
    float *yt = y + (size_t)t * out;
    if (a >= n_adapters) {
        if (o < out) yt[o] = __int_as_float(0x7fc00000);
        return;
    }
    fl_cuda_lora ad = adapters[a];
    if (!ad.A) return; // the whole block leaves together, so the barriers below stay uniform
    const float *ut = u + (size_t)t * u_stride;
    const float *bo = ad.B + (size_t)(o < out ? o : 0) * ad.rank;
    float s = 0.0f;
    for (int j0 = 0; j0 < ad.rank; j0 += LORA_U_CHUNK) {
        int m = min(LORA_U_CHUNK, ad.rank - j0);
        __syncthreads(); // the previous chunk is consumed
        for (int j = threadIdx.x; j < m; j += blockDim.x) us[j] = ut[j0 + j];
        __syncthreads();
        if (o < out)
            for (int j = 0; j < m; j++) s += us[j] * bo[j0 + j];
    }
    if (o < out) yt[o] += ad.scale * s;
}

static int check_lora(const char *op, int n_adapters, int n, int dim, const char *dim_name,
                      int u_stride) {
    if (n_adapters < 0 || n < 0 || dim <= 0 || u_stride <= 0)
        return fl_error("CUDA %s: n_adapters %d and n %d >= 0, %s %d and u_stride %d > 0 needed",
                        op, n_adapters, n, dim_name, dim, u_stride);
    return 0;
}

extern "C" int fl_cuda_lora_shrink(float *u, const float *x, const fl_cuda_lora *adapters,
                                   int n_adapters, const int32_t *tok_adapter, int n, int in,
                                   int u_stride, void *stream) {
    if (check_lora("lora_shrink", n_adapters, n, in, "in", u_stride)) return -1;
    if (n == 0) return 0;
    lora_shrink_kernel<<<n, LORA_THREADS, 0, (cudaStream_t)stream>>>(u, x, adapters, n_adapters,
                                                                     tok_adapter, in, u_stride);
    return fl_cuda_launched("lora_shrink");
}

extern "C" int fl_cuda_lora_expand(float *y, const float *u, const fl_cuda_lora *adapters,
                                   int n_adapters, const int32_t *tok_adapter, int n, int out,
                                   int u_stride, void *stream) {
    if (check_lora("lora_expand", n_adapters, n, out, "out", u_stride)) return -1;
    if (n == 0) return 0;
    dim3 grid((unsigned)n, (unsigned)((out + LORA_THREADS - 1) / LORA_THREADS));
    lora_expand_kernel<<<grid, LORA_THREADS, 0, (cudaStream_t)stream>>>(y, u, adapters, n_adapters,
                                                                        tok_adapter, out, u_stride);
    return fl_cuda_launched("lora_expand");
}
