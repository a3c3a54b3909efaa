/* Every backward kernel against central finite differences of L = sum(G * f(inputs)), with
 * G a random upstream gradient: through the real fp32 forward kernels (bound 1e-2 above the
 * fp32 rounding noise of L over the step), and through a float64 re-implementation of each
 * forward with a tiny step (bound 1e-4). The attention backward runs over a paged cache with
 * a shuffled page table in reverse chunks, and must match one whole call and give the same
 * bits for any thread count. */
#include "kernels.h"
#include "tap.h"

#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define RMS_EPS 1e-5f
#define STEP32 1e-2f     /* fp32 FD step: inputs are O(1) */
#define STEP64 1e-6      /* float64 FD step */
#define REL32 1e-2
#define REL64 1e-4
/* fp32 rounding noise of L, in FLT_EPSILON units of sqrt(sum (G*f)^2) over the outputs
 * that change: against float64 FD, the fp32 FD error stays under a fifth of it */
#define NOISE_ULPS 8.0
#define FLOOR64 1e-6     /* float64 FD: floor relative to the largest gradient (fp32 analytic) */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static float frand(float lo, float hi) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return lo + (hi - lo) * ((float)((rng_state >> 40) & 0xffffff) / 16777216.0f);
}

static float *rand_array(size_t n, float lo, float hi) {
    float *a = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) a[i] = frand(lo, hi);
    return a;
}

static float *zeros(size_t n) { return calloc(n ? n : 1, sizeof(float)); }

static double *to_double(const float *a, size_t n) {
    double *d = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) d[i] = a[i];
    return d;
}

static float **elems32(float *x, int n) {
    float **e = malloc(sizeof(float *) * (n ? n : 1));
    for (int i = 0; i < n; i++) e[i] = x + i;
    return e;
}

static double **elems64(double *x, int n) {
    double **e = malloc(sizeof(double *) * (n ? n : 1));
    for (int i = 0; i < n; i++) e[i] = x + i;
    return e;
}

/* sum G*f in double; *mag += sqrt(sum (G*f)^2), the scale of its fp32 rounding noise. */
static double objective(const float *G, const float *f, size_t n, double *mag) {
    double s = 0, s2 = 0;
    for (size_t i = 0; i < n; i++) {
        double gf = (double)G[i] * f[i];
        s += gf;
        s2 += gf * gf;
    }
    *mag += sqrt(s2);
    return s;
}

/* L at the current inputs over the outputs that input element i affects (the others are
 * bitwise unchanged between the two evaluations and cancel); the fp32 one also adds to
 * *mag the noise scale of what it summed. */
typedef double (*objective32)(void *ctx, int i, double *mag);
typedef double (*objective64)(void *ctx, int i);

static void fd32(double *fd, double *noise, float *const *x, int n, objective32 L, void *ctx) {
    for (int i = 0; i < n; i++) {
        float x0 = *x[i], xp = x0 + STEP32, xm = x0 - STEP32;
        double mag = 0;
        *x[i] = xp;
        double lp = L(ctx, i, &mag);
        *x[i] = xm;
        double lm = L(ctx, i, &mag);
        *x[i] = x0;
        double h = (double)xp - xm; /* the step as fp32 represents it */
        fd[i] = (lp - lm) / h;
        noise[i] = NOISE_ULPS * FLT_EPSILON * mag / h;
    }
}

static void fd64(double *fd, double *const *x, int n, objective64 L, void *ctx) {
    for (int i = 0; i < n; i++) {
        double x0 = *x[i];
        *x[i] = x0 + STEP64;
        double lp = L(ctx, i);
        *x[i] = x0 - STEP64;
        double lm = L(ctx, i);
        *x[i] = x0;
        fd[i] = (lp - lm) / (2 * STEP64);
    }
}

/* Worst relative error of an against fd: |fd - an| over the mean of their magnitudes, or
 * over floor/rel where that is larger (so an element within its floor passes). NaN fails. */
static double worst_rel(const float *an, const double *fd, const double *floor_i,
                        double floor_all, int n, double rel) {
    double worst = 0;
    for (int i = 0; i < n; i++) {
        double mean = (fabs(an[i]) + fabs(fd[i])) / 2;
        double den = fmax(mean, (floor_i ? floor_i[i] : floor_all) / rel);
        double e = den > 0 ? fabs(fd[i] - an[i]) / den : fabs(fd[i] - an[i]);
        if (!(e <= worst)) worst = e;
    }
    return worst;
}

/* One gradient (analytic an, n elements) against both finite differences. */
static void check_grad(const char *what, const float *an, int n, float *const *x32,
                       objective32 L32, void *c32, double *const *x64, objective64 L64,
                       void *c64) {
    double *fd = calloc(n, sizeof(double)), *noise = calloc(n, sizeof(double));
    /* the forwards' results do not depend on the thread count, and one thread spares
     * thousands of tiny parallel regions */
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    fd32(fd, noise, x32, n, L32, c32);
    omp_set_num_threads(threads);
    double w32 = worst_rel(an, fd, noise, 0, n, REL32);
    tap_ok(w32 <= REL32,
           "%s vs FD of the fp32 forward: worst relative error %.1e (bound %.0e above the fp32 "
           "noise of L/step)",
           what, w32, REL32);
    fd64(fd, x64, n, L64, c64);
    double gmax = 0;
    for (int i = 0; i < n; i++) gmax = fmax(gmax, fabs(fd[i]));
    double w64 = worst_rel(an, fd, NULL, FLOOR64 * gmax, n, REL64);
    tap_ok(w64 <= REL64, "%s vs FD of a float64 forward: worst relative error %.1e (bound %.0e)",
           what, w64, REL64);
    free(fd);
    free(noise);
}

