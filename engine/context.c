/* A context: the paged KV pool, the live sequences, and the batched forward. */
#include "train.h"
#include "fl_internal.h"

#include <math.h>

#include <stdlib.h>
#include <string.h>

#define DEFAULT_KV_BYTES ((size_t)1 << 30) /* pool size when kv_pages is left at 0 */

fl_context_params fl_context_default_params(void) {
    fl_context_params p = {.kv_pages = 0, .max_batch_tokens = 512, .max_seqs = 64};
    return p;
}

static int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static int alloc_scratch(fl_scratch *s, const fl_model *m, int T) {
    const fl_config *c = &m->cfg;
    size_t dim = (size_t)T * c->dim, hid = (size_t)T * c->hidden_dim;
    size_t wide = (size_t)T * max3(c->dim, m->q_dim, c->hidden_dim);
    s->rinv = fl_malloc(sizeof(float) * T);
    s->lse = fl_malloc(sizeof(float) * (size_t)T * c->n_heads);
    s->tok_adapter = fl_malloc(sizeof(*s->tok_adapter) * T);
    s->tok_train = fl_malloc(sizeof(*s->tok_train) * T);
    s->group_tok = fl_malloc(sizeof(int32_t) * T);
    s->group_pos = fl_malloc(sizeof(int32_t) * T);
    s->lora_x = fl_malloc(sizeof(float) * wide);
    s->lora_y = fl_malloc(sizeof(float) * wide);
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
    s->took = fl_malloc((size_t)T);
    return (s->x && s->xb && s->proj && s->out_rows && s->q && s->att && s->k && s->v &&
            s->gate && s->up && s->page_tables && s->rinv && s->lse && s->tok_adapter &&
            s->tok_train && s->group_tok && s->group_pos && s->lora_x && s->lora_y && s->took)
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
    free(s->rinv);
    free(s->lse);
    free(s->tok_adapter);
    free(s->tok_train);
    free(s->group_tok);
    free(s->group_pos);
    free(s->lora_x);
    free(s->lora_y);
    free(s->lora_u);
    free(s->took);
}

static int alloc_dev(fl_dev_batch *d, int T, int n_pages, int max_seqs) {
    struct {
        int32_t **p;
        int n;
    } a[] = {{&d->token, T},     {&d->pos, T},       {&d->page_start, T}, {&d->slot, T},
             {&d->logit_rows, T}, {&d->cpu_token, T}, {&d->cpu_seq, T},    {&d->cpu_pos, T},
             {&d->pages, n_pages}, {&d->seq_start, max_seqs}};
    for (size_t i = 0; i < sizeof a / sizeof a[0]; i++)
        if (!(*a[i].p = fl_malloc(sizeof(int32_t) * (size_t)a[i].n))) return -1;
    return 0;
}

static void free_dev(fl_dev_batch *d) {
    int32_t *a[] = {d->token,   d->pos,     d->page_start, d->slot,  d->logit_rows,
                    d->cpu_token, d->cpu_seq, d->cpu_pos,    d->pages, d->seq_start};
    for (size_t i = 0; i < sizeof a / sizeof a[0]; i++) free(a[i]);
}

/* The CPU KV pool. On cuda it holds only finetuning sequences' KV and is allocated when
 * the first finetuning rows come. */
