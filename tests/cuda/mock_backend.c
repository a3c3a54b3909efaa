/* The engine's cuda path (engine/context.c: the batch split between device and CPU, page
 * tables, logit rows, adapter slots, undo on failure) on a stand-in for the CUDA backend
 * that keeps the backend's contract with the CPU kernels: its own KV pool indexed by the
 * page ids it is given, its own copies of the adapters it is handed. So it runs on any
 * machine, and the engine's side of the device path is checked against a CPU context fed
 * the same batches, as tests/cuda/test_forward.c does with the real device. */
#include "cuda/cuda_model.h"
#include "fl_internal.h"
#include "lora.h"
#include "model.h"
#include "tap.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static float frand(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}
static int below(int n) { return (int)((frand() + 0.5f) * n) % n; }

static fl_model *load(const char *dir, fl_device device) {
    fl_model_params p = fl_model_default_params();
    p.device = device;
    fl_model *m = fl_model_load(dir, &p);
    if (!m) {
        tap_ok(0, "fl_model_load: %s", fl_last_error());
        exit(tap_done());
    }
    return m;
}

static fl_adapter *random_adapter(const fl_model *m, int rank, unsigned targets, uint64_t seed) {
    fl_lora_params lp = fl_lora_default_params();
    lp.rank = rank;
    lp.alpha = 2.0f * rank;
    lp.targets = targets;
    lp.seed = seed;
    fl_adapter *a = fl_adapter_new(m, &lp);
    for (size_t i = 0; i < a->n_params; i++) a->params[i] += 0.2f * frand(); /* B != 0 */
    return a;
}

typedef struct {
    fl_model *m;
    fl_context *ctx;
    int seq[4];
} side;

static side open_side(const char *dir, fl_device dev) {
    side s = {.m = load(dir, dev)};
    fl_context_params cp = fl_context_default_params();
    cp.kv_pages = 40;
    cp.max_seqs = 8;
    cp.max_batch_tokens = 128;
    s.ctx = fl_context_new(s.m, &cp);
    for (int i = 0; i < 4; i++) s.seq[i] = fl_seq_new(s.ctx);
    return s;
}

static void close_side(side *s) {
    fl_context_free(s->ctx);
    fl_model_free(s->m);
}

static double rel_max(const float *got, const float *ref, size_t n) {
    double big = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) big = fabs(ref[i]) > big ? fabs(ref[i]) : big;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        worst = isnan(d) ? INFINITY : d > worst ? d : worst;
    }
    return worst / (big > 0 ? big : 1.0);
}

typedef struct {
    int n;
    int32_t tok[128], pos[128];
    int seq_of[128];
    int8_t want[128];
    const fl_adapter *ad[128];
} batch;

static void add(batch *b, int32_t tok, int seq, int32_t pos, int want, const fl_adapter *a) {
    b->tok[b->n] = tok, b->seq_of[b->n] = seq, b->pos[b->n] = pos, b->want[b->n] = (int8_t)want;
    b->ad[b->n++] = a;
}

/* Runs b on the device side and, when cpu is given, on the CPU side; the device's return
 * value, and in *diff the largest relative difference of their logits. */