/* acc (start + a gradient) against start + fresh (the gradient from zero). */
static void check_accumulates(const char *what, const float *acc, const float *start,
                              const float *fresh, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double want = (double)start[i] + fresh[i];
        double e = fabs(acc[i] - want) / (fabs(start[i]) + fabs(fresh[i]) + 1e-30);
        if (!(e <= worst)) worst = e;
    }
    tap_ok(worst <= 1e-6, "%s accumulates into what was there (relative error %.1e)", what,
           worst);
}

/* ------------------------------------------------------------------ RMSNorm */

typedef struct {
    float *x, *w, *G, *y;
    int dim;
} rms32_ctx;

static double rms32(void *p, int i, double *mag) {
    rms32_ctx *c = p;
    size_t row = (size_t)(i / c->dim) * c->dim;
    fl_cpu_rmsnorm_forward(c->y, c->x + row, c->w, 1, c->dim, RMS_EPS);
    return objective(c->G + row, c->y, c->dim, mag);
}

typedef struct {
    double *x, *w, *G;
    int dim;
} rms64_ctx;

static double rms64(void *p, int i) {
    rms64_ctx *c = p;
    const double *x = c->x + (size_t)(i / c->dim) * c->dim, *G = c->G + (size_t)(i / c->dim) * c->dim;
    double ss = 0, L = 0;
    for (int k = 0; k < c->dim; k++) ss += x[k] * x[k];
    double r = 1 / sqrt(ss / c->dim + RMS_EPS);
    for (int k = 0; k < c->dim; k++) L += G[k] * c->w[k] * x[k] * r;
    return L;
}

static void test_rmsnorm(int n, int dim) {
    size_t nd = (size_t)n * dim;
    float *x = rand_array(nd, -2, 2), *w = rand_array(dim, 0.5f, 1.5f), *G = rand_array(nd, -1, 1);
    float *y = zeros(nd), *y2 = zeros(nd), *rinv = zeros(n), *dx = zeros(nd), *row = zeros(dim);
    fl_cpu_rmsnorm_forward(y, x, w, n, dim, RMS_EPS);
    fl_cpu_rmsnorm_forward_rinv(y2, rinv, x, w, n, dim, RMS_EPS);
    double rerr = 0;
    for (int t = 0; t < n; t++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[t * dim + i] * x[t * dim + i];
        rerr = fmax(rerr, fabs(rinv[t] * sqrt(ss / dim + RMS_EPS) - 1));
    }
    tap_ok(memcmp(y, y2, sizeof(float) * nd) == 0 && rerr < 1e-6,
           "rmsnorm dim %d: forward_rinv gives bitwise the forward's y, rinv within %.1e of "
           "float64",
           dim, rerr);
    fl_cpu_rmsnorm_backward(dx, G, x, rinv, w, n, dim);
    char what[96];
    snprintf(what, sizeof what, "rmsnorm dim %d: dx", dim);
    rms32_ctx c32 = {x, w, G, row, dim};
    double *x64 = to_double(x, nd), *w64 = to_double(w, dim), *G64 = to_double(G, nd);
    rms64_ctx c64 = {x64, w64, G64, dim};
    float **e32 = elems32(x, (int)nd);
    double **e64 = elems64(x64, (int)nd);
    check_grad(what, dx, (int)nd, e32, rms32, &c32, e64, rms64, &c64);
    float *start = rand_array(nd, -1, 1), *acc = malloc(sizeof(float) * nd);
    memcpy(acc, start, sizeof(float) * nd);
    fl_cpu_rmsnorm_backward(acc, G, x, rinv, w, n, dim);
    check_accumulates(what, acc, start, dx, nd);
    free(x), free(w), free(G), free(y), free(y2), free(rinv), free(dx), free(row);
    free(x64), free(w64), free(G64), free(e32), free(e64), free(start), free(acc);
}

/* --------------------------------------------------------------------- RoPE */

typedef struct {
    float *x, *G, *buf;
    const int32_t *pos;
    const float *inv_freq;
    int n_heads, head_dim;
} rope32_ctx;

static double rope32(void *p, int i, double *mag) {
    rope32_ctx *c = p;
    int hd = c->head_dim, t = i / (c->n_heads * hd);
    size_t off = (size_t)(i / hd) * hd; /* the one head vector element i is in */
    memcpy(c->buf, c->x + off, sizeof(float) * hd);
    fl_cpu_rope_forward(c->buf, c->pos + t, c->inv_freq, 1, 1, hd);
    return objective(c->G + off, c->buf, hd, mag);
}

typedef struct {
    double *x, *G;
    const int32_t *pos;
    const float *inv_freq;
    int n_heads, head_dim;
} rope64_ctx;

static double rope64(void *p, int i) {
    rope64_ctx *c = p;
    int hd = c->head_dim, half = hd / 2, t = i / (c->n_heads * hd);
    size_t off = (size_t)(i / hd) * hd;
    double L = 0;
    for (int k = 0; k < half; k++) {
        /* the fp32 angle the kernels use: at large positions a float64 angle differs by ~1e-3 */
        double angle = (float)c->pos[t] * c->inv_freq[k], a = c->x[off + k], b = c->x[off + k + half];
        L += c->G[off + k] * (a * cos(angle) - b * sin(angle)) +
             c->G[off + k + half] * (a * sin(angle) + b * cos(angle));
    }
    return L;
}

