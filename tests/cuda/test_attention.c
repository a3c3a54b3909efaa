/* CUDA paged KV store and attention against the CPU reference: one batch mixing decode
 * tokens, prefill chunks that continue a sequence or start it, chunks crossing page
 * boundaries, tokens of different sequences interleaved, scattered page tables; GQA, MHA
 * and MQA head layouts, head sizes 8 to 1024. */
#include "cuda_test.h"

#include <string.h>

typedef struct {
    int prior, chunk; /* tokens already in the cache, tokens in this batch */
} seq_spec;

static void run_case(int n_heads, int n_kv, int hd, const seq_spec *seqs, int n_seqs) {
    const int P = FL_KV_PAGE_TOKENS;
    int kv_dim = n_kv * hd, q_dim = n_heads * hd, n = 0, n_pages = 3; /* spare pages too */
    int *start = malloc(sizeof(int) * n_seqs), *taken = calloc(n_seqs, sizeof(int));
    for (int s = 0; s < n_seqs; s++) {
        start[s] = n_pages - 3;
        n_pages += (seqs[s].prior + seqs[s].chunk + P - 1) / P;
        n += seqs[s].chunk;
    }
    /* Page ids shuffled, so a sequence's pages are scattered over the pool. */
    int32_t *pages = malloc(sizeof(int32_t) * n_pages);
    for (int i = 0; i < n_pages; i++) pages[i] = i;
    for (int i = n_pages - 1; i > 0; i--) {
        int j = ct_below(i + 1);
        int32_t tmp = pages[i];
        pages[i] = pages[j];
        pages[j] = tmp;
    }
    /* Tokens round-robin over the sequences, each in position order. */
    int32_t *pos = malloc(sizeof(int32_t) * n), *page_start = malloc(sizeof(int32_t) * n);
    const int32_t **tables = malloc(sizeof(int32_t *) * n);
    int max_pos = 0;
    for (int t = 0; t < n;)
        for (int s = 0; s < n_seqs; s++)
            if (taken[s] < seqs[s].chunk) {
                pos[t] = seqs[s].prior + taken[s]++;
                page_start[t] = start[s];
                tables[t] = pages + start[s];
                max_pos = pos[t] > max_pos ? pos[t] : max_pos;
                t++;
            }
    size_t pool = (size_t)n_pages * P * kv_dim;
    float *kpool = ct_random(pool, -1.0f, 1.0f), *vpool = ct_random(pool, -1.0f, 1.0f);
    float *q = ct_random((size_t)n * q_dim, -4.0f, 4.0f);
    float *k = ct_random((size_t)n * kv_dim, -1.0f, 1.0f),
          *v = ct_random((size_t)n * kv_dim, -1.0f, 1.0f);
    float *dk = ct_upload(kpool, sizeof(float) * pool),
          *dv = ct_upload(vpool, sizeof(float) * pool);

    fl_kv_layer kv = {kpool, vpool, P, kv_dim};
    float *out = malloc(sizeof(float) * n * q_dim), *lse = malloc(sizeof(float) * n * n_heads);
    fl_cpu_kv_store(&kv, k, v, tables, pos, n);
    fl_cpu_attention_forward(out, lse, q, &kv, tables, pos, n, n_heads, n_kv, hd);

    fl_kv_layer dkv = {dk, dv, P, kv_dim};
    int32_t *dpages = ct_upload(pages, sizeof(int32_t) * n_pages);
    int32_t *dstart = ct_upload(page_start, sizeof(int32_t) * n),
            *dpos = ct_upload(pos, sizeof(int32_t) * n);
    float *dq = ct_upload(q, sizeof(float) * n * q_dim);
    float *dkt = ct_upload(k, sizeof(float) * n * kv_dim),
          *dvt = ct_upload(v, sizeof(float) * n * kv_dim);
    float *dout = ct_alloc(sizeof(float) * n * q_dim),
          *dlse = ct_alloc(sizeof(float) * n * n_heads);
    ct_check(fl_cuda_kv_store(&dkv, dkt, dvt, dpages, dstart, dpos, n, NULL), "kv_store");
    ct_check(fl_cuda_attention_forward(dout, dlse, dq, &dkv, dpages, dstart, dpos, n, n_heads, n_kv,
                                       hd, NULL),
             "attention");
    float *kgot = ct_download(dk, sizeof(float) * pool),
          *vgot = ct_download(dv, sizeof(float) * pool);
    float *ogot = ct_download(dout, sizeof(float) * n * q_dim);
    float *lgot = ct_download(dlse, sizeof(float) * n * n_heads);
    ct_check(fl_cuda_attention_forward(dout, NULL, dq, &dkv, dpages, dstart, dpos, n, n_heads, n_kv,
                                       hd, NULL),
             "attention without lse");
    float *ogot2 = ct_download(dout, sizeof(float) * n * q_dim);

    int pool_same = memcmp(kgot, kpool, sizeof(float) * pool) == 0 &&
                    memcmp(vgot, vpool, sizeof(float) * pool) == 0;
    double dO = ct_diff(ogot, out, (size_t)n * q_dim), dL = ct_diff(lgot, lse, (size_t)n * n_heads);
    int same_without = memcmp(ogot, ogot2, sizeof(float) * n * q_dim) == 0;
    tap_ok(pool_same && dO < 2e-5 && dL < 2e-5 && same_without,
           "attention %d heads / %d kv heads, head_dim %d, %d tokens of %d sequences (positions "
           "up to %d): pool after kv_store %s, out %.1e, lse %.1e, out without lse %s",
           n_heads, n_kv, hd, n, n_seqs, max_pos, pool_same ? "equal" : "DIFFERS", dO, dL,
           same_without ? "equal" : "DIFFERS");

    fl_cuda_free(dk);
    fl_cuda_free(dv);
    fl_cuda_free(dpages);
    fl_cuda_free(dstart);
    fl_cuda_free(dpos);
    fl_cuda_free(dq);
    fl_cuda_free(dkt);
    fl_cuda_free(dvt);
    fl_cuda_free(dout);
    fl_cuda_free(dlse);
    free(start);
    free(taken);
    free(pages);
    free(pos);
    free(page_start);
    free(tables);
    free(kpool);
    free(vpool);
    free(q);
    free(k);
    free(v);
    free(out);
    free(lse);
    free(kgot);
    free(vgot);
    free(ogot);
    free(lgot);
    free(ogot2);
}

