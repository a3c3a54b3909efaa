/* Sampling against its definition: empirical frequencies of many draws versus the
 * target distribution computed here in double (temperature, top-k, top-p). */
#include "flexllm.h"
#include "tap.h"

#include <math.h>

#define V 12
#define DRAWS 60000

/* The distribution the sampler should draw from, by the textbook definition:
 * softmax(logits / T), keep the k most likely, then the smallest prefix by
 * probability whose mass reaches top_p, renormalise. */
static void target(const float *logits, float t, int k, float p, double *out) {
    int order[V];
    double prob[V], sum = 0, mx = -1e30;
    for (int i = 0; i < V; i++) mx = fmax(mx, logits[i]);
    for (int i = 0; i < V; i++) sum += prob[i] = exp((logits[i] - mx) / t);
    for (int i = 0; i < V; i++) prob[i] /= sum, order[i] = i;
    for (int i = 0; i < V; i++) /* selection sort by probability, descending */
        for (int j = i + 1; j < V; j++)
            if (prob[order[j]] > prob[order[i]]) {
                int x = order[i];
                order[i] = order[j];
                order[j] = x;
            }
    int keep = k > 0 && k < V ? k : V;
    double kept = 0;
    for (int i = 0; i < keep; i++) kept += prob[order[i]];
    double acc = 0;
    int n = keep;
    for (int i = 0; i < keep; i++) {
        acc += prob[order[i]] / kept;
        if (acc >= p) {
            n = i + 1;
            break;
        }
    }
    double mass = 0;
    for (int i = 0; i < n; i++) mass += prob[order[i]];
    for (int i = 0; i < V; i++) out[i] = 0;
    for (int i = 0; i < n; i++) out[order[i]] = prob[order[i]] / mass;
}

static void check(const char *what, float t, int k, float p) {
    static const float logits[V] = {2.0f, 1.5f, 1.4f, 0.3f, -0.2f, 3.1f,
                                     0.0f, -1.0f, 2.2f, 0.9f, -3.0f, 1.1f};
    double want[V];
    target(logits, t, k, p, want);
    fl_sampling_params sp = fl_sampling_default_params();
    sp.temperature = t;
    sp.top_k = k;
    sp.top_p = p;
    sp.seed = 1234;
    fl_sampler *s = fl_sampler_new(&sp, V);
    int count[V] = {0};
    for (int i = 0; i < DRAWS; i++) count[fl_sampler_sample(s, logits)]++;
    fl_sampler_free(s);
    /* Each frequency within 5 standard errors; a token outside the kept set never drawn. */
    int ok = 1;
    double worst = 0;
    for (int i = 0; i < V; i++) {
        double f = (double)count[i] / DRAWS;
        double se = sqrt(want[i] * (1 - want[i]) / DRAWS) + 1e-9;
        if (want[i] == 0 && count[i] != 0) ok = 0;
        if (want[i] > 0 && fabs(f - want[i]) > 5 * se) ok = 0;
        if (want[i] > 0) worst = fmax(worst, fabs(f - want[i]) / se);
    }
    tap_ok(ok, "%s: %d draws follow the target distribution (worst deviation %.1f standard errors)",
           what, DRAWS, worst);
}

int main(void) {
    check("temperature 1", 1.0f, 0, 1.0f);
    check("temperature 0.5", 0.5f, 0, 1.0f);
    check("temperature 1.7, top-k 4", 1.7f, 4, 1.0f);
    check("temperature 1, top-p 0.8", 1.0f, 0, 0.8f);
    check("temperature 0.9, top-k 6, top-p 0.7", 0.9f, 6, 0.7f);

    static const float logits[V] = {0.1f, 0.2f, 5.0f, 0.3f, 5.0f, 0, 0, 0, 0, 0, 0, 0};
    fl_sampling_params sp = fl_sampling_default_params();
    fl_sampler *g = fl_sampler_new(&sp, V);
    tap_ok(fl_sampler_sample(g, logits) == 2, "greedy takes the first of equal maxima, as llama2.c");
    fl_sampler_free(g);

    sp.temperature = 1.0f;
    sp.seed = 99;
    fl_sampler *a = fl_sampler_new(&sp, V), *b = fl_sampler_new(&sp, V);
    int same = 1;
    for (int i = 0; i < 200; i++) same &= fl_sampler_sample(a, logits) == fl_sampler_sample(b, logits);
    tap_ok(same, "the same seed draws the same sequence");
    fl_sampler_free(a);
    fl_sampler_free(b);

    /* top_p below 1/V on near-uniform logits: the nucleus is the top token alone (the
     * pre-filter's cutoff once exceeded every candidate and left none). */
    static const float flat[V] = {0.001f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    sp.top_p = 0.01f;
    fl_sampler *tiny = fl_sampler_new(&sp, V);
    int top = 1;
    for (int i = 0; i < 200; i++) top &= fl_sampler_sample(tiny, flat) == 0;
    tap_ok(top, "top_p 0.01 over near-uniform logits always draws the top token");
    fl_sampler_free(tiny);
    check("temperature 1, top-p 0.05", 1.0f, 0, 0.05f);

    sp.top_p = 1.5f;
    tap_ok(fl_sampler_new(&sp, V) == NULL && strstr(fl_last_error(), "top_p 1.5 must be in (0, 1]"),
           "top_p outside (0, 1] is refused with its value (%s)", fl_last_error());
    sp.top_p = 1.0f;
    sp.temperature = -1.0f;
    tap_ok(fl_sampler_new(&sp, V) == NULL && strstr(fl_last_error(), "temperature -1 must be >= 0"),
           "a negative temperature is refused with its value");
    return tap_done();
}
