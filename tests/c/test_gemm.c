/* The packed GEMM against OpenBLAS and a float64 reference, on shapes that leave
 * partial panels and partial row tiles, and its batch invariance (bitwise). */
#include "kernels.h"
#include "tap.h"

#include <math.h>
#include <stdint.h>

static float frand(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*s >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}

static void check_shape(int n, int out, int in, int with_bias) {
    uint64_t seed = (uint64_t)(n * 1000003 + out * 1009 + in);
    float *w = malloc(sizeof(float) * out * in), *x = malloc(sizeof(float) * n * in);
    float *bias = malloc(sizeof(float) * out), *yp = malloc(sizeof(float) * n * out),
          *yb = malloc(sizeof(float) * n * out), *row = malloc(sizeof(float) * out);
    for (int i = 0; i < out * in; i++) w[i] = frand(&seed);
    for (int i = 0; i < n * in; i++) x[i] = frand(&seed);
    for (int i = 0; i < out; i++) bias[i] = frand(&seed);
    fl_packed_matrix p;
    fl_cpu_pack(&p, w, out, in);
    const float *b = with_bias ? bias : NULL;
    fl_cpu_matmul_packed(yp, x, &p, b, n);
    fl_cpu_matmul(yb, x, w, b, n, in, out);
    double err_p = 0, err_b = 0, scale = 0;
    for (int t = 0; t < n; t++)
        for (int o = 0; o < out; o++) {
            double ref = b ? b[o] : 0, mag = 0;
            for (int k = 0; k < in; k++) {
                ref += (double)x[t * in + k] * w[o * in + k];
                mag += fabs((double)x[t * in + k] * w[o * in + k]);
            }
            err_p = fmax(err_p, fabs(yp[t * out + o] - ref) / (mag + 1e-30));
            err_b = fmax(err_b, fabs(yb[t * out + o] - ref) / (mag + 1e-30));
            scale = fmax(scale, mag);
        }
    /* Error relative to sum |x*w|: fp32 accumulation of `in` terms stays near in*eps. */
    double bound = 2.0 * in * 6e-8;
    tap_ok(err_p <= bound && err_b <= bound,
           "[%d x %d] @ [%d x %d]^T%s: packed and OpenBLAS agree with float64 (relative "
           "error %.1e and %.1e, bound %.1e)",
           n, in, out, in, with_bias ? " + bias" : "", err_p, err_b, bound);
    int same = 1; /* each row alone gives the bits it got inside the batch */
    for (int t = 0; t < n && same; t++) {
        fl_cpu_matmul_packed(row, x + (size_t)t * in, &p, b, 1);
        same = memcmp(row, yp + (size_t)t * out, sizeof(float) * out) == 0;
    }
    tap_ok(same, "[%d x %d] packed: every row computed alone is bitwise the row of the batch", n,
           out);
    fl_cpu_packed_free(&p);
    free(w);
    free(x);
    free(bias);
    free(yp);
    free(yb);
    free(row);
}

int main(void) {
    int shapes[][3] = {{1, 16, 16}, {1, 17, 5},   {3, 33, 64},    {8, 64, 172},
                       {9, 172, 64}, {13, 48, 96}, {37, 300, 130}, {64, 768, 256}};
    for (int i = 0; i < 8; i++) check_shape(shapes[i][0], shapes[i][1], shapes[i][2], i % 2);
    return tap_done();
}
