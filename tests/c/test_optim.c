/* Optimizer tests: AdamW and SGD against a float64 re-implementation of PyTorch's update
 * rules (weight decay, clipping, warmup + cosine), accumulation, clipping, non-finite
 * gradients, checkpoint round trips (bitwise), refused checkpoints, a toy convergence. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flexllm.h"
#include "tap.h"

#define N 1000

static uint64_t rng = 0x2545F4914F6CDD1DULL;

static double uniform(void) { /* [-1, 1) */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (double)((rng * 0x2545F4914F6CDD1DULL) >> 11) / 4503599627370496.0 - 1.0;
}

/* Gradients with global norm about `norm`. */
static void random_grads(float *g, size_t n, double norm) {
    for (size_t i = 0; i < n; i++) g[i] = (float)(uniform() * norm * sqrt(3.0 / (double)n));
}

/* ------------------------------------------------ float64 PyTorch reference */

typedef struct {
    double p[N], m[N], v[N];
    int t;
} ref_state;

static double ref_lr(const fl_optim_params *o, int step) {
    if (step < o->warmup_steps) return o->lr * (double)(step + 1) / o->warmup_steps;
    if (o->schedule == FL_SCHEDULE_CONSTANT) return o->lr;
    double x = fmin(1.0, (double)(step - o->warmup_steps) / (o->total_steps - o->warmup_steps));
    return o->lr * (o->min_lr_ratio + (1 - o->min_lr_ratio) * (1 + cos(3.14159265358979323846 * x)) / 2);
}

/* torch.nn.utils.clip_grad_norm_ (as the brief states it) + torch.optim.AdamW / SGD. */
static double ref_step(const fl_optim_params *o, ref_state *r, const float *sum, int n_acc) {
    double g[N], sq = 0;
    for (int i = 0; i < N; i++) {
        g[i] = (double)sum[i] / n_acc;
        sq += g[i] * g[i];
    }
    double norm = sqrt(sq);
    if (o->clip_norm > 0 && norm > o->clip_norm)
        for (int i = 0; i < N; i++) g[i] *= o->clip_norm / norm;
    double lr = ref_lr(o, r->t);
    r->t++;
    for (int i = 0; i < N; i++) {
        if (o->kind == FL_OPT_ADAMW) {
            r->p[i] *= 1 - lr * o->weight_decay;
            r->m[i] = o->beta1 * r->m[i] + (1 - o->beta1) * g[i];
            r->v[i] = o->beta2 * r->v[i] + (1 - o->beta2) * g[i] * g[i];
            double mhat = r->m[i] / (1 - pow(o->beta1, r->t));
            double vhat = r->v[i] / (1 - pow(o->beta2, r->t));
            r->p[i] -= lr * mhat / (sqrt(vhat) + o->eps);
        } else {
            double d = g[i] + o->weight_decay * r->p[i];
            r->m[i] = r->t == 1 ? d : o->momentum * r->m[i] + d;
            r->p[i] -= lr * r->m[i];
        }
    }
    return norm;
}

/* max |a - b| / max(|b|, 0.01) */
static double max_rel(const float *a, const double *b) {
    double worst = 0;
    for (int i = 0; i < N; i++) worst = fmax(worst, fabs(a[i] - b[i]) / fmax(fabs(b[i]), 0.01));
    return worst;
}

