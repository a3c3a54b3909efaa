/* The engine's cuda path (engine/context.c: the batch split between device and CPU, page
 * tables, logit rows, adapter slots, undo on failure) on a stand-in for the CUDA backend
 * that keeps the backend's contract with the CPU kernels: its own KV pool indexed by the
 * page ids it is given, its own copies of the adapters it is handed. So it runs on any
 * machine, and the engine's side of the device path is checked against a CPU context fed
 * the same batches: device_path.h's checks, which tests/cuda/test_forward.c runs on the real
 * device, then what only a stand-in can do (count uploads, fail on demand). */
#include "cuda/cuda_model.h"
#include "device_path.h"
#include "fl_internal.h"
#include "model.h"

/* ------------------------------------------------------------------ the stand-in */

static struct {
    int forwards, uploads, fail_next;
    size_t free_bytes;
} mock = {.free_bytes = (size_t)64 << 20};

typedef struct {
    int rank;
    float scale;
    float *copy;    /* every A and B, copied */
    float **A, **B; /* [n_layers * FL_LORA_N_TARGETS] into copy, NULL where not adapted */
} mock_slot;

struct fl_cuda_model {
    const fl_model *m;
    int max_tokens, kv_pages;
    float *k_pool, *v_pool;
    float *x, *xb, *q, *k, *v, *att, *proj, *gate, *up, *u, *y, *rows;
    const int32_t **pt;
    mock_slot slot[FL_CUDA_ADAPTER_SLOTS];
};

static int probe(char *why, size_t cap) {
    snprintf(why, cap, "mock device");
    return 1;
}

static int mem_info(size_t *free_bytes, size_t *total_bytes) {
    *free_bytes = mock.free_bytes;
    *total_bytes = 2 * mock.free_bytes;
    return 0;
}

/* The weights stay the model's own. */
static fl_cuda_weights *weights_new(const fl_model *m, fl_cuda_dtype wtype) {
    return (fl_cuda_weights *)m;
}
static void weights_free(fl_cuda_weights *w) {}

static void model_free(fl_cuda_model *cm) {
    if (!cm) return;
    float *bufs[] = {cm->k_pool, cm->v_pool, cm->x,    cm->xb, cm->q, cm->k,  cm->v,
                     cm->att,    cm->proj,   cm->gate, cm->up, cm->u, cm->y, cm->rows};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    for (int s = 0; s < FL_CUDA_ADAPTER_SLOTS; s++) {
        free(cm->slot[s].copy);
        free(cm->slot[s].A);
        free(cm->slot[s].B);
    }
    free(cm->pt);
    free(cm);
}

static fl_cuda_model *model_new(const fl_cuda_weights *w, int max_tokens, int kv_pages) {
    const fl_model *m = (const fl_model *)w;
    const fl_config *c = &m->cfg;
    fl_cuda_model *cm = calloc(1, sizeof *cm);
    cm->m = m;
    cm->max_tokens = max_tokens;
    cm->kv_pages = kv_pages;
    size_t T = (size_t)max_tokens, pool = (size_t)c->n_layers * kv_pages * FL_KV_PAGE_TOKENS * m->kv_dim;
    size_t wide = (size_t)(c->hidden_dim > m->q_dim ? c->hidden_dim : m->q_dim);
    cm->k_pool = malloc(sizeof(float) * pool);
    cm->v_pool = malloc(sizeof(float) * pool);
    float **bufs[] = {&cm->x, &cm->xb, &cm->q, &cm->k, &cm->v, &cm->att,
                      &cm->proj, &cm->gate, &cm->up, &cm->y, &cm->rows};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        *bufs[i] = malloc(sizeof(float) * T * (wide > (size_t)c->dim ? wide : (size_t)c->dim));
    cm->u = malloc(sizeof(float) * 1024);
    cm->pt = malloc(sizeof(int32_t *) * T);
    return cm;
}

