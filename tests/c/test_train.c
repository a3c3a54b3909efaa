/* LoRA training through the token-level path, against independent truths: finite
 * differences of the loss for every adapter parameter, the same gradients for any
 * chunking (alone or sharing batches with inference), a NaN-poisoned scratch, and
 * the arena size the planner predicts. */
#include "flexllm.h"
#include "tap.h"
#include "train.h"

#include <math.h>

static fl_model *model;
static fl_context *ctx;

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static float frand(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}

/* A sample of n tokens from a fixed pseudo-random text. */
static fl_sample make_sample(int32_t *tok, int32_t *lab, int n, int vocab) {
    for (int i = 0; i < n; i++) tok[i] = 3 + (i * 131 + 17) % (vocab - 3);
    for (int i = 0; i < n; i++) lab[i] = i + 1 < n ? tok[i + 1] : -1;
    lab[2] = -1; /* a position without loss */
    fl_sample s = {tok, lab, n};
    return s;
}

/* An adapter on every linear with B random too, so A's gradients are not zero. */
static fl_adapter *make_adapter(int rank, float dropout) {
    fl_lora_params lp = fl_lora_default_params();
    lp.rank = rank;
    lp.alpha = 2.0f * rank;
    lp.targets = FL_LORA_ALL_LINEARS;
    lp.dropout = dropout;
    lp.seed = 11;
    fl_adapter *a = fl_adapter_new(model, &lp);
    for (size_t i = 0; a && i < a->n_params; i++) a->params[i] += 0.2f * frand();
    return a;
}

static double loss_of(fl_adapter *a, const fl_sample *s, const fl_train_params *tp) {
    fl_train_sample *t = fl_train_begin(ctx, a, s, tp);
    if (!t) return NAN;
    while (fl_train_forwarded(t) < s->n)
        if (fl_train_forward(ctx, t, 1000) <= 0) break;
    double l = fl_train_loss(t);
    fl_train_end(ctx, t);
    return l;
}

/* One sample forward (chunks of fwd) and backward (chunks of bwd); grads summed into a. */
static int run_sample(fl_adapter *a, const fl_sample *s, const fl_train_params *tp, int fwd,
                      int bwd, double *loss) {
    fl_train_sample *t = fl_train_begin(ctx, a, s, tp);
    if (!t) return -1;
    int ok = 1;
    while (ok && fl_train_forwarded(t) < s->n) ok = fl_train_forward(ctx, t, fwd) > 0;
    while (ok && fl_train_backward_left(t) > 0) ok = fl_train_backward(ctx, t, bwd) > 0;
    if (loss) *loss = fl_train_loss(t);
    fl_train_end(ctx, t);
    return ok ? 0 : -1;
}

/* Forward chunks of fwd tokens, each in one batch with a decode token and a 3-token
 * prefill chunk of two inference sequences. */
static int run_mixed(fl_adapter *a, fl_adapter *served, const fl_sample *s, int fwd) {
    fl_train_sample *t = fl_train_begin(ctx, a, s, NULL);
    int sb = fl_seq_new(ctx), sc = fl_seq_new(ctx), lb = 0, lc = 0, ok = t && sb >= 0 && sc >= 0;
    int32_t tk[128], sq[128], ps[128];
    int8_t want[128];
    const fl_adapter *ad[128];
    float *logits = malloc(sizeof(float) * 2 * fl_model_config(model)->vocab_size);
    while (ok && fl_train_forwarded(t) < s->n) {
        int n = 0, done = fl_train_forwarded(t);
        int take = s->n - done < fwd ? s->n - done : fwd;
        tk[n] = 5 + lb % 50, sq[n] = sb, ps[n] = lb++, want[n] = 1, ad[n++] = served;
        for (int j = 0; j < take; j++)
            tk[n] = s->tokens[done + j], sq[n] = fl_train_seq(t), ps[n] = done + j, want[n] = 0,
            ad[n++] = NULL;
        for (int j = 0; j < 3; j++) tk[n] = 9 + lc % 40, sq[n] = sc, ps[n] = lc++, want[n] = 0, ad[n++] = a;
        fl_batch b = {.n_tokens = n, .token = tk, .seq = sq, .pos = ps, .logits = want, .adapter = ad};
        ok = fl_forward(ctx, &b, logits) == 1;
    }
    while (ok && fl_train_backward_left(t) > 0) ok = fl_train_backward(ctx, t, 9) > 0;
    free(logits);
    if (t) fl_train_end(ctx, t);
    if (sb >= 0) fl_seq_free(ctx, sb);
    if (sc >= 0) fl_seq_free(ctx, sc);
    return ok ? 0 : -1;
}

