/* Finetuning samples: the arena, the loss fused into the forward, and the backward
 * in reverse chunks of positions, each through every layer top-down. Attention
 * gradients for keys reach earlier positions through per-layer dK/dV accumulators,
 * so any chunking gives the same gradients. */
#include "train.h"
#include "fl_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LOSS_ROWS 64 /* rows of logits at a time in the fused loss */

fl_train_params fl_train_default_params(void) {
    fl_train_params p = {0};
    return p;
}

fl_train_sample *fl_train_begin(fl_context *ctx, fl_adapter *adapter, const fl_sample *sample,
                                const fl_train_params *params) {
    const fl_model *m = ctx->model;
    const fl_config *c = &m->cfg;
    if (sample->n < 2 || sample->n > c->max_seq_len) {
        fl_error("finetuning sample: %d tokens, must be 2..%d", sample->n, c->max_seq_len);
        return NULL;
    }
    fl_train_sample *t = fl_calloc(1, sizeof *t);
    if (!t) return NULL;
    t->adapter = adapter;
    t->p = params ? *params : fl_train_default_params();
    t->seq = -1;
    t->n = sample->n;
    fl_plan_params pp = {.targets = adapter->p.targets, .rank = adapter->p.rank,
                         .remat_q = t->p.remat_q, .remat_gate_up = t->p.remat_gate_up};
    if (fl_plan_make(c, &pp, sample->n, &t->plan) != 0) goto fail;
    t->tokens = fl_malloc(sizeof(int32_t) * t->n);
    t->labels = fl_malloc(sizeof(int32_t) * t->n);
    t->arena_bytes = fl_plan_arena_bytes(&t->plan, t->n);
    if (ctx->spare_arena && ctx->spare_bytes >= t->arena_bytes) {
        t->arena = ctx->spare_arena;
        t->arena_cap = ctx->spare_bytes;
        ctx->spare_arena = NULL;
        ctx->spare_bytes = 0;
    } else {
        t->arena = fl_malloc(t->arena_bytes);
        t->arena_cap = t->arena_bytes;
    }
    if (!t->tokens || !t->labels || !t->arena) goto fail;
    memcpy(t->tokens, sample->tokens, sizeof(int32_t) * t->n);
    memcpy(t->labels, sample->labels, sizeof(int32_t) * t->n);
    for (int i = 0; i < t->n; i++) {
        if (t->tokens[i] < 0 || t->tokens[i] >= c->vocab_size || t->labels[i] >= c->vocab_size) {
            fl_error("finetuning sample: token or label at position %d is outside the "
                     "vocabulary [0, %d)",
                     i, c->vocab_size);
            goto fail;
        }
        t->n_labels += t->labels[i] >= 0;
    }
    size_t saved = (size_t)c->n_layers * t->n * t->plan.arena_floats;
    size_t acc = (size_t)c->n_layers * t->n * m->kv_dim;
    t->saved = t->arena;
    t->dk_acc = t->saved + saved;
    t->dv_acc = t->dk_acc + acc;
    t->dfinal = t->dv_acc + acc;
    memset(t->dk_acc, 0, sizeof(float) * 2 * acc);
    if ((t->seq = fl_seq_new(ctx)) < 0) goto fail;
    ctx->seqs[t->seq].train = t;
    return t;
fail:
    fl_train_end(ctx, t);
    return NULL;
}

void fl_train_end(fl_context *ctx, fl_train_sample *t) {
    if (!t) return;
    if (t->seq >= 0) {
        ctx->seqs[t->seq].train = NULL;
        fl_seq_free(ctx, t->seq);
    }
    free(t->tokens);
    free(t->labels);
    if (t->arena && t->arena_cap > ctx->spare_bytes) { /* keep the larger block */
        free(ctx->spare_arena);
        ctx->spare_arena = t->arena;
        ctx->spare_bytes = t->arena_cap;
    } else {
        free(t->arena);
    }
    free(t);
}

int fl_train_seq(const fl_train_sample *t) { return t->seq; }
int fl_train_length(const fl_train_sample *t) { return t->n; }
int fl_train_forwarded(const fl_train_sample *t) { return t->forwarded; }
int fl_train_backward_left(const fl_train_sample *t) { return t->n - t->backwarded; }
const int32_t *fl_train_tokens(const fl_train_sample *t) { return t->tokens; }
size_t fl_train_arena_bytes(const fl_train_sample *t) { return t->arena_bytes; }
double fl_train_loss(const fl_train_sample *t) {
    return t->n_labels ? t->loss_sum / t->n_labels : 0.0;
}