static int target_in(const fl_model *m, int tg) {
    return tg == FL_LORA_O ? m->q_dim : tg == FL_LORA_DOWN ? m->cfg.hidden_dim : m->cfg.dim;
}
static int target_out(const fl_model *m, int tg) {
    const fl_config *c = &m->cfg;
    switch (tg) {
    case FL_LORA_Q: return m->q_dim;
    case FL_LORA_K:
    case FL_LORA_V: return m->kv_dim;
    case FL_LORA_GATE:
    case FL_LORA_UP: return c->hidden_dim;
    default: return c->dim;
    }
}

static int set_adapter(fl_cuda_model *cm, int s, const fl_cuda_adapter *a) {
    if (s < 0 || s >= FL_CUDA_ADAPTER_SLOTS) return fl_error("mock: slot %d", s);
    mock_slot *sl = &cm->slot[s];
    free(sl->copy);
    free(sl->A);
    free(sl->B);
    memset(sl, 0, sizeof *sl);
    if (!a) return 0;
    mock.uploads++;
    size_t n = (size_t)cm->m->cfg.n_layers * FL_LORA_N_TARGETS;
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        if (a->A[i])
            total += (size_t)a->rank * (target_in(cm->m, i % FL_LORA_N_TARGETS) +
                                        target_out(cm->m, i % FL_LORA_N_TARGETS));
    sl->copy = malloc(sizeof(float) * total);
    sl->A = calloc(n, sizeof(float *));
    sl->B = calloc(n, sizeof(float *));
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        if (!a->A[i]) continue;
        size_t na = (size_t)a->rank * target_in(cm->m, i % FL_LORA_N_TARGETS);
        size_t nb = (size_t)a->rank * target_out(cm->m, i % FL_LORA_N_TARGETS);
        sl->A[i] = memcpy(sl->copy + off, a->A[i], sizeof(float) * na);
        sl->B[i] = memcpy(sl->copy + off + na, a->B[i], sizeof(float) * nb);
        off += na + nb;
    }
    sl->rank = a->rank;
    sl->scale = a->scale;
    return 0;
}

/* y[t] += token t's adapter of target tg in layer l, one token at a time. */
static void lora(fl_cuda_model *cm, const int32_t *slot, int n, int l, int tg, float *y,
                 const float *x) {
    int in = target_in(cm->m, tg), out = target_out(cm->m, tg);
    for (int t = 0; t < n; t++) {
        if (!slot || slot[t] < 0) continue;
        const mock_slot *sl = &cm->slot[slot[t]];
        int i = l * FL_LORA_N_TARGETS + tg;
        if (!sl->A[i]) continue;
        fl_cpu_lora_forward(y + (size_t)t * out, cm->u, x + (size_t)t * in, sl->A[i], sl->B[i],
                            sl->scale, 1, in, out, sl->rank);
    }
}

