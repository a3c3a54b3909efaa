// Paged KV store and causal GQA attention over the shared pool, for any mix of prefill-chunk
// and decode tokens in one launch (each token carries its own position and page table).
#include "cuda/cuda_util.h"

#include <math.h>

#define ATT_MAX_HEAD_DIM 1024 // the model loader's limit
#define ATT_MAX_WARPS 4       // query heads (one per warp) sharing a block's K/V tiles
#define ATT_TILE_FLOATS 4096  // K or V floats per tile (at most 32 rows: a lane per row)

__device__ __forceinline__ size_t kv_row(const fl_kv_layer &kv, const int32_t *table, int p) {
    return ((size_t)table[p / kv.page_tokens] * kv.page_tokens + p % kv.page_tokens) * kv.kv_dim;
}

// One block per token, threads over the row.
__global__ void kv_store_kernel(fl_kv_layer kv, const float *k, const float *v,
                                const int32_t *pages, const int32_t *page_start,
                                const int32_t *pos) {
    int t = blockIdx.x;
    size_t row = kv_row(kv, pages + page_start[t], pos[t]);
    const float *kt = k + (size_t)t * kv.kv_dim, *vt = v + (size_t)t * kv.kv_dim;
    for (int i = threadIdx.x; i < kv.kv_dim; i += blockDim.x) {
        kv.k[row + i] = kt[i];
        kv.v[row + i] = vt[i];
    }
}

static int check_kv(const fl_kv_layer *kv, const char *op) {
    if (!kv || !kv->k || !kv->v || kv->page_tokens <= 0 || kv->kv_dim <= 0)
        return fl_error("CUDA %s: the KV layer needs k and v pools, page_tokens > 0 and kv_dim "
                        "> 0",
                        op);
    return 0;
}

extern "C" int fl_cuda_kv_store(const fl_kv_layer *kv, const float *k, const float *v,
                                const int32_t *pages, const int32_t *page_start, const int32_t *pos,
                                int n, void *stream) {
    if (check_kv(kv, "kv_store")) return -1;
    if (n < 0) return fl_error("CUDA kv_store: n %d must be >= 0", n);
    if (n == 0) return 0;
    kv_store_kernel<<<n, 256, 0, (cudaStream_t)stream>>>(*kv, k, v, pages, page_start, pos);
    return fl_cuda_launched("kv_store");
}

