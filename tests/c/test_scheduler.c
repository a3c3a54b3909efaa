/* Plan validation rule by rule, the first-come-first-served fallback, and the online
 * cost model recovering a known linear cost from noisy observations. */
#include "fl_internal.h"
#include "scheduler.h"
#include "tap.h"

#include <math.h>

static fl_sched_request reqs[6];
static fl_sched_job jobs[2];
static fl_sched_item items[64];
static fl_sched_ft fts[4];
static fl_sched_state st;
static fl_sched_plan plan;

static void reset(void) {
    memset(reqs, 0, sizeof reqs);
    memset(jobs, 0, sizeof jobs);
    for (int i = 0; i < 6; i++) {
        reqs[i].id = 100 + i;
        reqs[i].prompt_len = 40;
        reqs[i].max_tokens = 20;
        reqs[i].pages_needed = 4;
        reqs[i].adapter = -1;
    }
    reqs[0].state = reqs[1].state = FL_REQ_DECODE, reqs[0].prefilled = reqs[1].prefilled = 40;
    reqs[0].kv_pages = reqs[1].kv_pages = 4, reqs[0].generated = 5, reqs[1].generated = 9;
    reqs[2].state = FL_REQ_PREFILL, reqs[2].prefilled = 16, reqs[2].kv_pages = 4;
    jobs[0] = (fl_sched_job){.id = 7, .phase = FL_JOB_FORWARD, .sample_len = 64, .forwarded = 10};
    jobs[1] = (fl_sched_job){.id = 8, .phase = FL_JOB_BACKWARD, .sample_len = 64, .forwarded = 64,
                             .backward_left = 30};
    st = (fl_sched_state){.max_batch_tokens = 64, .kv_pages_free = 6, .kv_pages_total = 20,
                          .seqs_free = 8,
                          .n_requests = 6, .requests = reqs, .n_jobs = 2, .jobs = jobs};
    plan = (fl_sched_plan){.cap_items = 64, .items = items, .cap_ft = 4, .ft = fts};
}

static void add_item(int r, int tokens) { items[plan.n_items++] = (fl_sched_item){r, tokens}; }
static void add_ft(int j, int f, int b) { fts[plan.n_ft++] = (fl_sched_ft){j, f, b}; }

static void invalid(const char *what, const char *want) {
    int rc = fl_sched_validate(&st, &plan);
    tap_ok(rc == -1 && strstr(fl_last_error(), want), "refused: %s (\"%s\")", what, fl_last_error());
    reset();
}

static void test_validate(void) {
    reset();
    add_item(0, 1), add_item(1, 1), add_item(2, 24), add_item(3, 10), add_ft(0, 20, 0), add_ft(1, 0, 30);
    tap_ok(fl_sched_validate(&st, &plan) == 0, "a plan within every rule is accepted (%s)", fl_last_error());
    reset();
    add_item(6, 1), invalid("a request index out of range", "request index 6 outside [0, 6)");
    add_item(0, 1), add_item(0, 1), invalid("a request twice", "appears twice");
    add_item(0, 2), invalid("two tokens for a decoding request", "is decoding and gets 2 tokens");
    add_item(2, 25), invalid("more prompt tokens than are left", "gets 25 prompt tokens, 24 are left");
    add_item(3, 0), invalid("zero tokens", "gets 0 prompt tokens");
    add_item(3, 8), add_item(4, 8), invalid("admissions beyond the free pages", "needs 4 KV pages, 2 are left");
    add_item(3, 40), add_ft(0, 30, 0), invalid("over the token budget", "70 forward tokens, the budget is 64");
    add_ft(1, 5, 0), invalid("forward tokens in the backward phase", "gets 5 forward tokens");
    add_ft(0, 0, 3), invalid("backward tokens in the forward phase", "gets 3 backward tokens");
    add_ft(1, 0, 31), invalid("more backward tokens than are left", "gets 31 backward tokens");
    add_ft(2, 1, 0), invalid("a job index out of range", "job index 2 outside [0, 2)");
    add_ft(0, 1, 0), add_ft(0, 1, 0), invalid("a job twice", "job 0 appears twice");
    plan.n_items = 65, invalid("more items than the capacity", "65 items (capacity 64)");
    st.seqs_free = 1, add_item(3, 8), add_item(4, 8), st.kv_pages_free = 20;
    invalid("admissions beyond the free sequence slots", "needs a sequence slot, none is left");
}

