/* Token sampling: greedy, temperature, top-k, top-p, with a seeded xorshift RNG. */
#include "fl_internal.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    float prob;
    int32_t id;
} candidate;

struct fl_sampler {
    fl_sampling_params p;
    int n_vocab;
    uint64_t rng;
    candidate *cand; /* [n_vocab] */
};

fl_sampling_params fl_sampling_default_params(void) {
    fl_sampling_params p = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 0};
    return p;
}

fl_sampler *fl_sampler_new(const fl_sampling_params *params, int n_vocab) {
    fl_sampling_params p = params ? *params : fl_sampling_default_params();
    if (!(p.temperature >= 0.0f)) {
        fl_error("sampling: temperature %g must be >= 0", (double)p.temperature);
        return NULL;
    }
    if (p.top_k < 0) {
        fl_error("sampling: top_k %d must be >= 0", p.top_k);
        return NULL;
    }
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
        fl_error("sampling: top_p %g must be in (0, 1]", (double)p.top_p);
        return NULL;
    }
    fl_sampler *s = fl_calloc(1, sizeof *s);
    if (!s) return NULL;
    s->p = p;
    s->n_vocab = n_vocab;
    s->rng = p.seed ? p.seed : 0x853c49e6748fea9bULL; /* xorshift needs a nonzero state */
    if (!(s->cand = fl_malloc(sizeof(candidate) * (size_t)n_vocab))) {
        free(s);
        return NULL;
    }
    return s;
}

void fl_sampler_free(fl_sampler *s) {
    if (!s) return;
    free(s->cand);
    free(s);
}

static float random_f32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    uint32_t r = (uint32_t)((*state * 0x2545F4914F6CDD1DULL) >> 32);
    return (float)(r >> 8) / 16777216.0f;
}

static int32_t argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static int by_prob_desc(const void *a, const void *b) {
    const candidate *x = a, *y = b;
    if (x->prob != y->prob) return x->prob > y->prob ? -1 : 1;
    return x->id - y->id;
}

static void sift_down(candidate *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, min = i;
        if (l < n && by_prob_desc(&h[l], &h[min]) > 0) min = l;
        if (r < n && by_prob_desc(&h[r], &h[min]) > 0) min = r;
        if (min == i) return;
        candidate t = h[i];
        h[i] = h[min];
        h[min] = t;
        i = min;
    }
}

/* Moves the k most probable candidates to the front, most probable first:
 * a min-heap of k, O(n log k). */
static void select_top_k(candidate *c, int n, int k) {
    for (int i = k / 2 - 1; i >= 0; i--) sift_down(c, k, i);
    for (int i = k; i < n; i++) {
        if (by_prob_desc(&c[i], &c[0]) < 0) {
            c[0] = c[i];
            sift_down(c, k, 0);
        }
    }
    qsort(c, (size_t)k, sizeof(candidate), by_prob_desc);
}

int32_t fl_sampler_sample(fl_sampler *s, const float *logits) {
    int n = s->n_vocab;
    if (s->p.temperature == 0.0f || s->p.top_k == 1) return argmax(logits, n);
    float max = logits[argmax(logits, n)], inv_t = 1.0f / s->p.temperature, sum = 0.0f;
    for (int i = 0; i < n; i++) {
        s->cand[i].id = i;
        s->cand[i].prob = expf((logits[i] - max) * inv_t);
        sum += s->cand[i].prob;
    }
    int k = n;
    if (s->p.top_k > 0 && s->p.top_k < n) {
        k = s->p.top_k;
        select_top_k(s->cand, n, k);
    } else if (s->p.top_p < 1.0f) {
        /* Below (1-top_p)/(n-1) of the mass a candidate can never enter the
         * nucleus, so only the rest need sorting (the llama2.c trick). */
        float cutoff = (1.0f - s->p.top_p) / (n - 1) * sum;
        if (cutoff > 1.0f) cutoff = 1.0f; /* the top candidate (prob 1) is always in */
        k = 0;
        for (int i = 0; i < n; i++)
            if (s->cand[i].prob >= cutoff) s->cand[k++] = s->cand[i];
        qsort(s->cand, (size_t)k, sizeof(candidate), by_prob_desc);
    }
    if (k < n) {
        sum = 0.0f;
        for (int i = 0; i < k; i++) sum += s->cand[i].prob;
    }
    if (s->p.top_p < 1.0f) { /* the smallest prefix holding top_p of the kept mass */
        float acc = 0.0f, kept = sum;
        for (int i = 0; i < k; i++) {
            acc += s->cand[i].prob;
            if (acc >= s->p.top_p * kept) {
                k = i + 1;
                sum = acc;
                break;
            }
        }
    }
    float r = random_f32(&s->rng) * sum, acc = 0.0f;
    for (int i = 0; i < k; i++) {
        acc += s->cand[i].prob;
        if (r < acc) return s->cand[i].id;
    }
    return s->cand[k - 1].id; /* rounding left r at the very top */
}