int fl_train_forward(fl_context *ctx, fl_train_sample *t, int max_tokens) {
    int m = t->n - t->forwarded;
    if (m > max_tokens) m = max_tokens;
    if (m > ctx->params.max_batch_tokens) m = ctx->params.max_batch_tokens;
    if (m <= 0) return 0;
    int32_t *seq = fl_malloc(sizeof(int32_t) * m), *pos = fl_malloc(sizeof(int32_t) * m);
    int rc = -1;
    if (seq && pos) {
        for (int i = 0; i < m; i++) seq[i] = t->seq, pos[i] = t->forwarded + i;
        /* No logits array: a finetuning sample's rows never have logits written (their loss
         * is fused into the forward), and its own adapter applies to them. */
        fl_batch b = {.n_tokens = m, .token = t->tokens + t->forwarded, .seq = seq, .pos = pos};
        rc = fl_forward(ctx, &b, NULL) < 0 ? -1 : m;
    }
    free(seq);
    free(pos);
    return rc;
}

void fl_lora_training_input(float *dst, const float *x, const fl_train_sample *t, int layer,
                            fl_lora_target target, const int32_t *pos, int m, int in) {
    if (dst != x) memcpy(dst, x, sizeof(float) * (size_t)m * in);
    if (t->adapter->p.dropout <= 0.0f) return;
    for (int r = 0; r < m; r++)
        for (int i = 0; i < in; i++)
            dst[(size_t)r * in + i] *=
                fl_lora_dropout(t->adapter, t->p.dropout_step, layer, target, pos[r], i);
}

int fl_train_loss_rows(fl_context *ctx, fl_train_sample *t, const float *x, const int32_t *pos,
                       int m) {
    const fl_model *mo = ctx->model;
    const fl_config *c = &mo->cfg;
    float scale = t->n_labels ? 1.0f / t->n_labels : 0.0f; /* the sample's mean */
    size_t rows = m < LOSS_ROWS ? (size_t)m : LOSS_ROWS;
    float *normed = fl_malloc(sizeof(float) * rows * c->dim);
    float *rinv = fl_malloc(sizeof(float) * rows);
    float *logits = fl_malloc(sizeof(float) * rows * (size_t)c->vocab_size);
    float *dn = fl_malloc(sizeof(float) * rows * c->dim);
    int32_t targets[LOSS_ROWS];
    int rc = normed && rinv && logits && dn ? 0 : -1;
    for (int r0 = 0; rc == 0 && r0 < m; r0 += LOSS_ROWS) {
        int k = m - r0 < LOSS_ROWS ? m - r0 : LOSS_ROWS;
        const float *xr = x + (size_t)r0 * c->dim;
        for (int i = 0; i < k; i++) targets[i] = t->labels[pos[r0 + i]];
        fl_cpu_rmsnorm_forward_rinv(normed, rinv, xr, mo->final_norm, k, c->dim, c->norm_eps);
        fl_model_linear(mo, logits, normed, &mo->lm_head, NULL, k, c->dim, c->vocab_size);
        t->loss_sum += fl_cpu_cross_entropy(logits, targets, k, c->vocab_size, scale);
        memset(dn, 0, sizeof(float) * (size_t)k * c->dim);
        fl_cpu_matmul_backward_input(dn, logits, mo->lm_head.w, k, c->dim, c->vocab_size);
        for (int i = 0; i < k; i++) { /* the final norm's backward lands in dfinal */
            float *d = t->dfinal + (size_t)pos[r0 + i] * c->dim;
            memset(d, 0, sizeof(float) * c->dim);
            fl_cpu_rmsnorm_backward(d, dn + (size_t)i * c->dim, xr + (size_t)i * c->dim,
                                    rinv + i, mo->final_norm, 1, c->dim);
        }
    }
    free(normed);
    free(rinv);
    free(logits);
    free(dn);
    return rc;
}

/* ---------------------------------------------------------------- backward */