static int forward(fl_cuda_model *cm, const int32_t *tokens, const int32_t *pos,
                   const int32_t *page_start, const int32_t *slot, int n, const int32_t *pages,
                   int n_page_ids, const int32_t *logit_rows, int n_logits, float *logits) {
    const fl_model *m = cm->m;
    const fl_config *c = &m->cfg;
    mock.forwards++;
    if (mock.fail_next) {
        mock.fail_next = 0;
        return fl_error("mock: an injected device failure");
    }
    /* the contract fl_cuda_model_forward checks */
    if (n <= 0 || n > cm->max_tokens || n_page_ids <= 0 || n_page_ids > cm->kv_pages ||
        n_logits < 0 || n_logits > n)
        return fl_error("mock: bad sizes n %d, page ids %d, logits %d", n, n_page_ids, n_logits);
    for (int i = 0; i < n_page_ids; i++)
        if (pages[i] < 0 || pages[i] >= cm->kv_pages) return fl_error("mock: page id %d", pages[i]);
    for (int t = 0; t < n; t++) {
        if (page_start[t] < 0 || page_start[t] + pos[t] / FL_KV_PAGE_TOKENS >= n_page_ids)
            return fl_error("mock: token %d's page table is short", t);
        if (slot && slot[t] >= 0 && !cm->slot[slot[t]].rank)
            return fl_error("mock: token %d names empty slot %d", t, slot[t]);
        cm->pt[t] = pages + page_start[t];
        memcpy(cm->x + (size_t)t * c->dim, m->embed + (size_t)tokens[t] * c->dim,
               sizeof(float) * c->dim);
    }
    int D = c->dim, H = c->hidden_dim, Q = m->q_dim, KV = m->kv_dim;
    for (int l = 0; l < c->n_layers; l++) {
        const fl_layer_weights *L = &m->layers[l];
        size_t stride = (size_t)cm->kv_pages * FL_KV_PAGE_TOKENS * KV;
        fl_kv_layer kv = {cm->k_pool + l * stride, cm->v_pool + l * stride, FL_KV_PAGE_TOKENS, KV};
        fl_cpu_rmsnorm_forward(cm->xb, cm->x, L->attn_norm, n, D, c->norm_eps);
        fl_model_linear(m, cm->q, cm->xb, &L->wq, L->bq, n, D, Q);
        fl_model_linear(m, cm->k, cm->xb, &L->wk, L->bk, n, D, KV);
        fl_model_linear(m, cm->v, cm->xb, &L->wv, L->bv, n, D, KV);
        lora(cm, slot, n, l, FL_LORA_Q, cm->q, cm->xb);
        lora(cm, slot, n, l, FL_LORA_K, cm->k, cm->xb);
        lora(cm, slot, n, l, FL_LORA_V, cm->v, cm->xb);
        fl_cpu_rope_forward(cm->q, pos, m->inv_freq, n, c->n_heads, c->head_dim);
        fl_cpu_rope_forward(cm->k, pos, m->inv_freq, n, c->n_kv_heads, c->head_dim);
        fl_cpu_kv_store(&kv, cm->k, cm->v, cm->pt, pos, n);
        fl_cpu_attention_forward(cm->att, NULL, cm->q, &kv, cm->pt, pos, n, c->n_heads,
                                 c->n_kv_heads, c->head_dim);
        fl_model_linear(m, cm->proj, cm->att, &L->wo, L->bo, n, Q, D);
        lora(cm, slot, n, l, FL_LORA_O, cm->proj, cm->att);
        fl_cpu_add_inplace(cm->x, cm->proj, n * D);
        fl_cpu_rmsnorm_forward(cm->xb, cm->x, L->ffn_norm, n, D, c->norm_eps);
        fl_model_linear(m, cm->gate, cm->xb, &L->w_gate, NULL, n, D, H);
        fl_model_linear(m, cm->up, cm->xb, &L->w_up, NULL, n, D, H);
        lora(cm, slot, n, l, FL_LORA_GATE, cm->gate, cm->xb);
        lora(cm, slot, n, l, FL_LORA_UP, cm->up, cm->xb);
        fl_cpu_swiglu_forward(cm->gate, cm->gate, cm->up, n * H);
        fl_model_linear(m, cm->proj, cm->gate, &L->w_down, NULL, n, H, D);
        lora(cm, slot, n, l, FL_LORA_DOWN, cm->proj, cm->gate);
        fl_cpu_add_inplace(cm->x, cm->proj, n * D);
    }
    for (int i = 0; i < n_logits; i++)
        fl_cpu_rmsnorm_forward(cm->rows + (size_t)i * D, cm->x + (size_t)logit_rows[i] * D,
                               m->final_norm, 1, D, c->norm_eps);
    if (n_logits > 0)
        fl_model_linear(m, logits, cm->rows, &m->lm_head, NULL, n_logits, D, c->vocab_size);
    return 0;
}

const fl_cuda_backend_api *fl_cuda_backend(void) {
    static const fl_cuda_backend_api api = {probe,      mem_info,    weights_new, weights_free,
                                            model_new, model_free, set_adapter, forward};
    return &api;
}

/* ------------------------------------------------------------------ the tests */

