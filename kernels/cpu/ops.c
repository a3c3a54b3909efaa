/* fp32 CPU kernels: the reference for every backend, and the CPU backend itself.
 * GEMMs go to OpenBLAS; the rest are plain loops parallelised with OpenMP. */
#include "kernels.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
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

void fl_cpu_rmsnorm_forward(float *y, const float *x, const float *w, int n, int dim, float eps) {
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim;
        float *yt = y + (size_t)t * dim;
        float ss = 0.0f;
        for (int i = 0; i < dim; i++) ss += xt[i] * xt[i];
        float rinv = 1.0f / sqrtf(ss / dim + eps);
        for (int i = 0; i < dim; i++) yt[i] = w[i] * (xt[i] * rinv);
    }
}

void fl_cpu_rope_forward(float *x, const int32_t *pos, const float *inv_freq, int n, int n_heads,
                         int head_dim) {
    int half = head_dim / 2;
    float cs[512], sn[512]; /* head_dim/2 <= 512 is checked at model load */
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < half; i++) {
            float angle = (float)pos[t] * inv_freq[i];
            cs[i] = cosf(angle);
            sn[i] = sinf(angle);
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

/* One query head against positions 0..last: online softmax in one pass, so no
 * score buffer sized by the context is needed. */
static float attend_one(float *out, const float *q, const fl_kv_layer *kv,
                        const int32_t *page_table, int last, int kv_off, int head_dim,
                        float scale) {
    float m = -FLT_MAX, l = 0.0f;
    for (int i = 0; i < head_dim; i++) out[i] = 0.0f;
    for (int p = 0; p <= last; p++) {
        size_t row = kv_row(kv, page_table, p) + kv_off;
        const float *k = kv->k + row, *v = kv->v + row;
        float s = 0.0f;
        for (int i = 0; i < head_dim; i++) s += q[i] * k[i];
        s *= scale;
        if (s > m) {
            float c = expf(m - s);
            l *= c;
            for (int i = 0; i < head_dim; i++) out[i] *= c;
            m = s;
        }
        float e = expf(s - m);
        l += e;
        for (int i = 0; i < head_dim; i++) out[i] += e * v[i];
    }
    float inv = 1.0f / l;
    for (int i = 0; i < head_dim; i++) out[i] *= inv;
    return m + logf(l);
}

void fl_cpu_attention_forward(float *out, float *lse, const float *q, const fl_kv_layer *kv,
                              const int32_t *const *page_tables, const int32_t *pos, int n,
                              int n_heads, int n_kv_heads, int head_dim) {
    float scale = 1.0f / sqrtf((float)head_dim);
    int group = n_heads / n_kv_heads;
    int total = n * n_heads;
#pragma omp parallel for schedule(dynamic, 4) if (total > 8)
    for (int th = 0; th < total; th++) {
        int t = th / n_heads, h = th % n_heads;
        size_t off = ((size_t)t * n_heads + h) * head_dim;
        float m = attend_one(out + off, q + off, kv, page_tables[t], pos[t],
                             (h / group) * head_dim, head_dim, scale);
        if (lse) lse[th] = m;
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