/* Buffers for one backward chunk of up to m rows. */
typedef struct {
    float *x, *xn, *dx, *dxn;             /* [m, dim] */
    float *q, *dq, *att, *datt;           /* [m, q_dim] */
    float *dk, *dv;                       /* [m, kv_dim] */
    float *gate, *up, *h, *dh, *dgate, *dup; /* [m, hidden] */
    float *lora_in, *lora_dx;             /* [m, max(dim, q_dim, hidden)] */
    float *u;                             /* [m, rank] */
    float *rinv, *lse;                    /* [m], [m, n_heads] */
    int32_t *pos;                         /* [m] */
} bwd_bufs;

#define BWD_FLOAT_BUFS 19

/* The float buffers' fields, in the order of the widths in alloc_bufs. */
static void buf_slots(bwd_bufs *b, float **slot[BWD_FLOAT_BUFS]) {
    float **p[BWD_FLOAT_BUFS] = {&b->x,   &b->xn,   &b->dx,    &b->dxn, &b->q,       &b->dq,
                                 &b->att, &b->datt, &b->dk,    &b->dv,  &b->gate,    &b->up,
                                 &b->h,   &b->dh,   &b->dgate, &b->dup, &b->lora_in, &b->u,
                                 &b->lora_dx};
    memcpy(slot, p, sizeof p);
}

static void free_bufs(bwd_bufs *b) {
    float **slot[BWD_FLOAT_BUFS];
    buf_slots(b, slot);
    for (int i = 0; i < BWD_FLOAT_BUFS; i++) free(*slot[i]);
    free(b->rinv);
    free(b->lse);
    free(b->pos);
}

static int alloc_bufs(bwd_bufs *b, const fl_model *mo, int m, int rank) {
    const fl_config *c = &mo->cfg;
    size_t D = c->dim, Q = mo->q_dim, KV = mo->kv_dim, H = c->hidden_dim;
    size_t wide = D > Q ? D : Q;
    if (H > wide) wide = H;
    size_t widths[BWD_FLOAT_BUFS] = {D, D, D, D, Q, Q, Q, Q, KV, KV, H, H, H, H, H, H, wide,
                                     (size_t)rank, wide};
    memset(b, 0, sizeof *b);
    float **slot[BWD_FLOAT_BUFS];
    buf_slots(b, slot);
    int ok = 1;
    for (int i = 0; i < BWD_FLOAT_BUFS; i++)
        ok &= (*slot[i] = fl_malloc(sizeof(float) * m * widths[i])) != NULL;
    b->rinv = fl_malloc(sizeof(float) * m);
    b->lse = fl_malloc(sizeof(float) * m * c->n_heads);
    b->pos = fl_malloc(sizeof(int32_t) * m);
    if (ok && b->rinv && b->lse && b->pos) return 0;
    free_bufs(b);
    return -1;
}

/* Gathers m rows of kept activation a (width floats) of layer l into dst. */
static void load_rows(float *dst, const fl_train_sample *t, int l, fl_activation a, int p0, int m,
                      size_t width) {
    for (int i = 0; i < m; i++)
        memcpy(dst + (size_t)i * width, fl_train_saved(t, l, p0 + i, a), sizeof(float) * width);
}

/* xn = x * rinv * w: the norm's output rebuilt from its kept input and 1/rms. */
static void renorm(float *xn, float *x, float *rinv, const fl_train_sample *t, int l,
                   fl_activation xa, fl_activation ra, const float *w, int p0, int m, int dim) {
    load_rows(x, t, l, xa, p0, m, dim);
    load_rows(rinv, t, l, ra, p0, m, 1);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < dim; j++)
            xn[(size_t)i * dim + j] = w[j] * (x[(size_t)i * dim + j] * rinv[i]);
}

/* y += s * u @ B^T with u kept from the forward: the LoRA part of an output that
 * is being recomputed. */
static void lora_output(float *y, const fl_train_sample *t, int l, fl_lora_target tg,
                        bwd_bufs *b, int p0, int m, int out) {
    const fl_lora_weight *w = fl_lora_at(t->adapter, l, tg);
    if (!w) return;
    int r = t->adapter->p.rank;
    load_rows(b->u, t, l, FL_ACT_U_Q + tg, p0, m, r);
    for (int i = 0; i < m; i++)
        for (int o = 0; o < out; o++) {
            float acc = 0.0f;
            for (int k = 0; k < r; k++) acc += b->u[(size_t)i * r + k] * w->B[(size_t)o * r + k];
            y[(size_t)i * out + o] += t->adapter->scale * acc;
        }
}

/* dx += dy @ W for a frozen linear, and its LoRA's gradients when it has one. x is the
 * linear's input as the forward saw it (before dropout); the LoRA's share of dx goes
 * back through the same dropout mask. */
