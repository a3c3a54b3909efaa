/* Op interface shared by the backends. Row-major; shapes in trailing comments.
 * kernels/cpu holds the fp32 reference that every other backend is tested against. */
#ifndef FL_KERNELS_H
#define FL_KERNELS_H

#include <stdint.h>

#include "flexllm.h" /* FL_KV_PAGE_TOKENS */

#define FL_ATTN_MAX_HEADS 256 /* checked when a model loads */

/* One layer's slice of the paged KV pool. Token t of a sequence lives in page
 * page_table[t / page_tokens], row t % page_tokens. */
typedef struct {
    float *k;         /* [n_pages, page_tokens, kv_dim] */
    float *v;         /* [n_pages, page_tokens, kv_dim] */
    int page_tokens;
    int kv_dim;
} fl_kv_layer;

/* A weight matrix [out, in] packed for fl_cpu_matmul_packed: panels of FL_PANEL
 * output rows, each stored k-major [in][FL_PANEL], zero-padded past out. */
#define FL_PANEL 16
typedef struct {
    float *data; /* [panels, in, FL_PANEL], 64-byte aligned */
    int out, in, panels;
} fl_packed_matrix;

int fl_cpu_pack(fl_packed_matrix *p, const float *w, int out, int in); /* w [out,in] */
void fl_cpu_packed_free(fl_packed_matrix *p);
/* y = x @ w^T (+ bias), batch-invariant: a row's result does not depend on n. */
void fl_cpu_matmul_packed(float *y, const float *x, const fl_packed_matrix *w, const float *bias,
                          int n); /* y [n,out], x [n,in], bias [out] or NULL */

/* y = x @ w^T (+ bias). */
void fl_cpu_matmul(float *y, const float *x, const float *w, const float *bias,
                   int n, int in, int out); /* y [n,out], x [n,in], w [out,in], bias [out] or NULL */

void fl_cpu_rmsnorm_forward(float *y, const float *x, const float *w, int n, int dim,
                            float eps); /* y [n,dim], x [n,dim], w [dim] */

/* Rotate-half RoPE in place on each head of each token at its position. */
void fl_cpu_rope_forward(float *x, const int32_t *pos, const float *inv_freq, int n, int n_heads,
                         int head_dim); /* x [n, n_heads*head_dim], inv_freq [head_dim/2] */

/* Writes k and v rows into the pool at each token's (page table, position). */
void fl_cpu_kv_store(const fl_kv_layer *kv, const float *k, const float *v,
                     const int32_t *const *page_tables, const int32_t *pos,
                     int n); /* k,v [n, kv_dim] */

/* Causal GQA attention: token t attends to positions 0..pos[t] of its own
 * sequence through its page table. lse (may be NULL) gets the log-sum-exp of
 * the scaled scores per token and head, which a backward needs. */
void fl_cpu_attention_forward(float *out, float *lse, const float *q, const fl_kv_layer *kv,
                              const int32_t *const *page_tables, const int32_t *pos, int n,
                              int n_heads, int n_kv_heads,
                              int head_dim); /* out,q [n, n_heads*head_dim], lse [n, n_heads] */

/* y = silu(gate) * up. */
void fl_cpu_swiglu_forward(float *y, const float *gate, const float *up,
                           int n); /* y,gate,up [n] */

/* x += y. */
void fl_cpu_add_inplace(float *x, const float *y, int n); /* [n] */

#endif