/* Runs the engine and the reference side by side for `steps` steps. */
static void against_reference(const char *label, const fl_optim_params *o, int steps, int n_acc) {
    static ref_state r;
    static float p[N], g[N];
    memset(&r, 0, sizeof r);
    for (int i = 0; i < N; i++) r.p[i] = p[i] = (float)uniform();
    fl_optimizer *opt = fl_optimizer_new(N, o);
    if (!tap_ok(opt != NULL, "%s: created: %s", label, opt ? "ok" : fl_last_error())) return;
    double worst = 0, worst_norm = 0, worst_lr = 0;
    int zeroed = 1, clipped = 0;
    for (int s = 0; s < steps; s++) {
        random_grads(g, N, (s % 3 == 0 ? 3.0 : 0.4) * n_acc); /* every third step clips */
        worst_lr = fmax(worst_lr, fabs(fl_optimizer_lr(opt) - ref_lr(o, s)) / ref_lr(o, s));
        double want = ref_step(o, &r, g, n_acc);
        clipped += o->clip_norm > 0 && want > o->clip_norm;
        float got = fl_optimizer_step(opt, p, g, n_acc);
        worst_norm = fmax(worst_norm, fabs(got - want) / want);
        worst = fmax(worst, max_rel(p, r.p));
        for (int i = 0; i < N; i++) zeroed &= g[i] == 0.0f;
    }
    tap_ok(worst < 1e-5, "%s: params match float64 PyTorch rules over %d steps (%d clipped), max rel %.2g",
           label, steps, clipped, worst);
    tap_ok(worst_norm < 1e-6 && worst_lr < 1e-6 && zeroed && fl_optimizer_steps(opt) == steps,
           "%s: returned pre-clip norms and scheduled lr match, grads zeroed, %d steps counted", label,
           fl_optimizer_steps(opt));
    fl_optimizer_free(opt);
}

static fl_optim_params adamw_params(void) {
    fl_optim_params o = fl_optim_default_params();
    o.lr = 1e-2f;
    o.weight_decay = 0.1f;
    o.clip_norm = 1.0f;
    o.warmup_steps = 3;
    o.total_steps = 10;
    o.schedule = FL_SCHEDULE_COSINE;
    o.min_lr_ratio = 0.1f;
    return o;
}

static void test_defaults_and_schedule(void) {
    fl_optim_params d = fl_optim_default_params();
    tap_ok(d.kind == FL_OPT_ADAMW && d.lr == 2e-4f && d.beta1 == 0.9f && d.beta2 == 0.999f &&
               d.eps == 1e-8f && d.weight_decay == 0 && d.momentum == 0.9f && d.clip_norm == 1.0f &&
               d.warmup_steps == 0 && d.total_steps == 0 && d.schedule == FL_SCHEDULE_CONSTANT &&
               d.min_lr_ratio == 0,
           "defaults: AdamW lr 2e-4, betas .9/.999, eps 1e-8, wd 0, momentum .9, clip 1, constant");

    fl_optim_params o = d;
    o.lr = 1.0f;
    o.warmup_steps = 4;
    o.total_steps = 12;
    o.schedule = FL_SCHEDULE_COSINE;
    o.min_lr_ratio = 0.1f;
    fl_optimizer *opt = fl_optimizer_new(4, &o);
    static const int at[] = {0, 3, 4, 8, 12, 20};
    static const float want[] = {0.25f, 1.0f, 1.0f, 0.55f, 0.1f, 0.1f};
    float p[4] = {0}, g[4] = {0};
    int ok = opt != NULL;
    for (int s = 0, k = 0; ok && s <= 20; s++) {
        if (s == at[k]) ok = fabsf(fl_optimizer_lr(opt) - want[k++]) < 1e-6f;
        fl_optimizer_step(opt, p, g, 1);
    }
    tap_ok(ok, "schedule: warmup (s+1)/4, then cosine to 0.1 at step 12 and flat after");
    fl_optimizer_free(opt);

    o = d;
    o.beta2 = 1.0f;
    tap_ok(!fl_optimizer_new(4, &o) && strstr(fl_last_error(), "beta2 1 must be in [0, 1)"),
           "a bad hyper-parameter is named: %s", fl_last_error());
    o = d;
    o.schedule = FL_SCHEDULE_COSINE;
    tap_ok(!fl_optimizer_new(4, &o) && strstr(fl_last_error(), "total_steps"),
           "cosine without total_steps is refused: %s", fl_last_error());
}

