/* CUDA forward ops. Pointers are device pointers unless marked host; launches go on the
 * given stream (NULL: the default stream). Each op has the semantics of its CPU reference
 * in kernels/cpu (named in its comment), which tests/cuda compares it against. Every
 * function returns 0, or -1 with fl_last_error() naming the op and the reason; a fault
 * inside a kernel surfaces at the next synchronising call (fl_cuda_sync). */
#ifndef FL_CUDA_OPS_H
#define FL_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "kernels.h" /* fl_kv_layer */

/* ---------------------------------------------------------------- runtime */

/* Usable CUDA devices (0 when there is no driver or device). */
int fl_cuda_device_count(void);
/* Whether device 0 can run this build's kernels: its count of devices (> 0) with why naming
 * it (name, memory, compute capability), or 0 with why giving the reason it cannot (no
 * driver, no device, no kernel image for its architecture). */
int fl_cuda_device_probe(char *why, size_t cap);
/* Free and total bytes of the current device. */
int fl_cuda_mem_info(size_t *free_bytes, size_t *total_bytes);

/* Device memory; what names the buffer in the error message. NULL on failure. */
void *fl_cuda_alloc(size_t bytes, const char *what);
void fl_cuda_free(void *p); /* NULL is fine */
/* Copies in stream order. From pageable (malloc) memory an upload has read the source
 * when it returns, so the buffer may be reused; a download ends synchronised. */
int fl_cuda_upload(void *dst, const void *host_src, size_t bytes, void *stream);
int fl_cuda_download(void *host_dst, const void *src, size_t bytes, void *stream);
/* Waits for the stream's work; reports any fault that happened in it. */
int fl_cuda_sync(void *stream);
/* A stream that does not wait for the default (NULL) stream's work: keep a forward's
 * copies and launches on it. NULL on failure. */
void *fl_cuda_stream_new(void);
void fl_cuda_stream_free(void *stream);

typedef enum { FL_CUDA_F32 = 0, FL_CUDA_BF16 = 1 } fl_cuda_dtype;

/* dst = bf16(src), rounded to nearest even: bit for bit fl_f32_to_bf16. Weights are
 * converted once at load with this. */
int fl_cuda_f32_to_bf16(uint16_t *dst, const float *src, size_t n, void *stream);

/* ---------------------------------------------------------------- elementwise and rows */

/* out[t] = table[rows[t]] as fp32: the embedding lookup (table fp32 or bf16), or
 * picking the rows that need logits. A row id outside [0, n_table) gives a NaN row. */
int fl_cuda_gather_rows(float *out, const void *table, fl_cuda_dtype dtype, const int32_t *rows,
                        int n, int dim, int n_table, void *stream); /* out [n,dim] */

/* fl_cpu_rmsnorm_forward / _rinv: y = x / rms(x) * w per row; rinv may be NULL. */
int fl_cuda_rmsnorm_forward(float *y, const float *x, const float *w, int n, int dim, float eps,
                            void *stream); /* y,x [n,dim], w [dim] */
int fl_cuda_rmsnorm_forward_rinv(float *y, float *rinv, const float *x, const float *w, int n,
                                 int dim, float eps, void *stream); /* rinv [n] */

/* fl_cpu_rope_forward: rotate-half RoPE in place at each token's position. inv_freq holds
 * the model's frequencies with any llama3 rescaling already applied. */
int fl_cuda_rope_forward(float *x, const int32_t *pos, const float *inv_freq, int n, int n_heads,
                         int head_dim, void *stream); /* x [n, n_heads*head_dim] */

/* fl_cpu_swiglu_forward: y = silu(gate) * up (y may alias gate). */
int fl_cuda_swiglu_forward(float *y, const float *gate, const float *up, size_t n, void *stream);

/* fl_cpu_add_inplace: x += y. */
int fl_cuda_add_inplace(float *x, const float *y, size_t n, void *stream);

/* ---------------------------------------------------------------- paged attention
 * The pool has the CPU layout (fl_kv_layer, device pointers). A token's page table is
 * pages + page_start[t]: the batch's page tables concatenated, as fl_forward's
 * page_tables[t] pointers become offsets. Position p of that sequence lives in page
 * pages[page_start[t] + p / page_tokens], row p % page_tokens. */

/* fl_cpu_kv_store: writes each token's k and v rows at its position. */
int fl_cuda_kv_store(const fl_kv_layer *kv, const float *k, const float *v, const int32_t *pages,
                     const int32_t *page_start, const int32_t *pos, int n,
                     void *stream); /* k,v [n, kv_dim] */

/* fl_cpu_attention_forward: token t attends to positions 0..pos[t] of its sequence (so a
 * prefill chunk stored with fl_cuda_kv_store first is causal within itself, and decode
 * tokens ride in the same launch). GQA: head h reads kv head h / (n_heads/n_kv_heads).
 * lse (may be NULL) gets the log-sum-exp of the scaled scores per token and head. */