int main(void) {
    ct_require_device("CUDA paged attention parity");
    ct_seed(7);
    /* decode, a chunk continuing at a page boundary, fresh prefill, first token, a long
     * decode, a chunk starting mid-page and crossing into the next */
    seq_spec mixed[] = {{40, 1}, {16, 20}, {0, 5}, {0, 1}, {300, 1}, {7, 9}};
    seq_spec mha[] = {{0, 33}, {100, 1}, {15, 2}};
    seq_spec llama[] = {{500, 1}, {0, 48}, {31, 17}, {1, 1}};
    seq_spec two[] = {{64, 1}, {3, 29}};
    seq_spec wide[] = {{200, 1}, {0, 20}};
    seq_spec tiny[] = {{90, 1}, {0, 12}};
    run_case(8, 4, 32, mixed, 6);   /* stories260K's layout: groups of 2 */
    run_case(4, 4, 64, mha, 3);     /* MHA: one warp per block */
    run_case(32, 8, 128, llama, 4); /* LLaMA-3-8B: groups of 4 */
    run_case(12, 2, 96, two, 2);    /* groups of 6: a block of 4 heads and one of 2 */
    run_case(16, 1, 256, wide, 2);  /* MQA: 16 heads over one kv head */
    run_case(8, 1, 512, wide, 2);   /* shared memory past 48 KiB (opt-in) */
    run_case(4, 1, 1024, two, 2);   /* the largest head the loader accepts */
    run_case(6, 3, 8, tiny, 2);     /* tiny heads: 32-row tiles */
    return tap_done();
}