static void test_rope(int head_dim) {
    enum { N = 6, H = 3 };
    const int32_t pos[N] = {0, 1, 17, 1000, 4097, 30001};
    size_t nx = (size_t)N * H * head_dim;
    float inv_freq[512];
    for (int i = 0; i < head_dim / 2; i++)
        inv_freq[i] = 1.0f / powf(10000.0f, 2.0f * i / head_dim);
    float *x = rand_array(nx, -1, 1), *G = rand_array(nx, -1, 1), *dx = malloc(sizeof(float) * nx);
    float *buf = malloc(sizeof(float) * head_dim);
    memcpy(dx, G, sizeof(float) * nx);
    fl_cpu_rope_backward(dx, pos, inv_freq, N, H, head_dim);
    char what[96];
    snprintf(what, sizeof what, "rope head_dim %d, positions 0..30001: dx", head_dim);
    rope32_ctx c32 = {x, G, buf, pos, inv_freq, H, head_dim};
    double *x64 = to_double(x, nx), *G64 = to_double(G, nx);
    rope64_ctx c64 = {x64, G64, pos, inv_freq, H, head_dim};
    float **e32 = elems32(x, (int)nx);
    double **e64 = elems64(x64, (int)nx);
    check_grad(what, dx, (int)nx, e32, rope32, &c32, e64, rope64, &c64);
    free(x), free(G), free(dx), free(buf), free(x64), free(G64), free(e32), free(e64);
}

/* ------------------------------------------------------------------- SwiGLU */

typedef struct {
    float *gate, *up, *G;
} swiglu32_ctx;

static double swiglu32(void *p, int i, double *mag) {
    swiglu32_ctx *c = p;
    float y;
    fl_cpu_swiglu_forward(&y, c->gate + i, c->up + i, 1);
    return objective(c->G + i, &y, 1, mag);
}

typedef struct {
    double *gate, *up, *G;
} swiglu64_ctx;

static double swiglu64(void *p, int i) {
    swiglu64_ctx *c = p;
    double g = c->gate[i];
    return c->G[i] * g / (1 + exp(-g)) * c->up[i];
}

static void test_swiglu(void) {
    enum { N = 300 };
    float *gate = rand_array(N, -8, 8), *up = rand_array(N, -2, 2), *G = rand_array(N, -1, 1);
    float *dgate = zeros(N), *dup = zeros(N);
    fl_cpu_swiglu_backward(dgate, dup, G, gate, up, N);
    swiglu32_ctx c32 = {gate, up, G};
    double *g64 = to_double(gate, N), *u64 = to_double(up, N), *G64 = to_double(G, N);
    swiglu64_ctx c64 = {g64, u64, G64};
    float **eg = elems32(gate, N), **eu = elems32(up, N);
    double **eg64 = elems64(g64, N), **eu64 = elems64(u64, N);
    check_grad("swiglu: dgate", dgate, N, eg, swiglu32, &c32, eg64, swiglu64, &c64);
    check_grad("swiglu: dup", dup, N, eu, swiglu32, &c32, eu64, swiglu64, &c64);
    free(gate), free(up), free(G), free(dgate), free(dup), free(g64), free(u64), free(G64);
    free(eg), free(eu), free(eg64), free(eu64);
}

/* ---------------------------------------------------------------- attention */

typedef struct {
    int seq, n_heads, n_kv_heads, head_dim, page_tokens, n_pages;
    const int32_t *page_table;  /* [n_pages], shuffled */
    const int *chunk_starts;    /* ascending from 0; the backward runs them last first */
    int n_chunks;
} attn_case;

typedef struct {
    float *q, *G, *out;
    const fl_kv_layer *kv;
    const int32_t *const *page_tables;
    const int32_t *pos;
    int seq, n_heads, n_kv_heads, head_dim, wrt_q;
} attn32_ctx;

/* q of token t affects token t; K/V at position j every token from j on. */
static double attn32(void *p, int i, double *mag) {
    attn32_ctx *c = p;
    int q_dim = c->n_heads * c->head_dim;
    int t0 = c->wrt_q ? i / q_dim : i / c->kv->kv_dim, t1 = c->wrt_q ? t0 + 1 : c->seq;
    size_t off = (size_t)t0 * q_dim;
    fl_cpu_attention_forward(c->out + off, NULL, c->q + off, c->kv, c->page_tables + t0,
                             c->pos + t0, t1 - t0, c->n_heads, c->n_kv_heads, c->head_dim);
    return objective(c->G + off, c->out + off, (size_t)(t1 - t0) * q_dim, mag);
}

typedef struct {
    double *q, *k, *v, *G;
    int seq, n_heads, n_kv_heads, head_dim, wrt_q;
} attn64_ctx;