static void test_accumulation(void) {
    static float pa[N], pb[N], ga[N], gb[N];
    fl_optim_params o = adamw_params();
    fl_optimizer *a = fl_optimizer_new(N, &o), *b = fl_optimizer_new(N, &o);
    for (int i = 0; i < N; i++) pa[i] = pb[i] = (float)uniform();
    double worst = 0;
    float na = 0, nb = 0;
    for (int s = 0; s < 6; s++) {
        random_grads(ga, N, s % 2 ? 8.0 : 1.0);
        for (int i = 0; i < N; i++) gb[i] = ga[i] / 4;
        na = fl_optimizer_step(a, pa, ga, 4);
        nb = fl_optimizer_step(b, pb, gb, 1);
        for (int i = 0; i < N; i++) worst = fmax(worst, fabs(pa[i] - pb[i]) / fmax(fabsf(pb[i]), 0.01));
    }
    tap_ok(worst < 1e-6 && fabsf(na - nb) < 1e-6f * nb,
           "accumulation: sum over 4 with n_accumulated 4 == grads/4 with 1 (max rel %.2g)", worst);
    fl_optimizer_free(a);
    fl_optimizer_free(b);
}

/* Past one norm block (65536) the norm and update run on threads: AdamW's first step,
 * p (1 - lr wd) - lr g / (|g| + eps) with g clipped, on 200003 parameters. */
static void test_large(void) {
    size_t n = 200003;
    float *p = malloc(n * sizeof *p), *p0 = malloc(n * sizeof *p), *g = malloc(n * sizeof *g);
    double *g0 = malloc(n * sizeof *g0);
    fl_optim_params o = adamw_params();
    fl_optimizer *opt = fl_optimizer_new(n, &o);
    random_grads(g, n, 4.0);
    double sq = 0;
    for (size_t i = 0; i < n; i++) {
        p[i] = p0[i] = (float)uniform();
        g0[i] = g[i];
        sq += g0[i] * g0[i];
        g[i] *= 2.0f; /* summed over 2 samples */
    }
    double norm = sqrt(sq), scale = norm > o.clip_norm ? o.clip_norm / norm : 1.0;
    double lr = ref_lr(&o, 0), worst = 0;
    float got = fl_optimizer_step(opt, p, g, 2);
    for (size_t i = 0; i < n; i++) {
        double gi = g0[i] * scale;
        double want = p0[i] * (1 - lr * o.weight_decay) - lr * gi / (fabs(gi) + o.eps);
        worst = fmax(worst, fabs(p[i] - want) / fmax(fabs(want), 0.01));
    }
    tap_ok(fabs(got - norm) < 1e-6 * norm && worst < 1e-5,
           "large (%zu params, threaded): norm %.4f and first AdamW step match float64 (max rel %.2g)", n,
           got, worst);
    free(p);
    free(p0);
    free(g);
    free(g0);
    fl_optimizer_free(opt);
}

/* SGD, lr 1, no momentum: the update is exactly -(clipped gradient). */
static void test_clipping(void) {
    static float p[N], p0[N], g[N], g0[N];
    fl_optim_params o = fl_optim_default_params();
    o.kind = FL_OPT_SGD;
    o.lr = 1.0f;
    o.momentum = 0.0f;
    o.clip_norm = 1.0f;
    for (int k = 0; k < 2; k++) {
        double scale = k == 0 ? 5.0 : 0.5;
        fl_optimizer *opt = fl_optimizer_new(N, &o);
        random_grads(g, N, scale);
        memcpy(g0, g, sizeof g);
        for (int i = 0; i < N; i++) p[i] = p0[i] = (float)uniform();
        double gn = 0, dn = 0, dot = 0;
        for (int i = 0; i < N; i++) gn += (double)g0[i] * g0[i];
        gn = sqrt(gn);
        float norm = fl_optimizer_step(opt, p, g, 1);
        for (int i = 0; i < N; i++) {
            double d = (double)p0[i] - p[i];
            dn += d * d;
            dot += d * g0[i];
        }
        dn = sqrt(dn);
        double want = gn > 1.0 ? 1.0 : gn;
        tap_ok(fabs(norm - gn) < 1e-5 * gn && fabs(dn - want) < 1e-5 && fabs(dot / (dn * gn) - 1) < 1e-6,
               "clipping: grad norm %.3f -> update of norm %.6f along the gradient (want %.3f)", gn, dn, want);
        fl_optimizer_free(opt);
    }
}

