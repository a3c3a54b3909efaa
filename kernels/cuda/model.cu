// The whole model's forward on the device: the CUDA ops in fl_forward's order
// (engine/context.c layer_forward), weights and buffers allocated once.
#include "cuda/cuda_model.h"
#include "cuda/cuda_util.h"

extern "C" {
#include "model.h"
}

#include <math.h>
#include <stdlib.h>
#include <string.h>

// Device buffers freed together.
typedef struct {
    void **p;
    int n, cap;
} dev_list;

static void *dev_alloc(dev_list *l, size_t bytes, const char *what) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        void **p = (void **)realloc(l->p, sizeof(void *) * cap);
        if (!p) {
            fl_error("out of memory tracking CUDA buffers");
            return NULL;
        }
        l->p = p;
        l->cap = cap;
    }
    void *d = fl_cuda_alloc(bytes, what);
    if (d) l->p[l->n++] = d;
    return d;
}

static void dev_list_free(dev_list *l) {
    for (int i = 0; i < l->n; i++) fl_cuda_free(l->p[i]);
    free(l->p);
    memset(l, 0, sizeof *l);
}

typedef struct {
    const void *w;  // [out, in] as the weights' dtype
    const float *b; // [out] or NULL
} dev_linear;

typedef struct {
    const float *attn_norm, *ffn_norm;
    dev_linear wq, wk, wv, wo, gate, up, down;
} dev_layer;

struct fl_cuda_weights {
    fl_config cfg;
    int q_dim, kv_dim;
    fl_cuda_dtype wtype;
    dev_layer *layers;
    const void *embed, *lm_head; // [vocab, dim] as wtype; the same buffer when tied
    const float *final_norm, *inv_freq;
    dev_list owned;
};

// ------------------------------------------------------------------ weights from a model

// An fp32 host tensor on the device: as is, or through the staging buffer and converted.
// The default stream orders the conversion before the next upload into staging.
static const void *upload_weight(fl_cuda_weights *w, const float *h, size_t n, fl_cuda_dtype dt,
                                 float *staging, const char *what) {
    if (dt == FL_CUDA_F32) {
        float *d = (float *)dev_alloc(&w->owned, sizeof(float) * n, what);
        if (!d || fl_cuda_upload(d, h, sizeof(float) * n, NULL)) return NULL;
        return d;
    }
    uint16_t *d = (uint16_t *)dev_alloc(&w->owned, sizeof(uint16_t) * n, what);
    if (!d || fl_cuda_upload(staging, h, sizeof(float) * n, NULL) ||
        fl_cuda_f32_to_bf16(d, staging, n, NULL))
        return NULL;
    return d;
}

static const float *upload_f32(fl_cuda_weights *w, const float *h, size_t n, const char *what) {
    return (const float *)upload_weight(w, h, n, FL_CUDA_F32, NULL, what);
}

static int upload_linear(fl_cuda_weights *w, dev_linear *d, const fl_linear *lin,
                         const float *bias, int out, int in, float *staging, const char *what) {
    d->w = upload_weight(w, lin->w, (size_t)out * in, w->wtype, staging, what);
    d->b = bias ? upload_f32(w, bias, out, what) : NULL;
    return d->w && (!bias || d->b) ? 0 : -1;
}