/* sum G*out of token t (at position t) over contiguous K/V rows. */
static double attn64_token(const attn64_ctx *c, int t) {
    int hd = c->head_dim, q_dim = c->n_heads * hd, kv_dim = c->n_kv_heads * hd;
    int group = c->n_heads / c->n_kv_heads;
    double L = 0, s[256];
    for (int h = 0; h < c->n_heads; h++) {
        const double *q = c->q + (size_t)t * q_dim + h * hd, *G = c->G + (size_t)t * q_dim + h * hd;
        size_t kvo = (size_t)(h / group) * hd;
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j <= t; j++) {
            double d = 0;
            for (int i = 0; i < hd; i++) d += q[i] * c->k[(size_t)j * kv_dim + kvo + i];
            s[j] = d / sqrt((double)hd);
            mx = fmax(mx, s[j]);
        }
        for (int j = 0; j <= t; j++) sum += s[j] = exp(s[j] - mx);
        for (int j = 0; j <= t; j++) {
            double gv = 0;
            for (int i = 0; i < hd; i++) gv += G[i] * c->v[(size_t)j * kv_dim + kvo + i];
            L += s[j] / sum * gv;
        }
    }
    return L;
}

static double attn64(void *p, int i) {
    attn64_ctx *c = p;
    int t0 = c->wrt_q ? i / (c->n_heads * c->head_dim) : i / (c->n_kv_heads * c->head_dim);
    int t1 = c->wrt_q ? t0 + 1 : c->seq;
    double L = 0;
    for (int t = t0; t < t1; t++) L += attn64_token(c, t);
    return L;
}

/* The backward over the chunks, last chunk first, into zeroed dq/dk/dv. */
static void attn_backward_chunked(float *dq, float *dk, float *dv, const float *G,
                                  const float *out, const float *lse, const float *q,
                                  const fl_kv_layer *kv, const attn_case *ac,
                                  const int32_t *pos) {
    int q_dim = ac->n_heads * ac->head_dim;
    memset(dk, 0, sizeof(float) * ac->seq * kv->kv_dim);
    memset(dv, 0, sizeof(float) * ac->seq * kv->kv_dim);
    for (int c = ac->n_chunks - 1; c >= 0; c--) {
        int t0 = ac->chunk_starts[c], t1 = c + 1 < ac->n_chunks ? ac->chunk_starts[c + 1] : ac->seq;
        size_t off = (size_t)t0 * q_dim;
        fl_cpu_attention_backward(dq + off, dk, dv, G + off, out + off,
                                  lse + (size_t)t0 * ac->n_heads, q + off, kv, ac->page_table,
                                  pos + t0, t1 - t0, ac->n_heads, ac->n_kv_heads, ac->head_dim);
    }
}

static double max_rel_diff(const float *a, const float *b, size_t n) {
    double d = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs(a[i] - b[i]));
        m = fmax(m, fabs(a[i]));
    }
    return m > 0 ? d / m : d;
}

static void test_attention(const attn_case *ac) {
    int seq = ac->seq, H = ac->n_heads, KVH = ac->n_kv_heads, hd = ac->head_dim;
    int P = ac->page_tokens, q_dim = H * hd, kv_dim = KVH * hd;
    size_t nq = (size_t)seq * q_dim, nkv = (size_t)seq * kv_dim;
    size_t pool = (size_t)ac->n_pages * P * kv_dim;
    float *kpool = malloc(sizeof(float) * pool), *vpool = malloc(sizeof(float) * pool);
    for (size_t i = 0; i < pool; i++) kpool[i] = vpool[i] = NAN; /* a stray read shows */
    fl_kv_layer kv = {kpool, vpool, P, kv_dim};
    int32_t *pos = malloc(sizeof(int32_t) * seq);
    const int32_t **pts = malloc(sizeof(int32_t *) * seq);
    for (int t = 0; t < seq; t++) pos[t] = t, pts[t] = ac->page_table;
    float *q = rand_array(nq, -1.5f, 1.5f), *k = rand_array(nkv, -1.5f, 1.5f);
    float *v = rand_array(nkv, -1, 1), *G = rand_array(nq, -1, 1);
    fl_cpu_kv_store(&kv, k, v, pts, pos, seq);
    float *out = zeros(nq), *lse = zeros((size_t)seq * H), *scratch = zeros(nq);
    fl_cpu_attention_forward(out, lse, q, &kv, pts, pos, seq, H, KVH, hd);

    float *dq = zeros(nq), *dk = zeros(nkv), *dv = zeros(nkv);
    attn_backward_chunked(dq, dk, dv, G, out, lse, q, &kv, ac, pos);

    char what[160], shape[128];
    snprintf(shape, sizeof shape, "attention %d q / %d kv heads, head_dim %d, %d tokens in %d chunks",
             H, KVH, hd, seq, ac->n_chunks);
    attn32_ctx c32 = {q, G, scratch, &kv, pts, pos, seq, H, KVH, hd, 1};
    double *q64 = to_double(q, nq), *k64 = to_double(k, nkv), *v64 = to_double(v, nkv),
           *G64 = to_double(G, nq);
    attn64_ctx c64 = {q64, k64, v64, G64, seq, H, KVH, hd, 1};
    float **eq = elems32(q, (int)nq), **ek = malloc(sizeof(float *) * nkv),
          **ev = malloc(sizeof(float *) * nkv);
    for (int j = 0; j < seq; j++) /* K/V rows where the page table put them */
        for (int i = 0; i < kv_dim; i++) {
            size_t row = ((size_t)ac->page_table[j / P] * P + j % P) * kv_dim;
            ek[(size_t)j * kv_dim + i] = kpool + row + i;
            ev[(size_t)j * kv_dim + i] = vpool + row + i;
        }
    double **eq64 = elems64(q64, (int)nq), **ek64 = elems64(k64, (int)nkv),
           **ev64 = elems64(v64, (int)nkv);
    snprintf(what, sizeof what, "%s: dq", shape);
    check_grad(what, dq, (int)nq, eq, attn32, &c32, eq64, attn64, &c64);
    c32.wrt_q = c64.wrt_q = 0;
    snprintf(what, sizeof what, "%s: dk_acc", shape);
    check_grad(what, dk, (int)nkv, ek, attn32, &c32, ek64, attn64, &c64);
    snprintf(what, sizeof what, "%s: dv_acc", shape);
    check_grad(what, dv, (int)nkv, ev, attn32, &c32, ev64, attn64, &c64);

    /* one call over the whole sequence */
    float *dq1 = zeros(nq), *dk1 = zeros(nkv), *dv1 = zeros(nkv);
    fl_cpu_attention_backward(dq1, dk1, dv1, G, out, lse, q, &kv, ac->page_table, pos, seq, H,
                              KVH, hd);
    double eq_ = max_rel_diff(dq, dq1, nq), ek_ = max_rel_diff(dk, dk1, nkv),
           ev_ = max_rel_diff(dv, dv1, nkv);
    tap_ok(eq_ <= 1e-5 && ek_ <= 1e-5 && ev_ <= 1e-5,
           "%s: one whole call gives the chunks' dq, dk, dv (max difference over max %.1e, "
           "%.1e, %.1e)",
           shape, eq_, ek_, ev_);

    /* the same bits for 1, 2 and 3 threads */
    int threads = omp_get_max_threads(), same = 1;
    for (int nt = 1; nt <= 3; nt++) {
        omp_set_num_threads(nt);
        attn_backward_chunked(dq1, dk1, dv1, G, out, lse, q, &kv, ac, pos);
        same = same && memcmp(dq, dq1, sizeof(float) * nq) == 0 &&
               memcmp(dk, dk1, sizeof(float) * nkv) == 0 &&
               memcmp(dv, dv1, sizeof(float) * nkv) == 0;
    }
    omp_set_num_threads(threads);
    tap_ok(same, "%s: bitwise the same dq, dk, dv with 1, 2 and 3 threads", shape);

    free(kpool), free(vpool), free(pos), free(pts), free(q), free(k), free(v), free(G);
    free(out), free(lse), free(scratch), free(dq), free(dk), free(dv), free(dq1), free(dk1),
        free(dv1);
    free(q64), free(k64), free(v64), free(G64), free(eq), free(ek), free(ev), free(eq64),
        free(ek64), free(ev64);
}

