/* y = x @ w^T with w packed once at load: panels of FL_PANEL output rows stored
 * k-major ([panel][in][FL_PANEL]), so the kernel streams one vector of weights per k
 * and broadcasts x. Packing at load replaces the per-call repacking a general GEMM
 * does, which dominates at decode-sized batches. Each output element sums over k in
 * the same order whatever the number of rows, so results are batch-invariant. */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

typedef float vpanel __attribute__((vector_size(FL_PANEL * sizeof(float))));

#if defined(__AVX512F__)
#define TILE_ROWS 8 /* 2 panels x 8 rows = 16 accumulators of 32 zmm registers */
#else
#define TILE_ROWS 2 /* each panel is two ymm registers on AVX2 */
#endif

int fl_cpu_pack(fl_packed_matrix *p, const float *w, int out, int in) {
    p->out = out;
    p->in = in;
    p->panels = (out + FL_PANEL - 1) / FL_PANEL;
    size_t bytes = sizeof(float) * (size_t)p->panels * in * FL_PANEL;
    if (posix_memalign((void **)&p->data, 64, bytes) != 0) {
        p->data = NULL;
        return -1;
    }
    for (int pn = 0; pn < p->panels; pn++) {
        float *dst = p->data + (size_t)pn * in * FL_PANEL;
        for (int k = 0; k < in; k++)
            for (int r = 0; r < FL_PANEL; r++) {
                int o = pn * FL_PANEL + r;
                dst[(size_t)k * FL_PANEL + r] = o < out ? w[(size_t)o * in + k] : 0.0f;
            }
    }
    return 0;
}

void fl_cpu_packed_free(fl_packed_matrix *p) {
    free(p->data);
    p->data = NULL;
}

/* rows (<= TILE_ROWS) rows of x against one or two panels: y[rows, cols]. */
static inline __attribute__((always_inline)) void tile(float *y, int ldy, const float *x,
                                                       int ldx, const float *w0,
                                                       const float *w1, int in, int rows,
                                                       int cols) {
    vpanel acc0[TILE_ROWS], acc1[TILE_ROWS];
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = (vpanel){0};
    for (int k = 0; k < in; k++) {
        vpanel a = *(const vpanel *)(w0 + (size_t)k * FL_PANEL);
        vpanel b = w1 ? *(const vpanel *)(w1 + (size_t)k * FL_PANEL) : (vpanel){0};
        for (int r = 0; r < rows; r++) {
            float xv = x[(size_t)r * ldx + k];
            acc0[r] += a * xv;
            if (w1) acc1[r] += b * xv;
        }
    }
    for (int r = 0; r < rows; r++) {
        float buf[2 * FL_PANEL];
        memcpy(buf, &acc0[r], sizeof acc0[r]);
        memcpy(buf + FL_PANEL, &acc1[r], sizeof acc1[r]);
        memcpy(y + (size_t)r * ldy, buf, sizeof(float) * cols);
    }
}

/* One panel pair against every row of x, a tile of rows at a time. The row count
 * is a constant inside each case, so the accumulators stay in registers. */
static void panel_pair(float *y, const float *x, const fl_packed_matrix *w, int pn, int n) {
    const float *w0 = w->data + (size_t)pn * w->in * FL_PANEL;
    int two = pn + 1 < w->panels;
    const float *w1 = two ? w0 + (size_t)w->in * FL_PANEL : NULL;
    int col = pn * FL_PANEL, left = w->out - col;
    int cols = left < (two ? 2 : 1) * FL_PANEL ? left : (two ? 2 : 1) * FL_PANEL;
    for (int r = 0; r < n; r += TILE_ROWS) {
        float *yt = y + (size_t)r * w->out + col;
        const float *xt = x + (size_t)r * w->in;
        int rows = n - r < TILE_ROWS ? n - r : TILE_ROWS;
        switch (rows) {
#define ROWS_CASE(R)                                                                        \
    case R:                                                                                 \
        if (w1) tile(yt, w->out, xt, w->in, w0, w1, w->in, R, cols);                       \
        else tile(yt, w->out, xt, w->in, w0, NULL, w->in, R, cols);                        \
        break;
            ROWS_CASE(1)
            ROWS_CASE(2)
#if TILE_ROWS > 2
            ROWS_CASE(3)
            ROWS_CASE(4)
            ROWS_CASE(5)
            ROWS_CASE(6)
            ROWS_CASE(7)
            ROWS_CASE(8)
#endif
#undef ROWS_CASE
        }
    }
}

void fl_cpu_matmul_packed(float *y, const float *x, const fl_packed_matrix *w, const float *bias,
                          int n) {
    int pairs = (w->panels + 1) / 2;
    long flops = 2L * n * w->out * w->in;
#pragma omp parallel for schedule(static) if (flops > 200000 && pairs > 1)
    for (int pp = 0; pp < pairs; pp++) panel_pair(y, x, w, 2 * pp, n);
    if (bias)
        for (int t = 0; t < n; t++)
            for (int o = 0; o < w->out; o++) y[(size_t)t * w->out + o] += bias[o];
}
