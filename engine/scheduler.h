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

/* Least squares of iteration seconds on the token counts by kind and the decode
 * context, with exponential forgetting so the fit follows the machine. */
typedef struct {
    double xtx[6][6];
    double xty[6];
    long n;
} fl_cost_fit;

/* The features of a plan: tokens by kind (FL_KIND_*) and decode context tokens. */
void fl_sched_plan_features(const fl_sched_state *st, const fl_sched_plan *plan,
                            double tokens[4], double *context);
void fl_cost_observe(fl_cost_fit *fit, fl_cost_model *model, const double tokens[4],
                     double context, double seconds);
double fl_cost_predict(const fl_cost_model *model, const double tokens[4], double context);

#endif