/* ------------------------------------------------------------ cross-entropy */

typedef struct {
    float *logits, *buf;
    const int32_t *targets;
    int vocab;
    float scale;
} ce32_ctx;

/* L = scale * loss of row i / vocab (the other rows' losses cancel). */
static double ce32(void *p, int i, double *mag) {
    ce32_ctx *c = p;
    int t = i / c->vocab;
    memcpy(c->buf, c->logits + (size_t)t * c->vocab, sizeof(float) * c->vocab);
    double loss = fl_cpu_cross_entropy(c->buf, c->targets + t, 1, c->vocab, 1.0f);
    *mag += c->scale; /* the fp32 exps leave ~1 ulp in the log-sum, whatever the loss */
    return c->scale * loss;
}

typedef struct {
    double *logits;
    const int32_t *targets;
    int vocab;
    double scale;
} ce64_ctx;

static double ce64_row(const double *x, int32_t target, int vocab) {
    if (target < 0) return 0;
    double mx = x[0], sum = 0;
    for (int i = 1; i < vocab; i++) mx = fmax(mx, x[i]);
    for (int i = 0; i < vocab; i++) sum += exp(x[i] - mx);
    return mx + log(sum) - x[target];
}

static double ce64(void *p, int i) {
    ce64_ctx *c = p;
    int t = i / c->vocab;
    return c->scale * ce64_row(c->logits + (size_t)t * c->vocab, c->targets[t], c->vocab);
}

static void test_cross_entropy(void) {
    enum { N = 6, V = 40 };
    const int32_t targets[N] = {3, -1, 0, 39, -1, 17};
    float scale = 0.25f; /* 1 / the rows with a target */
    float *logits = rand_array(N * V, -3, 3), *grad = malloc(sizeof(float) * N * V);
    for (int i = 0; i < V; i++) logits[3 * V + i] += 200; /* expf(200) overflows unless shifted */
    memcpy(grad, logits, sizeof(float) * N * V);
    double loss = fl_cpu_cross_entropy(grad, targets, N, V, scale);
    double *l64 = to_double(logits, N * V), want = 0;
    for (int t = 0; t < N; t++) want += ce64_row(l64 + t * V, targets[t], V);
    int zero = 1;
    for (int i = 0; i < V; i++) zero = zero && grad[1 * V + i] == 0 && grad[4 * V + i] == 0;
    tap_ok(fabs(loss - want) <= 1e-6 * want && zero,
           "cross-entropy: loss %.6f is the float64 sum over rows with a target (%.6f); rows "
           "with target -1 get zero gradient",
           loss, want);
    float *buf = malloc(sizeof(float) * V);
    ce32_ctx c32 = {logits, buf, targets, V, scale};
    ce64_ctx c64 = {l64, targets, V, scale};
    float **e32 = elems32(logits, N * V);
    double **e64 = elems64(l64, N * V);
    check_grad("cross-entropy (a row offset by 200, two rows ignored): dlogits", grad, N * V,
               e32, ce32, &c32, e64, ce64, &c64);
    free(logits), free(grad), free(l64), free(buf), free(e32), free(e64);
}

