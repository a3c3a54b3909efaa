/* A context: the paged KV pool, the live sequences, and the batched forward. */
#include "model.h"
#include "fl_internal.h"

#include <stdlib.h>
#include <string.h>

#define DEFAULT_KV_BYTES ((size_t)1 << 30) /* pool size when kv_pages is left at 0 */

fl_context_params fl_context_default_params(void) {
    fl_context_params p = {.kv_pages = 0, .max_batch_tokens = 512, .max_seqs = 64};
    return p;
}

static int alloc_scratch(fl_scratch *s, const fl_model *m, int T) {
    const fl_config *c = &m->cfg;
    size_t dim = (size_t)T * c->dim, hid = (size_t)T * c->hidden_dim;
    s->x = fl_malloc(sizeof(float) * dim);
    s->xb = fl_malloc(sizeof(float) * dim);
    s->proj = fl_malloc(sizeof(float) * dim);
    s->out_rows = fl_malloc(sizeof(float) * dim);
    s->q = fl_malloc(sizeof(float) * (size_t)T * m->q_dim);
    s->att = fl_malloc(sizeof(float) * (size_t)T * m->q_dim);
    s->k = fl_malloc(sizeof(float) * (size_t)T * m->kv_dim);
    s->v = fl_malloc(sizeof(float) * (size_t)T * m->kv_dim);
    s->gate = fl_malloc(sizeof(float) * hid);
    s->up = fl_malloc(sizeof(float) * hid);
    s->page_tables = fl_malloc(sizeof(int32_t *) * (size_t)T);
    return (s->x && s->xb && s->proj && s->out_rows && s->q && s->att && s->k && s->v &&
            s->gate && s->up && s->page_tables)
               ? 0
               : -1;
}

static void free_scratch(fl_scratch *s) {
    free(s->x);
    free(s->xb);
    free(s->proj);
    free(s->out_rows);
    free(s->q);
    free(s->att);
    free(s->k);
    free(s->v);
    free(s->gate);
    free(s->up);
    free(s->page_tables);
}

fl_context *fl_context_new(const fl_model *m, const fl_context_params *params) {
    fl_context_params p = params ? *params : fl_context_default_params();
    const fl_config *c = &m->cfg;
    if (p.max_batch_tokens <= 0 || p.max_seqs <= 0 || p.kv_pages < 0) {
        fl_error("context: max_batch_tokens (%d) and max_seqs (%d) must be positive, kv_pages "
                 "(%d) non-negative",
                 p.max_batch_tokens, p.max_seqs, p.kv_pages);
        return NULL;
    }
    size_t page_bytes = (size_t)2 * c->n_layers * FL_KV_PAGE_TOKENS * m->kv_dim * sizeof(float);
    if (p.kv_pages == 0) {
        size_t want = (size_t)p.max_seqs * ((c->max_seq_len + FL_KV_PAGE_TOKENS - 1) /
                                            FL_KV_PAGE_TOKENS);
        size_t fit = DEFAULT_KV_BYTES / page_bytes;
        p.kv_pages = (int)(want < fit ? want : fit);
        if (p.kv_pages < 1) p.kv_pages = 1;
    }
    fl_context *ctx = fl_calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->model = m;
    ctx->params = p;
    ctx->n_pages = ctx->n_free = p.kv_pages;
    size_t pool = (size_t)c->n_layers * p.kv_pages * FL_KV_PAGE_TOKENS * m->kv_dim;
    ctx->k_pool = fl_malloc(sizeof(float) * pool);
    ctx->v_pool = fl_malloc(sizeof(float) * pool);
    ctx->free_pages = fl_malloc(sizeof(int32_t) * (size_t)p.kv_pages);
    ctx->seqs = fl_calloc((size_t)p.max_seqs, sizeof(fl_seq));
    if (!ctx->k_pool || !ctx->v_pool || !ctx->free_pages || !ctx->seqs ||
        alloc_scratch(&ctx->s, m, p.max_batch_tokens) != 0) {
        fl_error_prefix("context with %d KV pages (%zu MiB)", p.kv_pages,
                        (size_t)p.kv_pages * page_bytes >> 20);
        fl_context_free(ctx);
        return NULL;
    }
    /* Popped from the end, so pages are handed out in increasing order. */
    for (int i = 0; i < p.kv_pages; i++) ctx->free_pages[i] = p.kv_pages - 1 - i;
    return ctx;
}