static void test_non_finite(void) {
    static float p[N], p0[N], g[N], g0[N], q[N];
    fl_optim_params o = adamw_params();
    fl_optimizer *opt = fl_optimizer_new(N, &o), *fresh = fl_optimizer_new(N, &o);
    for (int i = 0; i < N; i++) q[i] = p[i] = p0[i] = (float)uniform();
    for (int k = 0; k < 2; k++) {
        random_grads(g, N, 1.0);
        g[N / 2] = k == 0 ? NAN : INFINITY;
        memcpy(g0, g, sizeof g);
        float r = fl_optimizer_step(opt, p, g, 2);
        tap_ok(r == -1.0f && !memcmp(p, p0, sizeof p) && !memcmp(g, g0, sizeof g) &&
                   fl_optimizer_steps(opt) == 0 && strstr(fl_last_error(), "not finite"),
               "a%s gradient: returns -1, params, grads and step count untouched (%s)",
               k == 0 ? " NaN" : "n Inf", fl_last_error());
    }
    random_grads(g, N, 1.0);
    memcpy(g0, g, sizeof g);
    tap_ok(fl_optimizer_step(opt, p, g, 0) == -1.0f && !memcmp(g, g0, sizeof g) &&
               strstr(fl_last_error(), "n_accumulated 0 must be >= 1"),
           "n_accumulated 0 is refused: %s", fl_last_error());
    fl_optimizer_step(opt, p, g, 1);
    fl_optimizer_step(fresh, q, g0, 1);
    tap_ok(!memcmp(p, q, sizeof p), "after refused steps the moments are as new (bitwise same next step)");
    fl_optimizer_free(opt);
    fl_optimizer_free(fresh);
}

/* Save after 5 steps, load into a new optimizer: the next steps are bitwise the same. */
static void check_resume(const char *dir, fl_optimizer_kind kind) {
    static float p[N], q[N], g[N], h[N];
    fl_optim_params o = adamw_params();
    o.kind = kind;
    const char *name = kind == FL_OPT_SGD ? "sgd" : "adamw";
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s.safetensors", dir, name) >= (int)sizeof path) return;
    fl_optimizer *a = fl_optimizer_new(N, &o), *b = fl_optimizer_new(N, &o);
    for (int i = 0; i < N; i++) p[i] = (float)uniform();
    for (int s = 0; s < 5; s++) {
        random_grads(g, N, 2.0);
        fl_optimizer_step(a, p, g, 1);
    }
    int saved = fl_optimizer_save(a, path);
    int loaded = saved == 0 ? fl_optimizer_load(b, path) : -1;
    if (!tap_ok(saved == 0 && loaded == 0, "%s: state saves and loads: %s", name,
                saved || loaded ? fl_last_error() : "ok"))
        return;
    memcpy(q, p, sizeof p);
    int same = fl_optimizer_steps(b) == 5 && fl_optimizer_lr(a) == fl_optimizer_lr(b);
    for (int s = 0; s < 4; s++) {
        random_grads(g, N, 2.0);
        memcpy(h, g, sizeof g);
        same &= fl_optimizer_step(a, p, g, 1) == fl_optimizer_step(b, q, h, 1);
        same &= !memcmp(p, q, sizeof p);
    }
    tap_ok(same, "%s: the loaded optimizer continues bitwise like the original (step 5, 4 more steps)", name);
    fl_optimizer_free(a);
    fl_optimizer_free(b);
}

