// Token sampling on the device with fl_sampler_sample's semantics (engine/sampler.c):
// greedy is the first maximal logit; otherwise probabilities exp((logit - max) / T), then
// either the top_k most probable, or (top_p < 1 alone) the candidates above the nucleus
// cutoff, in descending order (ties by id); then the smallest prefix holding top_p of the
// kept mass; then the first candidate whose running mass exceeds u * mass. With neither
// top_k nor top_p the walk goes in vocabulary order, as the CPU's does.
//
// Three steps: a block per row takes the argmax (done for greedy rows) and the
// probabilities; CUB sorts the rows that need an order (a segmented radix sort, stable, so
// equal probabilities keep ascending ids); a block per row walks the prefix sums.
#include "cuda/cuda_util.h"

#include <cub/cub.cuh>
#include <limits.h>
#include <stdlib.h>

#define SAMPLE_THREADS 512

struct fl_cuda_sampler {
    int max_rows, n_vocab;
    float *probs, *sorted_probs;   // [max_rows, n_vocab]
    int32_t *ids, *sorted_ids;     // [max_rows, n_vocab]; ids holds 0..n_vocab-1 per row
    float *totals;                 // [max_rows] sum of each row's probabilities
    fl_cuda_sample_params *params; // [max_rows]
    int32_t *offsets;              // [2 * max_rows] the sort's segment begins, then ends
    int32_t *host_offsets;         // [2 * max_rows]
    void *temp;                    // CUB's scratch
    size_t temp_bytes;
};

__host__ __device__ static inline bool sample_greedy(const fl_cuda_sample_params &p) {
    return p.temperature == 0.0f || p.top_k == 1;
}
__host__ __device__ static inline bool sample_top_k(const fl_cuda_sample_params &p, int n_vocab) {
    return p.top_k > 0 && p.top_k < n_vocab;
}
__host__ __device__ static inline bool sample_sorted(const fl_cuda_sample_params &p, int n_vocab) {
    return !sample_greedy(p) && (sample_top_k(p, n_vocab) || p.top_p < 1.0f);
}

__global__ void iota_rows_kernel(int32_t *ids, size_t total, int n_vocab) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        ids[i] = (int32_t)(i % n_vocab);
}

// The first index of the maximum, to every thread (ties go to the lower index, as a
// left-to-right scan with a strict > finds).
__device__ static int block_argmax(const float *x, int n) {
    __shared__ float sv[32];
    __shared__ int si[32];
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (bi == INT_MAX || x[i] > bv) bv = x[i], bi = i;
    for (int off = 16; off > 0; off >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    bv = sv[0], bi = si[0];
    for (int w = 1; w < (int)blockDim.x / 32; w++)
        if (sv[w] > bv || (sv[w] == bv && si[w] < bi)) bv = sv[w], bi = si[w];
    __syncthreads();
    return bi;
}

__global__ void sample_prepare_kernel(int32_t *out, const float *logits,
                                      const fl_cuda_sample_params *params, float *probs,
                                      float *totals, int n_vocab) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    const float *x = logits + (size_t)row * n_vocab;
    fl_cuda_sample_params p = params[row];
    int best = block_argmax(x, n_vocab);
    if (sample_greedy(p)) {
        if (threadIdx.x == 0) out[row] = best;
        return;
    }
    float mx = x[best], inv_t = 1.0f / p.temperature, sum = 0.0f;
    float *pr = probs + (size_t)row * n_vocab;
    for (int i = threadIdx.x; i < n_vocab; i += blockDim.x) {
        float e = expf((x[i] - mx) * inv_t);
        pr[i] = e;
        sum += e;
    }
    sum = fl_block_sum(sum, scratch);
    if (threadIdx.x == 0) totals[row] = sum;
}

typedef cub::BlockScan<float, SAMPLE_THREADS> sample_scan;