static void test_fcfs(void) {
    reset();
    fl_sched_fcfs(&st, &plan, 0);
    int ok = fl_sched_validate(&st, &plan) == 0 && plan.n_items >= 3 && items[0].request == 0 &&
             items[1].request == 1 && items[2].request == 2 && items[2].tokens == 24;
    /* 62 tokens left after the decodes: 24 for request 2, 38 for request 3 (admitted, 4 pages) */
    ok = ok && plan.n_items == 4 && items[3].request == 3 && items[3].tokens == 38 && plan.n_ft == 1 &&
         fts[0].job == 1 && fts[0].backward_tokens == 30;
    tap_ok(ok, "FCFS: decodes, then prefill in arrival order within the budget, backward of the "
               "job that is in backward (%d items, %d finetuning)", plan.n_items, plan.n_ft);
    reset();
    st.kv_pages_free = 3; /* request 3 does not fit: nobody behind it is admitted */
    reqs[4].pages_needed = 1;
    fl_sched_fcfs(&st, &plan, 0);
    int behind = 0;
    for (int i = 0; i < plan.n_items; i++) behind |= items[i].request >= 3;
    tap_ok(!behind && fl_sched_validate(&st, &plan) == 0,
           "FCFS keeps arrival order: a waiting request that does not fit holds back later ones");
}

static void test_cost_model(void) {
    /* fixed, 4 kinds, context, per backward chunk: the chunk constant is the CPU's order of
     * magnitude (a 16-token backward chunk ~15 ms, 256 tokens ~100 ms). */
    const double truth[FL_COST_N] = {1.5e-3, 2e-5, 1.2e-4, 3e-5, 6e-5, 2e-7, 1.2e-2};
    fl_cost_fit fit = {0};
    fl_cost_model model = {0};
    uint64_t s = 12345;
    for (int i = 0; i < 600; i++) {
        fl_cost_features f;
        for (int k = 0; k < 4; k++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            f.tokens[k] = (double)((s >> 33) % 200);
        }
        f.context = f.tokens[1] * (double)((s >> 20) % 900);
        /* Backward tokens come in 0 to 3 chunks, like jobs sharing an iteration. */
        f.backward_chunks = f.tokens[3] > 0 ? (double)(1 + (s >> 45) % 3) : 0;
        double t = truth[0] + truth[5] * f.context + truth[6] * f.backward_chunks;
        for (int k = 0; k < 4; k++) t += truth[1 + k] * f.tokens[k];
        double noise = 1.0 + 0.01 * (((double)((s >> 11) % 2001) / 1000.0) - 1.0);
        fl_cost_observe(&fit, &model, &f, t * noise);
    }
    double got[FL_COST_N] = {model.fixed,        model.per_token[0], model.per_token[1],
                             model.per_token[2], model.per_token[3], model.per_context,
                             model.per_backward_chunk};
    double worst = 0;
    for (int i = 0; i < FL_COST_N; i++) worst = fmax(worst, fabs(got[i] - truth[i]) / truth[i]);
    tap_ok(worst < 0.1 && model.fitted == 600,
           "the cost model recovers fixed, per-token (4 kinds), per-context and per-backward-chunk "
           "costs from 600 noisy iterations (worst relative error %.3f)", worst);
    fl_cost_features f = {{100, 10, 50, 16}, 5000, 2};
    double want = truth[0] + truth[1] * 100 + truth[2] * 10 + truth[3] * 50 + truth[4] * 16 +
                  truth[5] * 5000 + truth[6] * 2;
    double pred = fl_cost_predict(&model, &f);
    tap_ok(fabs(pred - want) / want < 0.02, "it predicts an unseen plan's time within 2%% (%.3g s "
                                            "vs %.3g s)", pred, want);

    /* The plan's features count each job with backward tokens once. */
    reset();
    jobs[0].phase = FL_JOB_BACKWARD, jobs[0].forwarded = 64, jobs[0].backward_left = 20;
    add_item(0, 1);
    add_ft(0, 0, 16);
    add_ft(1, 0, 30);
    fl_sched_plan_features(&st, &plan, &f);
    tap_ok(f.backward_chunks == 2 && f.tokens[FL_KIND_FT_BACKWARD] == 46 &&
               f.tokens[FL_KIND_DECODE] == 1 && f.context == 45,
           "a plan's features count each job running backward once (%.0f chunks, %.0f tokens)",
           f.backward_chunks, f.tokens[FL_KIND_FT_BACKWARD]);
}

int main(void) {
    test_validate();
    test_fcfs();
    test_cost_model();
    return tap_done();
}