static void linear_backward(float *dx, const float *dy, const float *x, const fl_linear *lin,
                            const fl_train_sample *t, int l, fl_lora_target tg, bwd_bufs *b,
                            int p0, int m, int in, int out) {
    fl_cpu_matmul_backward_input(dx, dy, lin->w, m, in, out);
    const fl_lora_weight *w = fl_lora_at(t->adapter, l, tg);
    if (!w) return;
    int r = t->adapter->p.rank;
    fl_lora_training_input(b->lora_in, x, t, l, tg, b->pos, m, in);
    load_rows(b->u, t, l, FL_ACT_U_Q + tg, p0, m, r);
    if (t->adapter->p.dropout <= 0.0f) {
        fl_cpu_lora_backward(dx, w->dA, w->dB, dy, b->lora_in, b->u, w->A, w->B,
                             t->adapter->scale, m, in, out, r);
        return;
    }
    memset(b->lora_dx, 0, sizeof(float) * (size_t)m * in);
    fl_cpu_lora_backward(b->lora_dx, w->dA, w->dB, dy, b->lora_in, b->u, w->A, w->B,
                         t->adapter->scale, m, in, out, r);
    fl_lora_training_input(b->lora_dx, b->lora_dx, t, l, tg, b->pos, m, in);
    fl_cpu_add_inplace(dx, b->lora_dx, m * in);
}

/* One layer's backward for positions p0..p0+m-1; dx [m, dim] enters as the gradient
 * of the layer's output and leaves as the gradient of its input. */
static void layer_backward(fl_context *ctx, fl_train_sample *t, int l, bwd_bufs *b, int p0,
                           int m) {
    const fl_model *mo = ctx->model;
    const fl_config *c = &mo->cfg;
    const fl_layer_weights *L = &mo->layers[l];
    const fl_plan *pl = &t->plan;
    int D = c->dim, H = c->hidden_dim, Q = mo->q_dim, KV = mo->kv_dim;
    size_t MH = (size_t)m * H;

    /* MLP: x_mid -> norm -> gate/up -> swiglu -> down -> + */
    renorm(b->xn, b->x, b->rinv, t, l, FL_ACT_X_MID, FL_ACT_RMS2, L->ffn_norm, p0, m, D);
    if (pl->kept[FL_ACT_GATE]) {
        load_rows(b->gate, t, l, FL_ACT_GATE, p0, m, H);
        load_rows(b->up, t, l, FL_ACT_UP, p0, m, H);
    } else {
        fl_model_linear(mo, b->gate, b->xn, &L->w_gate, NULL, m, D, H);
        fl_model_linear(mo, b->up, b->xn, &L->w_up, NULL, m, D, H);
        lora_output(b->gate, t, l, FL_LORA_GATE, b, p0, m, H);
        lora_output(b->up, t, l, FL_LORA_UP, b, p0, m, H);
    }
    fl_cpu_swiglu_forward(b->h, b->gate, b->up, (int)MH);
    memset(b->dh, 0, sizeof(float) * MH);
    linear_backward(b->dh, b->dx, b->h, &L->w_down, t, l, FL_LORA_DOWN, b, p0, m, H, D);
    fl_cpu_swiglu_backward(b->dgate, b->dup, b->dh, b->gate, b->up, (int)MH);
    memset(b->dxn, 0, sizeof(float) * (size_t)m * D);
    linear_backward(b->dxn, b->dgate, b->xn, &L->w_gate, t, l, FL_LORA_GATE, b, p0, m, D, H);
    linear_backward(b->dxn, b->dup, b->xn, &L->w_up, t, l, FL_LORA_UP, b, p0, m, D, H);
    fl_cpu_rmsnorm_backward(b->dx, b->dxn, b->x, b->rinv, L->ffn_norm, m, D);

    /* attention: x_in -> norm -> q/k/v -> rope -> attention -> o -> + */
    load_rows(b->att, t, l, FL_ACT_ATT, p0, m, Q);
    load_rows(b->lse, t, l, FL_ACT_LSE, p0, m, c->n_heads);
    memset(b->datt, 0, sizeof(float) * (size_t)m * Q);
    linear_backward(b->datt, b->dx, b->att, &L->wo, t, l, FL_LORA_O, b, p0, m, Q, D);
    renorm(b->xn, b->x, b->rinv, t, l, FL_ACT_X_IN, FL_ACT_RMS1, L->attn_norm, p0, m, D);
    if (pl->kept[FL_ACT_Q]) {
        load_rows(b->q, t, l, FL_ACT_Q, p0, m, Q);
    } else {
        fl_model_linear(mo, b->q, b->xn, &L->wq, L->bq, m, D, Q);
        lora_output(b->q, t, l, FL_LORA_Q, b, p0, m, Q);
        fl_cpu_rope_forward(b->q, b->pos, mo->inv_freq, m, c->n_heads, c->head_dim);
    }
    fl_kv_layer kv = fl_context_kv_layer(ctx, l);
    float *dk_acc = t->dk_acc + (size_t)l * t->n * KV, *dv_acc = t->dv_acc + (size_t)l * t->n * KV;
    fl_cpu_attention_backward(b->dq, dk_acc, dv_acc, b->datt, b->att, b->lse, b->q, &kv,
                              ctx->seqs[t->seq].pages, b->pos, m, c->n_heads, c->n_kv_heads,
                              c->head_dim);
    /* Every query at or after these positions has been through: their dK/dV are whole. */
    memcpy(b->dk, dk_acc + (size_t)p0 * KV, sizeof(float) * (size_t)m * KV);
    memcpy(b->dv, dv_acc + (size_t)p0 * KV, sizeof(float) * (size_t)m * KV);
    fl_cpu_rope_backward(b->dq, b->pos, mo->inv_freq, m, c->n_heads, c->head_dim);
    fl_cpu_rope_backward(b->dk, b->pos, mo->inv_freq, m, c->n_kv_heads, c->head_dim);
    memset(b->dxn, 0, sizeof(float) * (size_t)m * D);
    linear_backward(b->dxn, b->dq, b->xn, &L->wq, t, l, FL_LORA_Q, b, p0, m, D, Q);
    linear_backward(b->dxn, b->dk, b->xn, &L->wk, t, l, FL_LORA_K, b, p0, m, D, KV);
    linear_backward(b->dxn, b->dv, b->xn, &L->wv, t, l, FL_LORA_V, b, p0, m, D, KV);
    fl_cpu_rmsnorm_backward(b->dx, b->dxn, b->x, b->rinv, L->attn_norm, m, D);
}

