/* fp32 CPU backward kernels, each the gradient of a forward in ops.c. Outputs named
 * *_acc or documented "+=" in kernels.h accumulate; the rest are overwritten. */
#include "kernels.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

void fl_cpu_rmsnorm_backward(float *dx, const float *dy, const float *x, const float *rinv,
                             const float *w, int n, int dim) {
    /* y_i = w_i x_i r with r = (mean(x^2) + eps)^-1/2, dr/dx_k = -r^3 x_k / dim:
     * dx_k = r w_k dy_k - x_k r^3 / dim * sum_i dy_i w_i x_i */
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim, *dyt = dy + (size_t)t * dim;
        float *dxt = dx + (size_t)t * dim;
        float r = rinv[t], dot = 0.0f;
        for (int i = 0; i < dim; i++) dot += dyt[i] * w[i] * xt[i];
        float c = r * r * r * dot / dim;
        for (int i = 0; i < dim; i++) dxt[i] += r * w[i] * dyt[i] - c * xt[i];
    }
}

void fl_cpu_swiglu_backward(float *dgate, float *dup, const float *dy, const float *gate,
                            const float *up, int n) {
    /* silu(g) = g s with s = sigmoid(g); silu'(g) = s (1 + g (1 - s)) */
    for (int i = 0; i < n; i++) {
        float g = gate[i], s = 1.0f / (1.0f + expf(-g));
        dgate[i] = dy[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = dy[i] * g * s;
    }
}

static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline __attribute__((always_inline)) void axpy(float *y, float a, const float *x, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* dq of one token's heads [h0, h0 + group), which share kv head g, against positions
 * 0..last, a page of K/V rows at a time (page_tokens <= FL_KV_PAGE_TOKENS, as in the
 * forward): all the page's dots, then its exps, then the updates, so the independent
 * dots overlap instead of each waiting on an exp. */
static inline __attribute__((always_inline)) void
dq_token(float *dq, const float *dout, const float *out, const float *lse, const float *q,
         const fl_kv_layer *kv, const int32_t *page_table, int last, int g, int group,
         int head_dim, float scale) {
    float D[FL_ATTN_MAX_HEADS], p[FL_ATTN_MAX_HEADS * FL_KV_PAGE_TOKENS],
        dp[FL_ATTN_MAX_HEADS * FL_KV_PAGE_TOKENS]; /* [head - h0, row in page] */
    int P = kv->page_tokens, h0 = g * group;
    for (int h = h0; h < h0 + group; h++) {
        D[h - h0] = dot(dout + (size_t)h * head_dim, out + (size_t)h * head_dim, head_dim);
        memset(dq + (size_t)h * head_dim, 0, sizeof(float) * head_dim);
    }
    for (int first = 0; first <= last; first += P) {
        int rows = last + 1 - first < P ? last + 1 - first : P;
        size_t base = (size_t)page_table[first / P] * P * kv->kv_dim + (size_t)g * head_dim;
        for (int j = 0; j < rows; j++) {
            const float *k = kv->k + base + (size_t)j * kv->kv_dim;
            const float *v = kv->v + base + (size_t)j * kv->kv_dim;
            for (int h = 0; h < group; h++) { /* p = exp(s - lse), dp = dout . v */
                size_t off = (size_t)(h0 + h) * head_dim;
                p[h * P + j] = dot(q + off, k, head_dim) * scale - lse[h0 + h];
                dp[h * P + j] = dot(dout + off, v, head_dim);
            }
        }
        for (int h = 0; h < group; h++)
            for (int j = 0; j < rows; j++) p[h * P + j] = expf(p[h * P + j]);
        for (int j = 0; j < rows; j++) {
            const float *k = kv->k + base + (size_t)j * kv->kv_dim;
            for (int h = 0; h < group; h++)
                axpy(dq + (size_t)(h0 + h) * head_dim, p[h * P + j] * (dp[h * P + j] - D[h]), k,
                     head_dim);
        }
    }
    for (int h = h0; h < h0 + group; h++)
        for (int i = 0; i < head_dim; i++) dq[(size_t)h * head_dim + i] *= scale;
}

/* Adds to dk_acc/dv_acc the rows of page number pg, columns of kv head g, from every
 * query that sees them, in query order then head order; staged like dq_token. */
static inline __attribute__((always_inline)) void
dkv_page(float *dk_acc, float *dv_acc, const float *dout, const float *out, const float *lse,
         const float *q, const fl_kv_layer *kv, const int32_t *page_table, const int32_t *pos,
         int n, int pg, int g, int group, int n_heads, int head_dim, float scale) {
    int P = kv->page_tokens, kv_dim = kv->kv_dim, first = pg * P;
    size_t base = (size_t)page_table[pg] * P * kv_dim + (size_t)g * head_dim;
    size_t acc = (size_t)first * kv_dim + (size_t)g * head_dim;
    for (int t = 0; t < n; t++) {
        int rows = pos[t] + 1 - first;
        if (rows <= 0) continue;
        if (rows > P) rows = P;
        for (int h = g * group; h < (g + 1) * group; h++) {
            size_t off = ((size_t)t * n_heads + h) * head_dim;
            const float *qh = q + off, *doh = dout + off;
            float D = dot(doh, out + off, head_dim), l = lse[(size_t)t * n_heads + h];
            float p[FL_KV_PAGE_TOKENS], dp[FL_KV_PAGE_TOKENS];
            for (int j = 0; j < rows; j++) {
                p[j] = dot(qh, kv->k + base + (size_t)j * kv_dim, head_dim) * scale - l;
                dp[j] = dot(doh, kv->v + base + (size_t)j * kv_dim, head_dim);
            }
            for (int j = 0; j < rows; j++) p[j] = expf(p[j]);
            for (int j = 0; j < rows; j++) {
                axpy(dk_acc + acc + (size_t)j * kv_dim, scale * p[j] * (dp[j] - D), qh, head_dim);
                axpy(dv_acc + acc + (size_t)j * kv_dim, p[j], doh, head_dim);
            }
        }
    }
}

/* Two passes so that every output has one owner and threads never share a sum: dq
 * per (token, kv head), then dk/dv per (kv head, key page). Each recomputes P and dS
 * (about 1.4x the arithmetic of a fused pass) but scales with threads beyond the kv
 * head count, and each owner's order is fixed, so results do not depend on threads. */
static inline __attribute__((always_inline)) void
attention_backward_hd(float *dq, float *dk_acc, float *dv_acc, const float *dout,
                      const float *out, const float *lse, const float *q,
                      const fl_kv_layer *kv, const int32_t *page_table, const int32_t *pos,
                      int n, int n_heads, int n_kv_heads, int head_dim) {
    float scale = 1.0f / sqrtf((float)head_dim);
    int group = n_heads / n_kv_heads, last = 0;
    long work = 0; /* multiply-adds, to keep tiny calls out of the thread pool */
    for (int t = 0; t < n; t++) {
        last = pos[t] > last ? pos[t] : last;
        work += (long)(pos[t] + 1) * n_heads * head_dim;
    }
    int items = n * n_kv_heads;
#pragma omp parallel for schedule(dynamic, 1) if (items > 1 && work > 8192)
    for (int it = 0; it < items; it++) {
        int t = it / n_kv_heads, g = it % n_kv_heads;
        size_t off = (size_t)t * n_heads * head_dim;
        dq_token(dq + off, dout + off, out + off, lse + (size_t)t * n_heads, q + off, kv,
                 page_table, pos[t], g, group, head_dim, scale);
    }
    int pages = n > 0 ? last / kv->page_tokens + 1 : 0;
    items = pages * n_kv_heads;
#pragma omp parallel for schedule(dynamic, 1) if (items > 1 && work > 8192)
    for (int it = 0; it < items; it++)
        dkv_page(dk_acc, dv_acc, dout, out, lse, q, kv, page_table, pos, n, it / n_kv_heads,
                 it % n_kv_heads, group, n_heads, head_dim, scale);
}

void fl_cpu_attention_backward(float *dq, float *dk_acc, float *dv_acc, const float *dout,
                               const float *out, const float *lse, const float *q,
                               const fl_kv_layer *kv, const int32_t *page_table,
                               const int32_t *pos, int n, int n_heads, int n_kv_heads,
                               int head_dim) {
    /* a constant head_dim for the common sizes, as the forward does */
    switch (head_dim) {
#define HD_CASE(D)                                                                         \
    case D:                                                                                \
        attention_backward_hd(dq, dk_acc, dv_acc, dout, out, lse, q, kv, page_table, pos, n, \
                              n_heads, n_kv_heads, D);                                     \
        break;
        FL_CPU_HEAD_DIMS(HD_CASE)
#undef HD_CASE
    default:
        attention_backward_hd(dq, dk_acc, dv_acc, dout, out, lse, q, kv, page_table, pos, n,
                              n_heads, n_kv_heads, head_dim);
    }
}

/* One row: its loss (0 when ignored), and the row overwritten with its gradient. */
static double cross_entropy_row(float *row, int32_t target, int vocab, float scale) {
    if (target < 0) {
        memset(row, 0, sizeof(float) * vocab);
        return 0.0;
    }
    float mx = row[0], xt = row[target];
    for (int i = 1; i < vocab; i++) mx = row[i] > mx ? row[i] : mx;
    double sum = 0.0; /* in double: a long row of small terms */
    for (int i = 0; i < vocab; i++) sum += row[i] = expf(row[i] - mx);
    float inv = (float)(scale / sum);
    for (int i = 0; i < vocab; i++) row[i] *= inv;
    row[target] -= scale;
    return log(sum) - ((double)xt - mx);
}

#define CE_BLOCK 64 /* rows whose losses are summed in row order after a parallel pass */

double fl_cpu_cross_entropy(float *logits, const int32_t *targets, int n, int vocab,
                            float scale) {
    double total = 0.0;
    for (int t0 = 0; t0 < n; t0 += CE_BLOCK) {
        int rows = n - t0 < CE_BLOCK ? n - t0 : CE_BLOCK;
        double loss[CE_BLOCK];
#pragma omp parallel for schedule(dynamic, 1) if (rows > 1 && (long)rows * vocab > 65536)
        for (int b = 0; b < rows; b++)
            loss[b] = cross_entropy_row(logits + (size_t)(t0 + b) * vocab, targets[t0 + b],
                                        vocab, scale);
        for (int b = 0; b < rows; b++) total += loss[b];
    }
    return total;
}

void fl_cpu_matmul_backward_input(float *dx, const float *dy, const float *w, int n, int in,
                                  int out) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, w, in,
                1.0f, dx, in);
}
