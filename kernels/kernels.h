/* Op interface shared by the backends. Row-major; shapes in trailing comments.
 * kernels/cpu holds the fp32 reference that every other backend is tested against. */
#ifndef FL_KERNELS_H
#define FL_KERNELS_H

#include <stdint.h>

#include "flexllm.h" /* FL_KV_PAGE_TOKENS */

#define FL_ATTN_MAX_HEADS 256 /* checked when a model loads */

/* Head sizes the CPU attention kernels compile a specialised copy for (X(D) per size). */
#define FL_CPU_HEAD_DIMS(X) X(8) X(16) X(32) X(64) X(128) X(256)

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

/* ---------------------------------------------------------------- training
 * Backward kernels (kernels/cpu/backward.c) and the LoRA linear
 * (kernels/cpu/lora.c). "+=" marks outputs that accumulate. */

/* RMSNorm forward that also keeps rinv = 1/sqrt(mean(x^2) + eps) per row. */
void fl_cpu_rmsnorm_forward_rinv(float *y, float *rinv, const float *x, const float *w, int n,
                                 int dim, float eps); /* rinv [n] */
/* dx += d(w * x * rinv)/dx applied to dy. */
void fl_cpu_rmsnorm_backward(float *dx, const float *dy, const float *x, const float *rinv,
                             const float *w, int n, int dim); /* dx += [n,dim] */

/* The gradient through rotate-half RoPE: rotates dx back by each token's angles, in place. */
void fl_cpu_rope_backward(float *dx, const int32_t *pos, const float *inv_freq, int n,
                          int n_heads, int head_dim); /* dx [n, n_heads*head_dim] */

/* y = silu(gate) * up: dgate = dy * up * silu'(gate), dup = dy * silu(gate). */
void fl_cpu_swiglu_backward(float *dgate, float *dup, const float *dy, const float *gate,
                            const float *up, int n); /* all [n], overwritten */

/* Attention backward for n query tokens of ONE sequence (page_table), with the
 * forward's output and log-sum-exp. Writes dq (post-RoPE gradient) and adds to the
 * per-position accumulators dk_acc/dv_acc, indexed by absolute position, for every
 * key position 0..pos[t] each query saw. */
void fl_cpu_attention_backward(float *dq, float *dk_acc, float *dv_acc, const float *dout,
                               const float *out, const float *lse, const float *q,
                               const fl_kv_layer *kv, const int32_t *page_table,
                               const int32_t *pos, int n, int n_heads, int n_kv_heads,
                               int head_dim);
/* dq,dout,out,q [n, n_heads*head_dim]; lse [n, n_heads]; dk_acc,dv_acc += [seq_len, kv_dim] */

/* Fused cross-entropy over n rows: returns the sum over rows with target >= 0 of
 * logsumexp(row) - row[target], and overwrites each row with its gradient
 * (softmax - onehot(target)) * scale (zero for rows with target < 0). */
double fl_cpu_cross_entropy(float *logits, const int32_t *targets, int n, int vocab,
                            float scale); /* logits [n, vocab] in: logits, out: gradient */

/* Frozen linear backward: dx += dy @ w. */
void fl_cpu_matmul_backward_input(float *dx, const float *dy, const float *w, int n, int in,
                                  int out); /* dx += [n,in], dy [n,out], w [out,in] */

/* LoRA: u = x @ A^T; y += scale * u @ B^T. */
void fl_cpu_lora_forward(float *y, float *u, const float *x, const float *A, const float *B,
                         float scale, int n, int in, int out, int r);
/* y += [n,out], u [n,r] out, x [n,in], A [r,in], B [out,r] */
/* du = scale * dy @ B; dB += scale * dy^T @ u; dA += du^T @ x; dx += du @ A (dx may be NULL). */
void fl_cpu_lora_backward(float *dx, float *dA, float *dB, const float *dy, const float *x,
                          const float *u, const float *A, const float *B, float scale, int n,
                          int in, int out, int r);

#endif