// Grid (token, kv head x slice): a block serves up to ATT_MAX_WARPS query heads of one kv
// head, a warp each, so the K/V rows it stages in shared memory are read once for the whole
// group. The token's positions 0..pos go by in tiles of `rows_max` rows; in a tile lane j
// scores row j (tile rows padded to head_dim + 1 floats: head_dim is even, so the odd stride
// puts the 32 rows a warp reads in 32 different banks), then the warp updates its online
// softmax (running max m, sum l, accumulator rescaled by exp(m_old - m_new)) as the CPU
// does page by page, and each lane accumulates its own columns of the output.
__global__ void attention_kernel(float *out, float *lse, const float *q, fl_kv_layer kv,
                                 const int32_t *pages, const int32_t *page_start,
                                 const int32_t *pos, int n_heads, int group, int head_dim,
                                 int slices, int rows_max, float scale) {
    extern __shared__ float smem[];
    int ld = head_dim + 1, warps = blockDim.x / 32;
    float *ks = smem;                   // [rows_max][ld]
    float *vs = ks + rows_max * ld;     // [rows_max][ld]
    float *qs = vs + rows_max * ld;     // [warps][head_dim]
    float *acc = qs + warps * head_dim; // [warps][head_dim]
    float *ps = acc + warps * head_dim; // [warps][32] softmax weights of a tile

    int t = blockIdx.x;
    int kvh = blockIdx.y / slices, slice = blockIdx.y % slices;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int hg = slice * warps + warp; // this warp's head within the group
    bool active = hg < group;
    int h = kvh * group + hg;
    int last = pos[t];
    const int32_t *table = pages + page_start[t];
    float *qw = qs + warp * head_dim, *aw = acc + warp * head_dim, *pw = ps + warp * 32;

    if (active)
        for (int i = lane; i < head_dim; i += 32) {
            qw[i] = q[((size_t)t * n_heads + h) * head_dim + i];
            aw[i] = 0.0f;
        }
    float m = -INFINITY, l = 0.0f;
    for (int first = 0; first <= last; first += rows_max) {
        int rows = min(rows_max, last + 1 - first);
        __syncthreads(); // the previous tile is consumed (and q is written, the first time)
        for (int idx = threadIdx.x; idx < rows * head_dim; idx += blockDim.x) {
            int r = idx / head_dim, i = idx - r * head_dim;
            size_t src = kv_row(kv, table, first + r) + (size_t)kvh * head_dim + i;
            ks[r * ld + i] = kv.k[src];
            vs[r * ld + i] = kv.v[src];
        }
        __syncthreads();
        if (!active) continue; // idle warps still load tiles and meet every barrier

        float s = -INFINITY;
        if (lane < rows) {
            const float *kr = ks + lane * ld;
            float d = 0.0f;
            for (int i = 0; i < head_dim; i++) d += qw[i] * kr[i];
            s = d * scale;
        }
        float mx = fmaxf(m, fl_warp_max(s));
        float p = lane < rows ? expf(s - mx) : 0.0f;
        float c = expf(m - mx); // 0 on the first tile (m = -inf)
        l = l * c + fl_warp_sum(p);
        m = mx;
        pw[lane] = p;
        __syncwarp();
        for (int i = lane; i < head_dim; i += 32) {
            float a = aw[i] * c;
            for (int j = 0; j < rows; j++) a += pw[j] * vs[j * ld + i];
            aw[i] = a;
        }
        __syncwarp(); // pw is rewritten by the next tile
    }
    if (!active) return;
    float inv = 1.0f / l;
    float *o = out + ((size_t)t * n_heads + h) * head_dim;
    for (int i = lane; i < head_dim; i += 32) o[i] = aw[i] * inv;
    if (lse && lane == 0) lse[(size_t)t * n_heads + h] = m + logf(l);
}

extern "C" int fl_cuda_attention_forward(float *out, float *lse, const float *q,
                                         const fl_kv_layer *kv, const int32_t *pages,
                                         const int32_t *page_start, const int32_t *pos, int n,
                                         int n_heads, int n_kv_heads, int head_dim, void *stream) {
    if (check_kv(kv, "attention")) return -1;
    if (n < 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0)
        return fl_error("CUDA attention: n %d >= 0 and n_heads %d a positive multiple of "
                        "n_kv_heads %d needed",
                        n, n_heads, n_kv_heads);
    if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > ATT_MAX_HEAD_DIM)
        return fl_error("CUDA attention: head_dim %d must be even and at most %d", head_dim,
                        ATT_MAX_HEAD_DIM);
    if (kv->kv_dim != n_kv_heads * head_dim)
        return fl_error("CUDA attention: the pool's kv_dim %d is not n_kv_heads %d * head_dim %d",
                        kv->kv_dim, n_kv_heads, head_dim);
    if (n == 0) return 0;
    int group = n_heads / n_kv_heads;
    int warps = group < ATT_MAX_WARPS ? group : ATT_MAX_WARPS;
    int slices = (group + warps - 1) / warps;
    int rows_max = ATT_TILE_FLOATS / head_dim;
    rows_max = rows_max > 32 ? 32 : rows_max < 1 ? 1 : rows_max;
    size_t smem = sizeof(float) *
                  ((size_t)2 * rows_max * (head_dim + 1) + (size_t)warps * (2 * head_dim + 32));
    if (smem > 48 * 1024 && // the default per-block limit; large heads opt in to more
        fl_cuda_check(cudaFuncSetAttribute(attention_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                      "attention (shared memory opt-in)"))
        return -1;
    dim3 grid((unsigned)n, (unsigned)(n_kv_heads * slices));
    attention_kernel<<<grid, 32 * warps, smem, (cudaStream_t)stream>>>(
        out, lse, q, *kv, pages, page_start, pos, n_heads, group, head_dim, slices, rows_max,
        1.0f / sqrtf((float)head_dim));
    return fl_cuda_launched("attention");
}