static void test_checkpoints(void) {
    const char *dir = tap_tmpdir("optim");
    if (!dir) {
        tap_skip("checkpoints: no scratch directory");
        return;
    }
    check_resume(dir, FL_OPT_ADAMW);
    check_resume(dir, FL_OPT_SGD);

    char path[4096];
    if (snprintf(path, sizeof path, "%s/adamw.safetensors", dir) >= (int)sizeof path) return;
    fl_optim_params o = adamw_params();
    fl_optimizer *small = fl_optimizer_new(N - 1, &o);
    tap_ok(fl_optimizer_load(small, path) < 0 && strstr(fl_last_error(), path) &&
               strstr(fl_last_error(), "state for 1000 parameters, this optimizer has 999"),
           "a state of another size is refused, naming the file: %s", fl_last_error());
    fl_optimizer_free(small);
    o.kind = FL_OPT_SGD;
    fl_optimizer *sgd = fl_optimizer_new(N, &o);
    tap_ok(fl_optimizer_load(sgd, path) < 0 && strstr(fl_last_error(), "kind 'adamw', this optimizer is sgd"),
           "a state of another kind is refused: %s", fl_last_error());
    if (snprintf(path, sizeof path, "%s/junk.safetensors", dir) >= (int)sizeof path) return;
    tap_write_text(path, "not a safetensors file");
    tap_ok(fl_optimizer_load(sgd, path) < 0 && strstr(fl_last_error(), path) && fl_optimizer_steps(sgd) == 0,
           "a broken file is refused, naming it: %s", fl_last_error());
    fl_optimizer_free(sgd);
}

/* AdamW on 0.5 sum a_i (p_i - c_i)^2 with a cosine decay: the loss drops 100x. */
static void test_convergence(void) {
    static float p[N], g[N];
    static double a[N], c[N];
    fl_optim_params o = fl_optim_default_params();
    o.lr = 0.05f;
    o.total_steps = 100;
    o.schedule = FL_SCHEDULE_COSINE;
    o.clip_norm = 0;
    fl_optimizer *opt = fl_optimizer_new(N, &o);
    for (int i = 0; i < N; i++) {
        a[i] = 1.25 + 0.75 * uniform();
        c[i] = uniform();
        p[i] = 0;
    }
    double first = 0, loss = 0;
    for (int s = 0; s <= o.total_steps; s++) {
        loss = 0;
        for (int i = 0; i < N; i++) {
            double d = p[i] - c[i];
            loss += 0.5 * a[i] * d * d;
            g[i] = (float)(a[i] * d);
        }
        if (s == 0) first = loss;
        if (s < o.total_steps) fl_optimizer_step(opt, p, g, 1);
    }
    tap_ok(loss * 100 < first, "convergence: AdamW takes a quadratic from %.3g to %.3g in %d steps (%.0fx)",
           first, loss, o.total_steps, first / loss);
    fl_optimizer_free(opt);
}

int main(void) {
    test_defaults_and_schedule();

    fl_optim_params o = adamw_params();
    against_reference("adamw (wd, clip, warmup + cosine)", &o, 14, 1);
    o = fl_optim_default_params();
    o.lr = 3e-3f;
    o.beta1 = 0.8f;
    o.beta2 = 0.95f;
    o.clip_norm = 0;
    against_reference("adamw (constant, no clip, 3 accumulated)", &o, 8, 3);
    o = adamw_params();
    o.kind = FL_OPT_SGD;
    o.lr = 0.05f;
    o.weight_decay = 0.01f;
    against_reference("sgd (momentum, wd, clip, warmup + cosine)", &o, 14, 2);

    test_large();
    test_accumulation();
    test_clipping();
    test_non_finite();
    test_checkpoints();
    test_convergence();
    return tap_done();
}
