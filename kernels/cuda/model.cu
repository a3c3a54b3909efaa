// The whole model's forward on the device: the CUDA ops in fl_forward's order
// (engine/context.c layer_forward), weights and buffers allocated once.
#include "cuda/cuda_model.h"
#include "cuda/cuda_util.h"

extern "C" {
#include "model.h"
}

#include <stdlib.h>
#include <string.h>

typedef struct {
    const void *w;  // [out, in] as the model's weight dtype
    const float *b; // [out] or NULL
} dev_linear;

typedef struct {
    const float *attn_norm, *ffn_norm;
    dev_linear wq, wk, wv, wo, gate, up, down;
} dev_layer;

struct fl_cuda_model {
    const fl_model *m;
    fl_cuda_dtype wtype;
    int max_tokens, kv_pages;
    void *stream;
    fl_cuda_gemm *gemm;
    dev_layer *layers;
    const void *embed, *lm_head; // [vocab, dim] as wtype; the same buffer when tied
    const float *final_norm, *inv_freq;
    float *k_pool, *v_pool; // [n_layers, kv_pages, FL_KV_PAGE_TOKENS, kv_dim]
    float *x, *xb, *q, *k, *v, *att, *proj, *gate, *up, *rows, *logits;
    int32_t *tokens, *pos, *page_start, *pages, *logit_rows;
    void **owned; // every device buffer, freed together
    int n_owned, cap_owned;
};

static void *dev_alloc(fl_cuda_model *cm, size_t bytes, const char *what) {
    if (cm->n_owned == cm->cap_owned) {
        int cap = cm->cap_owned ? 2 * cm->cap_owned : 64;
        void **p = (void **)realloc(cm->owned, sizeof(void *) * cap);
        if (!p) {
            fl_error("out of memory tracking CUDA buffers");
            return NULL;
        }
        cm->owned = p;
        cm->cap_owned = cap;
    }
    void *d = fl_cuda_alloc(bytes, what);
    if (d) cm->owned[cm->n_owned++] = d;
    return d;
}

// An fp32 host tensor on the device: as is, or through the staging buffer and converted.
static const void *upload_weight(fl_cuda_model *cm, const float *w, size_t n, fl_cuda_dtype dt,
                                 float *staging, const char *what) {
    if (dt == FL_CUDA_F32) {
        float *d = (float *)dev_alloc(cm, sizeof(float) * n, what);
        if (!d || fl_cuda_upload(d, w, sizeof(float) * n, cm->stream)) return NULL;
        return d;
    }
    uint16_t *d = (uint16_t *)dev_alloc(cm, sizeof(uint16_t) * n, what);
    // Stream order: the next upload into staging waits for this conversion.
    if (!d || fl_cuda_upload(staging, w, sizeof(float) * n, cm->stream) ||
        fl_cuda_f32_to_bf16(d, staging, n, cm->stream))
        return NULL;
    return d;
}

static const float *upload_f32(fl_cuda_model *cm, const float *w, size_t n, const char *what) {
    return (const float *)upload_weight(cm, w, n, FL_CUDA_F32, NULL, what);
}

static int upload_linear(fl_cuda_model *cm, dev_linear *d, const fl_linear *lin, const float *bias,
                         int out, int in, float *staging, const char *what) {
    d->w = upload_weight(cm, lin->w, (size_t)out * in, cm->wtype, staging, what);
    d->b = bias ? upload_f32(cm, bias, out, what) : NULL;
    return d->w && (!bias || d->b) ? 0 : -1;
}