struct fl_bwd_cache {
    bwd_bufs b;
    int rows, rank;
};

/* The context's backward buffers, grown to m rows and the rank when needed. */
static bwd_bufs *backward_buffers(fl_context *ctx, int m, int rank) {
    struct fl_bwd_cache *c = ctx->bwd;
    if (c && c->rows >= m && c->rank >= rank) return &c->b;
    int rows = c && c->rows > m ? c->rows : m, r = c && c->rank > rank ? c->rank : rank;
    if (c) free_bufs(&c->b);
    else if (!(c = ctx->bwd = fl_calloc(1, sizeof *c))) return NULL;
    if (alloc_bufs(&c->b, ctx->model, rows, r) != 0) {
        free(c);
        ctx->bwd = NULL;
        return NULL;
    }
    c->rows = rows;
    c->rank = r;
    return &c->b;
}

void fl_train_release(fl_context *ctx) {
    if (ctx->bwd) free_bufs(&ctx->bwd->b);
    free(ctx->bwd);
    ctx->bwd = NULL;
    free(ctx->spare_arena);
    ctx->spare_arena = NULL;
    ctx->spare_bytes = 0;
}

int fl_train_backward(fl_context *ctx, fl_train_sample *t, int max_tokens) {
    if (t->forwarded < t->n)
        return fl_error("finetuning sample: backward needs the whole forward (%d of %d positions)",
                        t->forwarded, t->n);
    int end = t->n - t->backwarded, m = end < max_tokens ? end : max_tokens;
    if (m <= 0) return 0;
    const fl_model *mo = ctx->model;
    int p0 = end - m;
    bwd_bufs *b = backward_buffers(ctx, m, t->adapter->p.rank);
    if (!b) return -1;
    for (int i = 0; i < m; i++) b->pos[i] = p0 + i;
    memcpy(b->dx, t->dfinal + (size_t)p0 * mo->cfg.dim, sizeof(float) * (size_t)m * mo->cfg.dim);
    for (int l = mo->cfg.n_layers - 1; l >= 0; l--) layer_backward(ctx, t, l, b, p0, m);
    t->backwarded += m;
    return m;
}