void fl_context_free(fl_context *ctx) {
    if (!ctx) return;
    if (ctx->seqs)
        for (int i = 0; i < ctx->params.max_seqs; i++) free(ctx->seqs[i].pages);
    free(ctx->seqs);
    free(ctx->free_pages);
    free(ctx->k_pool);
    free(ctx->v_pool);
    free_scratch(&ctx->s);
    free(ctx);
}

fl_kv_layer fl_context_kv_layer(const fl_context *ctx, int layer) {
    size_t stride = (size_t)ctx->n_pages * FL_KV_PAGE_TOKENS * ctx->model->kv_dim;
    fl_kv_layer kv = {ctx->k_pool + layer * stride, ctx->v_pool + layer * stride,
                      FL_KV_PAGE_TOKENS, ctx->model->kv_dim};
    return kv;
}

int fl_seq_new(fl_context *ctx) {
    for (int i = 0; i < ctx->params.max_seqs; i++) {
        fl_seq *s = &ctx->seqs[i];
        if (!s->live) {
            s->live = 1;
            s->len = 0;
            s->n_pages = 0;
            return i;
        }
    }
    return fl_error("context: all %d sequence slots are live", ctx->params.max_seqs);
}

static fl_seq *live_seq(const fl_context *ctx, int seq) {
    if (seq < 0 || seq >= ctx->params.max_seqs || !ctx->seqs[seq].live) return NULL;
    return &ctx->seqs[seq];
}

int fl_seq_free(fl_context *ctx, int seq) {
    fl_seq *s = live_seq(ctx, seq);
    if (!s) return fl_error("context: sequence %d is not live", seq);
    for (int i = 0; i < s->n_pages; i++) ctx->free_pages[ctx->n_free++] = s->pages[i];
    s->n_pages = 0;
    s->len = 0;
    s->live = 0;
    return 0;
}

int fl_seq_len(const fl_context *ctx, int seq) {
    const fl_seq *s = live_seq(ctx, seq);
    return s ? s->len : fl_error("context: sequence %d is not live", seq);
}

const fl_model *fl_context_model(const fl_context *ctx) { return ctx->model; }
int fl_context_max_batch_tokens(const fl_context *ctx) { return ctx->params.max_batch_tokens; }
int fl_kv_pages_total(const fl_context *ctx) { return ctx->n_pages; }
int fl_kv_pages_free(const fl_context *ctx) { return ctx->n_free; }

/* Checks every token of the batch against the sequences, and counts the new
 * pages it needs, before anything changes. */
static int validate_batch(const fl_context *ctx, const fl_batch *b, int *new_pages) {
    const fl_config *c = &ctx->model->cfg;
    if (b->n_tokens <= 0 || b->n_tokens > ctx->params.max_batch_tokens)
        return fl_error("batch: %d tokens, must be 1..%d (max_batch_tokens)", b->n_tokens,
                        ctx->params.max_batch_tokens);
    int *next = fl_calloc((size_t)ctx->params.max_seqs, sizeof(int));
    if (!next) return -1;
    for (int i = 0; i < ctx->params.max_seqs; i++) next[i] = ctx->seqs[i].len;
    int rc = 0, pages = 0;
    for (int t = 0; t < b->n_tokens && rc == 0; t++) {
        int sq = b->seq[t];
        if (b->token[t] < 0 || b->token[t] >= c->vocab_size)
            rc = fl_error("batch: token %d is id %d, outside the vocabulary [0, %d)", t,
                          b->token[t], c->vocab_size);
        else if (!live_seq(ctx, sq))
            rc = fl_error("batch: token %d names sequence %d, which is not live", t, sq);
        else if (b->pos[t] != next[sq])
            rc = fl_error("batch: token %d of sequence %d is at position %d, expected %d", t, sq,
                          b->pos[t], next[sq]);
        else if (b->pos[t] >= c->max_seq_len)
            rc = fl_error("batch: position %d of sequence %d reaches max_seq_len %d", b->pos[t],
                          sq, c->max_seq_len);
        else {
            if (next[sq] % FL_KV_PAGE_TOKENS == 0 &&
                next[sq] / FL_KV_PAGE_TOKENS >= ctx->seqs[sq].n_pages)
                pages++;
            next[sq]++;
        }
    }
    free(next);
    if (rc == 0 && pages > ctx->n_free)
        rc = fl_error("batch: needs %d new KV pages, %d free", pages, ctx->n_free);
    *new_pages = pages;
    return rc;
}