int fl_cuda_attention_forward(float *out, float *lse, const float *q, const fl_kv_layer *kv,
                              const int32_t *pages, const int32_t *page_start, const int32_t *pos,
                              int n, int n_heads, int n_kv_heads, int head_dim, void *stream);
/* out,q [n, n_heads*head_dim], lse [n, n_heads] */

/* ---------------------------------------------------------------- GEMM (cuBLAS) */

/* A cuBLAS handle bound to a stream, with room to stage activations as bf16 for bf16
 * weights (cuBLAS multiplies bf16 by bf16 only). */
typedef struct fl_cuda_gemm fl_cuda_gemm;
/* max_x: the most activation elements (n * in) one call will pass. NULL on failure. */
fl_cuda_gemm *fl_cuda_gemm_new(void *stream, size_t max_x);
void fl_cuda_gemm_free(fl_cuda_gemm *g);

/* fl_cpu_matmul: y = x @ w^T (+ bias), fp32 accumulation (CUBLAS_COMPUTE_32F). With bf16
 * weights x is rounded to bf16 first; the products are then exact in fp32. */
int fl_cuda_linear(fl_cuda_gemm *g, float *y, const float *x, const void *w, fl_cuda_dtype wtype,
                   const float *bias, int n, int in, int out);
/* y [n,out], x [n,in], w [out,in], bias [out] or NULL */

/* Several linears of one input (q, k and v; gate and up), each as fl_cuda_linear: with bf16
 * weights x is rounded to bf16 once for all of them. */
typedef struct {
    float *y;          /* [n, out] */
    const void *w;     /* [out, in] as the call's wtype */
    const float *bias; /* [out] or NULL */
    int out;
} fl_cuda_linear_out;
int fl_cuda_linears(fl_cuda_gemm *g, const fl_cuda_linear_out *outs, int n_outs, const float *x,
                    fl_cuda_dtype wtype, int n, int in); /* x [n,in] */

/* ---------------------------------------------------------------- multi-LoRA
 * Every token carries an adapter index (-1: none); one launch for the shrink and one for
 * the expand serve all adapters of the batch (the SGMV/BGMV idea): each token gathers its
 * own adapter's matrices, so a batch mixes any number of adapters and ranks. */
typedef struct {
    const float *A; /* [rank, in], device; NULL when the adapter does not adapt this target */
    const float *B; /* [out, rank], device */
    float scale;    /* alpha / rank */
    int rank;
} fl_cuda_lora;

/* u[t, 0..rank) = x[t] @ A^T of token t's adapter (fl_cpu_lora_forward's u); the rest
 * of the row, and rows of tokens without an adapter, are left as they are. An adapter
 * index >= n_adapters gives a NaN row. */
int fl_cuda_lora_shrink(float *u, const float *x, const fl_cuda_lora *adapters, int n_adapters,
                        const int32_t *tok_adapter, int n, int in, int u_stride, void *stream);
/* u [n, u_stride] with u_stride >= every rank, x [n,in], adapters [n_adapters] device,
 * tok_adapter [n] */

/* y[t] += scale * u[t, 0..rank) @ B^T of token t's adapter (fl_cpu_lora_forward's y). */
int fl_cuda_lora_expand(float *y, const float *u, const fl_cuda_lora *adapters, int n_adapters,
                        const int32_t *tok_adapter, int n, int out, int u_stride, void *stream);
/* y += [n,out] */

/* ---------------------------------------------------------------- sampling
 * fl_sampler_sample on the device, one row of logits per sequence. The uniform draw comes
 * from the host (each sequence's seeded RNG), so the device follows the same random
 * stream: draw it only for rows that are not greedy, as the CPU sampler does. */
typedef struct {
    float temperature; /* 0: greedy */
    int top_k;         /* 0: off; 1: greedy */
    float top_p;       /* (0, 1]; 1: off */
    float u;           /* uniform draw in [0, 1) */
} fl_cuda_sample_params;

/* Buffers for up to max_rows rows of n_vocab logits, allocated once: four of
 * max_rows * n_vocab * 4 bytes (probabilities and ids, before and after the sort) and
 * the sort's scratch. */
typedef struct fl_cuda_sampler fl_cuda_sampler;
fl_cuda_sampler *fl_cuda_sampler_new(int max_rows, int n_vocab);
void fl_cuda_sampler_free(fl_cuda_sampler *s);

/* out[r] = the token sampled from logits row r with params[r] (host array). */
int fl_cuda_sample(fl_cuda_sampler *s, int32_t *out, const float *logits,
                   const fl_cuda_sample_params *params, int n, void *stream);
/* out [n] device, logits [n, n_vocab] */

#ifdef __cplusplus
}
#endif
#endif
