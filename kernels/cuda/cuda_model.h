/* The whole model's forward on the device: fl_forward's layer loop (engine/context.c) over
 * the CUDA ops. Two objects:
 * - fl_cuda_weights: a model's weights uploaded once (linear layers and the embedding as
 *   fp32 or bf16, norms fp32), shared by every forward state made on them;
 * - fl_cuda_model: one forward state on those weights: a paged KV pool, scratch for
 *   max_tokens tokens, slots for LoRA adapters, all on one stream. The caller keeps the
 *   page bookkeeping (which pages each sequence owns), as fl_context does for the CPU pool.
 * Inference rows only: no log-sum-exp or saved activations for finetuning (the engine runs
 * finetuning rows on the CPU for now). Plain C: the engine includes this header for the
 * types even when built without CUDA. */
#ifndef FL_CUDA_MODEL_H
#define FL_CUDA_MODEL_H

#include "cuda/cuda_ops.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fl_cuda_weights fl_cuda_weights;

/* The model's weights on the device, linear layers and embedding as wtype. NULL +
 * fl_last_error on failure. */
fl_cuda_weights *fl_cuda_weights_new(const fl_model *m, fl_cuda_dtype wtype);
/* Random weights for a config, made on the device without host copies (benchmarks at sizes
 * the host could not hold as fp32): linear weights uniform in +-1/sqrt(in), the embedding
 * in +-1, norms 1, the model's RoPE frequencies. The same seed gives the same weights. */
fl_cuda_weights *fl_cuda_weights_random(const fl_config *cfg, fl_cuda_dtype wtype, uint64_t seed);
void fl_cuda_weights_free(fl_cuda_weights *w); /* after every fl_cuda_model made on it */

typedef struct fl_cuda_model fl_cuda_model;

/* kv_pages pages of FL_KV_PAGE_TOKENS tokens per layer. NULL + fl_last_error on failure. */
fl_cuda_model *fl_cuda_model_new(const fl_cuda_weights *w, int max_tokens, int kv_pages);
void fl_cuda_model_free(fl_cuda_model *cm);

/* LoRA adapters live in slots; a forward's tokens name a slot each (or none). */
#define FL_CUDA_ADAPTER_SLOTS 64

/* One adapter's host weights, for every layer and target at index
 * layer * FL_LORA_N_TARGETS + target: A [rank, in] and B [out, rank] fp32, both NULL where
 * the adapter does not adapt that target. y += scale * (x @ A^T) @ B^T. */
typedef struct {
    int rank;
    float scale;
    const float *const *A, *const *B; /* [n_layers * FL_LORA_N_TARGETS] host pointers */
} fl_cuda_adapter;

/* Copies an adapter into a slot (replacing what it held), or empties the slot when a is
 * NULL. Between forwards only. Returns 0, or -1 with fl_last_error. */
int fl_cuda_model_set_adapter(fl_cuda_model *cm, int slot, const fl_cuda_adapter *a);

/* One forward over n tokens, every array on the host: token ids, positions, each token's
 * page table as pages + page_start[t] (fl_cuda_attention_forward's layout, pages holding
 * n_page_ids ids below kv_pages), and each token's adapter slot (-1: none; slot NULL: no
 * adapters at all). A token's k and v go to its position before any token attends, so a
 * sequence's chunk is causal within itself. Rows logit_rows[0..n_logits) of the batch get
 * their logits in logits [n_logits, vocab]. Returns 0, or -1 with fl_last_error (bad
 * input is refused before anything runs). */
int fl_cuda_model_forward(fl_cuda_model *cm, const int32_t *tokens, const int32_t *pos,
                          const int32_t *page_start, const int32_t *slot, int n,
                          const int32_t *pages, int n_page_ids, const int32_t *logit_rows,
                          int n_logits, float *logits);

/* The backend as the engine calls it. The CPU library holds no CUDA symbol: model.c
 * declares fl_cuda_backend weak, so it is NULL in programs linked without the CUDA library
 * (make CUDA=0), and the CUDA library, linked whole (--whole-archive, since nothing else
 * references its backend.o), defines it. One table behind one symbol rather than a weak
 * reference per function: the engine either has the whole backend or none of it. */
typedef struct {
    int (*probe)(char *why, size_t cap);
    int (*mem_info)(size_t *free_bytes, size_t *total_bytes);
    fl_cuda_weights *(*weights_new)(const fl_model *m, fl_cuda_dtype wtype);
    void (*weights_free)(fl_cuda_weights *w);
    fl_cuda_model *(*model_new)(const fl_cuda_weights *w, int max_tokens, int kv_pages);
    void (*model_free)(fl_cuda_model *cm);
    int (*set_adapter)(fl_cuda_model *cm, int slot, const fl_cuda_adapter *a);
    int (*forward)(fl_cuda_model *cm, const int32_t *tokens, const int32_t *pos,
                   const int32_t *page_start, const int32_t *slot, int n, const int32_t *pages,
                   int n_page_ids, const int32_t *logit_rows, int n_logits, float *logits);
} fl_cuda_backend_api;

const fl_cuda_backend_api *fl_cuda_backend(void);

#ifdef __cplusplus
}
#endif
#endif