// The first i < k whose inclusive prefix sum of pr passes thr (prefix > thr when strict,
// else prefix >= thr), or -1; *prefix gets that prefix sum. Every thread gets the answer.
__device__ static int first_prefix(const float *pr, int k, float thr, bool strict, float *prefix,
                                   sample_scan::TempStorage &tmp) {
    __shared__ int s_found;
    __shared__ float s_carry, s_prefix;
    if (threadIdx.x == 0) s_found = INT_MAX;
    __syncthreads();
    float carry = 0.0f;
    for (int base = 0; base < k; base += blockDim.x) {
        int i = base + threadIdx.x;
        float v = i < k ? pr[i] : 0.0f, incl;
        sample_scan(tmp).InclusiveSum(v, incl);
        float acc = carry + incl;
        if (i < k && (strict ? thr < acc : acc >= thr)) atomicMin(&s_found, i);
        if (threadIdx.x == blockDim.x - 1) s_carry = acc;
        __syncthreads();
        int f = s_found;
        if (f != INT_MAX) { // the same for every thread
            if (i == f) s_prefix = acc;
            __syncthreads();
            *prefix = s_prefix;
            return f;
        }
        carry = s_carry;
        __syncthreads(); // s_carry and the scan's storage are reused
    }
    return -1;
}

__global__ void sample_pick_kernel(int32_t *out, const fl_cuda_sample_params *params,
                                   const float *probs, const float *sorted_probs,
                                   const int32_t *sorted_ids, const float *totals, int n_vocab) {
    __shared__ sample_scan::TempStorage tmp;
    __shared__ float scratch[32];
    int row = blockIdx.x;
    fl_cuda_sample_params p = params[row];
    if (sample_greedy(p)) return;
    bool sorted = sample_sorted(p, n_vocab);
    size_t off = (size_t)row * n_vocab;
    const float *pr = (sorted ? sorted_probs : probs) + off;
    int k = n_vocab;
    float sum = totals[row];
    if (sample_top_k(p, n_vocab) || p.top_p < 1.0f) {
        if (sample_top_k(p, n_vocab)) {
            k = p.top_k;
        } else { // sorted descending, so the candidates at or above the cutoff are a prefix
            float cutoff = (1.0f - p.top_p) / (n_vocab - 1) * sum;
            k = 0;
            for (int base = 0; base < n_vocab; base += blockDim.x) {
                int i = base + threadIdx.x;
                k += __syncthreads_count(i < n_vocab && pr[i] >= cutoff);
            }
            k = k > 0 ? k : 1; // empty only for top_p < 1/n_vocab, which the CPU mishandles
        }
        float part = 0.0f;
        for (int i = threadIdx.x; i < k; i += blockDim.x) part += pr[i];
        sum = fl_block_sum(part, scratch);
    }
    float prefix;
    if (p.top_p < 1.0f) { // the smallest prefix holding top_p of the kept mass
        int i = first_prefix(pr, k, p.top_p * sum, false, &prefix, tmp);
        if (i >= 0) k = i + 1, sum = prefix;
    }
    int i = first_prefix(pr, k, p.u * sum, true, &prefix, tmp);
    if (i < 0) i = k - 1; // rounding left u * sum at the very top
    if (threadIdx.x == 0) out[row] = sorted ? sorted_ids[off + i] : i;
}

extern "C" void fl_cuda_sampler_free(fl_cuda_sampler *s) {
    if (!s) return;
    fl_cuda_free(s->probs);
    fl_cuda_free(s->sorted_probs);
    fl_cuda_free(s->ids);
    fl_cuda_free(s->sorted_ids);
    fl_cuda_free(s->totals);
    fl_cuda_free(s->params);
    fl_cuda_free(s->offsets);
    fl_cuda_free(s->temp);
    free(s->host_offsets);
    free(s);
}

static cudaError_t sort_rows(fl_cuda_sampler *s, void *temp, size_t &bytes, int n,
                             cudaStream_t stream) {
    return cub::DeviceSegmentedRadixSort::SortPairsDescending(
        temp, bytes, s->probs, s->sorted_probs, s->ids, s->sorted_ids, n * s->n_vocab, n,
        s->offsets, s->offsets + n, 0, (int)sizeof(float) * 8, stream);
}