static int upload_model(fl_cuda_weights *w, const fl_model *m) {
    const fl_config *c = &m->cfg;
    size_t biggest = (size_t)c->vocab_size * c->dim;
    size_t mats[] = {(size_t)m->q_dim * c->dim, (size_t)m->kv_dim * c->dim,
                     (size_t)c->hidden_dim * c->dim};
    for (int i = 0; i < 3; i++) biggest = mats[i] > biggest ? mats[i] : biggest;
    float *staging = NULL;
    if (w->wtype == FL_CUDA_BF16 &&
        !(staging = (float *)fl_cuda_alloc(sizeof(float) * biggest, "weight conversion")))
        return -1;
    int rc = 0;
    for (int l = 0; l < c->n_layers && rc == 0; l++) {
        const fl_layer_weights *L = &m->layers[l];
        dev_layer *D = &w->layers[l];
        rc =
            !(D->attn_norm = upload_f32(w, L->attn_norm, c->dim, "attention norm")) ||
            !(D->ffn_norm = upload_f32(w, L->ffn_norm, c->dim, "ffn norm")) ||
            upload_linear(w, &D->wq, &L->wq, L->bq, m->q_dim, c->dim, staging, "wq") ||
            upload_linear(w, &D->wk, &L->wk, L->bk, m->kv_dim, c->dim, staging, "wk") ||
            upload_linear(w, &D->wv, &L->wv, L->bv, m->kv_dim, c->dim, staging, "wv") ||
            upload_linear(w, &D->wo, &L->wo, L->bo, c->dim, m->q_dim, staging, "wo") ||
            upload_linear(w, &D->gate, &L->w_gate, NULL, c->hidden_dim, c->dim, staging,
                          "w_gate") ||
            upload_linear(w, &D->up, &L->w_up, NULL, c->hidden_dim, c->dim, staging, "w_up") ||
            upload_linear(w, &D->down, &L->w_down, NULL, c->dim, c->hidden_dim, staging, "w_down");
    }
    size_t vd = (size_t)c->vocab_size * c->dim;
    if (rc == 0 &&
        (!(w->embed = upload_weight(w, m->embed, vd, w->wtype, staging, "embedding")) ||
         !(w->final_norm = upload_f32(w, m->final_norm, c->dim, "final norm")) ||
         !(w->inv_freq = upload_f32(w, m->inv_freq, c->head_dim / 2, "rope frequencies"))))
        rc = -1;
    if (rc == 0)
        w->lm_head = m->lm_head.w == m->embed
                         ? w->embed
                         : upload_weight(w, m->lm_head.w, vd, w->wtype, staging, "lm_head");
    if (rc == 0 && !w->lm_head) rc = -1;
    // The staging buffer is freed only after the conversions that read it.
    if (fl_cuda_sync(NULL)) rc = -1;
    fl_cuda_free(staging);
    return rc;
}

static const char *dtype_name(fl_cuda_dtype dt) { return dt == FL_CUDA_BF16 ? "bf16" : "fp32"; }

static fl_cuda_weights *weights_alloc(const fl_config *c, fl_cuda_dtype wtype) {
    if (wtype != FL_CUDA_F32 && wtype != FL_CUDA_BF16) {
        fl_error("CUDA weights: dtype %d is neither fp32 nor bf16", (int)wtype);
        return NULL;
    }
    fl_cuda_weights *w = (fl_cuda_weights *)fl_calloc(1, sizeof *w);
    if (!w) return NULL;
    w->cfg = *c;
    w->q_dim = c->n_heads * c->head_dim;
    w->kv_dim = c->n_kv_heads * c->head_dim;
    w->wtype = wtype;
    if (!(w->layers = (dev_layer *)fl_calloc((size_t)c->n_layers, sizeof(dev_layer)))) {
        free(w);
        return NULL;
    }
    return w;
}

extern "C" void fl_cuda_weights_free(fl_cuda_weights *w) {
    if (!w) return;
    dev_list_free(&w->owned);
    free(w->layers);
    free(w);
}

extern "C" fl_cuda_weights *fl_cuda_weights_new(const fl_model *m, fl_cuda_dtype wtype) {
    fl_cuda_weights *w = weights_alloc(&m->cfg, wtype);
    if (!w) return NULL;
    if (upload_model(w, m) != 0) {
        fl_error_prefix("CUDA weights (%s)", dtype_name(wtype));
        fl_cuda_weights_free(w);
        return NULL;
    }
    return w;
}

// ------------------------------------------------------------------ random weights