static int upload_model(fl_cuda_model *cm) {
    const fl_model *m = cm->m;
    const fl_config *c = &m->cfg;
    size_t biggest = (size_t)c->vocab_size * c->dim;
    size_t mats[] = {(size_t)m->q_dim * c->dim, (size_t)m->kv_dim * c->dim,
                     (size_t)c->hidden_dim * c->dim};
    for (int i = 0; i < 3; i++) biggest = mats[i] > biggest ? mats[i] : biggest;
    float *staging = NULL;
    if (cm->wtype == FL_CUDA_BF16 &&
        !(staging = (float *)fl_cuda_alloc(sizeof(float) * biggest, "weight conversion")))
        return -1;
    int rc = 0;
    for (int l = 0; l < c->n_layers && rc == 0; l++) {
        const fl_layer_weights *L = &m->layers[l];
        dev_layer *D = &cm->layers[l];
        rc =
            !(D->attn_norm = upload_f32(cm, L->attn_norm, c->dim, "attention norm")) ||
            !(D->ffn_norm = upload_f32(cm, L->ffn_norm, c->dim, "ffn norm")) ||
            upload_linear(cm, &D->wq, &L->wq, L->bq, m->q_dim, c->dim, staging, "wq") ||
            upload_linear(cm, &D->wk, &L->wk, L->bk, m->kv_dim, c->dim, staging, "wk") ||
            upload_linear(cm, &D->wv, &L->wv, L->bv, m->kv_dim, c->dim, staging, "wv") ||
            upload_linear(cm, &D->wo, &L->wo, L->bo, c->dim, m->q_dim, staging, "wo") ||
            upload_linear(cm, &D->gate, &L->w_gate, NULL, c->hidden_dim, c->dim, staging,
                          "w_gate") ||
            upload_linear(cm, &D->up, &L->w_up, NULL, c->hidden_dim, c->dim, staging, "w_up") ||
            upload_linear(cm, &D->down, &L->w_down, NULL, c->dim, c->hidden_dim, staging, "w_down");
    }
    size_t vd = (size_t)c->vocab_size * c->dim;
    if (rc == 0 &&
        (!(cm->embed = upload_weight(cm, m->embed, vd, cm->wtype, staging, "embedding")) ||
         !(cm->final_norm = upload_f32(cm, m->final_norm, c->dim, "final norm")) ||
         !(cm->inv_freq = upload_f32(cm, m->inv_freq, c->head_dim / 2, "rope frequencies"))))
        rc = -1;
    if (rc == 0)
        cm->lm_head = m->lm_head.w == m->embed
                          ? cm->embed
                          : upload_weight(cm, m->lm_head.w, vd, cm->wtype, staging, "lm_head");
    if (rc == 0 && !cm->lm_head) rc = -1;
    // The staging buffer is freed only after the conversions that read it.
    if (fl_cuda_sync(cm->stream)) rc = -1;
    fl_cuda_free(staging);
    return rc;
}

static int alloc_buffers(fl_cuda_model *cm) {
    const fl_model *m = cm->m;
    const fl_config *c = &m->cfg;
    size_t T = (size_t)cm->max_tokens;
    size_t pool = (size_t)c->n_layers * cm->kv_pages * FL_KV_PAGE_TOKENS * m->kv_dim;
    struct {
        float **p;
        size_t n;
        const char *what;
    } f[] = {{&cm->k_pool, pool, "K pool"},
             {&cm->v_pool, pool, "V pool"},
             {&cm->x, T * c->dim, "residual"},
             {&cm->xb, T * c->dim, "normed input"},
             {&cm->q, T * m->q_dim, "q"},
             {&cm->k, T * m->kv_dim, "k"},
             {&cm->v, T * m->kv_dim, "v"},
             {&cm->att, T * m->q_dim, "attention output"},
             {&cm->proj, T * c->dim, "projection"},
             {&cm->gate, T * c->hidden_dim, "gate"},
             {&cm->up, T * c->hidden_dim, "up"},
             {&cm->rows, T * c->dim, "logit rows"},
             {&cm->logits, T * c->vocab_size, "logits"}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (!(*f[i].p = (float *)dev_alloc(cm, sizeof(float) * f[i].n, f[i].what))) return -1;
    struct {
        int32_t **p;
        size_t n;
    } g[] = {{&cm->tokens, T},
             {&cm->pos, T},
             {&cm->page_start, T},
             {&cm->pages, (size_t)cm->kv_pages},
             {&cm->logit_rows, T}};
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++)
        if (!(*g[i].p = (int32_t *)dev_alloc(cm, sizeof(int32_t) * g[i].n, "batch indices")))
            return -1;
    return 0;
}

extern "C" void fl_cuda_model_free(fl_cuda_model *cm) {
    if (!cm) return;
    if (cm->stream) fl_cuda_sync(cm->stream); // nothing may still use what is freed below
    for (int i = 0; i < cm->n_owned; i++) fl_cuda_free(cm->owned[i]);
    free(cm->owned);
    free(cm->layers);
    fl_cuda_gemm_free(cm->gemm);
    fl_cuda_stream_free(cm->stream);
    free(cm);
}

