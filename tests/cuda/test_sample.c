/* CUDA sampling against fl_sampler_sample. Greedy rows must agree exactly. A sampled row
 * gets the uniform draw the CPU sampler makes first for its seed; the device sums its
 * probabilities in another order than the CPU's left-to-right loop, so a draw that falls
 * within rounding of a boundary between two candidates may go either way. The device is
 * therefore also run at u - DELTA and u + DELTA: where both give the same token the CPU's
 * must equal it, and otherwise the CPU's token must lie between them in the walk order. */
#include "cuda_test.h"

#include <string.h>

#define DELTA 2e-4f

/* The first draw of an fl_sampler seeded `seed`: engine/sampler.c's xorshift64* (state =
 * seed, then one step), mirrored so the device can be handed the same uniform. */
static float first_draw(uint64_t seed) {
    uint64_t s = seed;
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    uint32_t r = (uint32_t)((s * 0x2545F4914F6CDD1DULL) >> 32);
    return (float)(r >> 8) / 16777216.0f;
}

typedef struct {
    float temperature;
    int top_k; /* -1: the vocabulary size + 5 (larger than the vocabulary: off) */
    float top_p;
    float spread; /* logits uniform in [-spread, spread] */
} row_cfg;

static const row_cfg cfgs[] = {
    {0.0f, 0, 1.0f, 4.0f},   /* greedy */
    {0.8f, 1, 1.0f, 4.0f},   /* top_k 1: greedy too */
    {1.0f, 0, 1.0f, 4.0f},   /* temperature only: the walk in vocabulary order */
    {0.7f, 40, 1.0f, 4.0f},  /* top_k */
    {1.0f, 0, 0.9f, 4.0f},   /* top_p alone: the cutoff prefilter, then the nucleus */
    {0.9f, 50, 0.95f, 4.0f}, /* both */
    {1.5f, 0, 0.5f, 12.0f},  /* a peaked distribution, a narrow nucleus */
    {1.0f, -1, 1.0f, 4.0f},  /* top_k past the vocabulary */
    {0.6f, 0, 0.99f, 4.0f},  {1.2f, 3, 1.0f, 12.0f},
};
#define N_ROWS (int)(sizeof cfgs / sizeof cfgs[0])

static const float *sort_probs; /* for by_prob */
static int by_prob(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (sort_probs[x] != sort_probs[y]) return sort_probs[x] > sort_probs[y] ? -1 : 1;
    return x - y;
}

/* where[id] = the candidate's place in the CPU's walk: by probability (computed as the CPU
 * does) and then id when top_k or top_p orders them, else the id itself. */