// Element i of tensor `tensor`: a splitmix64 hash of (seed, tensor, i), uniform in
// [-scale, scale), stored as fp32 or bf16.
__global__ void fill_uniform_kernel(void *dst, int bf16, size_t n, uint64_t seed, uint64_t tensor,
                                    float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = seed + tensor * 0x9E3779B97F4A7C15ULL + (i + 1) * 0xD1B54A32D192ED03ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        float v = scale * ((float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f);
        if (bf16) ((uint16_t *)dst)[i] = fl_f32_to_bf16_bits(v);
        else ((float *)dst)[i] = v;
    }
}

__global__ void fill_const_kernel(float *dst, size_t n, float v) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = v;
}

typedef struct {
    fl_cuda_weights *w;
    uint64_t seed, tensor;
} rand_state;

static const void *random_tensor(rand_state *r, size_t n, fl_cuda_dtype dt, float scale,
                                 const char *what) {
    size_t esize = dt == FL_CUDA_BF16 ? sizeof(uint16_t) : sizeof(float);
    void *d = dev_alloc(&r->w->owned, esize * n, what);
    if (!d) return NULL;
    fill_uniform_kernel<<<fl_cuda_blocks(n, 256), 256>>>(d, dt == FL_CUDA_BF16, n, r->seed,
                                                         r->tensor++, scale);
    return fl_cuda_launched("random weights") ? NULL : d;
}

static const float *ones(rand_state *r, size_t n, const char *what) {
    float *d = (float *)dev_alloc(&r->w->owned, sizeof(float) * n, what);
    if (!d) return NULL;
    fill_const_kernel<<<fl_cuda_blocks(n, 256), 256>>>(d, n, 1.0f);
    return fl_cuda_launched("norm weights") ? NULL : d;
}

static int random_linear(rand_state *r, dev_linear *d, int out, int in, const char *what) {
    d->w = random_tensor(r, (size_t)out * in, r->w->wtype, 1.0f / sqrtf((float)in), what);
    return d->w ? 0 : -1;
}

extern "C" fl_cuda_weights *fl_cuda_weights_random(const fl_config *c, fl_cuda_dtype wtype,
                                                   uint64_t seed) {
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads != 0 || c->head_dim <= 0 ||
        c->head_dim % 2 != 0 || c->vocab_size <= 0) {
        fl_error("CUDA random weights: the config needs positive sizes, n_heads %d a multiple "
                 "of n_kv_heads %d and an even head_dim %d",
                 c->n_heads, c->n_kv_heads, c->head_dim);
        return NULL;
    }
    if (c->qkv_bias || c->o_bias) {
        fl_error("CUDA random weights: configs with attention biases are not supported");
        return NULL;
    }
    fl_cuda_weights *w = weights_alloc(c, wtype);
    if (!w) return NULL;
    rand_state r = {w, seed, 0};
    int rc = 0;
    for (int l = 0; l < c->n_layers && rc == 0; l++) {
        dev_layer *D = &w->layers[l];
        rc = !(D->attn_norm = ones(&r, c->dim, "attention norm")) ||
             !(D->ffn_norm = ones(&r, c->dim, "ffn norm")) ||
             random_linear(&r, &D->wq, w->q_dim, c->dim, "wq") ||
             random_linear(&r, &D->wk, w->kv_dim, c->dim, "wk") ||
             random_linear(&r, &D->wv, w->kv_dim, c->dim, "wv") ||
             random_linear(&r, &D->wo, c->dim, w->q_dim, "wo") ||
             random_linear(&r, &D->gate, c->hidden_dim, c->dim, "w_gate") ||
             random_linear(&r, &D->up, c->hidden_dim, c->dim, "w_up") ||
             random_linear(&r, &D->down, c->dim, c->hidden_dim, "w_down");
    }
    size_t vd = (size_t)c->vocab_size * c->dim;
    float *inv_freq = (float *)fl_malloc(sizeof(float) * (c->head_dim / 2));
    if (rc == 0 && inv_freq) fl_rope_inv_freq(c, inv_freq);
    if (rc != 0 || !inv_freq || !(w->embed = random_tensor(&r, vd, wtype, 1.0f, "embedding")) ||
        !(w->final_norm = ones(&r, c->dim, "final norm")) ||
        !(w->inv_freq = upload_f32(w, inv_freq, c->head_dim / 2, "rope frequencies")) ||
        !(w->lm_head = c->tie_embeddings
                           ? w->embed
                           : random_tensor(&r, vd, wtype, 1.0f / sqrtf((float)c->dim), "lm_head")) ||
        fl_cuda_sync(NULL)) {
        free(inv_freq);
        fl_error_prefix("CUDA random weights (%s)", dtype_name(wtype));
        fl_cuda_weights_free(w);
        return NULL;
    }
    free(inv_freq);
    return w;
}