static fl_model *load(const char *dir, fl_device device) {
    fl_model_params p = fl_model_default_params();
    p.device = device;
    fl_model *m = fl_model_load(dir, &p);
    if (!m) ct_check(-1, "fl_model_load");
    return m;
}

static void test_choice(const char *dir) {
    fl_model *m = load(dir, FL_DEVICE_AUTO);
    const char *why;
    fl_device d = fl_model_device(m, &why);
    tap_ok(d == FL_DEVICE_CUDA && !strcmp(why, "cuda: mock device, auto, fp32 weights"),
           "auto with a backend and a device picks cuda, fp32 for an fp32 checkpoint (\"%s\")", why);
    /* the default pool: half the device's free memory, or what max_seqs sequences need */
    fl_context_params cp = fl_context_default_params();
    cp.max_seqs = 1000;
    fl_context *ctx = fl_context_new(m, &cp);
    const fl_config *c = fl_model_config(m);
    size_t page = (size_t)2 * c->n_layers * FL_KV_PAGE_TOKENS * c->n_kv_heads * c->head_dim * 4;
    tap_ok(ctx && (size_t)fl_kv_pages_total(ctx) == mock.free_bytes / 2 / page,
           "the default pool on the device is half its free memory: %d pages of %zu bytes",
           ctx ? fl_kv_pages_total(ctx) : -1, page);
    fl_context_free(ctx);
    fl_model_free(m);
    m = load(dir, FL_DEVICE_CPU);
    d = fl_model_device(m, &why);
    tap_ok(d == FL_DEVICE_CPU && !strcmp(why, "cpu: asked for"),
           "device cpu stays on the CPU (\"%s\")", why);
    fl_model_free(m);
}

/* A failing device forward, and a batch of more adapters than the device has slots. */
static void test_failures(const char *dir) {
    dp_side dev = dp_open(dir, FL_DEVICE_CUDA), cpu = dp_open(dir, FL_DEVICE_CPU);
    int vocab = fl_model_config(cpu.m)->vocab_size, len[4] = {0};
    fl_adapter *ad[3] = {dp_random_adapter(cpu.m, 4, (1u << FL_LORA_Q) | (1u << FL_LORA_V), 1),
                         dp_random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 2),
                         dp_random_adapter(cpu.m, 16, (1u << FL_LORA_O) | (1u << FL_LORA_DOWN), 3)};
    dp_batch pre = {0};
    for (int s = 0; s < 4; s++)
        for (int i = 0; i < 9; i++) dp_add(&pre, ct_below(vocab), s, len[s]++, i == 8, s < 3 ? ad[s] : NULL);
    double d;
    if (dp_run(&dev, &cpu, &pre, &d) != 4 || !(d < 1e-5)) ct_check(-1, "the prefill before");

    /* a failing device forward changes nothing; the same batch then runs */
    int free_before = fl_kv_pages_free(dev.ctx), len0 = fl_seq_len(dev.ctx, dev.seq[0]);
    dp_batch big = {0};
    for (int s = 0; s < 4; s++)
        for (int i = 0; i < 20; i++) dp_add(&big, ct_below(vocab), s, len[s] + i, i == 19, s < 3 ? ad[s] : NULL);
    mock.fail_next = 1;
    int rf = dp_run(&dev, NULL, &big, &d);
    tap_ok(rf == -1 && strstr(fl_last_error(), "injected") && fl_kv_pages_free(dev.ctx) == free_before &&
               fl_seq_len(dev.ctx, dev.seq[0]) == len0,
           "a failing device forward returns -1 (%s) with the pages (%d free) and lengths as "
           "before",
           fl_last_error(), fl_kv_pages_free(dev.ctx));
    int rb = dp_run(&dev, &cpu, &big, &d);
    tap_ok(rb == 4 && d < 1e-5, "the same batch then runs as on the CPU (%.1e)", d);
    for (int s = 0; s < 4; s++) len[s] += 20;

    /* more adapters in one batch than the device has slots */
    fl_adapter *many[FL_CUDA_ADAPTER_SLOTS + 1];
    dp_batch wide = {0};
    for (int i = 0; i <= FL_CUDA_ADAPTER_SLOTS; i++) {
        many[i] = dp_random_adapter(cpu.m, 2, 1u << FL_LORA_Q, 100 + i);
        dp_add(&wide, ct_below(vocab), i % 4, len[i % 4] + i / 4, 0, many[i]);
    }
    free_before = fl_kv_pages_free(dev.ctx);
    int rw = dp_run(&dev, NULL, &wide, &d);
    tap_ok(rw == -1 && strstr(fl_last_error(), "more than 64 adapters") &&
               fl_kv_pages_free(dev.ctx) == free_before,
           "65 adapters in one batch are refused before anything changes: %s", fl_last_error());
    for (int i = 0; i <= FL_CUDA_ADAPTER_SLOTS; i++) fl_adapter_free(many[i]);
    for (int i = 0; i < 3; i++) fl_adapter_free(ad[i]);
    dp_close(&dev);
    dp_close(&cpu);
}

