/* Plan validation, the fallback plan and the cost model (see scheduler.h). */
#include "scheduler.h"
#include "fl_internal.h"
#include "policy.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FORGET 0.995 /* weight of the past per observation: ~200 iterations of memory */
#define RIDGE 1e-9   /* keeps unseen kinds' coefficients at zero instead of undefined */

static int check_items(const fl_sched_state *st, const fl_sched_plan *plan, char *seen,
                       long *tokens) {
    int pages = st->kv_pages_free, seqs = st->seqs_free;
    for (int i = 0; i < plan->n_items; i++) {
        const fl_sched_item *it = &plan->items[i];
        if (it->request < 0 || it->request >= st->n_requests)
            return fl_error("plan item %d: request index %d outside [0, %d)", i, it->request,
                            st->n_requests);
        if (seen[it->request]++)
            return fl_error("plan item %d: request %d appears twice", i, it->request);
        const fl_sched_request *r = &st->requests[it->request];
        if (r->state == FL_REQ_DECODE && it->tokens != 1)
            return fl_error("plan item %d: request %d is decoding and gets %d tokens (must be 1)",
                            i, r->id, it->tokens);
        if (r->state != FL_REQ_DECODE && (it->tokens < 1 || it->tokens > r->prompt_len - r->prefilled))
            return fl_error("plan item %d: request %d gets %d prompt tokens, %d are left", i,
                            r->id, it->tokens, r->prompt_len - r->prefilled);
        if (r->state == FL_REQ_WAITING) {
            int need = r->pages_needed - r->kv_pages;
            if (need > pages)
                return fl_error("plan item %d: admitting request %d needs %d KV pages, %d are "
                                "left", i, r->id, need, pages);
            if (seqs == 0)
                return fl_error("plan item %d: admitting request %d needs a sequence slot, none "
                                "is left", i, r->id);
            pages -= need;
            seqs--;
        }
        *tokens += it->tokens;
    }
    return 0;
}

static int check_ft(const fl_sched_state *st, const fl_sched_plan *plan, char *seen,
                    long *tokens) {
    for (int i = 0; i < plan->n_ft; i++) {
        const fl_sched_ft *f = &plan->ft[i];
        if (f->job < 0 || f->job >= st->n_jobs)
            return fl_error("plan finetuning entry %d: job index %d outside [0, %d)", i, f->job,
                            st->n_jobs);
        if (seen[f->job]++) return fl_error("plan finetuning entry %d: job %d appears twice", i, f->job);
        const fl_sched_job *j = &st->jobs[f->job];
        if (f->forward_tokens < 0 || f->backward_tokens < 0)
            return fl_error("plan finetuning entry %d: negative token count", i);
        if (f->forward_tokens &&
            (j->phase != FL_JOB_FORWARD || f->forward_tokens > j->sample_len - j->forwarded))
            return fl_error("plan finetuning entry %d: job %d gets %d forward tokens (phase %d, "
                            "%d left)", i, j->id, f->forward_tokens, j->phase,
                            j->sample_len - j->forwarded);
        if (f->backward_tokens &&
            (j->phase != FL_JOB_BACKWARD || f->backward_tokens > j->backward_left))
            return fl_error("plan finetuning entry %d: job %d gets %d backward tokens (phase %d, "
                            "%d left)", i, j->id, f->backward_tokens, j->phase, j->backward_left);
        *tokens += f->forward_tokens;
    }
    return 0;
}

int fl_sched_validate(const fl_sched_state *st, const fl_sched_plan *plan) {
    if (plan->n_items < 0 || plan->n_items > plan->cap_items || plan->n_ft < 0 ||
        plan->n_ft > plan->cap_ft)
        return fl_error("plan: %d items (capacity %d) and %d finetuning entries (capacity %d)",
                        plan->n_items, plan->cap_items, plan->n_ft, plan->cap_ft);
    char *seen = fl_calloc((size_t)st->n_requests + (size_t)st->n_jobs + 1, 1);
    if (!seen) return -1;
    long tokens = 0;
    int rc = check_items(st, plan, seen, &tokens);
    if (rc == 0) rc = check_ft(st, plan, seen + st->n_requests, &tokens);
    free(seen);
    if (rc == 0 && tokens > st->max_batch_tokens)
        rc = fl_error("plan: %ld forward tokens, the budget is %d", tokens, st->max_batch_tokens);
    return rc;
}