// ------------------------------------------------------------------ forward state

struct fl_cuda_model {
    const fl_cuda_weights *w;
    int max_tokens, kv_pages;
    void *stream;
    fl_cuda_gemm *gemm;
    float *k_pool, *v_pool; // [n_layers, kv_pages, FL_KV_PAGE_TOKENS, kv_dim]
    float *x, *xb, *q, *k, *v, *att, *proj, *gate, *up, *rows, *logits;
    int32_t *tokens, *pos, *page_start, *pages, *logit_rows, *tok_slot;
    dev_list owned;
    // Adapters: lora_table[(layer * FL_LORA_N_TARGETS + target) * SLOTS + slot] on the
    // device, mirrored on the host; each slot's matrices in one buffer of its own.
    fl_cuda_lora *lora_table, *lora_host;
    float *slot_buf[FL_CUDA_ADAPTER_SLOTS];
    unsigned slot_targets[FL_CUDA_ADAPTER_SLOTS]; // 0: the slot is empty
    float *lora_u; // [max_tokens, u_stride]: x @ A^T of each token
    int u_stride;
};

// The host mirror of the adapter table to the device.
static int upload_table(fl_cuda_model *cm) {
    size_t entries = (size_t)cm->w->cfg.n_layers * FL_LORA_N_TARGETS * FL_CUDA_ADAPTER_SLOTS;
    return fl_cuda_upload(cm->lora_table, cm->lora_host, sizeof(fl_cuda_lora) * entries,
                          cm->stream);
}

static int alloc_buffers(fl_cuda_model *cm) {
    const fl_cuda_weights *w = cm->w;
    const fl_config *c = &w->cfg;
    size_t T = (size_t)cm->max_tokens;
    size_t pool = (size_t)c->n_layers * cm->kv_pages * FL_KV_PAGE_TOKENS * w->kv_dim;
    struct {
        float **p;
        size_t n;
        const char *what;
    } f[] = {{&cm->k_pool, pool, "K pool"},
             {&cm->v_pool, pool, "V pool"},
             {&cm->x, T * c->dim, "residual"},
             {&cm->xb, T * c->dim, "normed input"},
             {&cm->q, T * w->q_dim, "q"},
             {&cm->k, T * w->kv_dim, "k"},
             {&cm->v, T * w->kv_dim, "v"},
             {&cm->att, T * w->q_dim, "attention output"},
             {&cm->proj, T * c->dim, "projection"},
             {&cm->gate, T * c->hidden_dim, "gate"},
             {&cm->up, T * c->hidden_dim, "up"},
             {&cm->rows, T * c->dim, "logit rows"},
             {&cm->logits, T * c->vocab_size, "logits"}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (!(*f[i].p = (float *)dev_alloc(&cm->owned, sizeof(float) * f[i].n, f[i].what)))
            return -1;
    struct {
        int32_t **p;
        size_t n;
    } g[] = {{&cm->tokens, T},
             {&cm->pos, T},
             {&cm->page_start, T},
             {&cm->pages, (size_t)cm->kv_pages},
             {&cm->logit_rows, T},
             {&cm->tok_slot, T}};
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++)
        if (!(*g[i].p =
                  (int32_t *)dev_alloc(&cm->owned, sizeof(int32_t) * g[i].n, "batch indices")))
            return -1;
    size_t entries = (size_t)c->n_layers * FL_LORA_N_TARGETS * FL_CUDA_ADAPTER_SLOTS;
    if (!(cm->lora_table = (fl_cuda_lora *)dev_alloc(&cm->owned, sizeof(fl_cuda_lora) * entries,
                                                     "adapter table")) ||
        !(cm->lora_host = (fl_cuda_lora *)fl_calloc(entries, sizeof(fl_cuda_lora))))
        return -1;
    // Every entry empty (A NULL): the kernels skip tokens of a slot without the target.
    return upload_table(cm);
}

