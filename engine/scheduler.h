/* The runtime's side of the scheduling ABI: plan validation, the built-in
 * first-come-first-served plan, and the online cost model. */
#ifndef FL_SCHED_INTERNAL_H
#define FL_SCHED_INTERNAL_H

#include "fl_sched.h"

/* Checks a plan against the state: request and job indexes (each at most once), token
 * counts by phase, the forward token budget, and KV pages for admitted requests.
 * Returns 0, or -1 with what is wrong in fl_last_error(). */
int fl_sched_validate(const fl_sched_state *st, const fl_sched_plan *plan);

/* The fallback plan: decodes, then prefill chunks of at most max_chunk tokens (0: no
 * limit) in arrival order (admitting waiting requests while pages last, never out of
 * order), then finetuning with what is left. */
void fl_sched_fcfs(const fl_sched_state *st, fl_sched_plan *plan, int max_chunk);

struct fl_policy;

/* The plan of one iteration: the policy's when it has one, is not disabled, returns
 * normally and its plan validates; else the fallback plan (an invalid plan is reported
 * to the policy as a failure). Returns 1 for the policy's plan, 0 when there is no
 * usable policy, -1 when the policy failed this call. */
int fl_sched_decide(struct fl_policy *policy, fl_sched_state *st, fl_sched_plan *plan,
                    int max_chunk);

/* The features of a plan: tokens by kind (FL_KIND_*), decode context tokens, and the
 * jobs that run backward tokens. */
typedef struct {
    double tokens[4];
    double context;
    double backward_chunks;
} fl_cost_features;

/* The fit's unknowns: fixed, per_token[4], per_context, per_backward_chunk. */
enum { FL_COST_N = 7 };

/* Least squares of iteration seconds on the features, with exponential forgetting so the
 * fit follows the machine. */
typedef struct {
    double xtx[FL_COST_N][FL_COST_N]; /* lower triangle only */
    double xty[FL_COST_N];
    long n;
} fl_cost_fit;

void fl_sched_plan_features(const fl_sched_state *st, const fl_sched_plan *plan,
                            fl_cost_features *f);
void fl_cost_observe(fl_cost_fit *fit, fl_cost_model *model, const fl_cost_features *f,
                     double seconds);
double fl_cost_predict(const fl_cost_model *model, const fl_cost_features *f);

#endif
