/* The whole model's forward on the device: fl_forward's layer loop (engine/context.c) over
 * the CUDA ops, with the weights uploaded once (linear layers as fp32 or bf16, norms fp32),
 * a paged KV pool of its own and scratch for max_tokens tokens, all on one stream. The
 * caller keeps the page bookkeeping (which pages each sequence owns), as fl_context does
 * for the CPU pool. No LoRA and no finetuning rows yet. */
#ifndef FL_CUDA_MODEL_H
#define FL_CUDA_MODEL_H

#include "cuda/cuda_ops.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fl_cuda_model fl_cuda_model;

/* kv_pages pages of FL_KV_PAGE_TOKENS tokens per layer. NULL + fl_last_error on failure. */
fl_cuda_model *fl_cuda_model_new(const fl_model *m, fl_cuda_dtype wtype, int max_tokens,
                                 int kv_pages);
void fl_cuda_model_free(fl_cuda_model *cm);

/* One forward over n tokens, every array on the host: token ids, positions, and each
 * token's page table as pages + page_start[t] (fl_cuda_attention_forward's layout, pages
 * holding n_page_ids ids below kv_pages). A token's k and v go to its position before any
 * token attends, so a sequence's chunk is causal within itself. Rows logit_rows[0..n_logits)
 * of the batch get their logits in logits [n_logits, vocab]. Returns 0, or -1 with
 * fl_last_error (bad input is refused before anything runs). */
int fl_cuda_model_forward(fl_cuda_model *cm, const int32_t *tokens, const int32_t *pos,
                          const int32_t *page_start, int n, const int32_t *pages, int n_page_ids,
                          const int32_t *logit_rows, int n_logits, float *logits);

#ifdef __cplusplus
}
#endif
#endif