/* Many rows and a wider vocab: the parallel path, over more than one block of rows,
 * against float64, and the same loss and gradient bits for 1 and 2 threads. */
static void test_cross_entropy_wide(void) {
    enum { N = 150, V = 1000 };
    int32_t targets[N];
    for (int t = 0; t < N; t++) targets[t] = t % 7 == 3 ? -1 : (t * 37) % V;
    float *logits = rand_array((size_t)N * V, -4, 4), *g1 = malloc(sizeof(float) * N * V),
          *g2 = malloc(sizeof(float) * N * V);
    float scale = 1.0f / N;
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    memcpy(g1, logits, sizeof(float) * N * V);
    double loss1 = fl_cpu_cross_entropy(g1, targets, N, V, scale);
    omp_set_num_threads(2);
    memcpy(g2, logits, sizeof(float) * N * V);
    double loss2 = fl_cpu_cross_entropy(g2, targets, N, V, scale);
    omp_set_num_threads(threads);
    double want = 0, err = 0;
    double *row = malloc(sizeof(double) * V);
    for (int t = 0; t < N; t++) {
        for (int i = 0; i < V; i++) row[i] = logits[(size_t)t * V + i];
        want += ce64_row(row, targets[t], V);
        if (targets[t] < 0) {
            for (int i = 0; i < V; i++) err = fmax(err, fabs(g1[(size_t)t * V + i]) / scale);
            continue;
        }
        double mx = row[0], sum = 0;
        for (int i = 1; i < V; i++) mx = fmax(mx, row[i]);
        for (int i = 0; i < V; i++) sum += exp(row[i] - mx);
        for (int i = 0; i < V; i++) {
            double g = (exp(row[i] - mx) / sum - (i == targets[t])) * scale;
            err = fmax(err, fabs(g1[(size_t)t * V + i] - g) / scale);
        }
    }
    tap_ok(fabs(loss1 - want) <= 1e-6 * want && err <= 1e-6,
           "cross-entropy %d rows x %d: loss and gradient match float64 (loss %.1e relative, "
           "gradient %.1e of scale)",
           N, V, fabs(loss1 - want) / want, err);
    tap_ok(loss1 == loss2 && memcmp(g1, g2, sizeof(float) * N * V) == 0,
           "cross-entropy %d rows x %d: bitwise the same loss and gradient with 1 and 2 threads",
           N, V);
    free(logits), free(g1), free(g2), free(row);
}

/* ------------------------------------------------------ frozen linear input */

typedef struct {
    float *x, *w, *G, *y;
    int in, out;
} mm32_ctx;

static double mm32(void *p, int i, double *mag) {
    mm32_ctx *c = p;
    int t = i / c->in;
    fl_cpu_matmul(c->y, c->x + (size_t)t * c->in, c->w, NULL, 1, c->in, c->out);
    return objective(c->G + (size_t)t * c->out, c->y, c->out, mag);
}

typedef struct {
    double *x, *w, *G;
    int in, out;
} mm64_ctx;

static double mm64(void *p, int i) {
    mm64_ctx *c = p;
    int t = i / c->in;
    double L = 0;
    for (int o = 0; o < c->out; o++) {
        double y = 0;
        for (int k = 0; k < c->in; k++) y += c->x[(size_t)t * c->in + k] * c->w[(size_t)o * c->in + k];
        L += c->G[(size_t)t * c->out + o] * y;
    }
    return L;
}

static void test_matmul_backward_input(void) {
    enum { N = 5, IN = 37, OUT = 23 };
    float *x = rand_array(N * IN, -1, 1), *w = rand_array(OUT * IN, -1, 1),
          *G = rand_array(N * OUT, -1, 1), *y = zeros(OUT), *dx = zeros(N * IN);
    fl_cpu_matmul_backward_input(dx, G, w, N, IN, OUT);
    mm32_ctx c32 = {x, w, G, y, IN, OUT};
    double *x64 = to_double(x, N * IN), *w64 = to_double(w, OUT * IN), *G64 = to_double(G, N * OUT);
    mm64_ctx c64 = {x64, w64, G64, IN, OUT};
    float **e32 = elems32(x, N * IN);
    double **e64 = elems64(x64, N * IN);
    check_grad("matmul_backward_input [5 x 37] -> 23: dx", dx, N * IN, e32, mm32, &c32, e64, mm64,
               &c64);
    float *start = rand_array(N * IN, -1, 1), *acc = malloc(sizeof(float) * N * IN);
    memcpy(acc, start, sizeof(float) * N * IN);
    fl_cpu_matmul_backward_input(acc, G, w, N, IN, OUT);
    check_accumulates("matmul_backward_input: dx", acc, start, dx, N * IN);
    free(x), free(w), free(G), free(y), free(dx), free(x64), free(w64), free(G64), free(e32),
        free(e64), free(start), free(acc);
}

/* --------------------------------------------------------------------- LoRA */

typedef struct {
    float *x, *A, *B, *G, *y, *u;
    float scale;
    int n, in, out, r, wrt_x;
} lora32_ctx;

/* x of row t affects row t; A and B every row. */
static double lora32(void *p, int i, double *mag) {
    lora32_ctx *c = p;
    int t0 = c->wrt_x ? i / c->in : 0, rows = c->wrt_x ? 1 : c->n;
    memset(c->y, 0, sizeof(float) * rows * c->out);
    fl_cpu_lora_forward(c->y, c->u, c->x + (size_t)t0 * c->in, c->A, c->B, c->scale, rows, c->in,
                        c->out, c->r);
    return objective(c->G + (size_t)t0 * c->out, c->y, (size_t)rows * c->out, mag);
}