void fl_sched_fcfs(const fl_sched_state *st, fl_sched_plan *plan, int max_chunk) {
    int budget = st->max_batch_tokens, pages = st->kv_pages_free, seqs = st->seqs_free;
    plan->n_items = plan->n_ft = 0;
    for (int i = 0; i < st->n_requests && budget > 0 && plan->n_items < plan->cap_items; i++)
        if (st->requests[i].state == FL_REQ_DECODE) {
            plan->items[plan->n_items++] = (fl_sched_item){i, 1};
            budget--;
        }
    for (int i = 0; i < st->n_requests && budget > 0 && plan->n_items < plan->cap_items; i++) {
        const fl_sched_request *r = &st->requests[i];
        if (r->state == FL_REQ_DECODE) continue;
        if (r->state == FL_REQ_WAITING) {
            int need = r->pages_needed - r->kv_pages;
            if (need > pages || seqs == 0) break; /* later arrivals wait behind it */
            pages -= need;
            seqs--;
        }
        int left = r->prompt_len - r->prefilled, chunk = left < budget ? left : budget;
        if (max_chunk > 0 && chunk > max_chunk) chunk = max_chunk;
        plan->items[plan->n_items++] = (fl_sched_item){i, chunk};
        budget -= chunk;
    }
    for (int j = 0; j < st->n_jobs && plan->n_ft < plan->cap_ft; j++) {
        const fl_sched_job *job = &st->jobs[j];
        fl_sched_ft f = {j, 0, 0};
        if (job->phase == FL_JOB_FORWARD && budget > 0) {
            int left = job->sample_len - job->forwarded;
            f.forward_tokens = left < budget ? left : budget;
            budget -= f.forward_tokens;
        } else if (job->phase == FL_JOB_BACKWARD) {
            f.backward_tokens = job->backward_left < st->max_batch_tokens ? job->backward_left
                                                                           : st->max_batch_tokens;
        }
        if (f.forward_tokens || f.backward_tokens) plan->ft[plan->n_ft++] = f;
    }
}

int fl_sched_decide(fl_policy *policy, fl_sched_state *st, fl_sched_plan *plan, int max_chunk) {
    if (policy && !fl_policy_disabled(policy)) {
        int rc = fl_policy_schedule(policy);
        if (rc == 0 && fl_sched_validate(st, plan) == 0) return 1;
        if (rc == 0) fl_policy_report_invalid(policy, fl_last_error());
        fl_sched_fcfs(st, plan, max_chunk);
        return -1;
    }
    fl_sched_fcfs(st, plan, max_chunk);
    return 0;
}

void fl_sched_plan_features(const fl_sched_state *st, const fl_sched_plan *plan,
                            fl_cost_features *f) {
    memset(f, 0, sizeof *f);
    for (int i = 0; i < plan->n_items; i++) {
        const fl_sched_request *r = &st->requests[plan->items[i].request];
        if (r->state == FL_REQ_DECODE) {
            f->tokens[FL_KIND_DECODE] += 1;
            f->context += r->prefilled + r->generated;
        } else {
            f->tokens[FL_KIND_PREFILL] += plan->items[i].tokens;
        }
    }
    for (int i = 0; i < plan->n_ft; i++) {
        f->tokens[FL_KIND_FT_FORWARD] += plan->ft[i].forward_tokens;
        f->tokens[FL_KIND_FT_BACKWARD] += plan->ft[i].backward_tokens;
        f->backward_chunks += plan->ft[i].backward_tokens > 0;
    }
}

/* Solves (A + RIDGE*I) c = b for the FL_COST_N coefficients by Cholesky, reading the lower
 * triangle of A. */
static int solve(const double a[FL_COST_N][FL_COST_N], const double b[FL_COST_N],
                 double c[FL_COST_N]) {
    enum { N = FL_COST_N };
    double l[N][N] = {{0}}, y[N];
    for (int i = 0; i < N; i++)
        for (int j = 0; j <= i; j++) {
            double s = a[i][j] + (i == j ? RIDGE : 0);
            for (int k = 0; k < j; k++) s -= l[i][k] * l[j][k];
            if (i == j) {
                if (s <= 0) return -1;
                l[i][i] = sqrt(s);
            } else {
                l[i][j] = s / l[j][j];
            }
        }
    for (int i = 0; i < N; i++) {
        double s = b[i];
        for (int k = 0; k < i; k++) s -= l[i][k] * y[k];
        y[i] = s / l[i][i];
    }
    for (int i = N - 1; i >= 0; i--) {
        double s = y[i];
        for (int k = i + 1; k < N; k++) s -= l[k][i] * c[k];
        c[i] = s / l[i][i];
    }
    return 0;
}

void fl_cost_observe(fl_cost_fit *fit, fl_cost_model *model, const fl_cost_features *f,
                     double seconds) {
    const double x[FL_COST_N] = {1,          f->tokens[0], f->tokens[1],      f->tokens[2],
                                 f->tokens[3], f->context, f->backward_chunks};
    for (int i = 0; i < FL_COST_N; i++) {
        for (int j = 0; j <= i; j++) /* symmetric: the solve reads the lower triangle */
            fit->xtx[i][j] = FORGET * fit->xtx[i][j] + x[i] * x[j];
        fit->xty[i] = FORGET * fit->xty[i] + x[i] * seconds;
    }
    fit->n++;
    double c[FL_COST_N];
    if (solve(fit->xtx, fit->xty, c) != 0) return;
    /* A negative cost is collinearity noise, not a faster machine: clamp it. */
    model->fixed = fmax(c[0], 0);
    for (int k = 0; k < 4; k++) model->per_token[k] = fmax(c[1 + k], 0);
    model->per_context = fmax(c[5], 0);
    model->per_backward_chunk = fmax(c[6], 0);
    model->fitted = (int32_t)(fit->n < INT32_MAX ? fit->n : INT32_MAX);
}

double fl_cost_predict(const fl_cost_model *m, const fl_cost_features *f) {
    double t = m->fixed + m->per_context * f->context + m->per_backward_chunk * f->backward_chunks;
    for (int k = 0; k < 4; k++) t += m->per_token[k] * f->tokens[k];
    return t;
}
