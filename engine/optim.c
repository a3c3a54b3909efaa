/* Optimizers over one flat fp32 parameter vector: AdamW and SGD with momentum, with
 * PyTorch's update rules, gradient accumulation (mean), global-norm clipping and a
 * warmup + constant/cosine schedule. State saves to safetensors for checkpoints. */
#include "fl_internal.h"
#include "safetensors.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The norm sums squares per block of this many floats, then adds the blocks in order:
 * the same result for any thread count, so runs and resumed runs stay bitwise equal. */
#define NORM_BLOCK 65536

struct fl_optimizer {
    fl_optim_params p;
    size_t n;
    int step;       /* updates done */
    float *m, *v;   /* AdamW: exp_avg, exp_avg_sq. SGD: m is the momentum buffer */
    double *partial; /* [n_blocks] sums of squares */
    size_t n_blocks;
};

fl_optim_params fl_optim_default_params(void) {
    fl_optim_params p = {.kind = FL_OPT_ADAMW, .lr = 2e-4f, .beta1 = 0.9f, .beta2 = 0.999f,
                         .eps = 1e-8f, .weight_decay = 0.0f, .momentum = 0.9f,
                         .clip_norm = 1.0f, .warmup_steps = 0, .total_steps = 0,
                         .schedule = FL_SCHEDULE_CONSTANT, .min_lr_ratio = 0.0f};
    return p;
}

static int check_params(const fl_optim_params *p) {
    if (p->kind != FL_OPT_ADAMW && p->kind != FL_OPT_SGD)
        return fl_error("optimizer: unknown kind %d", (int)p->kind);
    if (!(p->lr >= 0.0f && isfinite(p->lr)))
        return fl_error("optimizer: lr %g must be finite and >= 0", (double)p->lr);
    if (!(p->beta1 >= 0.0f && p->beta1 < 1.0f))
        return fl_error("optimizer: beta1 %g must be in [0, 1)", (double)p->beta1);
    if (!(p->beta2 >= 0.0f && p->beta2 < 1.0f))
        return fl_error("optimizer: beta2 %g must be in [0, 1)", (double)p->beta2);
    if (!(p->eps > 0.0f)) return fl_error("optimizer: eps %g must be > 0", (double)p->eps);
    if (!(p->weight_decay >= 0.0f && isfinite(p->weight_decay)))
        return fl_error("optimizer: weight_decay %g must be >= 0", (double)p->weight_decay);
    if (!(p->momentum >= 0.0f && p->momentum < 1.0f))
        return fl_error("optimizer: momentum %g must be in [0, 1)", (double)p->momentum);
    if (!(p->clip_norm >= 0.0f))
        return fl_error("optimizer: clip_norm %g must be >= 0 (0: off)", (double)p->clip_norm);
    if (p->warmup_steps < 0 || p->total_steps < 0)
        return fl_error("optimizer: warmup_steps %d and total_steps %d must be >= 0",
                        p->warmup_steps, p->total_steps);
    if (p->schedule != FL_SCHEDULE_CONSTANT && p->schedule != FL_SCHEDULE_COSINE)
        return fl_error("optimizer: unknown schedule %d", (int)p->schedule);
    if (p->schedule == FL_SCHEDULE_COSINE && p->total_steps <= p->warmup_steps)
        return fl_error("optimizer: the cosine schedule needs total_steps (%d) > warmup_steps (%d)",
                        p->total_steps, p->warmup_steps);
    if (!(p->min_lr_ratio >= 0.0f && p->min_lr_ratio <= 1.0f))
        return fl_error("optimizer: min_lr_ratio %g must be in [0, 1]", (double)p->min_lr_ratio);
    return 0;
}

fl_optimizer *fl_optimizer_new(size_t n_params, const fl_optim_params *params) {
    fl_optim_params p = params ? *params : fl_optim_default_params();
    if (check_params(&p)) return NULL;
    if (n_params == 0) {
        fl_error("optimizer: no parameters");
        return NULL;
    }
    fl_optimizer *opt = fl_calloc(1, sizeof *opt);
    if (!opt) return NULL;
    opt->p = p;
    opt->n = n_params;
    opt->n_blocks = (n_params + NORM_BLOCK - 1) / NORM_BLOCK;
    opt->m = fl_calloc(n_params, sizeof(float));
    opt->v = p.kind == FL_OPT_ADAMW ? fl_calloc(n_params, sizeof(float)) : NULL;
    opt->partial = fl_malloc(opt->n_blocks * sizeof(double));
    if (!opt->m || (p.kind == FL_OPT_ADAMW && !opt->v) || !opt->partial) {
        fl_optimizer_free(opt);
        return NULL;
    }
    return opt;
}

