// Row and elementwise forward ops: gather (embedding), RMSNorm, RoPE, SwiGLU, residual add.
// fp32 throughout, the arithmetic written as in kernels/cpu/ops.c so results agree to
// rounding. Elementwise kernels use grid-stride loops over size_t indices.
#include "cuda/cuda_util.h"

// One block per output row; a bad row id writes NaN so it cannot pass unnoticed.
__global__ void gather_rows_kernel(float *out, const void *table, int bf16, const int32_t *rows,
                                   int dim, int n_table) {
    int id = rows[blockIdx.x];
    float *o = out + (size_t)blockIdx.x * dim;
    if (id < 0 || id >= n_table) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __int_as_float(0x7fc00000);
        return;
    }
    if (bf16) {
        const uint16_t *r = (const uint16_t *)table + (size_t)id * dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = fl_bf16_bits_to_f32(r[i]);
    } else {
        const float *r = (const float *)table + (size_t)id * dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = r[i];
    }
}

extern "C" int fl_cuda_gather_rows(float *out, const void *table, fl_cuda_dtype dtype,
                                   const int32_t *rows, int n, int dim, int n_table, void *stream) {
    if (n < 0 || dim <= 0 || n_table <= 0)
        return fl_error("CUDA gather_rows: n %d, dim %d, n_table %d must be positive", n, dim,
                        n_table);
    if (n == 0) return 0;
    gather_rows_kernel<<<n, 256, 0, (cudaStream_t)stream>>>(out, table, dtype == FL_CUDA_BF16, rows,
                                                            dim, n_table);
    return fl_cuda_launched("gather_rows");
}

// One block per row: a block-wide sum of squares in fp32, then the scaled row.
__global__ void rmsnorm_forward_kernel(float *y, float *rinv, const float *x, const float *w,
                                       int dim, float eps) {
    __shared__ float scratch[32];
    const float *xr = x + (size_t)blockIdx.x * dim;
    float *yr = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    float r = rsqrtf(fl_block_sum(ss, scratch) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = w[i] * (xr[i] * r);
    if (rinv && threadIdx.x == 0) rinv[blockIdx.x] = r;
}

extern "C" int fl_cuda_rmsnorm_forward_rinv(float *y, float *rinv, const float *x, const float *w,
                                            int n, int dim, float eps, void *stream) {
    if (n < 0 || dim <= 0)
        return fl_error("CUDA rmsnorm: n %d must be >= 0 and dim %d positive", n, dim);
    if (n == 0) return 0;
    rmsnorm_forward_kernel<<<n, 256, 0, (cudaStream_t)stream>>>(y, rinv, x, w, dim, eps);
    return fl_cuda_launched("rmsnorm");
}

extern "C" int fl_cuda_rmsnorm_forward(float *y, const float *x, const float *w, int n, int dim,
                                       float eps, void *stream) {
    return fl_cuda_rmsnorm_forward_rinv(y, NULL, x, w, n, dim, eps, stream);
}

// One thread per (token, head, pair i): rotates (x[i], x[i + half]) by pos * inv_freq[i].
// The angle is the same fp32 product the CPU forms; sincosf is accurate over the whole
// range (no fast math), which long positions need.
__global__ void rope_forward_kernel(float *x, const int32_t *pos, const float *inv_freq,
                                    size_t total, int n_heads, int head_dim) {
    int half = head_dim / 2;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        size_t th = idx / half; // token * n_heads + head
        float angle = (float)pos[th / n_heads] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float *v = x + th * head_dim;
        float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = a * s + b * c;
    }
}

extern "C" int fl_cuda_rope_forward(float *x, const int32_t *pos, const float *inv_freq, int n,
                                    int n_heads, int head_dim, void *stream) {
    if (n < 0 || n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0)
        return fl_error("CUDA rope: n %d >= 0, n_heads %d > 0 and an even head_dim %d needed", n,
                        n_heads, head_dim);
    size_t total = (size_t)n * n_heads * (head_dim / 2);
    if (total == 0) return 0;
    rope_forward_kernel<<<fl_cuda_blocks(total, 256), 256, 0, (cudaStream_t)stream>>>(
        x, pos, inv_freq, total, n_heads, head_dim);
    return fl_cuda_launched("rope");
}

__global__ void swiglu_forward_kernel(float *y, const float *gate, const float *up, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        y[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" int fl_cuda_swiglu_forward(float *y, const float *gate, const float *up, size_t n,
                                      void *stream) {
    if (n == 0) return 0;
    swiglu_forward_kernel<<<fl_cuda_blocks(n, 256), 256, 0, (cudaStream_t)stream>>>(y, gate, up, n);
    return fl_cuda_launched("swiglu");
}

__global__ void add_inplace_kernel(float *x, const float *y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" int fl_cuda_add_inplace(float *x, const float *y, size_t n, void *stream) {
    if (n == 0) return 0;
    add_inplace_kernel<<<fl_cuda_blocks(n, 256), 256, 0, (cudaStream_t)stream>>>(x, y, n);
    return fl_cuda_launched("add_inplace");
}