static int alloc_cpu_pool(fl_context *ctx) {
    if (ctx->k_pool) return 0;
    const fl_model *m = ctx->model;
    size_t pool = (size_t)m->cfg.n_layers * ctx->n_pages * FL_KV_PAGE_TOKENS * m->kv_dim;
    ctx->k_pool = fl_malloc(sizeof(float) * pool);
    ctx->v_pool = fl_malloc(sizeof(float) * pool);
    if (ctx->k_pool && ctx->v_pool) return 0;
    free(ctx->k_pool);
    free(ctx->v_pool);
    ctx->k_pool = ctx->v_pool = NULL;
    return fl_error_prefix("the CPU KV pool (%zu MiB)", 2 * sizeof(float) * pool >> 20);
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
        /* On the device the pool may take half of the memory free once the weights are in;
         * the rest is left to scratch, cuBLAS and other contexts. */
        size_t budget = DEFAULT_KV_BYTES, free_bytes, total_bytes;
        if (m->cuda && m->cuda->mem_info(&free_bytes, &total_bytes) == 0)
            budget = free_bytes / 2;
        size_t fit = budget / page_bytes;
        p.kv_pages = (int)(want < fit ? want : fit);
        if (p.kv_pages < 1) p.kv_pages = 1;
    }
    fl_context *ctx = fl_calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->model = m;
    ctx->params = p;
    ctx->n_pages = ctx->n_free = p.kv_pages;
    ctx->free_pages = fl_malloc(sizeof(int32_t) * (size_t)p.kv_pages);
    ctx->seqs = fl_calloc((size_t)p.max_seqs, sizeof(fl_seq));
    int ok = ctx->free_pages && ctx->seqs && alloc_scratch(&ctx->s, m, p.max_batch_tokens) == 0;
    if (ok && m->cuda)
        ok = alloc_dev(&ctx->dev, p.max_batch_tokens, p.kv_pages, p.max_seqs) == 0 &&
             (ctx->cuda = m->cuda->model_new(m->cuda_weights, p.max_batch_tokens, p.kv_pages));
    else if (ok)
        ok = alloc_cpu_pool(ctx) == 0;
    if (!ok) {
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
    fl_train_release(ctx);
    if (ctx->seqs)
        for (int i = 0; i < ctx->params.max_seqs; i++) free(ctx->seqs[i].pages);
    free(ctx->seqs);
    free(ctx->free_pages);
    free(ctx->k_pool);
    free(ctx->v_pool);
    free_scratch(&ctx->s);
    if (ctx->cuda) ctx->model->cuda->model_free(ctx->cuda);
    free_dev(&ctx->dev);
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

int fl_seqs_free(const fl_context *ctx) {
    int n = 0;
    for (int i = 0; i < ctx->params.max_seqs; i++) n += !ctx->seqs[i].live;
    return n;
}
int fl_kv_pages_free(const fl_context *ctx) { return ctx->n_free; }

/* Checks every token of the batch against the sequences, and that the pool has the new
 * pages it needs, before anything changes. */
static int validate_batch(const fl_context *ctx, const fl_batch *b) {
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
        const fl_train_sample *tr = live_seq(ctx, sq) ? ctx->seqs[sq].train : NULL;
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
        else if (tr && (b->pos[t] >= tr->n || b->token[t] != tr->tokens[b->pos[t]]))
            rc = fl_error("batch: token %d (id %d at position %d) is not the finetuning "
                          "sample's token there",
                          t, b->token[t], b->pos[t]);
        else if (tr && b->logits && b->logits[t])
            rc = fl_error("batch: token %d of a finetuning sample asks for logits", t);
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

#define MAX_GROUPS 64 /* adapter groups in one batch */

/* Groups the batch's tokens by adapter (the SGMV idea: one pair of small GEMMs per
 * adapter and target); returns the number of groups, their bounds in group_tok.
 * A finetuning sample's tokens form a group of their own, apart from inference
 * tokens that use the same adapter (those see no dropout and keep nothing). */
static int group_by_adapter(fl_context *ctx, const fl_batch *b, const fl_adapter **adapters,
                            int *start) {
    fl_scratch *s = &ctx->s;
    int T = b->n_tokens, n_groups = 0, k = 0;
    for (int t = 0; t < T; t++) {
        s->tok_train[t] = ctx->seqs[b->seq[t]].train;
        s->tok_adapter[t] = s->tok_train[t] ? s->tok_train[t]->adapter
                                            : (b->adapter ? b->adapter[t] : NULL);
    }
    for (int t = 0; t < T; t++) {
        const fl_adapter *a = s->tok_adapter[t];
        if (!a) continue; /* plain inference batches skip the scan below */
        int seen = 0;
        for (int u = 0; u < t && !seen; u++)
            seen = s->tok_adapter[u] == a && s->tok_train[u] == s->tok_train[t];
        if (seen) continue;
        if (n_groups == MAX_GROUPS) return MAX_GROUPS + 1;
        start[n_groups] = k;
        adapters[n_groups++] = a;
        for (int u = t; u < T; u++)
            if (s->tok_adapter[u] == a && s->tok_train[u] == s->tok_train[t])
                s->group_pos[k] = b->pos[u], s->group_tok[k++] = u;
    }
    start[n_groups] = k;
    return n_groups;
}


typedef struct {
    const fl_batch *b;
    int n_groups;
    const fl_adapter *adapters[MAX_GROUPS];
    int start[MAX_GROUPS + 1];
} batch_info;

static int ensure_lora_u(fl_scratch *s, int T, int rank) {
    if (rank <= s->lora_u_rank) return 0;
    float *u = realloc(s->lora_u, sizeof(float) * (size_t)T * rank);
    if (!u) return fl_error("out of memory for LoRA rank %d", rank);
    s->lora_u = u;
    s->lora_u_rank = rank;
    return 0;
}

/* y += each token's LoRA of target tg in layer l, one adapter group at a time. Rows of
 * finetuning tokens go through the dropout mask, and their u is kept when planned. */
static void apply_lora(fl_context *ctx, const batch_info *bi, int l, fl_lora_target tg, float *y,
                       const float *x, int in, int out) {
    fl_scratch *s = &ctx->s;
    for (int g = 0; g < bi->n_groups; g++) {
        const fl_adapter *a = bi->adapters[g];
        const fl_lora_weight *w = fl_lora_at(a, l, tg);
        if (!w) continue;
        int first = bi->start[g], m = bi->start[g + 1] - first;
        const int32_t *toks = s->group_tok + first;
        fl_train_sample *tr = s->tok_train[toks[0]]; /* a training adapter is in one sample */
        for (int i = 0; i < m; i++)
            memcpy(s->lora_x + (size_t)i * in, x + (size_t)toks[i] * in, sizeof(float) * in);
        if (tr) fl_lora_training_input(s->lora_x, s->lora_x, tr, l, tg, s->group_pos + first, m, in);
        memset(s->lora_y, 0, sizeof(float) * (size_t)m * out);
        fl_cpu_lora_forward(s->lora_y, s->lora_u, s->lora_x, w->A, w->B, a->scale, m, in, out,
                            a->p.rank);
        for (int i = 0; i < m; i++) {
            fl_cpu_add_inplace(y + (size_t)toks[i] * out, s->lora_y + (size_t)i * out, out);
            if (tr && tr->plan.kept[FL_ACT_U_Q + tg])
                memcpy(fl_train_saved(tr, l, s->group_pos[first + i], FL_ACT_U_Q + tg),
                       s->lora_u + (size_t)i * a->p.rank, sizeof(float) * a->p.rank);
        }
    }
}

/* Copies the rows of finetuning tokens into their arenas when the plan keeps a. */
static void save_rows(fl_context *ctx, const fl_batch *b, int l, fl_activation a,
                      const float *src, size_t width) {
    fl_scratch *s = &ctx->s;
    for (int t = 0; t < b->n_tokens; t++) {
        fl_train_sample *tr = s->tok_train[t];
        if (tr && tr->plan.kept[a])
            memcpy(fl_train_saved(tr, l, b->pos[t], a), src + (size_t)t * width,
                   sizeof(float) * width);
    }
}

/* One decoder layer over the whole batch: x [T, dim] is updated in place. */
static void layer_forward(fl_context *ctx, int l, const batch_info *bi) {
    const fl_model *m = ctx->model;
    const fl_config *c = &m->cfg;
    const fl_layer_weights *L = &m->layers[l];
    const fl_batch *b = bi->b;
    fl_scratch *s = &ctx->s;
    int T = b->n_tokens;
    fl_kv_layer kv = fl_context_kv_layer(ctx, l);

    save_rows(ctx, b, l, FL_ACT_X_IN, s->x, c->dim);
    fl_cpu_rmsnorm_forward_rinv(s->xb, s->rinv, s->x, L->attn_norm, T, c->dim, c->norm_eps);
    save_rows(ctx, b, l, FL_ACT_RMS1, s->rinv, 1);
    fl_model_linear(m, s->q, s->xb, &L->wq, L->bq, T, c->dim, m->q_dim);
    fl_model_linear(m, s->k, s->xb, &L->wk, L->bk, T, c->dim, m->kv_dim);
    fl_model_linear(m, s->v, s->xb, &L->wv, L->bv, T, c->dim, m->kv_dim);
    apply_lora(ctx, bi, l, FL_LORA_Q, s->q, s->xb, c->dim, m->q_dim);
    apply_lora(ctx, bi, l, FL_LORA_K, s->k, s->xb, c->dim, m->kv_dim);
    apply_lora(ctx, bi, l, FL_LORA_V, s->v, s->xb, c->dim, m->kv_dim);
    fl_cpu_rope_forward(s->q, b->pos, m->inv_freq, T, c->n_heads, c->head_dim);
    fl_cpu_rope_forward(s->k, b->pos, m->inv_freq, T, c->n_kv_heads, c->head_dim);
    save_rows(ctx, b, l, FL_ACT_Q, s->q, m->q_dim);
    fl_cpu_kv_store(&kv, s->k, s->v, s->page_tables, b->pos, T);
    fl_cpu_attention_forward(s->att, s->lse, s->q, &kv, s->page_tables, b->pos, T, c->n_heads,
                             c->n_kv_heads, c->head_dim);
    save_rows(ctx, b, l, FL_ACT_ATT, s->att, m->q_dim);
    save_rows(ctx, b, l, FL_ACT_LSE, s->lse, c->n_heads);
    fl_model_linear(m, s->proj, s->att, &L->wo, L->bo, T, m->q_dim, c->dim);
    apply_lora(ctx, bi, l, FL_LORA_O, s->proj, s->att, m->q_dim, c->dim);
    fl_cpu_add_inplace(s->x, s->proj, T * c->dim);

    save_rows(ctx, b, l, FL_ACT_X_MID, s->x, c->dim);
    fl_cpu_rmsnorm_forward_rinv(s->xb, s->rinv, s->x, L->ffn_norm, T, c->dim, c->norm_eps);
    save_rows(ctx, b, l, FL_ACT_RMS2, s->rinv, 1);
    fl_model_linear(m, s->gate, s->xb, &L->w_gate, NULL, T, c->dim, c->hidden_dim);
    fl_model_linear(m, s->up, s->xb, &L->w_up, NULL, T, c->dim, c->hidden_dim);
    apply_lora(ctx, bi, l, FL_LORA_GATE, s->gate, s->xb, c->dim, c->hidden_dim);
    apply_lora(ctx, bi, l, FL_LORA_UP, s->up, s->xb, c->dim, c->hidden_dim);
    save_rows(ctx, b, l, FL_ACT_GATE, s->gate, c->hidden_dim);
    save_rows(ctx, b, l, FL_ACT_UP, s->up, c->hidden_dim);
    fl_cpu_swiglu_forward(s->gate, s->gate, s->up, T * c->hidden_dim);
    fl_model_linear(m, s->proj, s->gate, &L->w_down, NULL, T, c->hidden_dim, c->dim);
    apply_lora(ctx, bi, l, FL_LORA_DOWN, s->proj, s->gate, c->hidden_dim, c->dim);
    fl_cpu_add_inplace(s->x, s->proj, T * c->dim);
}

/* The fused loss of each finetuning sample's rows in the batch. */
static int training_losses(fl_context *ctx, const fl_batch *b) {
    fl_scratch *s = &ctx->s;
    const fl_config *c = &ctx->model->cfg;
    for (int t = 0; t < b->n_tokens; t++) {
        fl_train_sample *tr = s->tok_train[t];
        if (!tr) continue;
        int seen = 0; /* each sample once: its rows are gathered below */
        for (int u = 0; u < t && !seen; u++) seen = s->tok_train[u] == tr;
        if (seen) continue;
        int m = 0;
        for (int u = t; u < b->n_tokens; u++)
            if (s->tok_train[u] == tr) {
                memcpy(s->lora_x + (size_t)m * c->dim, s->x + (size_t)u * c->dim,
                       sizeof(float) * c->dim);
                s->group_pos[m++] = b->pos[u];
            }
        if (fl_train_loss_rows(ctx, tr, s->lora_x, s->group_pos, m) != 0) return -1;
        tr->forwarded += m;
    }
    return 0;
}

static void poison_scratch(fl_context *ctx) {
    const fl_model *m = ctx->model;
    fl_scratch *s = &ctx->s;
    size_t T = (size_t)ctx->params.max_batch_tokens, dim = T * m->cfg.dim;
    size_t hid = T * m->cfg.hidden_dim;
    struct { float *p; size_t n; } bufs[] = {
        {s->x, dim}, {s->xb, dim}, {s->proj, dim}, {s->out_rows, dim}, {s->q, T * m->q_dim},
        {s->att, T * m->q_dim}, {s->k, T * m->kv_dim}, {s->v, T * m->kv_dim}, {s->gate, hid},
        {s->up, hid}, {s->rinv, T}, {s->lse, T * m->cfg.n_heads},
        {s->lora_x, T * max3(m->cfg.dim, m->q_dim, m->cfg.hidden_dim)},
        {s->lora_y, T * max3(m->cfg.dim, m->q_dim, m->cfg.hidden_dim)},
        {s->lora_u, T * s->lora_u_rank}};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        for (size_t j = 0; j < bufs[i].n; j++) bufs[i].p[j] = NAN;
}

void fl_context_poison_scratch(fl_context *ctx, int on) { ctx->poison = on; }

/* Undoes take_pages for the batch's first n tokens: the lengths as they were, the pages back
 * on the free stack in the order they left it. */
static void undo_pages(fl_context *ctx, const fl_batch *b, int n) {
    for (int t = n - 1; t >= 0; t--) {
        fl_seq *sq = &ctx->seqs[b->seq[t]];
        sq->len--;
        if (ctx->s.took[t]) ctx->free_pages[ctx->n_free++] = sq->pages[--sq->n_pages];
    }
}

/* Takes the pages the batch's tokens begin, marking which token took one; all before any
 * page table is read, since taking a page may move one. */
static int take_pages(fl_context *ctx, const fl_batch *b) {
    for (int t = 0; t < b->n_tokens; t++) {
        fl_seq *sq = &ctx->seqs[b->seq[t]];
        ctx->s.took[t] = sq->len % FL_KV_PAGE_TOKENS == 0 &&
                         sq->len / FL_KV_PAGE_TOKENS >= sq->n_pages;
        if (ctx->s.took[t] && take_page(ctx, sq) != 0) {
            undo_pages(ctx, b, t);
            return -1;
        }
        sq->len++;
    }
    return 0;
}

/* Groups the batch by adapter and sizes the LoRA scratch: what can fail before anything
 * changes. */
static int cpu_prepare(fl_context *ctx, const fl_batch *b, batch_info *bi) {
    bi->b = b;
    bi->n_groups = group_by_adapter(ctx, b, bi->adapters, bi->start);
    if (bi->n_groups > MAX_GROUPS)
        return fl_error("batch: more than %d adapter groups", MAX_GROUPS);
    for (int g = 0; g < bi->n_groups; g++)
        if (ensure_lora_u(&ctx->s, ctx->params.max_batch_tokens, bi->adapters[g]->p.rank) != 0)
            return -1;
    return 0;
}

/* The forward on the CPU, once the batch's pages are taken. Returns the logit rows written. */
static int cpu_run(fl_context *ctx, const batch_info *bi, float *logits) {
    const fl_model *m = ctx->model;
    const fl_config *c = &m->cfg;
    const fl_batch *b = bi->b;
    fl_scratch *s = &ctx->s;
    int T = b->n_tokens;
    for (int t = 0; t < T; t++) {
        s->page_tables[t] = ctx->seqs[b->seq[t]].pages;
        memcpy(s->x + (size_t)t * c->dim, m->embed + (size_t)b->token[t] * c->dim,
               sizeof(float) * c->dim);
    }
    for (int l = 0; l < c->n_layers; l++) layer_forward(ctx, l, bi);
    if (training_losses(ctx, b) != 0) return -1;

    int n_out = 0;
    for (int t = 0; t < T; t++) {
        int want = b->logits ? b->logits[t] != 0 : t == T - 1 && !s->tok_train[t];
        if (!want) continue;
        fl_cpu_rmsnorm_forward(s->out_rows + (size_t)n_out * c->dim, s->x + (size_t)t * c->dim,
                               m->final_norm, 1, c->dim, c->norm_eps);
        n_out++;
    }
    if (n_out > 0)
        fl_model_linear(m, logits, s->out_rows, &m->lm_head, NULL, n_out, c->dim, c->vocab_size);
    if (ctx->poison) poison_scratch(ctx);
    return n_out;
}

/* Puts adapter a's weights, as they are now, in slot i of the device. */
static int upload_adapter(fl_context *ctx, int i, const fl_adapter *a, long long now) {
    const fl_model *m = ctx->model;
    fl_dev_slot *sl = &ctx->dev.slots[i];
    int n = m->cfg.n_layers * FL_LORA_N_TARGETS;
    sl->adapter = NULL;
    sl->used = 0;
    const float **ab = fl_malloc(sizeof(float *) * 2 * (size_t)n);
    if (!ab) return -1;
    for (int k = 0; k < n; k++) {
        const fl_lora_weight *w = fl_lora_at(a, k / FL_LORA_N_TARGETS, k % FL_LORA_N_TARGETS);
        ab[k] = w ? w->A : NULL;
        ab[n + k] = w ? w->B : NULL;
    }
    fl_cuda_adapter ca = {.rank = a->p.rank, .scale = a->scale, .A = ab, .B = ab + n};
    int rc = m->cuda->set_adapter(ctx->cuda, i, &ca);
    free(ab);
    if (rc != 0) return -1;
    sl->adapter = a;
    sl->version = a->version;
    sl->used = now;
    return i;
}

/* The device slot holding adapter a's weights as they are now, uploading them when none
 * does (into the slot least recently used, never one this forward uses). An adapter's
 * address proves nothing about its content: it may have been trained since (the optimizer
 * writes its parameters in place), or freed and another made at the same address. Its
 * version, new for every adapter and every change (fl_adapter_changed), tells both.
 * Returns the slot, or -1. */
static int adapter_slot(fl_context *ctx, const fl_adapter *a, long long now) {
    fl_dev_slot *sl = ctx->dev.slots;
    int found = -1, lru = -1;
    for (int i = 0; i < FL_CUDA_ADAPTER_SLOTS && found < 0; i++) {
        if (sl[i].adapter == a) found = i;
        else if (sl[i].used != now && (lru < 0 || sl[i].used < sl[lru].used)) lru = i;
    }
    if (found >= 0 && sl[found].version == a->version) {
        sl[found].used = now;
        return found;
    }
    int i = found >= 0 ? found : lru;
    if (i < 0)
        return fl_error("batch: more than %d adapters in one forward on the device",
                        FL_CUDA_ADAPTER_SLOTS);
    return upload_adapter(ctx, i, a, now);
}

/* A batch on a cuda context: inference rows on the device; finetuning rows on the CPU, their
 * sequences' KV in the CPU pool (training on the device comes with the backward there).
 * Attention never crosses sequences, so splitting a batch by sequence changes no result. */
static int forward_device(fl_context *ctx, const fl_batch *b, float *logits) {
    const fl_model *m = ctx->model;
    fl_dev_batch *d = &ctx->dev;
    int T = b->n_tokens, n_dev = 0, n_cpu = 0, n_out = 0;
    long long now = ++d->forwards;
    for (int t = 0; t < T; t++) {
        if (ctx->seqs[b->seq[t]].train) {
            d->cpu_token[n_cpu] = b->token[t];
            d->cpu_seq[n_cpu] = b->seq[t];
            d->cpu_pos[n_cpu++] = b->pos[t];
            continue;
        }
        const fl_adapter *a = b->adapter ? b->adapter[t] : NULL;
        int slot = a ? adapter_slot(ctx, a, now) : -1;
        if (a && slot < 0) return -1;
        if (b->logits ? b->logits[t] != 0 : t == T - 1) d->logit_rows[n_out++] = n_dev;
        d->token[n_dev] = b->token[t];
        d->pos[n_dev] = b->pos[t];
        d->slot[n_dev++] = slot;
    }
    fl_batch sub = {.n_tokens = n_cpu, .token = d->cpu_token, .seq = d->cpu_seq,
                    .pos = d->cpu_pos};
    batch_info bi;
    if (n_cpu > 0 && (alloc_cpu_pool(ctx) != 0 || cpu_prepare(ctx, &sub, &bi) != 0)) return -1;
    if (take_pages(ctx, b) != 0) return -1;
    if (n_dev > 0) {
        int n_ids = 0, k = 0;
        for (int t = 0; t < T; t++) d->seq_start[b->seq[t]] = -1;
        for (int t = 0; t < T; t++) {
            const fl_seq *sq = &ctx->seqs[b->seq[t]];
            if (sq->train) continue;
            if (d->seq_start[b->seq[t]] < 0) {
                d->seq_start[b->seq[t]] = n_ids;
                memcpy(d->pages + n_ids, sq->pages, sizeof(int32_t) * (size_t)sq->n_pages);
                n_ids += sq->n_pages;
            }
            d->page_start[k++] = d->seq_start[b->seq[t]];
        }
        if (m->cuda->forward(ctx->cuda, d->token, d->pos, d->page_start, d->slot, n_dev, d->pages,
                             n_ids, d->logit_rows, n_out, logits) != 0) {
            undo_pages(ctx, b, T);
            return -1;
        }
    }
    if (n_cpu > 0 && cpu_run(ctx, &bi, NULL) < 0) return -1;
    return n_out;
}

int fl_forward(fl_context *ctx, const fl_batch *b, float *logits) {
    if (validate_batch(ctx, b) != 0) return -1;
    if (ctx->cuda) return forward_device(ctx, b, logits);
    batch_info bi;
    if (cpu_prepare(ctx, b, &bi) != 0 || take_pages(ctx, b) != 0) return -1;
    return cpu_run(ctx, &bi, logits);
}
