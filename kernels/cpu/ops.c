/* fp32 CPU kernels: the reference for every backend, and the CPU backend itself.
 * GEMMs go to OpenBLAS; the rest are plain loops parallelised with OpenMP. */
#include "kernels.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <string.h>

void fl_cpu_matmul(float *y, const float *x, const float *w, const float *bias, int n, int in,
                   int out) {
    if (n == 1) /* a single row is a matrix-vector product: gemv skips gemm's packing */
        cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, 0.0f, y, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f,
                    y, out);
    if (bias) {
        for (int t = 0; t < n; t++)
            for (int o = 0; o < out; o++) y[(size_t)t * out + o] += bias[o];
    }
}

void fl_cpu_rmsnorm_forward_rinv(float *y, float *rinv, const float *x, const float *w, int n,
                                 int dim, float eps) {
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim;
        float *yt = y + (size_t)t * dim;
        float ss = 0.0f;
        for (int i = 0; i < dim; i++) ss += xt[i] * xt[i];
        float r = 1.0f / sqrtf(ss / dim + eps);
        for (int i = 0; i < dim; i++) yt[i] = w[i] * (xt[i] * r);
        if (rinv) rinv[t] = r;
    }
}

void fl_cpu_rmsnorm_forward(float *y, const float *x, const float *w, int n, int dim, float eps) {
    fl_cpu_rmsnorm_forward_rinv(y, NULL, x, w, n, dim, eps);
}

/* Rotates each (x[i], x[i + half]) pair of every head by sign * pos * inv_freq[i]:
 * sign 1 is RoPE, sign -1 its transpose, which carries the gradient back. */
static void rope_rotate(float *x, const int32_t *pos, const float *inv_freq, int n, int n_heads,
                        int head_dim, float sign) {
    int half = head_dim / 2;
    float cs[512], sn[512]; /* head_dim/2 <= 512 is checked at model load */
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < half; i++) {
            float angle = (float)pos[t] * inv_freq[i];
            cs[i] = cosf(angle);
            sn[i] = sign * sinf(angle);
        }
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = a * sn[i] + b * cs[i];
            }
        }
    }
}

void fl_cpu_rope_forward(float *x, const int32_t *pos, const float *inv_freq, int n, int n_heads,
                         int head_dim) {
    rope_rotate(x, pos, inv_freq, n, n_heads, head_dim, 1.0f);
}

void fl_cpu_rope_backward(float *dx, const int32_t *pos, const float *inv_freq, int n,
                          int n_heads, int head_dim) {
    rope_rotate(dx, pos, inv_freq, n, n_heads, head_dim, -1.0f);
}

static inline size_t kv_row(const fl_kv_layer *kv, const int32_t *page_table, int p) {
    return ((size_t)page_table[p / kv->page_tokens] * kv->page_tokens + p % kv->page_tokens) *
           kv->kv_dim;
}

void fl_cpu_kv_store(const fl_kv_layer *kv, const float *k, const float *v,
                     const int32_t *const *page_tables, const int32_t *pos, int n) {
    for (int t = 0; t < n; t++) {
        size_t row = kv_row(kv, page_tables[t], pos[t]);
        memcpy(kv->k + row, k + (size_t)t * kv->kv_dim, sizeof(float) * kv->kv_dim);
        memcpy(kv->v + row, v + (size_t)t * kv->kv_dim, sizeof(float) * kv->kv_dim);
    }
}

static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Heads [h0, h1) of one token against positions 0..last of its sequence. Positions go
 * a page at a time: each K and V row is read once for all the heads, and the online
 * softmax rescales once per page. Each head's arithmetic does not depend on which
 * other heads share the call, so results do not depend on how work is split.
 * Inlined with a constant head_dim for the common sizes (see attend_token). */
