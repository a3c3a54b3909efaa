/* CUDA forward ops against the CPU reference (kernels/cpu) on random inputs at several
 * shapes, odd ones included: bf16 conversion, row gather, RMSNorm, RoPE, SwiGLU, add,
 * GEMM with fp32 and bf16 weights (one output or several of one input), multi-LoRA
 * shrink/expand. Argument checks run
 * everywhere; the rest skips without a device. */
#include "cuda_test.h"
#include "fl_internal.h"
#include "model.h" /* fl_rope_inv_freq */

#include <float.h>
#include <string.h>

static int has(const char *needle) { return strstr(fl_last_error(), needle) != NULL; }

/* Bad shapes are refused on the host, before anything touches the device. */
static void test_argument_errors(void) {
    float dummy[1];
    fl_kv_layer kv = {dummy, dummy, FL_KV_PAGE_TOKENS, 192};
    tap_ok(fl_cuda_attention_forward(dummy, NULL, dummy, &kv, NULL, NULL, NULL, 1, 8, 3, 64,
                                     NULL) == -1 &&
               has("n_kv_heads 3"),
           "attention refuses 8 heads over 3 kv heads (%s)", fl_last_error());
    tap_ok(fl_cuda_attention_forward(dummy, NULL, dummy, &kv, NULL, NULL, NULL, 1, 4, 2, 7, NULL) ==
                   -1 &&
               has("head_dim 7"),
           "attention refuses an odd head_dim (%s)", fl_last_error());
    tap_ok(fl_cuda_attention_forward(dummy, NULL, dummy, &kv, NULL, NULL, NULL, 1, 4, 2, 64,
                                     NULL) == -1 &&
               has("kv_dim 192"),
           "attention refuses a pool whose kv_dim is not n_kv_heads * head_dim (%s)",
           fl_last_error());
    tap_ok(fl_cuda_rope_forward(dummy, NULL, dummy, 1, 2, 5, NULL) == -1 && has("head_dim 5"),
           "rope refuses an odd head_dim (%s)", fl_last_error());
    tap_ok(fl_cuda_linear(NULL, dummy, dummy, dummy, (fl_cuda_dtype)7, NULL, 1, 4, 4) == -1 &&
               has("dtype 7"),
           "linear refuses an unknown weight dtype (%s)", fl_last_error());
    tap_ok(fl_cuda_sampler_new(0, 512) == NULL && has("0 rows"),
           "the sampler refuses zero rows (%s)", fl_last_error());
}

