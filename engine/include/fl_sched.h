/* The scheduling ABI: the state the runtime fills before each iteration and the plan a
 * policy writes back. Policies are LuaJIT files that read and write these structs
 * through FFI pointers cast once when the policy loads.
 *
 * The block between the ABI markers is plain C that ffi.cdef accepts: the build copies
 * it into build/lua/flexllm/sched_abi.lua (scripts/gen-sched-abi.lua), and a policy checks
 * ffi.sizeof of each struct against the sizes C reports when it loads. Change a struct
 * here and both sides follow. Times are seconds on the runtime's clock. */
#ifndef FL_SCHED_H
#define FL_SCHED_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* FL_SCHED_ABI_BEGIN */
enum {
    FL_REQ_WAITING = 0, /* queued, holds no KV pages */
    FL_REQ_PREFILL = 1, /* admitted, prompt partly in the KV cache */
    FL_REQ_DECODE = 2   /* prompt done, generating */
};

enum {
    FL_JOB_FORWARD = 0,  /* the current sample has positions left to run forward */
    FL_JOB_BACKWARD = 1, /* the current sample's forward is done, backward runs */
    FL_JOB_DONE = 2      /* every step done (or failed) */
};

/* A request preempted for KV pages waits again and, once readmitted, recomputes the
 * tokens it had generated with its prompt: it is reported as a request whose prompt is
 * its prompt followed by those tokens, with max_tokens less them, and generated 0. So
 * prompt_len - prefilled is always the prefill left, max_tokens - generated the tokens
 * left to generate, and prefilled + generated the context a decode reads. */
typedef struct {
    int32_t id;          /* request id, stable for its lifetime */
    int32_t state;       /* FL_REQ_* */
    int32_t adapter;     /* adapter slot, -1 for the base model */
    int32_t prompt_len;  /* tokens to prefill (see above) */
    int32_t prefilled;   /* of them, in the KV cache */
    int32_t generated;   /* tokens sampled since */
    int32_t max_tokens;
    int32_t kv_pages;    /* pages it holds now (0 while waiting) */
    int32_t pages_needed; /* waiting: free pages admitting it takes now; else kv_pages */
    int32_t preempted;   /* times it was preempted (and recomputed) */
    double arrival;
    double first_token;  /* time of the first token, or -1 */
    double last_token;   /* time of the latest token, or -1 */
    float ttft_slo;      /* seconds: its own SLO, else the global rule; 0: none */
    float tpot_slo;
} fl_sched_request;

typedef struct {
    int32_t id;
    int32_t phase;        /* FL_JOB_* */
    int32_t adapter;      /* the slot of the adapter it trains */
    int32_t sample_len;   /* tokens of the current sample */
    int32_t forwarded;    /* its positions through the forward */
    int32_t backward_left; /* its positions still to go backward */
    int32_t step;         /* optimizer steps done */
    int32_t total_steps;
    float loss;           /* mean loss of the last step */
    float priority;       /* from the job's settings; policies may use it */
    int64_t tokens;       /* finetuning forward tokens run so far */
} fl_sched_job;

/* The online cost model: predicted iteration seconds = fixed + sum of per_token[k] times
 * the tokens of kind k + per_context times the context tokens decode attention reads +
 * per_backward_chunk times the jobs that run backward tokens in the iteration. */
enum { FL_KIND_PREFILL = 0, FL_KIND_DECODE = 1, FL_KIND_FT_FORWARD = 2, FL_KIND_FT_BACKWARD = 3 };

typedef struct {
    double fixed;
    double per_token[4]; /* by FL_KIND_* */
    double per_context;
    /* Seconds per job with backward tokens: a backward chunk has a fixed cost (on the CPU
     * a 16-token chunk takes about as long as a 32-token one) which, without this term,
     * the fit would load onto the other kinds. */
    double per_backward_chunk;
    int32_t fitted;      /* iterations the fit has seen */
} fl_cost_model;

typedef struct {
    double now;
    int64_t iteration;
    int32_t max_batch_tokens; /* forward tokens in one iteration at most */
    /* Pages not held: a running request already holds the page its next token needs
     * (preemptions for it happen before the state is filled), so only admissions
     * (pages_needed each) take from these. */
    int32_t kv_pages_free;
    int32_t kv_pages_total;
    int32_t seqs_free;        /* sequence slots left: each admitted request takes one */
    int32_t n_requests;       /* running and waiting, in arrival order */
    fl_sched_request *requests;
    int32_t n_jobs;
    fl_sched_job *jobs;
    fl_cost_model cost;
    float ttft_slo;           /* global rules in force; 0: none */
    float tpot_slo;
    double last_iteration_s;  /* measured time of the previous iteration */
} fl_sched_state;

typedef struct {
    int32_t request;          /* index into state.requests */
    int32_t tokens;           /* prompt tokens to prefill, or 1 to decode */
} fl_sched_item;

typedef struct {
    int32_t job;              /* index into state.jobs */
    int32_t forward_tokens;   /* next positions of its sample to run forward */
    int32_t backward_tokens;  /* last positions of its sample to run backward */
} fl_sched_ft;

/* Written by the policy into arrays the runtime owns (capacities given). */
typedef struct {
    int32_t n_items;
    int32_t cap_items;
    fl_sched_item *items;
    int32_t n_ft;
    int32_t cap_ft;
    fl_sched_ft *ft;
} fl_sched_plan;
/* FL_SCHED_ABI_END */

#ifdef __cplusplus
}
#endif
#endif