static int take_page(fl_context *ctx, fl_seq *s) {
    if (s->n_pages == s->cap_pages) {
        int cap = s->cap_pages ? s->cap_pages * 2 : 8;
        int32_t *np = realloc(s->pages, sizeof(int32_t) * (size_t)cap);
        if (!np) return fl_error("out of memory growing a page table");
        s->pages = np;
        s->cap_pages = cap;
    }
    s->pages[s->n_pages++] = ctx->free_pages[--ctx->n_free];
    return 0;
}

/* One decoder layer over the whole batch: x [T, dim] is updated in place. */
static void layer_forward(fl_context *ctx, int l, const fl_batch *b) {
    const fl_model *m = ctx->model;
    const fl_config *c = &m->cfg;
    const fl_layer_weights *L = &m->layers[l];
    fl_scratch *s = &ctx->s;
    int T = b->n_tokens;
    fl_kv_layer kv = fl_context_kv_layer(ctx, l);

    fl_cpu_rmsnorm_forward(s->xb, s->x, L->attn_norm, T, c->dim, c->norm_eps);
    fl_model_linear(m, s->q, s->xb, &L->wq, L->bq, T, c->dim, m->q_dim);
    fl_model_linear(m, s->k, s->xb, &L->wk, L->bk, T, c->dim, m->kv_dim);
    fl_model_linear(m, s->v, s->xb, &L->wv, L->bv, T, c->dim, m->kv_dim);
    fl_cpu_rope_forward(s->q, b->pos, m->inv_freq, T, c->n_heads, c->head_dim);
    fl_cpu_rope_forward(s->k, b->pos, m->inv_freq, T, c->n_kv_heads, c->head_dim);
    fl_cpu_kv_store(&kv, s->k, s->v, s->page_tables, b->pos, T);
    fl_cpu_attention_forward(s->att, NULL, s->q, &kv, s->page_tables, b->pos, T, c->n_heads,
                             c->n_kv_heads, c->head_dim);
    fl_model_linear(m, s->proj, s->att, &L->wo, L->bo, T, m->q_dim, c->dim);
    fl_cpu_add_inplace(s->x, s->proj, T * c->dim);

    fl_cpu_rmsnorm_forward(s->xb, s->x, L->ffn_norm, T, c->dim, c->norm_eps);
    fl_model_linear(m, s->gate, s->xb, &L->w_gate, NULL, T, c->dim, c->hidden_dim);
    fl_model_linear(m, s->up, s->xb, &L->w_up, NULL, T, c->dim, c->hidden_dim);
    fl_cpu_swiglu_forward(s->gate, s->gate, s->up, T * c->hidden_dim);
    fl_model_linear(m, s->proj, s->gate, &L->w_down, NULL, T, c->hidden_dim, c->dim);
    fl_cpu_add_inplace(s->x, s->proj, T * c->dim);
}

int fl_forward(fl_context *ctx, const fl_batch *b, float *logits) {
    const fl_model *m = ctx->model;
    const fl_config *c = &m->cfg;
    fl_scratch *s = &ctx->s;
    int new_pages;
    if (validate_batch(ctx, b, &new_pages) != 0) return -1;
    int T = b->n_tokens;
    for (int t = 0; t < T; t++) { /* all pages first: taking one may move a page table */
        fl_seq *sq = &ctx->seqs[b->seq[t]];
        if (sq->len % FL_KV_PAGE_TOKENS == 0 && sq->len / FL_KV_PAGE_TOKENS >= sq->n_pages &&
            take_page(ctx, sq) != 0)
            return -1;
        sq->len++;
    }
    for (int t = 0; t < T; t++) {
        s->page_tables[t] = ctx->seqs[b->seq[t]].pages;
        memcpy(s->x + (size_t)t * c->dim, m->embed + (size_t)b->token[t] * c->dim,
               sizeof(float) * c->dim);
    }
    for (int l = 0; l < c->n_layers; l++) layer_forward(ctx, l, b);

    int n_out = 0;
    for (int t = 0; t < T; t++) {
        int want = b->logits ? b->logits[t] != 0 : t == T - 1;
        if (!want) continue;
        fl_cpu_rmsnorm_forward(s->out_rows + (size_t)n_out * c->dim, s->x + (size_t)t * c->dim,
                               m->final_norm, 1, c->dim, c->norm_eps);
        n_out++;
    }
    if (n_out > 0)
        fl_model_linear(m, logits, s->out_rows, &m->lm_head, NULL, n_out, c->dim, c->vocab_size);
    return n_out;
}