extern "C" void fl_cuda_model_free(fl_cuda_model *cm) {
    if (!cm) return;
    if (cm->stream) fl_cuda_sync(cm->stream); // nothing may still use what is freed below
    dev_list_free(&cm->owned);
    for (int i = 0; i < FL_CUDA_ADAPTER_SLOTS; i++) fl_cuda_free(cm->slot_buf[i]);
    fl_cuda_free(cm->lora_u);
    free(cm->lora_host);
    fl_cuda_gemm_free(cm->gemm);
    fl_cuda_stream_free(cm->stream);
    free(cm);
}

extern "C" fl_cuda_model *fl_cuda_model_new(const fl_cuda_weights *w, int max_tokens,
                                            int kv_pages) {
    const fl_config *c = &w->cfg;
    if (max_tokens <= 0 || kv_pages <= 0) {
        fl_error("CUDA model: max_tokens %d and kv_pages %d must be positive", max_tokens,
                 kv_pages);
        return NULL;
    }
    fl_cuda_model *cm = (fl_cuda_model *)fl_calloc(1, sizeof *cm);
    if (!cm) return NULL;
    cm->w = w;
    cm->max_tokens = max_tokens;
    cm->kv_pages = kv_pages;
    int widest = c->dim > w->q_dim ? c->dim : w->q_dim;
    widest = c->hidden_dim > widest ? c->hidden_dim : widest;
    if (!(cm->stream = fl_cuda_stream_new()) ||
        !(cm->gemm = fl_cuda_gemm_new(cm->stream, (size_t)max_tokens * widest)) ||
        alloc_buffers(cm) != 0 || fl_cuda_sync(cm->stream) != 0) {
        fl_error_prefix("CUDA model (%d tokens, %d KV pages)", max_tokens, kv_pages);
        fl_cuda_model_free(cm);
        return NULL;
    }
    return cm;
}

// ------------------------------------------------------------------ adapters

static void target_shape(const fl_cuda_weights *w, int tg, int *in, int *out) {
    const fl_config *c = &w->cfg;
    switch (tg) {
    case FL_LORA_Q: *in = c->dim, *out = w->q_dim; break;
    case FL_LORA_K:
    case FL_LORA_V: *in = c->dim, *out = w->kv_dim; break;
    case FL_LORA_O: *in = w->q_dim, *out = c->dim; break;
    case FL_LORA_GATE:
    case FL_LORA_UP: *in = c->dim, *out = c->hidden_dim; break;
    default: *in = c->hidden_dim, *out = c->dim; break; // FL_LORA_DOWN
    }
}

static void clear_slot(fl_cuda_model *cm, int slot) {
    int n = cm->w->cfg.n_layers * FL_LORA_N_TARGETS;
    for (int i = 0; i < n; i++) memset(&cm->lora_host[(size_t)i * FL_CUDA_ADAPTER_SLOTS + slot], 0,
                                       sizeof(fl_cuda_lora));
    cm->slot_targets[slot] = 0;
}