static inline __attribute__((always_inline)) void
attend_token_hd(float *out, float *lse, const float *q, const fl_kv_layer *kv,
                const int32_t *page_table, int last, int h0, int h1, int group, int head_dim,
                float scale) {
    float score[FL_ATTN_MAX_HEADS * FL_KV_PAGE_TOKENS]; /* [head - h0, row in page] */
    float m[FL_ATTN_MAX_HEADS], l[FL_ATTN_MAX_HEADS];
    int P = kv->page_tokens, nh = h1 - h0;
    for (int h = 0; h < nh; h++) {
        m[h] = -FLT_MAX;
        l[h] = 0.0f;
        memset(out + (size_t)(h0 + h) * head_dim, 0, sizeof(float) * head_dim);
    }
    for (int first = 0; first <= last; first += P) {
        int rows = last + 1 - first < P ? last + 1 - first : P;
        size_t base = (size_t)page_table[first / P] * P * kv->kv_dim;
        for (int j = 0; j < rows; j++) {
            const float *k = kv->k + base + (size_t)j * kv->kv_dim;
            for (int h = 0; h < nh; h++)
                score[h * P + j] = dot(q + (size_t)(h0 + h) * head_dim,
                                       k + (size_t)((h0 + h) / group) * head_dim, head_dim) *
                                   scale;
        }
        for (int h = 0; h < nh; h++) {
            float *s = score + h * P, mx = m[h];
            for (int j = 0; j < rows; j++) mx = s[j] > mx ? s[j] : mx;
            float c = expf(m[h] - mx), sum = 0.0f;
            for (int j = 0; j < rows; j++) sum += s[j] = expf(s[j] - mx);
            l[h] = l[h] * c + sum;
            m[h] = mx;
            float *acc = out + (size_t)(h0 + h) * head_dim;
            if (c != 1.0f)
                for (int i = 0; i < head_dim; i++) acc[i] *= c;
        }
        for (int j = 0; j < rows; j++) {
            const float *v = kv->v + base + (size_t)j * kv->kv_dim;
            for (int h = 0; h < nh; h++) {
                float e = score[h * P + j], *acc = out + (size_t)(h0 + h) * head_dim;
                const float *vh = v + (size_t)((h0 + h) / group) * head_dim;
#pragma omp simd
                for (int i = 0; i < head_dim; i++) acc[i] += e * vh[i];
            }
        }
    }
    for (int h = 0; h < nh; h++) {
        float inv = 1.0f / l[h], *acc = out + (size_t)(h0 + h) * head_dim;
        for (int i = 0; i < head_dim; i++) acc[i] *= inv;
        if (lse) lse[h0 + h] = m[h] + logf(l[h]);
    }
}

static void attend_token(float *out, float *lse, const float *q, const fl_kv_layer *kv,
                         const int32_t *page_table, int last, int h0, int h1, int group,
                         int head_dim, float scale) {
    switch (head_dim) {
#define HD_CASE(D)                                                                        \
    case D:                                                                               \
        attend_token_hd(out, lse, q, kv, page_table, last, h0, h1, group, D, scale);       \
        break;
        FL_CPU_HEAD_DIMS(HD_CASE)
#undef HD_CASE
    default:
        attend_token_hd(out, lse, q, kv, page_table, last, h0, h1, group, head_dim, scale);
    }
}

void fl_cpu_attention_forward(float *out, float *lse, const float *q, const fl_kv_layer *kv,
                              const int32_t *const *page_tables, const int32_t *pos, int n,
                              int n_heads, int n_kv_heads, int head_dim) {
    float scale = 1.0f / sqrtf((float)head_dim);
    int group = n_heads / n_kv_heads;
    /* Enough work items for every thread: whole tokens when there are many, else
     * each token's heads split in parts. */
    int threads = omp_get_max_threads();
    int parts = n >= 2 * threads ? 1 : (2 * threads + n - 1) / n;
    if (parts > n_heads) parts = n_heads;
    int per = (n_heads + parts - 1) / parts;
    int items = n * parts;
    long work = 0; /* multiply-adds, to keep tiny calls out of the thread pool */
    for (int t = 0; t < n; t++) work += (long)(pos[t] + 1) * n_heads * head_dim;
#pragma omp parallel for schedule(dynamic, 1) if (items > 1 && work > 8192)
    for (int it = 0; it < items; it++) {
        int t = it / parts, h0 = (it % parts) * per, h1 = h0 + per < n_heads ? h0 + per : n_heads;
        if (h0 >= h1) continue;
        size_t off = (size_t)t * n_heads * head_dim;
        attend_token(out + off, lse ? lse + (size_t)t * n_heads : NULL, q + off, kv,
                     page_tables[t], pos[t], h0, h1, group, head_dim, scale);
    }
}

void fl_cpu_swiglu_forward(float *y, const float *gate, const float *up, int n) {
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        y[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void fl_cpu_add_inplace(float *x, const float *y, int n) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}