void fl_optimizer_free(fl_optimizer *opt) {
    if (!opt) return;
    free(opt->m);
    free(opt->v);
    free(opt->partial);
    free(opt);
}

/* Linear warmup from lr/warmup to lr, then constant or cosine down to lr*min_lr_ratio
 * at total_steps (and flat after it). */
static double schedule_lr(const fl_optim_params *p, int step) {
    if (step < p->warmup_steps) return (double)p->lr * (step + 1.0) / p->warmup_steps;
    if (p->schedule != FL_SCHEDULE_COSINE) return p->lr;
    double progress = (double)(step - p->warmup_steps) / (p->total_steps - p->warmup_steps);
    if (progress > 1.0) progress = 1.0;
    double lo = p->min_lr_ratio;
    return (double)p->lr * (lo + (1.0 - lo) * 0.5 * (1.0 + cos(M_PI * progress)));
}

float fl_optimizer_lr(const fl_optimizer *opt) { return (float)schedule_lr(&opt->p, opt->step); }
int fl_optimizer_steps(const fl_optimizer *opt) { return opt->step; }

static double grad_norm(fl_optimizer *opt, const float *g) {
    size_t n = opt->n;
    #pragma omp parallel for schedule(static) if (opt->n_blocks > 1)
    for (size_t b = 0; b < opt->n_blocks; b++) {
        size_t end = (b + 1) * NORM_BLOCK < n ? (b + 1) * NORM_BLOCK : n;
        double s = 0.0;
        for (size_t i = b * NORM_BLOCK; i < end; i++) s += (double)g[i] * g[i];
        opt->partial[b] = s;
    }
    double s = 0.0;
    for (size_t b = 0; b < opt->n_blocks; b++) s += opt->partial[b];
    return sqrt(s);
}

/* torch.optim.AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), bias corrections bc = 1 - beta^t. */
static void adamw_update(fl_optimizer *opt, float *params, const float *grads, float gscale,
                         double lr) {
    const fl_optim_params *p = &opt->p;
    int t = opt->step + 1;
    float b1 = p->beta1, b2 = p->beta2, eps = p->eps;
    float step_size = (float)(lr / (1.0 - pow(p->beta1, t)));
    float bc2_sqrt = (float)sqrt(1.0 - pow(p->beta2, t));
    float decay = (float)(1.0 - lr * p->weight_decay);
    float *m = opt->m, *v = opt->v;
    #pragma omp parallel for schedule(static) if (opt->n > NORM_BLOCK)
    for (size_t i = 0; i < opt->n; i++) {
        float g = grads[i] * gscale;
        m[i] = b1 * m[i] + (1.0f - b1) * g;
        v[i] = b2 * v[i] + (1.0f - b2) * g * g;
        params[i] = params[i] * decay - step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
    }
}

/* torch.optim.SGD (dampening 0, no Nesterov): g += wd p (L2, as torch's SGD does);
 * buf = g on the first step, momentum buf + g after; p -= lr buf. */
static void sgd_update(fl_optimizer *opt, float *params, const float *grads, float gscale,
                       double lr) {
    float mom = opt->step == 0 ? 0.0f : opt->p.momentum, wd = opt->p.weight_decay;
    float lr_f = (float)lr, *buf = opt->m;
    #pragma omp parallel for schedule(static) if (opt->n > NORM_BLOCK)
    for (size_t i = 0; i < opt->n; i++) {
        float g = grads[i] * gscale + wd * params[i];
        buf[i] = mom * buf[i] + g;
        params[i] -= lr_f * buf[i];
    }
}

float fl_optimizer_step(fl_optimizer *opt, float *params, float *grads, int n_accumulated) {
    if (n_accumulated < 1) {
        fl_error("optimizer: n_accumulated %d must be >= 1", n_accumulated);
        return -1.0f;
    }
    double norm = grad_norm(opt, grads) / n_accumulated;
    if (!isfinite(norm)) {
        fl_error("optimizer step %d: gradient norm is not finite", opt->step);
        return -1.0f;
    }
    double scale = 1.0 / n_accumulated;
    if (opt->p.clip_norm > 0.0f && norm > opt->p.clip_norm) scale *= opt->p.clip_norm / norm;
    double lr = schedule_lr(&opt->p, opt->step);
    if (opt->p.kind == FL_OPT_ADAMW) adamw_update(opt, params, grads, (float)scale, lr);
    else sgd_update(opt, params, grads, (float)scale, lr);
    memset(grads, 0, opt->n * sizeof *grads);
    opt->step++;
    return (float)norm;
}