typedef struct {
    double *x, *A, *B, *G;
    double scale;
    int n, in, out, r, wrt_x;
} lora64_ctx;

/* y[t] = scale * B (A x[t]), into y [out]. */
static void lora64_row(double *y, const lora64_ctx *c, int t) {
    double u[64];
    for (int k = 0; k < c->r; k++) {
        u[k] = 0;
        for (int i = 0; i < c->in; i++) u[k] += c->A[(size_t)k * c->in + i] * c->x[(size_t)t * c->in + i];
    }
    for (int o = 0; o < c->out; o++) {
        y[o] = 0;
        for (int k = 0; k < c->r; k++) y[o] += c->B[(size_t)o * c->r + k] * u[k];
        y[o] *= c->scale;
    }
}

static double lora64(void *p, int i) {
    lora64_ctx *c = p;
    int t0 = c->wrt_x ? i / c->in : 0, t1 = c->wrt_x ? t0 + 1 : c->n;
    double L = 0, y[64];
    for (int t = t0; t < t1; t++) {
        lora64_row(y, c, t);
        for (int o = 0; o < c->out; o++) L += c->G[(size_t)t * c->out + o] * y[o];
    }
    return L;
}

static void test_lora_forward(int n, int in, int out, int r, float scale) {
    float *x = rand_array((size_t)n * in, -1, 1), *A = rand_array((size_t)r * in, -1, 1),
          *B = rand_array((size_t)out * r, -1, 1), *y0 = rand_array((size_t)n * out, -1, 1);
    float *y = malloc(sizeof(float) * n * out), *u = zeros((size_t)n * r);
    memcpy(y, y0, sizeof(float) * n * out);
    fl_cpu_lora_forward(y, u, x, A, B, scale, n, in, out, r);
    double *x64 = to_double(x, (size_t)n * in), *A64 = to_double(A, (size_t)r * in),
           *B64 = to_double(B, (size_t)out * r);
    lora64_ctx c = {x64, A64, B64, NULL, scale, n, in, out, r, 1};
    /* errors over the largest magnitude: the sums cancel, so elementwise would be noise */
    double erry = 0, erru = 0, my = 0, mu = 0, ref[64];
    for (int t = 0; t < n; t++) {
        lora64_row(ref, &c, t);
        for (int o = 0; o < out; o++) {
            erry = fmax(erry, fabs(y[t * out + o] - (y0[t * out + o] + ref[o])));
            my = fmax(my, fabs(y0[t * out + o] + ref[o]));
        }
        for (int k = 0; k < r; k++) {
            double uk = 0;
            for (int i = 0; i < in; i++) uk += A64[k * in + i] * x64[t * in + i];
            erru = fmax(erru, fabs(u[t * r + k] - uk));
            mu = fmax(mu, fabs(uk));
        }
    }
    erry /= my;
    erru /= mu;
    tap_ok(erry <= 1e-5 && erru <= 1e-5,
           "lora_forward [%d x %d] -> %d, rank %d, scale %g: y += and u against a float64 loop "
           "(max error over max %.1e, %.1e)",
           n, in, out, r, scale, erry, erru);
    free(x), free(A), free(B), free(y0), free(y), free(u), free(x64), free(A64), free(B64);
}

static void test_lora_backward(void) {
    enum { N = 7, IN = 19, OUT = 13, R = 4 };
    float scale = 2.5f;
    float *x = rand_array(N * IN, -1, 1), *A = rand_array(R * IN, -1, 1),
          *B = rand_array(OUT * R, -1, 1), *G = rand_array(N * OUT, -1, 1);
    float *y = zeros(N * OUT), *u = zeros(N * R);
    float *dx = zeros(N * IN), *dA = zeros(R * IN), *dB = zeros(OUT * R);
    fl_cpu_lora_forward(y, u, x, A, B, scale, N, IN, OUT, R);
    fl_cpu_lora_backward(dx, dA, dB, G, x, u, A, B, scale, N, IN, OUT, R);
    lora32_ctx c32 = {x, A, B, G, y, u, scale, N, IN, OUT, R, 1};
    double *x64 = to_double(x, N * IN), *A64 = to_double(A, R * IN), *B64 = to_double(B, OUT * R),
           *G64 = to_double(G, N * OUT);
    lora64_ctx c64 = {x64, A64, B64, G64, scale, N, IN, OUT, R, 1};
    float **ex = elems32(x, N * IN), **eA = elems32(A, R * IN), **eB = elems32(B, OUT * R);
    double **ex64 = elems64(x64, N * IN), **eA64 = elems64(A64, R * IN),
           **eB64 = elems64(B64, OUT * R);
    check_grad("lora [7 x 19] -> 13, rank 4, scale 2.5: dx", dx, N * IN, ex, lora32, &c32, ex64,
               lora64, &c64);
    c32.wrt_x = c64.wrt_x = 0;
    check_grad("lora [7 x 19] -> 13, rank 4, scale 2.5: dA", dA, R * IN, eA, lora32, &c32, eA64,
               lora64, &c64);
    check_grad("lora [7 x 19] -> 13, rank 4, scale 2.5: dB", dB, OUT * R, eB, lora32, &c32, eB64,
               lora64, &c64);

    /* dA, dB, dx add to what is there; without dx, dA and dB are the same */
    float *sx = rand_array(N * IN, -1, 1), *sA = rand_array(R * IN, -1, 1),
          *sB = rand_array(OUT * R, -1, 1);
    float *ax = malloc(sizeof(float) * N * IN), *aA = malloc(sizeof(float) * R * IN),
          *aB = malloc(sizeof(float) * OUT * R);
    memcpy(ax, sx, sizeof(float) * N * IN);
    memcpy(aA, sA, sizeof(float) * R * IN);
    memcpy(aB, sB, sizeof(float) * OUT * R);
    fl_cpu_lora_backward(ax, aA, aB, G, x, u, A, B, scale, N, IN, OUT, R);
    check_accumulates("lora_backward: dx", ax, sx, dx, N * IN);
    check_accumulates("lora_backward: dA", aA, sA, dA, R * IN);
    check_accumulates("lora_backward: dB", aB, sB, dB, OUT * R);
    float *nA = zeros(R * IN), *nB = zeros(OUT * R);
    fl_cpu_lora_backward(NULL, nA, nB, G, x, u, A, B, scale, N, IN, OUT, R);
    tap_ok(memcmp(nA, dA, sizeof(float) * R * IN) == 0 &&
               memcmp(nB, dB, sizeof(float) * OUT * R) == 0,
           "lora_backward with dx NULL: the same dA and dB");
    free(x), free(A), free(B), free(G), free(y), free(u), free(dx), free(dA), free(dB);
    free(x64), free(A64), free(B64), free(G64), free(ex), free(eA), free(eB), free(ex64),
        free(eA64), free(eB64);
    free(sx), free(sA), free(sB), free(ax), free(aA), free(aB), free(nA), free(nB);
}