static float bits_f32(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* The device conversion rounds bit for bit as fl_f32_to_bf16: ties to even, NaN quiet,
 * overflow to infinity, subnormals kept. */
static void test_bf16(void) {
    float special[] = {0.0f,
                       -0.0f,
                       INFINITY,
                       -INFINITY,
                       bits_f32(0x7f800001u),
                       bits_f32(0xffc00000u),
                       1.00390625f /* tie, to even: 1 */,
                       1.01171875f /* tie, to even: up */,
                       FLT_MAX,
                       -FLT_MAX,
                       FLT_MIN,
                       1e-40f,
                       -3e-39f,
                       65504.0f,
                       3.14159265f};
    size_t ns = sizeof special / sizeof special[0], n = 100003;
    float *x = ct_random(n, -1.0f, 1.0f);
    for (size_t i = 0; i < n; i++) x[i] *= exp2f((float)(ct_below(80) - 40));
    memcpy(x, special, sizeof special);
    float *dx = ct_upload(x, sizeof(float) * n);
    uint16_t *db = ct_alloc(sizeof(uint16_t) * n);
    ct_check(fl_cuda_f32_to_bf16(db, dx, n, NULL), "f32_to_bf16");
    uint16_t *got = ct_download(db, sizeof(uint16_t) * n);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (got[i] != fl_f32_to_bf16(x[i]) && bad++ == 0) first = i;
    tap_ok(bad == 0,
           "f32 -> bf16 on the device matches fl_f32_to_bf16 bit for bit on %zu values "
           "(%zu special; %zu differ, first at %zu)",
           n, ns, bad, first);
    fl_cuda_free(dx);
    fl_cuda_free(db);
    free(x);
    free(got);
}

/* Embedding lookup from fp32 and bf16 tables; a bad id gives a NaN row. */
static void test_gather(void) {
    int shapes[][3] = {{5, 1, 7}, {33, 257, 512}, {8, 4096, 1000}}; /* n, dim, n_table */
    for (int s = 0; s < 3; s++) {
        int n = shapes[s][0], dim = shapes[s][1], nt = shapes[s][2];
        size_t tsz = (size_t)nt * dim, osz = (size_t)n * dim;
        float *table = ct_random(tsz, -2.0f, 2.0f), *ref = malloc(sizeof(float) * osz);
        uint16_t *table16 = malloc(sizeof(uint16_t) * tsz);
        for (size_t i = 0; i < tsz; i++) table16[i] = fl_f32_to_bf16(table[i]);
        int32_t *rows = malloc(sizeof(int32_t) * n);
        for (int t = 0; t < n; t++) rows[t] = ct_below(nt);
        rows[n - 1] = n > 2 ? nt : -1; /* out of range */
        if (n > 2) rows[1] = -1;
        int32_t *drows = ct_upload(rows, sizeof(int32_t) * n);
        float *dout = ct_alloc(sizeof(float) * osz);
        for (int bf16 = 0; bf16 <= 1; bf16++) {
            for (int t = 0; t < n; t++)
                for (int i = 0; i < dim; i++) {
                    size_t at = (size_t)rows[t] * dim + i;
                    ref[(size_t)t * dim + i] = rows[t] < 0 || rows[t] >= nt ? NAN
                                               : bf16 ? fl_bf16_to_f32(table16[at])
                                                      : table[at];
                }
            void *dt = bf16 ? ct_upload(table16, sizeof(uint16_t) * tsz)
                            : ct_upload(table, sizeof(float) * tsz);
            ct_check(fl_cuda_gather_rows(dout, dt, bf16 ? FL_CUDA_BF16 : FL_CUDA_F32, drows, n, dim,
                                         nt, NULL),
                     "gather_rows");
            float *got = ct_download(dout, sizeof(float) * osz);
            tap_ok(ct_diff(got, ref, osz) == 0.0,
                   "gather_rows [%d of %d, %d] from a %s table matches the rows (NaN rows for "
                   "bad ids)",
                   n, nt, dim, bf16 ? "bf16" : "fp32");
            fl_cuda_free(dt);
            free(got);
        }
        fl_cuda_free(drows);
        fl_cuda_free(dout);
        free(table);
        free(table16);
        free(ref);
        free(rows);
    }
}

static void test_rmsnorm(void) {
    int shapes[][2] = {{1, 64}, {3, 1}, {7, 4096}, {33, 5123}, {128, 8192}};
    for (int s = 0; s < 5; s++) {
        int n = shapes[s][0], dim = shapes[s][1];
        size_t sz = (size_t)n * dim;
        float *x = ct_random(sz, -3.0f, 3.0f), *w = ct_random(dim, -0.5f, 1.5f);
        float *ref = malloc(sizeof(float) * sz), *rref = malloc(sizeof(float) * n);
        fl_cpu_rmsnorm_forward_rinv(ref, rref, x, w, n, dim, 1e-5f);
        float *dx = ct_upload(x, sizeof(float) * sz), *dw = ct_upload(w, sizeof(float) * dim);
        float *dy = ct_alloc(sizeof(float) * sz), *dr = ct_alloc(sizeof(float) * n);
        ct_check(fl_cuda_rmsnorm_forward_rinv(dy, dr, dx, dw, n, dim, 1e-5f, NULL), "rmsnorm");
        float *got = ct_download(dy, sizeof(float) * sz),
              *rgot = ct_download(dr, sizeof(float) * n);
        double dyv = ct_diff(got, ref, sz), drv = ct_diff(rgot, rref, n);
        free(got);
        ct_check(fl_cuda_rmsnorm_forward(dy, dx, dw, n, dim, 1e-5f, NULL), "rmsnorm");
        got = ct_download(dy, sizeof(float) * sz);
        double dplain = ct_diff(got, ref, sz);
        tap_ok(dyv < 1e-5 && drv < 1e-5 && dplain < 1e-5,
               "rmsnorm [%d, %d] matches the CPU (y %.1e, rinv %.1e, without rinv %.1e)", n, dim,
               dyv, drv, dplain);
        fl_cuda_free(dx);
        fl_cuda_free(dw);
        fl_cuda_free(dy);
        fl_cuda_free(dr);
        free(x);
        free(w);
        free(ref);
        free(rref);
        free(got);
        free(rgot);
    }
}

/* LLaMA-3.1's frequencies (theta 500000, llama3 rescaling: factor 8, low 1, high 4, 8192
 * original positions), as the model loader makes them: realistic inputs; the op itself
 * takes any inv_freq. */
static void llama3_inv_freq(float *f, int head_dim) {
    fl_config c = {.head_dim = head_dim,
                   .rope_theta = 500000.0f,
                   .rope_scaling = FL_ROPE_SCALING_LLAMA3,
                   .rope_factor = 8.0f,
                   .rope_low_freq_factor = 1.0f,
                   .rope_high_freq_factor = 4.0f,
                   .rope_original_max_pos = 8192};
    fl_rope_inv_freq(&c, f);
}

static void test_rope(void) {
    int shapes[][3] = {{1, 1, 2}, {3, 4, 6}, {5, 8, 32}, {17, 32, 128}, {4, 2, 256}};
    for (int s = 0; s < 5; s++) {
        int n = shapes[s][0], nh = shapes[s][1], hd = shapes[s][2];
        size_t sz = (size_t)n * nh * hd;
        float *x = ct_random(sz, -2.0f, 2.0f), *ref = malloc(sizeof(float) * sz);
        float *inv = malloc(sizeof(float) * (hd / 2));
        llama3_inv_freq(inv, hd);
        int32_t *pos = malloc(sizeof(int32_t) * n);
        for (int t = 0; t < n; t++) pos[t] = t == 0 ? 0 : ct_below(131072);
        memcpy(ref, x, sizeof(float) * sz);
        fl_cpu_rope_forward(ref, pos, inv, n, nh, hd);
        float *dx = ct_upload(x, sizeof(float) * sz),
              *dinv = ct_upload(inv, sizeof(float) * (hd / 2));
        int32_t *dpos = ct_upload(pos, sizeof(int32_t) * n);
        ct_check(fl_cuda_rope_forward(dx, dpos, dinv, n, nh, hd, NULL), "rope");
        float *got = ct_download(dx, sizeof(float) * sz);
        double d = ct_diff(got, ref, sz);
        tap_ok(d < 1e-5,
               "rope [%d tokens, %d heads, head_dim %d], positions up to 128K, matches "
               "the CPU (%.1e)",
               n, nh, hd, d);
        fl_cuda_free(dx);
        fl_cuda_free(dinv);
        fl_cuda_free(dpos);
        free(x);
        free(ref);
        free(inv);
        free(pos);
        free(got);
    }
}

static void test_swiglu_add(void) {
    size_t sizes[] = {1, 1000, 123457};
    for (int s = 0; s < 3; s++) {
        size_t n = sizes[s];
        float *g = ct_random(n, -8.0f, 8.0f), *u = ct_random(n, -2.0f, 2.0f);
        float *ref = malloc(sizeof(float) * n);
        fl_cpu_swiglu_forward(ref, g, u, (int)n);
        float *dg = ct_upload(g, sizeof(float) * n), *du = ct_upload(u, sizeof(float) * n);
        ct_check(fl_cuda_swiglu_forward(dg, dg, du, n, NULL), "swiglu"); /* in place, as used */
        float *got = ct_download(dg, sizeof(float) * n);
        double d = ct_diff(got, ref, n);
        tap_ok(d < 1e-6, "swiglu over %zu (in place) matches the CPU (%.1e)", n, d);
        free(got);

        memcpy(ref, g, sizeof(float) * n);
        fl_cpu_add_inplace(ref, u, (int)n);
        ct_check(fl_cuda_upload(dg, g, sizeof(float) * n, NULL), "upload");
        ct_check(fl_cuda_add_inplace(dg, du, n, NULL), "add_inplace");
        got = ct_download(dg, sizeof(float) * n);
        tap_ok(memcmp(got, ref, sizeof(float) * n) == 0, "add over %zu equals the CPU exactly", n);
        fl_cuda_free(dg);
        fl_cuda_free(du);
        free(g);
        free(u);
        free(ref);
        free(got);
    }
}

static void round_bf16(float *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = fl_bf16_to_f32(fl_f32_to_bf16(src[i]));
}

/* fp32 weights against fl_cpu_matmul; bf16 weights (converted on the device, as at load)
 * against fl_cpu_matmul on the same bf16-rounded operands, and against the fp32 result
 * with a bf16 tolerance. The GEMMs run on a stream of their own, as the forward's will. */
static void test_gemm(void) {
    int shapes[][3] = {{1, 64, 96}, {5, 3, 7}, {33, 257, 129}, {7, 4096, 1000}, {128, 512, 1024}};
    size_t max_x = 0;
    for (int s = 0; s < 5; s++)
        if ((size_t)shapes[s][0] * shapes[s][1] > max_x)
            max_x = (size_t)shapes[s][0] * shapes[s][1];
    void *st = fl_cuda_stream_new();
    if (!st) ct_check(-1, "stream_new");
    fl_cuda_gemm *g = fl_cuda_gemm_new(st, max_x);
    if (!g) ct_check(-1, "gemm_new");
    for (int s = 0; s < 5; s++) {
        int n = shapes[s][0], in = shapes[s][1], out = shapes[s][2], use_bias = s % 2;
        size_t xs = (size_t)n * in, ws = (size_t)out * in, ys = (size_t)n * out;
        float wr = 1.0f / sqrtf((float)in);
        float *x = ct_random(xs, -1.0f, 1.0f), *w = ct_random(ws, -wr, wr);
        float *bias = use_bias ? ct_random(out, -1.0f, 1.0f) : NULL;
        float *ref = malloc(sizeof(float) * ys), *ref16 = malloc(sizeof(float) * ys);
        float *x16 = malloc(sizeof(float) * xs), *w16 = malloc(sizeof(float) * ws);
        fl_cpu_matmul(ref, x, w, bias, n, in, out);
        round_bf16(x16, x, xs);
        round_bf16(w16, w, ws);
        fl_cpu_matmul(ref16, x16, w16, bias, n, in, out);

        float *dx = ct_upload(x, sizeof(float) * xs), *dw = ct_upload(w, sizeof(float) * ws);
        float *db = bias ? ct_upload(bias, sizeof(float) * out) : NULL;
        float *dy = ct_alloc(sizeof(float) * ys);
        uint16_t *dw16 = ct_alloc(sizeof(uint16_t) * ws);
        ct_check(fl_cuda_f32_to_bf16(dw16, dw, ws, NULL), "f32_to_bf16");
        ct_check(fl_cuda_sync(NULL), "f32_to_bf16"); /* the GEMM stream does not wait for it */

        ct_check(fl_cuda_linear(g, dy, dx, dw, FL_CUDA_F32, db, n, in, out), "linear fp32");
        float *got = ct_download_on(dy, sizeof(float) * ys, st);
        double d32 = ct_diff(got, ref, ys);
        tap_ok(d32 < 2e-5, "linear [%d x %d] @ [%d x %d]^T%s, fp32 weights, matches the CPU (%.1e)",
               n, in, out, in, bias ? " + bias" : "", d32);
        free(got);

        ct_check(fl_cuda_linear(g, dy, dx, dw16, FL_CUDA_BF16, db, n, in, out), "linear bf16");
        got = ct_download_on(dy, sizeof(float) * ys, st);
        double d16 = ct_diff(got, ref16, ys), dfull = ct_diff(got, ref, ys);
        tap_ok(d16 < 5e-5 && dfull < 2e-2, /* tensor cores sum in their own order */
               "linear [%d x %d] @ [%d x %d]^T%s, bf16 weights, matches the CPU on bf16 operands "
               "(%.1e) and fp32 within bf16 tolerance (%.1e)",
               n, in, out, in, bias ? " + bias" : "", d16, dfull);
        free(got);

        /* two outputs of a new input in one call (the forward's q/k/v, gate/up): the input
         * rounded once serves both, the second without the bias */
        float *x2 = ct_random(xs, -1.0f, 1.0f), *ref2 = malloc(sizeof(float) * ys);
        round_bf16(x16, x2, xs);
        fl_cpu_matmul(ref16, x16, w16, bias, n, in, out);
        fl_cpu_matmul(ref2, x16, w16, NULL, n, in, out);
        float *dx2 = ct_upload(x2, sizeof(float) * xs), *dy2 = ct_alloc(sizeof(float) * ys);
        const fl_cuda_linear_out two[2] = {{dy, dw16, db, out}, {dy2, dw16, NULL, out}};
        ct_check(fl_cuda_linears(g, two, 2, dx2, FL_CUDA_BF16, n, in), "linears bf16");
        got = ct_download_on(dy, sizeof(float) * ys, st);
        float *got2 = ct_download_on(dy2, sizeof(float) * ys, st);
        double da = ct_diff(got, ref16, ys), db2 = ct_diff(got2, ref2, ys);
        tap_ok(da < 5e-5 && db2 < 5e-5,
               "linears: two outputs of one input [%d x %d], bf16 weights, match the CPU on "
               "bf16 operands (%.1e%s, %.1e)",
               n, in, da, bias ? " with bias" : "", db2);
        free(got);
        free(got2);
        free(x2);
        free(ref2);
        fl_cuda_free(dx2);
        fl_cuda_free(dy2);
        fl_cuda_free(dx);
        fl_cuda_free(dw);
        fl_cuda_free(db);
        fl_cuda_free(dy);
        fl_cuda_free(dw16);
        free(x);
        free(w);
        free(bias);
        free(ref);
        free(ref16);
        free(x16);
        free(w16);
    }
    float *dy = ct_alloc(sizeof(float)), *dx = ct_alloc(sizeof(float) * (max_x + 1));
    tap_ok(fl_cuda_linear(g, dy, dx, dx, FL_CUDA_BF16, NULL, 1, (int)max_x + 1, 1) == -1 &&
               has("exceed"),
           "linear refuses bf16 activations past the staging size it was created with (%s)",
           fl_last_error());
    fl_cuda_free(dy);
    fl_cuda_free(dx);
    fl_cuda_gemm_free(g);
    fl_cuda_stream_free(st);
}

/* A batch mixing adapters of different ranks, tokens with none, an adapter without this
 * target (A NULL) and a bad adapter index (NaN rows), against fl_cpu_lora_forward run per
 * adapter on its gathered tokens, as the CPU context does. */
static void test_lora(void) {
    struct {
        int n, in, out, ranks[3];
    } cases[] = {
        {37, 256, 129, {8, 16, 5}}, {64, 1024, 768, {16, 1, 32}}, {9, 4096, 1000, {4, 1100, 8}}};
    for (int c = 0; c < 3; c++) {
        int n = cases[c].n, in = cases[c].in, out = cases[c].out, na = 4; /* adapter 3: no A */
        int stride = 0;
        for (int a = 0; a < 3; a++)
            stride = cases[c].ranks[a] > stride ? cases[c].ranks[a] : stride;
        float *x = ct_random((size_t)n * in, -1.0f, 1.0f),
              *y0 = ct_random((size_t)n * out, -1.0f, 1.0f);
        float *A[3], *B[3], scale[3];
        fl_cuda_lora host[4];
        void *dA[3], *dB[3];
        for (int a = 0; a < 3; a++) {
            int r = cases[c].ranks[a];
            A[a] = ct_random((size_t)r * in, -0.05f, 0.05f);
            B[a] = ct_random((size_t)out * r, -0.1f, 0.1f);
            scale[a] = 16.0f / (float)r;
            dA[a] = ct_upload(A[a], sizeof(float) * r * in);
            dB[a] = ct_upload(B[a], sizeof(float) * out * r);
            host[a] = (fl_cuda_lora){dA[a], dB[a], scale[a], r};
        }
        host[3] = (fl_cuda_lora){NULL, dB[0], 1.0f, cases[c].ranks[0]};
        int32_t *tok = malloc(sizeof(int32_t) * n);
        for (int t = 0; t < n; t++) tok[t] = ct_below(na + 1) - 1; /* -1 .. 3 */
        tok[n / 2] = na;                                           /* out of range */

        float *yref = malloc(sizeof(float) * n * out), *uref = malloc(sizeof(float) * n * stride);
        memcpy(yref, y0, sizeof(float) * n * out);
        for (size_t i = 0; i < (size_t)n * stride; i++) uref[i] = 7.0f; /* untouched marker */
        float *xg = malloc(sizeof(float) * n * in), *yg = malloc(sizeof(float) * n * out);
        float *ug = malloc(sizeof(float) * n * stride);
        int32_t *idx = malloc(sizeof(int32_t) * n);
        for (int a = 0; a < 3; a++) {
            int m = 0, r = cases[c].ranks[a];
            for (int t = 0; t < n; t++)
                if (tok[t] == a) {
                    memcpy(xg + (size_t)m * in, x + (size_t)t * in, sizeof(float) * in);
                    idx[m++] = t;
                }
            if (m == 0) continue;
            memset(yg, 0, sizeof(float) * m * out);
            fl_cpu_lora_forward(yg, ug, xg, A[a], B[a], scale[a], m, in, out, r);
            for (int i = 0; i < m; i++) {
                fl_cpu_add_inplace(yref + (size_t)idx[i] * out, yg + (size_t)i * out, out);
                memcpy(uref + (size_t)idx[i] * stride, ug + (size_t)i * r, sizeof(float) * r);
            }
        }
        for (int j = 0; j < stride; j++) uref[(size_t)(n / 2) * stride + j] = NAN;
        for (int o = 0; o < out; o++) yref[(size_t)(n / 2) * out + o] = NAN;

        float *dx = ct_upload(x, sizeof(float) * n * in),
              *dy = ct_upload(y0, sizeof(float) * n * out);
        float *du = ct_alloc(sizeof(float) * n * stride);
        float *marker = malloc(sizeof(float) * n * stride);
        for (size_t i = 0; i < (size_t)n * stride; i++) marker[i] = 7.0f;
        ct_check(fl_cuda_upload(du, marker, sizeof(float) * n * stride, NULL), "upload");
        fl_cuda_lora *dad = ct_upload(host, sizeof host);
        int32_t *dtok = ct_upload(tok, sizeof(int32_t) * n);
        ct_check(fl_cuda_lora_shrink(du, dx, dad, na, dtok, n, in, stride, NULL), "lora_shrink");
        ct_check(fl_cuda_lora_expand(dy, du, dad, na, dtok, n, out, stride, NULL), "lora_expand");
        float *ugot = ct_download(du, sizeof(float) * n * stride);
        float *ygot = ct_download(dy, sizeof(float) * n * out);
        double dus = ct_diff(ugot, uref, (size_t)n * stride),
               dys = ct_diff(ygot, yref, (size_t)n * out);
        tap_ok(dus < 1e-5 && dys < 1e-5,
               "multi-LoRA [%d tokens, %d -> %d, ranks %d/%d/%d, one adapter without the "
               "target, one bad index] matches the CPU per adapter (u %.1e, y %.1e)",
               n, in, out, cases[c].ranks[0], cases[c].ranks[1], cases[c].ranks[2], dus, dys);
        for (int a = 0; a < 3; a++) {
            fl_cuda_free(dA[a]);
            fl_cuda_free(dB[a]);
            free(A[a]);
            free(B[a]);
        }
        fl_cuda_free(dx);
        fl_cuda_free(dy);
        fl_cuda_free(du);
        fl_cuda_free(dad);
        fl_cuda_free(dtok);
        free(x);
        free(y0);
        free(tok);
        free(yref);
        free(uref);
        free(xg);
        free(yg);
        free(ug);
        free(idx);
        free(marker);
        free(ugot);
        free(ygot);
    }
}

int main(void) {
    test_argument_errors();
    ct_require_device("CUDA op parity (bf16, gather, rmsnorm, rope, swiglu, add, GEMM, LoRA)");
    ct_seed(42);
    test_bf16();
    test_gather();
    test_rmsnorm();
    test_rope();
    test_swiglu_add();
    test_gemm();
    test_lora();
    return tap_done();
}