/* ------------------------------------------------------------ checkpoints */

static const char *kind_name(fl_optimizer_kind k) { return k == FL_OPT_SGD ? "sgd" : "adamw"; }
/* The tensor of m, named as in torch's optimizer state. */
static const char *m_name(fl_optimizer_kind k) {
    return k == FL_OPT_SGD ? "momentum_buffer" : "exp_avg";
}

int fl_optimizer_save(const fl_optimizer *opt, const char *path) {
    const fl_optim_params *p = &opt->p;
    /* Every hyper-parameter goes in, so a checkpoint says how it was trained. */
    char num[12][32];
    snprintf(num[0], sizeof num[0], "%d", opt->step);
    snprintf(num[1], sizeof num[1], "%zu", opt->n);
    const float f[] = {p->lr, p->beta1, p->beta2, p->eps, p->weight_decay, p->momentum,
                       p->clip_norm, p->min_lr_ratio};
    for (int i = 0; i < 8; i++) snprintf(num[2 + i], sizeof num[0], "%.9g", (double)f[i]);
    snprintf(num[10], sizeof num[0], "%d", p->warmup_steps);
    snprintf(num[11], sizeof num[0], "%d", p->total_steps);
    const char *keys[] = {"format", "kind", "step", "n_params", "lr", "beta1", "beta2", "eps",
                          "weight_decay", "momentum", "clip_norm", "min_lr_ratio",
                          "warmup_steps", "total_steps", "schedule"};
    const char *vals[] = {"flexllm-optimizer", kind_name(p->kind), num[0], num[1], num[2],
                          num[3], num[4], num[5], num[6], num[7], num[8], num[9], num[10], num[11],
                          p->schedule == FL_SCHEDULE_COSINE ? "cosine" : "constant"};
    fl_st_tensor t[2] = {
        {.name = m_name(p->kind), .dtype = FL_DTYPE_F32,
         .ndim = 1, .shape = {(int64_t)opt->n}, .data = opt->m},
        {.name = "exp_avg_sq", .dtype = FL_DTYPE_F32, .ndim = 1, .shape = {(int64_t)opt->n},
         .data = opt->v},
    };
    return fl_st_write(path, t, p->kind == FL_OPT_ADAMW ? 2 : 1, keys, vals,
                       (int)(sizeof keys / sizeof *keys));
}

static const char *meta_str(const fl_st_set *set, const char *key) {
    const char *v = fl_st_metadata(set, key);
    return v ? v : "";
}

/* Checks the file against this optimizer: format, kind, sizes; the step count out. */
static int check_state(const fl_optimizer *opt, const char *path, const fl_st_set *set,
                       int *step) {
    if (strcmp(meta_str(set, "format"), "flexllm-optimizer"))
        return fl_error("%s: not an optimizer state (format '%s')", path, meta_str(set, "format"));
    const char *kind = meta_str(set, "kind");
    if (strcmp(kind, kind_name(opt->p.kind)))
        return fl_error("%s: optimizer kind '%s', this optimizer is %s", path, kind,
                        kind_name(opt->p.kind));
    char *end;
    const char *s = meta_str(set, "n_params");
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    if (!*s || *end || errno || n != opt->n)
        return fl_error("%s: state for %s parameters, this optimizer has %zu", path, s, opt->n);
    s = meta_str(set, "step");
    long st = strtol(s, &end, 10);
    if (!*s || *end || st < 0 || st > INT32_MAX)
        return fl_error("%s: bad step count '%s'", path, s);
    *step = (int)st;
    const char *names[2] = {m_name(opt->p.kind), "exp_avg_sq"};
    for (int i = 0; i < (opt->v ? 2 : 1); i++) {
        const fl_st_tensor *t = fl_st_find(set, names[i]);
        if (!t) return fl_error("%s: tensor '%s' missing", path, names[i]);
        if (t->dtype != FL_DTYPE_F32 || t->ndim != 1 || (uint64_t)t->numel != opt->n)
            return fl_error("%s: tensor '%s' must be F32 [%zu]", path, names[i], opt->n);
    }
    return 0;
}

int fl_optimizer_load(fl_optimizer *opt, const char *path) {
    fl_st_set *set = fl_st_open(path);
    if (!set) return -1;
    int step = 0;
    int rc = check_state(opt, path, set, &step);
    if (!rc) {
        fl_st_to_f32(fl_st_find(set, m_name(opt->p.kind)), opt->m);
        if (opt->v) fl_st_to_f32(fl_st_find(set, "exp_avg_sq"), opt->v);
        opt->step = step;
    }
    fl_st_close(set);
    return rc;
}
