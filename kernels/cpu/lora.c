/* The LoRA linear y += scale * (x @ A^T) @ B^T and its backward, as OpenBLAS GEMMs.
 * The rank r is small, so u = x @ A^T is the only intermediate the forward keeps. */
#include "kernels.h"

#include <cblas.h>

void fl_cpu_lora_forward(float *y, float *u, const float *x, const float *A, const float *B,
                         float scale, int n, int in, int out, int r) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r, in, 1.0f, x, in, A, in, 0.0f, u,
                r); /* u [n,r] */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, r, scale, u, r, B, r, 1.0f, y,
                out); /* y += [n,out] */
}

#define LORA_DU_FLOATS 16384 /* du is built a block at a time in 64 KiB of stack */

void fl_cpu_lora_backward(float *dx, float *dA, float *dB, const float *dy, const float *x,
                          const float *u, const float *A, const float *B, float scale, int n,
                          int in, int out, int r) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, r, n, scale, dy, out, u, r, 1.0f,
                dB, r); /* dB += scale * dy^T @ u [out,r] */
    /* du = scale * dy @ B, in blocks of rows (and of rank columns, for a huge r), each
     * block used at once by dA and dx, so no [n, r] buffer is allocated */
    float du[LORA_DU_FLOATS];
    int cols = r < LORA_DU_FLOATS ? r : LORA_DU_FLOATS, rows = LORA_DU_FLOATS / cols;
    for (int c0 = 0; c0 < r; c0 += cols) {
        int nc = r - c0 < cols ? r - c0 : cols;
        for (int t0 = 0; t0 < n; t0 += rows) {
            int nt = n - t0 < rows ? n - t0 : rows;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nt, nc, out, scale,
                        dy + (size_t)t0 * out, out, B + c0, r, 0.0f, du,
                        nc); /* du [nt,nc] */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nc, in, nt, 1.0f, du, nc,
                        x + (size_t)t0 * in, in, 1.0f, dA + (size_t)c0 * in,
                        in); /* dA[c0:c0+nc] += du^T @ x */
            if (dx)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nt, in, nc, 1.0f, du, nc,
                            A + (size_t)c0 * in, in, 1.0f, dx + (size_t)t0 * in,
                            in); /* dx += du @ A[c0:c0+nc] */
        }
    }
}