static double max_rel_diff(const float *x, const float *y, size_t n) {
    double scale = 0, d = 0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs(y[i]));
    for (size_t i = 0; i < n; i++) d = fmax(d, fabs((double)x[i] - y[i]));
    return scale > 0 ? d / scale : d;
}

static void test_finite_differences(float dropout) {
    int32_t tok[12], lab[12];
    fl_sample s = make_sample(tok, lab, 12, fl_model_config(model)->vocab_size);
    fl_adapter *a = make_adapter(2, dropout);
    fl_train_params tp = fl_train_default_params();
    tp.dropout_step = 3;
    double loss;
    memset(a->grads, 0, sizeof(float) * a->n_params);
    if (!tap_ok(run_sample(a, &s, &tp, 5, 4, &loss) == 0, "forward and backward run (%s)",
                fl_last_error()))
        return;
    /* Central differences on the mean loss, in fp32 forwards, Richardson-extrapolated
     * from steps eps and 2 eps so the eps^2 error cancels (the LoRA scale makes some
     * directions strongly curved). The loss (~6) is exact to ~1e-6, which the quotient
     * turns into noise of up to ~4e-4 (the tail over 11560 elements): each must agree to 5%
     * plus that floor, and the whole gradient to 1% in L2. */
    const float eps = 1e-2f;
    const double floor_abs = 5e-4;
    double err2 = 0, ref2 = 0, worst = 0, worst_fd = 0, worst_an = 0, max_abs = 0;
    size_t n = a->n_params, checked = 0, worst_i = 0;
    /* Every parameter without dropout; with it (and under the sanitizers) a subset. */
    size_t step = dropout > 0 ? 5 : 1;
#if defined(__SANITIZE_ADDRESS__)
    step *= 7;
#endif
    for (size_t i = 0; i < n; i += step) {
        float keep = a->params[i];
        double d[2];
        for (int k = 0; k < 2; k++) {
            float h = eps * (k + 1);
            a->params[i] = keep + h;
            double lp = loss_of(a, &s, &tp);
            a->params[i] = keep - h;
            double lm = loss_of(a, &s, &tp);
            d[k] = (lp - lm) / (2 * (double)h);
        }
        a->params[i] = keep;
        double fd = (4 * d[0] - d[1]) / 3, an = a->grads[i];
        err2 += (fd - an) * (fd - an);
        ref2 += an * an;
        double e = fabs(fd - an) / (0.05 * fabs(an) + floor_abs);
        if (e > worst) worst = e, worst_i = i, worst_fd = fd, worst_an = an;
        max_abs = fmax(max_abs, fabs(fd - an));
        checked++;
    }
    tap_diag("worst parameter %zu: finite difference %.6e, analytic %.6e", worst_i, worst_fd,
             worst_an);
    double rel = sqrt(err2 / ref2);
    tap_ok(rel < 1e-2 && worst <= 1.0,
           "stories260K, LoRA r2 on all linears%s: finite differences match the gradient of "
           "%zu checked parameters (of %zu): relative L2 error %.2e, largest |fd-an| %.1e, "
           "worst |fd-an| / (5%% |an| + %.0e) = %.2f",
           dropout > 0 ? " with dropout 0.1" : "", checked, n, rel, max_abs, floor_abs, worst);
    fl_adapter_free(a);
}

