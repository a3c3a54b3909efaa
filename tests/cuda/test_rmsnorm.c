/* CUDA RMSNorm against the CPU reference; skips without a device. */
#include "cuda/cuda_ops.h"
#include "kernels.h"
#include "tap.h"

#include <cuda_runtime.h>
#include <math.h>

int main(void) {
    if (fl_cuda_device_count() == 0) {
        tap_skip("CUDA rmsnorm parity: no CUDA device on this machine");
        return tap_done();
    }
    int shapes[][2] = {{1, 64}, {7, 4096}, {33, 5120}, {128, 8192}};
    for (int s = 0; s < 4; s++) {
        int n = shapes[s][0], dim = shapes[s][1];
        size_t bytes = sizeof(float) * (size_t)n * dim;
        float *x = malloc(bytes), *w = malloc(sizeof(float) * dim), *ref = malloc(bytes),
              *got = malloc(bytes);
        for (int i = 0; i < n * dim; i++) x[i] = sinf(i * 0.37f) * 3.0f;
        for (int i = 0; i < dim; i++) w[i] = 0.5f + cosf(i * 0.11f);
        fl_cpu_rmsnorm_forward(ref, x, w, n, dim, 1e-5f);
        float *dx, *dw, *dy;
        cudaMalloc((void **)&dx, bytes);
        cudaMalloc((void **)&dy, bytes);
        cudaMalloc((void **)&dw, sizeof(float) * dim);
        cudaMemcpy(dx, x, bytes, cudaMemcpyHostToDevice);
        cudaMemcpy(dw, w, sizeof(float) * dim, cudaMemcpyHostToDevice);
        int rc = fl_cuda_rmsnorm_forward(dy, dx, dw, n, dim, 1e-5f, NULL);
        cudaMemcpy(got, dy, bytes, cudaMemcpyDeviceToHost);
        double worst = 0;
        for (int i = 0; i < n * dim; i++) {
            double d = fabs((double)got[i] - ref[i]) / (1.0 + fabs(ref[i]));
            if (d > worst) worst = d;
        }
        tap_ok(rc == 0 && worst < 1e-5, "CUDA rmsnorm [%d, %d] matches the CPU reference "
                                        "(max relative diff %.2e)", n, dim, worst);
        cudaFree(dx);
        cudaFree(dy);
        cudaFree(dw);
        free(x);
        free(w);
        free(ref);
        free(got);
    }
    return tap_done();
}