// The slot's matrices into a fresh buffer, laid out A then B per layer and target.
static int fill_slot(fl_cuda_model *cm, int slot, const fl_cuda_adapter *a) {
    int n = cm->w->cfg.n_layers * FL_LORA_N_TARGETS;
    size_t total = 0;
    unsigned targets = 0;
    for (int i = 0; i < n; i++) {
        if (!a->A[i] && !a->B[i]) continue;
        if (!a->A[i] || !a->B[i])
            return fl_error("layer %d target %d has only one of A and B", i / FL_LORA_N_TARGETS,
                            i % FL_LORA_N_TARGETS);
        int in, out;
        target_shape(cm->w, i % FL_LORA_N_TARGETS, &in, &out);
        total += (size_t)a->rank * ((size_t)in + out);
        targets |= 1u << (i % FL_LORA_N_TARGETS);
    }
    if (!targets) return fl_error("it adapts no target");
    float *buf = (float *)fl_cuda_alloc(sizeof(float) * total, "adapter weights");
    if (!buf) return -1;
    cm->slot_buf[slot] = buf;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        if (!a->A[i]) continue;
        int in, out;
        target_shape(cm->w, i % FL_LORA_N_TARGETS, &in, &out);
        size_t na = (size_t)a->rank * in, nb = (size_t)out * a->rank;
        if (fl_cuda_upload(buf + off, a->A[i], sizeof(float) * na, cm->stream) ||
            fl_cuda_upload(buf + off + na, a->B[i], sizeof(float) * nb, cm->stream))
            return -1;
        fl_cuda_lora *e = &cm->lora_host[(size_t)i * FL_CUDA_ADAPTER_SLOTS + slot];
        e->A = buf + off;
        e->B = buf + off + na;
        e->scale = a->scale;
        e->rank = a->rank;
        off += na + nb;
    }
    cm->slot_targets[slot] = targets;
    return 0;
}

extern "C" int fl_cuda_model_set_adapter(fl_cuda_model *cm, int slot, const fl_cuda_adapter *a) {
    if (slot < 0 || slot >= FL_CUDA_ADAPTER_SLOTS)
        return fl_error("CUDA adapter: slot %d is outside [0, %d)", slot, FL_CUDA_ADAPTER_SLOTS);
    if (a && (a->rank <= 0 || !isfinite(a->scale)))
        return fl_error("CUDA adapter for slot %d: rank %d must be positive and scale %g finite",
                        slot, a->rank, (double)a->scale);
    // The slot's old buffer may still be read by queued work.
    if (fl_cuda_sync(cm->stream)) return -1;
    fl_cuda_free(cm->slot_buf[slot]);
    cm->slot_buf[slot] = NULL;
    clear_slot(cm, slot);
    int rc = 0;
    if (a && a->rank > cm->u_stride) { // every slot's rank fits the intermediate's rows
        // Replaced only once the larger one is had: the other slots keep working otherwise.
        float *u = (float *)fl_cuda_alloc(sizeof(float) * cm->max_tokens * a->rank,
                                          "LoRA intermediate");
        if (u) {
            fl_cuda_free(cm->lora_u);
            cm->lora_u = u;
            cm->u_stride = a->rank;
        } else {
            rc = -1;
        }
    }
    if (rc == 0 && a) rc = fill_slot(cm, slot, a);
    if (rc != 0) { // the slot stays empty
        fl_cuda_sync(cm->stream);
        fl_cuda_free(cm->slot_buf[slot]);
        cm->slot_buf[slot] = NULL;
        clear_slot(cm, slot);
    }
    // Uploads from pageable memory have read the host table when they return.
    if (upload_table(cm) || fl_cuda_sync(cm->stream)) rc = -1;
    return rc ? fl_error_prefix("CUDA adapter for slot %d", slot) : 0;
}

// ------------------------------------------------------------------ forward