extern "C" fl_cuda_model *fl_cuda_model_new(const fl_model *m, fl_cuda_dtype wtype, int max_tokens,
                                            int kv_pages) {
    const fl_config *c = &m->cfg;
    if (wtype != FL_CUDA_F32 && wtype != FL_CUDA_BF16) {
        fl_error("CUDA model: weight dtype %d is neither fp32 nor bf16", (int)wtype);
        return NULL;
    }
    if (max_tokens <= 0 || kv_pages <= 0) {
        fl_error("CUDA model: max_tokens %d and kv_pages %d must be positive", max_tokens,
                 kv_pages);
        return NULL;
    }
    fl_cuda_model *cm = (fl_cuda_model *)fl_calloc(1, sizeof *cm);
    if (!cm) return NULL;
    cm->m = m;
    cm->wtype = wtype;
    cm->max_tokens = max_tokens;
    cm->kv_pages = kv_pages;
    int widest = c->dim > m->q_dim ? c->dim : m->q_dim;
    widest = c->hidden_dim > widest ? c->hidden_dim : widest;
    if (!(cm->stream = fl_cuda_stream_new()) ||
        !(cm->gemm = fl_cuda_gemm_new(cm->stream, (size_t)max_tokens * widest)) ||
        !(cm->layers = (dev_layer *)fl_calloc((size_t)c->n_layers, sizeof(dev_layer))) ||
        alloc_buffers(cm) != 0 || upload_model(cm) != 0) {
        fl_error_prefix("CUDA model (%s weights)", wtype == FL_CUDA_BF16 ? "bf16" : "fp32");
        fl_cuda_model_free(cm);
        return NULL;
    }
    return cm;
}

// Every index the kernels will follow, checked on the host first.
static int check_batch(const fl_cuda_model *cm, const int32_t *tokens, const int32_t *pos,
                       const int32_t *page_start, int n, const int32_t *pages, int n_page_ids,
                       const int32_t *logit_rows, int n_logits) {
    const fl_config *c = &cm->m->cfg;
    if (n <= 0 || n > cm->max_tokens)
        return fl_error("CUDA forward: %d tokens, must be 1..%d", n, cm->max_tokens);
    if (n_logits < 0 || n_logits > n)
        return fl_error("CUDA forward: %d logit rows for %d tokens", n_logits, n);
    if (n_page_ids <= 0 || n_page_ids > cm->kv_pages)
        return fl_error("CUDA forward: %d page ids, must be 1..%d (kv_pages)", n_page_ids,
                        cm->kv_pages);
    for (int i = 0; i < n_page_ids; i++)
        if (pages[i] < 0 || pages[i] >= cm->kv_pages)
            return fl_error("CUDA forward: page id %d at %d is outside the pool [0, %d)", pages[i],
                            i, cm->kv_pages);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size)
            return fl_error("CUDA forward: token %d is id %d, outside the vocabulary [0, %d)", t,
                            tokens[t], c->vocab_size);
        if (pos[t] < 0 || page_start[t] < 0 ||
            (long)page_start[t] + pos[t] / FL_KV_PAGE_TOKENS >= n_page_ids)
            return fl_error("CUDA forward: token %d at position %d with its page table at %d "
                            "needs more than the %d page ids given",
                            t, pos[t], page_start[t], n_page_ids);
    }
    for (int i = 0; i < n_logits; i++)
        if (logit_rows[i] < 0 || logit_rows[i] >= n)
            return fl_error("CUDA forward: logit row %d is token %d, outside the batch of %d", i,
                            logit_rows[i], n);
    return 0;
}