static int run(side *dev, side *cpu, const batch *b, double *diff) {
    int32_t sd[128], sc[128];
    for (int t = 0; t < b->n; t++) sd[t] = dev->seq[b->seq_of[t]], sc[t] = cpu ? cpu->seq[b->seq_of[t]] : 0;
    int vocab = fl_model_config(dev->m)->vocab_size;
    float *ld = malloc(sizeof(float) * b->n * vocab), *lc = malloc(sizeof(float) * b->n * vocab);
    fl_batch bd = {.n_tokens = b->n, .token = b->tok, .seq = sd, .pos = b->pos, .logits = b->want,
                   .adapter = b->ad};
    fl_batch bc = bd;
    bc.seq = sc;
    int rd = fl_forward(dev->ctx, &bd, ld);
    if (cpu) {
        int rc = fl_forward(cpu->ctx, &bc, lc);
        *diff = rd == rc && rd >= 0 ? rel_max(ld, lc, (size_t)rd * vocab) : INFINITY;
    }
    free(ld);
    free(lc);
    return rd;
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

static void test_batches(const char *dir) {
    side dev = open_side(dir, FL_DEVICE_CUDA), cpu = open_side(dir, FL_DEVICE_CPU);
    int vocab = fl_model_config(cpu.m)->vocab_size, len[4] = {0};
    fl_adapter *ad[3] = {random_adapter(cpu.m, 4, (1u << FL_LORA_Q) | (1u << FL_LORA_V), 1),
                         random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 2),
                         random_adapter(cpu.m, 16, (1u << FL_LORA_O) | (1u << FL_LORA_DOWN), 3)};
    /* prefill chunks of four sequences (three adapters and none), interleaved, then
     * decode steps; logits of some rows only */
    batch b = {0};
    for (int i = 0; i < 20; i++)
        for (int s = 0; s < 4; s++)
            if (s != 3 || i < 7) add(&b, below(vocab), s, len[s]++, i % 3 == 0, s < 3 ? ad[s] : NULL);
    double d1, d2, d3 = 0;
    int n1 = run(&dev, &cpu, &b, &d1), up1 = mock.uploads;
    for (int step = 0; step < 3; step++) {
        batch dec = {0};
        for (int s = 3; s >= 0; s--) add(&dec, below(vocab), s, len[s]++, 1, s < 3 ? ad[s] : NULL);
        double d;
        run(&dev, &cpu, &dec, &d);
        d3 = d > d3 ? d : d3;
    }
    tap_ok(n1 == 24 && d1 < 1e-5 && d3 < 1e-5,
           "prefill chunks of 4 sequences (3 adapters and none) then decode steps: the device "
           "path's logits are the CPU's (%.1e, %.1e; %d rows)",
           d1, d3, n1);
    tap_ok(up1 == 3 && mock.uploads == 3,
           "each adapter went to the device once (%d uploads after the prefill, %d after decoding)",
           up1, mock.uploads);

    /* one adapter trained in place, one freed and another made, one unchanged */
    for (size_t i = 0; i < ad[1]->n_params; i++) ad[1]->params[i] *= -1.5f;
    fl_adapter_free(ad[0]);
    ad[0] = random_adapter(cpu.m, 4, (1u << FL_LORA_Q) | (1u << FL_LORA_V), 9);
    batch dec = {0};
    for (int s = 0; s < 4; s++) add(&dec, below(vocab), s, len[s]++, 1, s < 3 ? ad[s] : NULL);
    run(&dev, &cpu, &dec, &d2);
    tap_ok(d2 < 1e-5 && mock.uploads == 5,
           "an adapter changed in place and one made anew are uploaded again (%d uploads), and "
           "used as they are now (%.1e)",
           mock.uploads, d2);

    /* a failing device forward changes nothing; the same batch then runs */
    int free_before = fl_kv_pages_free(dev.ctx), len0 = fl_seq_len(dev.ctx, dev.seq[0]);
    batch big = {0};
    for (int s = 0; s < 4; s++)
        for (int i = 0; i < 20; i++) add(&big, below(vocab), s, len[s] + i, i == 19, s < 3 ? ad[s] : NULL);
    mock.fail_next = 1;
    int rf = run(&dev, NULL, &big, &d2);
    tap_ok(rf == -1 && strstr(fl_last_error(), "injected") && fl_kv_pages_free(dev.ctx) == free_before &&
               fl_seq_len(dev.ctx, dev.seq[0]) == len0,
           "a failing device forward returns -1 (%s) with the pages (%d free) and lengths as "
           "before",
           fl_last_error(), fl_kv_pages_free(dev.ctx));
    int rb = run(&dev, &cpu, &big, &d2);
    tap_ok(rb == 4 && d2 < 1e-5, "the same batch then runs as on the CPU (%.1e)", d2);
    for (int s = 0; s < 4; s++) len[s] += 20;

    /* more adapters in one batch than the device has slots */
    fl_adapter *many[FL_CUDA_ADAPTER_SLOTS + 1];
    batch wide = {0};
    for (int i = 0; i <= FL_CUDA_ADAPTER_SLOTS; i++) {
        many[i] = random_adapter(cpu.m, 2, 1u << FL_LORA_Q, 100 + i);
        add(&wide, below(vocab), i % 4, len[i % 4] + i / 4, 0, many[i]);
    }
    free_before = fl_kv_pages_free(dev.ctx);
    int rw = run(&dev, NULL, &wide, &d2);
    tap_ok(rw == -1 && strstr(fl_last_error(), "more than 64 adapters") &&
               fl_kv_pages_free(dev.ctx) == free_before,
           "65 adapters in one batch are refused before anything changes: %s", fl_last_error());
    for (int i = 0; i <= FL_CUDA_ADAPTER_SLOTS; i++) fl_adapter_free(many[i]);
    for (int i = 0; i < 3; i++) fl_adapter_free(ad[i]);
    close_side(&dev);
    close_side(&cpu);
}