// Every index the kernels will follow, checked on the host first. *targets gets the LoRA
// targets some token of the batch uses.
static int check_batch(const fl_cuda_model *cm, const int32_t *tokens, const int32_t *pos,
                       const int32_t *page_start, const int32_t *slot, int n,
                       const int32_t *pages, int n_page_ids, const int32_t *logit_rows,
                       int n_logits, unsigned *targets) {
    const fl_config *c = &cm->w->cfg;
    *targets = 0;
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
        if (!slot || slot[t] == -1) continue;
        if (slot[t] < -1 || slot[t] >= FL_CUDA_ADAPTER_SLOTS || !cm->slot_targets[slot[t]])
            return fl_error("CUDA forward: token %d names adapter slot %d, which holds no adapter",
                            t, slot[t]);
        *targets |= cm->slot_targets[slot[t]];
    }
    for (int i = 0; i < n_logits; i++)
        if (logit_rows[i] < 0 || logit_rows[i] >= n)
            return fl_error("CUDA forward: logit row %d is token %d, outside the batch of %d", i,
                            logit_rows[i], n);
    return 0;
}

// y += each token's adapter of target tg in layer l: one shrink and one expand launch for
// all the batch's adapters.
static int lora(fl_cuda_model *cm, unsigned targets, int l, int tg, float *y, const float *x,
                int in, int out, int n) {
    if (!(targets & (1u << tg))) return 0;
    const fl_cuda_lora *tab =
        cm->lora_table + ((size_t)l * FL_LORA_N_TARGETS + tg) * FL_CUDA_ADAPTER_SLOTS;
    return fl_cuda_lora_shrink(cm->lora_u, x, tab, FL_CUDA_ADAPTER_SLOTS, cm->tok_slot, n, in,
                               cm->u_stride, cm->stream) ||
           fl_cuda_lora_expand(y, cm->lora_u, tab, FL_CUDA_ADAPTER_SLOTS, cm->tok_slot, n, out,
                               cm->u_stride, cm->stream);
}

static int layer_forward(fl_cuda_model *cm, int l, int n, unsigned tg) {
    const fl_cuda_weights *w = cm->w;
    const fl_config *c = &w->cfg;
    const dev_layer *L = &w->layers[l];
    fl_cuda_gemm *g = cm->gemm;
    fl_cuda_dtype wt = w->wtype;
    void *st = cm->stream;
    int D = c->dim, H = c->hidden_dim, Q = w->q_dim, KV = w->kv_dim;
    size_t stride = (size_t)cm->kv_pages * FL_KV_PAGE_TOKENS * KV;
    fl_kv_layer kv = {cm->k_pool + l * stride, cm->v_pool + l * stride, FL_KV_PAGE_TOKENS, KV};
    const fl_cuda_linear_out qkv[3] = {{cm->q, L->wq.w, L->wq.b, Q},
                                       {cm->k, L->wk.w, L->wk.b, KV},
                                       {cm->v, L->wv.w, L->wv.b, KV}};
    const fl_cuda_linear_out gate_up[2] = {{cm->gate, L->gate.w, NULL, H},
                                           {cm->up, L->up.w, NULL, H}};
    return fl_cuda_rmsnorm_forward(cm->xb, cm->x, L->attn_norm, n, D, c->norm_eps, st) ||
           fl_cuda_linears(g, qkv, 3, cm->xb, wt, n, D) ||
           lora(cm, tg, l, FL_LORA_Q, cm->q, cm->xb, D, Q, n) ||
           lora(cm, tg, l, FL_LORA_K, cm->k, cm->xb, D, KV, n) ||
           lora(cm, tg, l, FL_LORA_V, cm->v, cm->xb, D, KV, n) ||
           fl_cuda_rope_forward(cm->q, cm->pos, w->inv_freq, n, c->n_heads, c->head_dim, st) ||
           fl_cuda_rope_forward(cm->k, cm->pos, w->inv_freq, n, c->n_kv_heads, c->head_dim, st) ||
           fl_cuda_kv_store(&kv, cm->k, cm->v, cm->pages, cm->page_start, cm->pos, n, st) ||
           fl_cuda_attention_forward(cm->att, NULL, cm->q, &kv, cm->pages, cm->page_start, cm->pos,
                                     n, c->n_heads, c->n_kv_heads, c->head_dim, st) ||
           fl_cuda_linear(g, cm->proj, cm->att, L->wo.w, wt, L->wo.b, n, Q, D) ||
           lora(cm, tg, l, FL_LORA_O, cm->proj, cm->att, Q, D, n) ||
           fl_cuda_add_inplace(cm->x, cm->proj, (size_t)n * D, st) ||
           fl_cuda_rmsnorm_forward(cm->xb, cm->x, L->ffn_norm, n, D, c->norm_eps, st) ||
           fl_cuda_linears(g, gate_up, 2, cm->xb, wt, n, D) ||
           lora(cm, tg, l, FL_LORA_GATE, cm->gate, cm->xb, D, H, n) ||
           lora(cm, tg, l, FL_LORA_UP, cm->up, cm->xb, D, H, n) ||
           fl_cuda_swiglu_forward(cm->gate, cm->gate, cm->up, (size_t)n * H, st) ||
           fl_cuda_linear(g, cm->proj, cm->gate, L->down.w, wt, NULL, n, H, D) ||
           lora(cm, tg, l, FL_LORA_DOWN, cm->proj, cm->gate, H, D, n) ||
           fl_cuda_add_inplace(cm->x, cm->proj, (size_t)n * D, st);
}

