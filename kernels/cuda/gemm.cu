// y = x @ w^T through cuBLAS with fp32 accumulation. Row-major y [n,out] is column-major
// y^T [out,n], so the call is y^T = op_T(w) * x^T with w read as column-major [in,out].
#include "cuda/cuda_util.h"

#include <cublas_v2.h>
#include <stdlib.h>

struct fl_cuda_gemm {
    cublasHandle_t handle;
    cudaStream_t stream;
    uint16_t *xb; // [max_x] activations rounded to bf16 for bf16 weights
    size_t max_x;
};

static int blas_check(cublasStatus_t st, const char *op) {
    if (st == CUBLAS_STATUS_SUCCESS) return 0;
    return fl_error("cuBLAS %s: %s", op, cublasGetStatusString(st));
}

extern "C" fl_cuda_gemm *fl_cuda_gemm_new(void *stream, size_t max_x) {
    fl_cuda_gemm *g = (fl_cuda_gemm *)fl_calloc(1, sizeof *g);
    if (!g) return NULL;
    g->stream = (cudaStream_t)stream;
    g->max_x = max_x;
    if (blas_check(cublasCreate(&g->handle), "create handle")) {
        free(g);
        return NULL;
    }
    if (blas_check(cublasSetStream(g->handle, g->stream), "set stream") ||
        !(g->xb = (uint16_t *)fl_cuda_alloc(sizeof(uint16_t) * (max_x ? max_x : 1),
                                            "bf16 GEMM activations"))) {
        fl_cuda_gemm_free(g);
        return NULL;
    }
    return g;
}

extern "C" void fl_cuda_gemm_free(fl_cuda_gemm *g) {
    if (!g) return;
    if (g->handle) cublasDestroy(g->handle);
    fl_cuda_free(g->xb);
    free(g);
}

__global__ void add_bias_kernel(float *y, const float *bias, size_t total, int out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % out];
}

// One GEMM of the staged input (x as the weights' dtype) into o->y, then o's bias.
static int gemm_out(fl_cuda_gemm *g, const fl_cuda_linear_out *o, const void *xin,
                    fl_cuda_dtype wtype, int n, int in) {
    cudaDataType_t ab = wtype == FL_CUDA_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    const float one = 1.0f, zero = 0.0f;
    // CUBLAS_COMPUTE_32F: fp32 products and sums, never TF32.
    cublasStatus_t st = cublasGemmEx(g->handle, CUBLAS_OP_T, CUBLAS_OP_N, o->out, n, in, &one,
                                     o->w, ab, in, xin, ab, in, &zero, o->y, CUDA_R_32F, o->out,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        return fl_error("cuBLAS GemmEx for the linear [%d x %d] @ [%d x %d]^T (%s weights): %s", n,
                        in, o->out, in, wtype == FL_CUDA_BF16 ? "bf16" : "fp32",
                        cublasGetStatusString(st));
    if (!o->bias) return 0;
    size_t total = (size_t)n * o->out;
    add_bias_kernel<<<fl_cuda_blocks(total, 256), 256, 0, g->stream>>>(o->y, o->bias, total,
                                                                       o->out);
    return fl_cuda_launched("linear bias");
}

extern "C" int fl_cuda_linears(fl_cuda_gemm *g, const fl_cuda_linear_out *outs, int n_outs,
                               const float *x, fl_cuda_dtype wtype, int n, int in) {
    for (int i = 0; i < n_outs; i++)
        if (n < 0 || in <= 0 || outs[i].out <= 0)
            return fl_error("CUDA linear: n %d >= 0, in %d and out %d > 0 needed", n, in,
                            outs[i].out);
    if (wtype != FL_CUDA_F32 && wtype != FL_CUDA_BF16)
        return fl_error("CUDA linear: weight dtype %d is neither fp32 nor bf16", (int)wtype);
    if (n == 0) return 0;
    const void *xin = x;
    if (wtype == FL_CUDA_BF16) { // rounded once for every output
        size_t nx = (size_t)n * in;
        if (nx > g->max_x)
            return fl_error("CUDA linear: %d x %d activations exceed the %zu the GEMM was "
                            "created for",
                            n, in, g->max_x);
        if (fl_cuda_f32_to_bf16(g->xb, x, nx, g->stream)) return -1;
        xin = g->xb;
    }
    for (int i = 0; i < n_outs; i++)
        if (gemm_out(g, &outs[i], xin, wtype, n, in)) return -1;
    return 0;
}

extern "C" int fl_cuda_linear(fl_cuda_gemm *g, float *y, const float *x, const void *w,
                              fl_cuda_dtype wtype, const float *bias, int n, int in, int out) {
    fl_cuda_linear_out o = {y, w, bias, out};
    return fl_cuda_linears(g, &o, 1, x, wtype, n, in);
}