static int layer_forward(fl_cuda_model *cm, int l, int n) {
    const fl_model *m = cm->m;
    const fl_config *c = &m->cfg;
    const dev_layer *L = &cm->layers[l];
    fl_cuda_gemm *g = cm->gemm;
    fl_cuda_dtype wt = cm->wtype;
    void *st = cm->stream;
    size_t stride = (size_t)cm->kv_pages * FL_KV_PAGE_TOKENS * m->kv_dim;
    fl_kv_layer kv = {cm->k_pool + l * stride, cm->v_pool + l * stride, FL_KV_PAGE_TOKENS,
                      m->kv_dim};
    return fl_cuda_rmsnorm_forward(cm->xb, cm->x, L->attn_norm, n, c->dim, c->norm_eps, st) ||
           fl_cuda_linear(g, cm->q, cm->xb, L->wq.w, wt, L->wq.b, n, c->dim, m->q_dim) ||
           fl_cuda_linear(g, cm->k, cm->xb, L->wk.w, wt, L->wk.b, n, c->dim, m->kv_dim) ||
           fl_cuda_linear(g, cm->v, cm->xb, L->wv.w, wt, L->wv.b, n, c->dim, m->kv_dim) ||
           fl_cuda_rope_forward(cm->q, cm->pos, cm->inv_freq, n, c->n_heads, c->head_dim, st) ||
           fl_cuda_rope_forward(cm->k, cm->pos, cm->inv_freq, n, c->n_kv_heads, c->head_dim, st) ||
           fl_cuda_kv_store(&kv, cm->k, cm->v, cm->pages, cm->page_start, cm->pos, n, st) ||
           fl_cuda_attention_forward(cm->att, NULL, cm->q, &kv, cm->pages, cm->page_start, cm->pos,
                                     n, c->n_heads, c->n_kv_heads, c->head_dim, st) ||
           fl_cuda_linear(g, cm->proj, cm->att, L->wo.w, wt, L->wo.b, n, m->q_dim, c->dim) ||
           fl_cuda_add_inplace(cm->x, cm->proj, (size_t)n * c->dim, st) ||
           fl_cuda_rmsnorm_forward(cm->xb, cm->x, L->ffn_norm, n, c->dim, c->norm_eps, st) ||
           fl_cuda_linear(g, cm->gate, cm->xb, L->gate.w, wt, NULL, n, c->dim, c->hidden_dim) ||
           fl_cuda_linear(g, cm->up, cm->xb, L->up.w, wt, NULL, n, c->dim, c->hidden_dim) ||
           fl_cuda_swiglu_forward(cm->gate, cm->gate, cm->up, (size_t)n * c->hidden_dim, st) ||
           fl_cuda_linear(g, cm->proj, cm->gate, L->down.w, wt, NULL, n, c->hidden_dim, c->dim) ||
           fl_cuda_add_inplace(cm->x, cm->proj, (size_t)n * c->dim, st);
}

extern "C" int fl_cuda_model_forward(fl_cuda_model *cm, const int32_t *tokens, const int32_t *pos,
                                     const int32_t *page_start, int n, const int32_t *pages,
                                     int n_page_ids, const int32_t *logit_rows, int n_logits,
                                     float *logits) {
    if (check_batch(cm, tokens, pos, page_start, n, pages, n_page_ids, logit_rows, n_logits))
        return -1;
    const fl_config *c = &cm->m->cfg;
    void *st = cm->stream;
    size_t ib = sizeof(int32_t) * n;
    if (fl_cuda_upload(cm->tokens, tokens, ib, st) || fl_cuda_upload(cm->pos, pos, ib, st) ||
        fl_cuda_upload(cm->page_start, page_start, ib, st) ||
        fl_cuda_upload(cm->pages, pages, sizeof(int32_t) * n_page_ids, st) ||
        (n_logits > 0 &&
         fl_cuda_upload(cm->logit_rows, logit_rows, sizeof(int32_t) * n_logits, st)))
        return fl_error_prefix("CUDA forward");
    if (fl_cuda_gather_rows(cm->x, cm->embed, cm->wtype, cm->tokens, n, c->dim, c->vocab_size, st))
        return -1;
    for (int l = 0; l < c->n_layers; l++)
        if (layer_forward(cm, l, n)) return fl_error_prefix("CUDA forward, layer %d", l);
    if (n_logits == 0) return fl_cuda_sync(st);
    if (fl_cuda_gather_rows(cm->rows, cm->x, FL_CUDA_F32, cm->logit_rows, n_logits, c->dim, n,
                            st) ||
        fl_cuda_rmsnorm_forward(cm->rows, cm->rows, cm->final_norm, n_logits, c->dim, c->norm_eps,
                                st) ||
        fl_cuda_linear(cm->gemm, cm->logits, cm->rows, cm->lm_head, cm->wtype, NULL, n_logits,
                       c->dim, c->vocab_size))
        return -1;
    return fl_cuda_download(logits, cm->logits, sizeof(float) * n_logits * c->vocab_size, st);
}