/* Finetuning rows beside inference rows: the device path runs them on the CPU. */
static void test_finetuning(const char *dir) {
    side dev = open_side(dir, FL_DEVICE_CUDA), cpu = open_side(dir, FL_DEVICE_CPU);
    int vocab = fl_model_config(cpu.m)->vocab_size;
    fl_adapter *ad = random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 5);
    fl_adapter *ac = random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 5);
    memcpy(ac->params, ad->params, sizeof(float) * ad->n_params);
    fl_adapter *inf = random_adapter(cpu.m, 4, FL_LORA_ALL_LINEARS, 6);
    int32_t stok[30], slab[30];
    for (int i = 0; i < 30; i++) stok[i] = below(vocab);
    for (int i = 0; i < 30; i++) slab[i] = i + 1 < 30 ? stok[i + 1] : -1;
    fl_sample sample = {stok, slab, 30};
    fl_train_sample *td = fl_train_begin(dev.ctx, ad, &sample, NULL);
    fl_train_sample *tc = fl_train_begin(cpu.ctx, ac, &sample, NULL);
    double worst = 0.0;
    int done = 0, len = 0;
    while (done < 30) { /* chunks of 7 sample positions among inference tokens */
        int32_t tok[16], sd[16], sc[16], pos[16];
        int8_t want[16];
        const fl_adapter *use[16];
        int n = 0, k = 30 - done < 7 ? 30 - done : 7;
        for (int i = 0; i < k; i++) {
            tok[n] = stok[done + i], sd[n] = fl_train_seq(td), sc[n] = fl_train_seq(tc);
            pos[n] = done + i, want[n] = 0, use[n++] = NULL;
            if (i % 2 == 0) { /* an inference token in between, with the sample's adapter */
                tok[n] = below(vocab), sd[n] = dev.seq[0], sc[n] = cpu.seq[0], pos[n] = len++;
                want[n] = 1, use[n++] = i == 0 ? ad : inf;
            }
        }
        done += k;
        int vocab_n = vocab * 16;
        float *ld = malloc(sizeof(float) * vocab_n), *lc = malloc(sizeof(float) * vocab_n);
        fl_batch bd = {.n_tokens = n, .token = tok, .seq = sd, .pos = pos, .logits = want, .adapter = use};
        fl_batch bc = bd;
        bc.seq = sc;
        const fl_adapter *usec[16];
        for (int i = 0; i < n; i++) usec[i] = use[i] == ad ? ac : use[i];
        bc.adapter = usec;
        int rd = fl_forward(dev.ctx, &bd, ld), rc = fl_forward(cpu.ctx, &bc, lc);
        double d = rd == rc && rd > 0 ? rel_max(ld, lc, (size_t)rd * vocab) : INFINITY;
        worst = d > worst ? d : worst;
        free(ld);
        free(lc);
    }
    int bd = fl_train_backward(dev.ctx, td, 30), bc = fl_train_backward(cpu.ctx, tc, 30);
    double gd = 0.0, gbig = 0.0;
    for (size_t i = 0; i < ad->n_params; i++) {
        gd = fmax(gd, fabs((double)ad->grads[i] - ac->grads[i]));
        gbig = fmax(gbig, fabs(ac->grads[i]));
    }
    tap_ok(worst < 1e-5, "inference rows among finetuning rows: logits as the CPU's (%.1e)", worst);
    tap_ok(bd == 30 && bc == 30 && fl_train_loss(td) == fl_train_loss(tc) && gd <= 1e-6 * gbig &&
               gbig > 0,
           "the finetuning rows ran on the CPU: loss %.6f as the CPU context's %.6f, gradients "
           "within %.1e of the largest %.1e",
           fl_train_loss(td), fl_train_loss(tc), gd, gbig);
    fl_train_end(dev.ctx, td);
    fl_train_end(cpu.ctx, tc);
    fl_adapter_free(ad);
    fl_adapter_free(ac);
    fl_adapter_free(inf);
    close_side(&dev);
    close_side(&cpu);
}

/* Generation end to end (the generator's batches through the device path). */
static void test_generator(const char *dir) {
    fl_model *md = load(dir, FL_DEVICE_CUDA), *mc = load(dir, FL_DEVICE_CPU);
    fl_adapter *a = random_adapter(mc, 8, FL_LORA_ALL_LINEARS, 7);
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
    test_choice(model);
    test_batches(model);
    test_finetuning(model);
    test_generator(model);
    return tap_done();
}