/* Enough rows that du is built in several blocks: against the float64 formulas. */
static void test_lora_backward_blocks(void) {
    enum { N = 600, IN = 24, OUT = 20, R = 64 };
    float scale = 0.5f;
    float *x = rand_array(N * IN, -1, 1), *A = rand_array(R * IN, -1, 1),
          *B = rand_array(OUT * R, -1, 1), *G = rand_array(N * OUT, -1, 1);
    float *y = zeros(N * OUT), *u = zeros(N * R);
    float *dx = zeros(N * IN), *dA = zeros(R * IN), *dB = zeros(OUT * R);
    fl_cpu_lora_forward(y, u, x, A, B, scale, N, IN, OUT, R);
    fl_cpu_lora_backward(dx, dA, dB, G, x, u, A, B, scale, N, IN, OUT, R);
    double *du = calloc((size_t)N * R, sizeof(double)), *rA = calloc(R * IN, sizeof(double)),
           *rB = calloc(OUT * R, sizeof(double)), *rx = calloc(N * IN, sizeof(double));
    for (int t = 0; t < N; t++)
        for (int k = 0; k < R; k++) {
            for (int o = 0; o < OUT; o++) du[t * R + k] += (double)scale * G[t * OUT + o] * B[o * R + k];
            for (int i = 0; i < IN; i++) {
                rA[k * IN + i] += du[t * R + k] * x[t * IN + i];
                rx[t * IN + i] += du[t * R + k] * A[k * IN + i];
            }
            for (int o = 0; o < OUT; o++) rB[o * R + k] += (double)scale * G[t * OUT + o] * u[t * R + k];
        }
    double ex = 0, eA = 0, eB = 0, mx = 0, mA = 0, mB = 0;
    for (int i = 0; i < N * IN; i++) ex = fmax(ex, fabs(dx[i] - rx[i])), mx = fmax(mx, fabs(rx[i]));
    for (int i = 0; i < R * IN; i++) eA = fmax(eA, fabs(dA[i] - rA[i])), mA = fmax(mA, fabs(rA[i]));
    for (int i = 0; i < OUT * R; i++) eB = fmax(eB, fabs(dB[i] - rB[i])), mB = fmax(mB, fabs(rB[i]));
    tap_ok(ex / mx <= 1e-5 && eA / mA <= 1e-5 && eB / mB <= 1e-5,
           "lora_backward [%d x %d] -> %d, rank %d (du in blocks of rows): dx, dA, dB against "
           "float64 (max error over max %.1e, %.1e, %.1e)",
           N, IN, OUT, R, ex / mx, eA / mA, eB / mB);
    free(x), free(A), free(B), free(G), free(y), free(u), free(dx), free(dA), free(dB);
    free(du), free(rA), free(rB), free(rx);
}

int main(void) {
    test_rmsnorm(3, 64);
    test_rmsnorm(4, 37);
    test_rope(8);
    test_rope(64);
    test_swiglu();
    const int32_t pages6[6] = {4, 1, 5, 0, 3, 2};
    const int chunks3[3] = {0, 12, 30}, chunks2[2] = {0, 9};
    attn_case gqa = {40, 8, 2, 16, 8, 6, pages6, chunks3, 3};
    attn_case mha = {21, 3, 3, 12, 4, 6, pages6, chunks2, 2}; /* head_dim without a fast path */
    test_attention(&gqa);
    test_attention(&mha);
    test_cross_entropy();
    test_cross_entropy_wide();
    test_matmul_backward_input();
    test_lora_forward(5, 19, 13, 4, 2.5f);
    test_lora_forward(33, 64, 48, 16, 0.5f);
    test_lora_backward();
    test_lora_backward_blocks();
    return tap_done();
}