/* Generation end to end (the generator's batches through the device path). */
static void test_generator(const char *dir) {
    fl_model *md = load(dir, FL_DEVICE_CUDA), *mc = load(dir, FL_DEVICE_CPU);
    fl_adapter *a = dp_random_adapter(mc, 8, FL_LORA_ALL_LINEARS, 7);
    int32_t got[2][3][40], n[2][3] = {{0}};
    for (int side_i = 0; side_i < 2; side_i++) {
        fl_context *ctx = fl_context_new(side_i ? mc : md, NULL);
        fl_generator_params gp = fl_generator_default_params();
        gp.prefill_chunk = 5;
        fl_generator *g = fl_generator_new(ctx, &gp);
        int32_t prompt[12];
        for (int r = 0; r < 3; r++) {
            for (int i = 0; i < 12; i++) prompt[i] = 3 + (r * 37 + i * 11) % 200;
            fl_request_params rp = fl_request_default_params();
            rp.max_tokens = 40;
            rp.ignore_eos = 1;
            rp.adapter = r == 1 ? a : NULL;
            fl_generator_add(g, prompt, 4 + 4 * r, &rp);
        }
        while (fl_generator_active(g) > 0) {
            const fl_gen_event *ev;
            int k = fl_generator_step(g, &ev);
            for (int i = 0; i < k; i++)
                if (ev[i].token >= 0 && n[side_i][ev[i].request] < 40)
                    got[side_i][ev[i].request][n[side_i][ev[i].request]++] = ev[i].token;
            if (k < 0) break;
        }
        fl_generator_free(g);
        fl_context_free(ctx);
    }
    int same = 1;
    for (int r = 0; r < 3; r++)
        same &= n[0][r] == 40 && n[1][r] == 40 && !memcmp(got[0][r], got[1][r], sizeof got[0][r]);
    tap_ok(same, "the generator on the device path gives the CPU's 3 x 40 greedy ids (one request "
                 "with an adapter)");
    fl_adapter_free(a);
    fl_model_free(md);
    fl_model_free(mc);
}

int main(void) {
    ct_seed(23);
    const char *dir = tap_tmpdir("cuda_mock");
    char model[4200];
    snprintf(model, sizeof model, "%s/model", dir ? dir : "build/tmp");
    fl_init_model_params ip = fl_init_model_default_params();
    ip.seed = 4;
    ip.dim = 64;
    ip.hidden_dim = 160;
    ip.n_layers = 2;
    ip.n_heads = 4;
    ip.n_kv_heads = 2;
    if (!tap_ok(dir && fl_init_model(model, &ip) == 0, "a small model is written")) return tap_done();
    /* the stand-in computes as the CPU does: only the batch composition may differ */
    dp_tol tol = {.logits = 1e-5, .loss = 0.0, .grads = 1e-6};
    test_choice(model);
    dp_check_adapters(model, tol, &mock.uploads);
    test_failures(model);
    dp_check_finetuning_rows(model, tol);
    dp_check_job_adapter(model, dir, tol, &mock.uploads);
    test_generator(model);
    return tap_done();
}