extern "C" fl_cuda_sampler *fl_cuda_sampler_new(int max_rows, int n_vocab) {
    if (max_rows <= 0 || n_vocab <= 0 || (size_t)max_rows * n_vocab > INT_MAX) {
        fl_error("CUDA sampler: %d rows of %d logits must be positive and fit in an int", max_rows,
                 n_vocab);
        return NULL;
    }
    fl_cuda_sampler *s = (fl_cuda_sampler *)fl_calloc(1, sizeof *s);
    if (!s) return NULL;
    s->max_rows = max_rows;
    s->n_vocab = n_vocab;
    size_t cells = (size_t)max_rows * n_vocab;
    if (!(s->probs = (float *)fl_cuda_alloc(sizeof(float) * cells, "sampler probabilities")) ||
        !(s->sorted_probs = (float *)fl_cuda_alloc(sizeof(float) * cells, "sampler sort")) ||
        !(s->ids = (int32_t *)fl_cuda_alloc(sizeof(int32_t) * cells, "sampler ids")) ||
        !(s->sorted_ids = (int32_t *)fl_cuda_alloc(sizeof(int32_t) * cells, "sampler sort")) ||
        !(s->totals = (float *)fl_cuda_alloc(sizeof(float) * max_rows, "sampler sums")) ||
        !(s->params = (fl_cuda_sample_params *)fl_cuda_alloc(
              sizeof(fl_cuda_sample_params) * max_rows, "sampler parameters")) ||
        !(s->offsets =
              (int32_t *)fl_cuda_alloc(sizeof(int32_t) * 2 * max_rows, "sampler segments")) ||
        !(s->host_offsets = (int32_t *)fl_malloc(sizeof(int32_t) * 2 * max_rows)))
        goto fail;
    iota_rows_kernel<<<fl_cuda_blocks(cells, 256), 256>>>(s->ids, cells, n_vocab);
    if (fl_cuda_launched("sampler ids") || fl_cuda_sync(NULL) ||
        fl_cuda_check(sort_rows(s, NULL, s->temp_bytes, max_rows, NULL), "sampler sort size") ||
        !(s->temp = fl_cuda_alloc(s->temp_bytes, "sampler sort scratch")))
        goto fail;
    return s;
fail:
    fl_cuda_sampler_free(s);
    return NULL;
}

extern "C" int fl_cuda_sample(fl_cuda_sampler *s, int32_t *out, const float *logits,
                              const fl_cuda_sample_params *params, int n, void *stream) {
    if (n < 0 || n > s->max_rows)
        return fl_error("CUDA sample: %d rows, the sampler holds 0..%d", n, s->max_rows);
    if (n == 0) return 0;
    int V = s->n_vocab, any_sorted = 0;
    for (int r = 0; r < n; r++) {
        const fl_cuda_sample_params *p = &params[r];
        if (!(p->temperature >= 0.0f) || p->top_k < 0 || !(p->top_p > 0.0f && p->top_p <= 1.0f) ||
            !(p->u >= 0.0f && p->u < 1.0f))
            return fl_error("CUDA sample: row %d has temperature %g (>= 0), top_k %d (>= 0), "
                            "top_p %g (in (0, 1]), u %g (in [0, 1)): one is out of range",
                            r, (double)p->temperature, p->top_k, (double)p->top_p, (double)p->u);
        int sorted = sample_sorted(*p, V);
        any_sorted |= sorted;
        s->host_offsets[r] = r * V;                        // begin
        s->host_offsets[n + r] = r * V + (sorted ? V : 0); // end: empty for unsorted rows
    }
    cudaStream_t st = (cudaStream_t)stream;
    if (fl_cuda_upload(s->params, params, sizeof *params * n, stream) ||
        fl_cuda_upload(s->offsets, s->host_offsets, sizeof(int32_t) * 2 * n, stream))
        return fl_error_prefix("CUDA sample");
    sample_prepare_kernel<<<n, SAMPLE_THREADS, 0, st>>>(out, logits, s->params, s->probs, s->totals,
                                                        V);
    if (fl_cuda_launched("sample (argmax and probabilities)")) return -1;
    if (any_sorted) {
        size_t need = 0;
        if (fl_cuda_check(sort_rows(s, NULL, need, n, st), "sample (sort size)")) return -1;
        if (need > s->temp_bytes)
            return fl_error("CUDA sample: the sort wants %zu bytes of scratch, %zu were sized",
                            need, s->temp_bytes);
        size_t have = s->temp_bytes;
        if (fl_cuda_check(sort_rows(s, s->temp, have, n, st), "sample (sort)")) return -1;
    }
    sample_pick_kernel<<<n, SAMPLE_THREADS, 0, st>>>(out, s->params, s->probs, s->sorted_probs,
                                                     s->sorted_ids, s->totals, V);
    return fl_cuda_launched("sample (pick)");
}