static void test_chunk_invariance(void) {
    int32_t tok[100], lab[100];
    fl_sample s = make_sample(tok, lab, 100, fl_model_config(model)->vocab_size);
    fl_adapter *a = make_adapter(4, 0.0f);
    size_t n = a->n_params;
    float *ref = malloc(sizeof(float) * n);
    memset(a->grads, 0, sizeof(float) * n);
    run_sample(a, &s, NULL, 100, 100, NULL);
    memcpy(ref, a->grads, sizeof(float) * n);
    int chunks[] = {1, 7, 64};
    for (int i = 0; i < 3; i++) {
        memset(a->grads, 0, sizeof(float) * n);
        int rc = run_sample(a, &s, NULL, chunks[i], chunks[i], NULL);
        double d = max_rel_diff(a->grads, ref, n);
        tap_ok(rc == 0 && d <= 1e-5,
               "forward and backward in chunks of %d give the whole-sample gradients (max "
               "relative diff %.1e)", chunks[i], d);
    }
    memset(a->grads, 0, sizeof(float) * n);
    fl_adapter *served = make_adapter(3, 0.0f);
    int rc = run_mixed(a, served, &s, 7);
    double d = max_rel_diff(a->grads, ref, n);
    tap_ok(rc == 0 && d <= 1e-5,
           "forward chunks of 7 sharing batches with 2 inference sequences (one using the "
           "adapter being trained) give the same gradients (max relative diff %.1e; %s)", d,
           rc ? fl_last_error() : "ok");

    /* Pruning is honest: NaN everywhere the plan does not keep, same gradients. */
    fl_context_poison_scratch(ctx, 1);
    memset(a->grads, 0, sizeof(float) * n);
    rc = run_sample(a, &s, NULL, 13, 11, NULL);
    fl_context_poison_scratch(ctx, 0);
    int finite = 1;
    for (size_t i = 0; i < n; i++) finite &= isfinite(a->grads[i]);
    d = max_rel_diff(a->grads, ref, n);
    tap_ok(rc == 0 && finite && d <= 1e-5,
           "with every unkept forward buffer overwritten by NaN after each forward, gradients "
           "stay finite and equal (max relative diff %.1e)", d);

    fl_train_params tp = fl_train_default_params();
    tp.remat_q = tp.remat_gate_up = 1;
    memset(a->grads, 0, sizeof(float) * n);
    rc = run_sample(a, &s, &tp, 64, 64, NULL);
    d = max_rel_diff(a->grads, ref, n);
    tap_ok(rc == 0 && d <= 1e-5,
           "recomputing Q and gate/up instead of keeping them gives the same gradients (%.1e)", d);

    fl_plan plan;
    fl_plan_params pp = {.targets = FL_LORA_ALL_LINEARS, .rank = 4};
    fl_plan_make(fl_model_config(model), &pp, 100, &plan);
    fl_train_sample *t = fl_train_begin(ctx, a, &s, NULL);
    /* Where the sample's last arena region (the final-hidden gradient, after the kept
     * activations and the dK/dV accumulators) ends: the layout train.c builds, against
     * the size plan.c predicts from its own formula. */
    size_t used = t ? (size_t)((char *)(t->dfinal + (size_t)100 * fl_model_config(model)->dim) -
                               (char *)t->arena)
                    : 0;
    tap_ok(t && used == fl_plan_arena_bytes(&plan, 100) && fl_train_arena_bytes(t) == used,
           "the training arena's regions end at exactly the planner's %zu bytes for 100 tokens "
           "(%zu used)", fl_plan_arena_bytes(&plan, 100), used);
    fl_train_end(ctx, t);
    tap_ok(fl_kv_pages_free(ctx) == fl_kv_pages_total(ctx), "every KV page is back");
    free(ref);
    fl_adapter_free(a);
    fl_adapter_free(served);
}

int main(void) {
    const char *dir = tap_shared("models/stories260K");
    if (!dir) {
        tap_skip("training tests: ../shared/models/stories260K absent (set FLEXLLM_SHARED)");
        return tap_done();
    }
    model = fl_model_load(dir, NULL);
    fl_context_params cp = fl_context_default_params();
    cp.max_batch_tokens = 128;
    ctx = fl_context_new(model, &cp);
    if (!tap_ok(model && ctx, "stories260K loads")) return tap_done();
    test_finite_differences(0.0f);
    test_finite_differences(0.1f);
    test_chunk_invariance();
    fl_context_free(ctx);
    fl_model_free(model);
    return tap_done();
}
