/* The model and context internals shared by the engine's forward, training and runtime. */
#ifndef FL_MODEL_H
#define FL_MODEL_H

#include "flexllm.h"
#include "kernels.h"
#include "safetensors.h"
#include "cuda/cuda_model.h" /* types only: the CUDA backend is reached through fl_cuda_backend_api */

/* A linear layer's weight as stored [out, in], and packed when the model uses the
 * packed GEMM. */
typedef struct {
    const float *w;
    fl_packed_matrix packed;
} fl_linear;

typedef struct {
    const float *attn_norm;                   /* [dim] */
    fl_linear wq, wk, wv, wo;                 /* [q_dim,dim] [kv_dim,dim] [kv_dim,dim] [dim,q_dim] */
    const float *bq, *bk, *bv;                /* [q_dim] [kv_dim] [kv_dim], or NULL */
    const float *bo;                          /* [dim], or NULL */
    const float *ffn_norm;                    /* [dim] */
    fl_linear w_gate, w_up, w_down;           /* [hidden,dim] [hidden,dim] [dim,hidden] */
} fl_layer_weights;

struct fl_model {
    fl_config cfg;
    int q_dim, kv_dim;        /* n_heads*head_dim, n_kv_heads*head_dim */
    fl_tokenizer *tok;
    fl_st_set *st;
    const float *embed;       /* [vocab, dim] */
    fl_layer_weights *layers; /* [n_layers] */
    const float *final_norm;  /* [dim] */
    fl_linear lm_head;        /* [vocab, dim], .w == embed when tied */
    float *inv_freq;          /* [head_dim/2], llama3 scaling applied */
    float **owned;            /* weight buffers converted from F16/BF16 or unaligned F32 */
    int n_owned;
    size_t n_params;
    fl_gemm gemm;
    int non_bf16_matrices;    /* 2-D tensors the checkpoint stores in another dtype than BF16 */
    char device_why[320];     /* how the device was chosen (fl_model_device) */
    const fl_cuda_backend_api *cuda;   /* the backend when the model is on cuda, else NULL */
    fl_cuda_weights *cuda_weights;      /* the device's weights, on cuda */
};

/* The RoPE inverse frequencies of a config [head_dim/2], llama3 rescaling applied. */
void fl_rope_inv_freq(const fl_config *c, float *inv_freq);

/* y = x @ lin^T (+ bias) with the model's GEMM. */
void fl_model_linear(const fl_model *m, float *y, const float *x, const fl_linear *lin,
                     const float *bias, int n, int in, int out); /* y [n,out], x [n,in] */

typedef struct {
    int live;
    struct fl_train_sample *train; /* the finetuning sample running on it, or NULL */
    int len;          /* tokens in the cache */
    int32_t *pages;   /* [cap_pages] page ids */
    int n_pages, cap_pages;
} fl_seq;

/* Scratch for one forward of up to max_batch_tokens tokens. */
typedef struct {
    float *x;        /* [T, dim] residual stream */
    float *xb;       /* [T, dim] normed input */
    float *q;        /* [T, q_dim] */
    float *k, *v;    /* [T, kv_dim] */
    float *att;      /* [T, q_dim] */
    float *proj;     /* [T, dim] */
    float *gate, *up;/* [T, hidden] */
    float *out_rows; /* [T, dim] final-normed rows that need logits */
    float *rinv;     /* [T] 1/rms of the last norm */
    float *lse;      /* [T, n_heads] */
    const int32_t **page_tables; /* [T] */
    /* LoRA: tokens grouped by adapter, and the gathered rows of one group */
    const fl_adapter **tok_adapter; /* [T] */
    struct fl_train_sample **tok_train; /* [T] the sample of a training token, else NULL */
    int32_t *group_tok;   /* [T] token indices, grouped by adapter */
    int32_t *group_pos;   /* [T] their positions */
    float *lora_x;        /* [T, max in] */
    float *lora_y;        /* [T, max out] */
    float *lora_u;        /* [T, lora_u_rank] */
    int lora_u_rank;
    int8_t *took;         /* [T] whether the token took a new KV page (undone on failure) */
} fl_scratch;

/* An adapter held in one of the device's slots. */
typedef struct {
    const fl_adapter *adapter; /* NULL: the slot is empty */
    uint64_t version;          /* the adapter's version uploaded (fl_adapter.version) */
    long long used;            /* the forward that last used it */
} fl_dev_slot;

/* A cuda context's host side: the batch split between the device (inference rows) and the
 * CPU (finetuning rows), and the adapters in the device's slots. */
typedef struct {
    int32_t *token, *pos, *page_start, *slot, *logit_rows; /* [T] the device's tokens */
    int32_t *pages;      /* [n_pages] page tables of the device's sequences, concatenated */
    int32_t *seq_start;  /* [max_seqs] a sequence's offset in pages, -1: not in this batch */
    int32_t *cpu_token, *cpu_seq, *cpu_pos; /* [T] the finetuning tokens */
    fl_dev_slot slots[FL_CUDA_ADAPTER_SLOTS];
    long long forwards;
} fl_dev_batch;

struct fl_context {
    const fl_model *model;
    fl_context_params params;
    int n_pages, n_free;
    int32_t *free_pages;  /* [n_pages] stack of free page ids */
    float *k_pool, *v_pool; /* [n_layers, n_pages, FL_KV_PAGE_TOKENS, kv_dim]; on cuda
                               allocated when finetuning rows first come (they run here) */
    fl_seq *seqs;          /* [max_seqs] */
    fl_scratch s;
    fl_cuda_model *cuda;   /* the device's KV pool and forward when the model is on cuda */
    fl_dev_batch dev;
    int poison;            /* fill scratch with NaN after each forward (tests) */
    /* Memory finished finetuning samples gave back, for the next ones: a fresh
     * allocation of this size costs its page faults again on every sample. */
    void *spare_arena;
    size_t spare_bytes;
    struct fl_bwd_cache *bwd; /* train.c's backward buffers */
};

/* The KV pool slice of one layer. */
fl_kv_layer fl_context_kv_layer(const fl_context *ctx, int layer);

#endif