static void walk_order(int *where, const float *logits, const fl_sampling_params *p, int V) {
    int ordered = (p->top_k > 0 && p->top_k < V) || p->top_p < 1.0f;
    if (!ordered) {
        for (int i = 0; i < V; i++) where[i] = i;
        return;
    }
    float mx = logits[0], inv_t = 1.0f / p->temperature;
    for (int i = 1; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    float *prob = malloc(sizeof(float) * V);
    int *ids = malloc(sizeof(int) * V);
    for (int i = 0; i < V; i++) {
        prob[i] = expf((logits[i] - mx) * inv_t);
        ids[i] = i;
    }
    sort_probs = prob;
    qsort(ids, (size_t)V, sizeof(int), by_prob);
    for (int i = 0; i < V; i++) where[ids[i]] = i;
    free(prob);
    free(ids);
}

static void run_vocab(int V, int trials) {
    fl_cuda_sampler *s = fl_cuda_sampler_new(N_ROWS, V);
    if (!s) ct_check(-1, "sampler_new");
    float *logits = malloc(sizeof(float) * N_ROWS * V);
    for (int r = 0; r < N_ROWS; r++)
        for (int i = 0; i < V; i++)
            logits[(size_t)r * V + i] = ct_uniform(-cfgs[r].spread, cfgs[r].spread);
    if (V > 7) { /* tied maxima in the greedy row: the first wins */
        logits[7] = logits[3] = 2.0f * cfgs[0].spread;
    }
    float *dlogits = ct_upload(logits, sizeof(float) * N_ROWS * V);
    int32_t *dout = ct_alloc(sizeof(int32_t) * N_ROWS);
    fl_sampling_params sp[N_ROWS];
    int *where = malloc(sizeof(int) * (size_t)N_ROWS * V);
    for (int r = 0; r < N_ROWS; r++) {
        sp[r] = (fl_sampling_params){cfgs[r].temperature, cfgs[r].top_k < 0 ? V + 5 : cfgs[r].top_k,
                                     cfgs[r].top_p, 0};
        walk_order(where + (size_t)r * V, logits + (size_t)r * V, &sp[r], V);
    }
    int greedy_ok = 1, sampled_ok = 1, exact = 0, sampled = 0, first_bad = -1;
    for (int trial = 0; trial < trials; trial++) {
        int32_t cpu[N_ROWS], got[3][N_ROWS];
        fl_cuda_sample_params dp[3][N_ROWS];
        for (int r = 0; r < N_ROWS; r++) {
            sp[r].seed = 1000u * (uint64_t)trial + (uint64_t)r + 1;
            fl_sampler *cs = fl_sampler_new(&sp[r], V);
            if (!cs) ct_check(-1, "fl_sampler_new");
            cpu[r] = fl_sampler_sample(cs, logits + (size_t)r * V);
            fl_sampler_free(cs);
            float u = first_draw(sp[r].seed);
            float us[3] = {u, u - DELTA > 0.0f ? u - DELTA : 0.0f,
                           u + DELTA < 1.0f ? u + DELTA : 0.99999994f};
            for (int j = 0; j < 3; j++)
                dp[j][r] =
                    (fl_cuda_sample_params){sp[r].temperature, sp[r].top_k, sp[r].top_p, us[j]};
        }
        for (int j = 0; j < 3; j++) {
            ct_check(fl_cuda_sample(s, dout, dlogits, dp[j], N_ROWS, NULL), "sample");
            ct_check(fl_cuda_download(got[j], dout, sizeof(int32_t) * N_ROWS, NULL), "download");
        }
        for (int r = 0; r < N_ROWS; r++) {
            int ok;
            if (sp[r].temperature == 0.0f || sp[r].top_k == 1) {
                ok = got[0][r] == cpu[r];
                greedy_ok &= ok;
            } else {
                const int *w = where + (size_t)r * V;
                int lo = got[1][r], mid = got[0][r], hi = got[2][r];
                int in_range = cpu[r] >= 0 && cpu[r] < V && lo >= 0 && lo < V && hi >= 0 && hi < V;
                ok = in_range &&
                     (lo == hi ? cpu[r] == mid : w[lo] <= w[cpu[r]] && w[cpu[r]] <= w[hi]);
                sampled_ok &= ok;
                sampled++;
                exact += mid == cpu[r];
            }
            if (!ok && first_bad < 0) first_bad = r;
        }
    }
    tap_ok(greedy_ok,
           "greedy and top_k 1 over %d logits match the CPU exactly (ties to the "
           "first)",
           V);
    tap_ok(sampled_ok,
           "sampling over %d logits (temperature, top_k, top_p, both) matches the "
           "CPU for the same draw: %d of %d identical, the rest within +-%g of u",
           V, exact, sampled, (double)DELTA);
    if (first_bad >= 0) tap_diag("first failing row: %d", first_bad);
    fl_cuda_sample_params bad = {1.0f, 0, 1.0f, 1.0f};
    tap_ok(fl_cuda_sample(s, dout, dlogits, &bad, 1, NULL) == -1 && strstr(fl_last_error(), "u 1"),
           "a draw of 1 is refused (%s)", fl_last_error());
    fl_cuda_free(dlogits);
    fl_cuda_free(dout);
    fl_cuda_sampler_free(s);
    free(logits);
    free(where);
}

int main(void) {
    ct_require_device("CUDA sampling parity");
    ct_seed(11);
    run_vocab(5, 20);
    run_vocab(512, 20);
    run_vocab(1001, 10);
    run_vocab(32000, 4);
    return tap_done();
}