extern "C" int fl_cuda_model_forward(fl_cuda_model *cm, const int32_t *tokens, const int32_t *pos,
                                     const int32_t *page_start, const int32_t *slot, int n,
                                     const int32_t *pages, int n_page_ids,
                                     const int32_t *logit_rows, int n_logits, float *logits) {
    unsigned targets;
    if (check_batch(cm, tokens, pos, page_start, slot, n, pages, n_page_ids, logit_rows, n_logits,
                    &targets))
        return -1;
    const fl_cuda_weights *w = cm->w;
    const fl_config *c = &w->cfg;
    void *st = cm->stream;
    size_t ib = sizeof(int32_t) * n;
    if (fl_cuda_upload(cm->tokens, tokens, ib, st) || fl_cuda_upload(cm->pos, pos, ib, st) ||
        fl_cuda_upload(cm->page_start, page_start, ib, st) ||
        fl_cuda_upload(cm->pages, pages, sizeof(int32_t) * n_page_ids, st) ||
        (targets && fl_cuda_upload(cm->tok_slot, slot, ib, st)) ||
        (n_logits > 0 &&
         fl_cuda_upload(cm->logit_rows, logit_rows, sizeof(int32_t) * n_logits, st)))
        return fl_error_prefix("CUDA forward");
    if (fl_cuda_gather_rows(cm->x, w->embed, w->wtype, cm->tokens, n, c->dim, c->vocab_size, st))
        return -1;
    for (int l = 0; l < c->n_layers; l++)
        if (layer_forward(cm, l, n, targets)) return fl_error_prefix("CUDA forward, layer %d", l);
    if (n_logits == 0) return fl_cuda_sync(st);
    if (fl_cuda_gather_rows(cm->rows, cm->x, FL_CUDA_F32, cm->logit_rows, n_logits, c->dim, n,
                            st) ||
        fl_cuda_rmsnorm_forward(cm->rows, cm->rows, w->final_norm, n_logits, c->dim, c->norm_eps,
                                st) ||
        fl_cuda_linear(cm->gemm, cm->logits, cm->rows, w->lm_head, w->wtype, NULL, n_logits,
                       c->dim, c->vocab_size))
        return -1;
    return fl_cuda_download(logits, cm->logits, sizeof(float) * n_logits * c->vocab_size, st);
}
