/* The co-serving runtime: requests and finetuning jobs, one fused iteration at a time.
 * Each iteration gives every decoding request the KV page its next token needs
 * (preempting when the pool is out), fills the scheduling state, takes the policy's plan
 * (or the built-in one when there is no policy, it fails, or its plan is invalid),
 * admits and runs the planned tokens in one forward, runs the planned backward chunks,
 * samples, and feeds the measured time to the cost model.
 *
 * KV pages are promised before they are written, so a forward never runs out: a
 * request is admitted when the pool can promise its prompt and first token, and is
 * promised one more page whenever its next token starts one. When no page is left for
 * that, the running request admitted last (the needy one only when it runs alone) is
 * preempted: its sequence and pages return and it waits again, keeping its sampler,
 * detokenizer and text. Readmitted, it prefills its prompt and every token it had
 * sampled, and samples the next token from the last row, which is the row its decode
 * would have computed (the forward is batch-invariant): its output is the one it would
 * have had, and no event repeats. Preemption happens before the state is filled, so a
 * plan never names a request that lost its pages. A finetuning sample is promised its
 * whole length when it begins, until it ends or its job fails or is cancelled. */
#include "fl_internal.h"
#include "policy.h"
#include "scheduler.h"
#include "train.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

typedef enum { REQ_QUEUED, REQ_RUNNING, REQ_DONE } req_state;

typedef struct {
    int id;
    req_state state;
    int seq;
    double arrival, first_at, last_at; /* seconds on the runtime clock; -1: not yet */
    int32_t *tokens;        /* [n_prompt + max_tokens]: the prompt, then each sampled token */
    int n_prompt, n_tokens;
    int n_fill;             /* tokens an admission prefills: the prompt, after a preemption
                               also the tokens sampled before it */
    int n_prefilled;        /* of n_fill; the last sampled token is fed back once they are in */
    int reserved_pages;     /* promised to it while it runs */
    long long admitted;     /* admission order: the latest admitted is preempted first */
    int preempted;
    float ttft_slo, tpot_slo; /* its own rule, else the runtime's */
    int adapter_slot;       /* its adapter's slot in the runtime, -1 for the base model */
    fl_request_params p;
    char **stop;
    int max_stop_len;
    fl_sampler *sampler;
    fl_detok_state detok;
    char *text;             /* generated text, for stop-string matching */
    size_t text_len, text_cap, emitted;
} request;

typedef struct {
    int id;
    fl_finetune *ft;
    int pages;           /* KV pages reserved for its sample in flight */
    int done;            /* finished, or failed with error */
    char error[512];
} job_slot;

struct fl_runtime {
    fl_context *ctx;
    fl_runtime_params p;
    char *policy_path;
    char *options;         /* ctx.options source, kept across reloads */
    fl_policy *policy;
    double seen_mtime;     /* the policy file's modification time at the last check */
    double changed_at;     /* when a new modification time was first seen, or -1 */
    int sighup_seen;
    request *reqs;
    int n_reqs, cap_reqs, next_id;
    job_slot *jobs;
    int n_jobs, cap_jobs, next_job;
    int reserved_pages;    /* pages promised to admitted requests and samples, taken or not */
    long long admissions;
    /* the scheduling state and plan, handed to the policy by pointer */
    fl_sched_state st;
    fl_sched_plan plan;
    int cap_st_reqs, cap_st_jobs;
    int *st_job_slot;      /* job slot of each state.jobs entry */
    const fl_adapter **adapters; /* adapter slots the state reports, in order of first use */
    int n_adapters;
    fl_cost_fit fit;
    fl_runtime_stats stats;
    double clock0;
    /* per-iteration buffers */
    int32_t *tok, *seq, *pos;
    int8_t *want;
    const fl_adapter **adapter;
    int *row_req;          /* request of each logits row */
    float *logits;         /* [max_batch_tokens, vocab] */
    fl_gen_event *events;
    int cap_events;
    char *event_text;      /* text of all events of a step */
    size_t event_text_len, event_text_cap;
};

fl_request_params fl_request_default_params(void) {
    fl_request_params p = {.max_tokens = 256, .sampling = fl_sampling_default_params()};
    return p;
}

fl_runtime_params fl_runtime_default_params(void) {
    fl_policy_params pp = fl_policy_default_params();
    fl_runtime_params p = {.prefill_chunk = 256, .policy_time_budget = pp.time_budget,
                           .policy_mem_limit = pp.mem_limit,
                           .policy_max_failures = pp.max_failures};
    return p;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double mtime_of(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    return (double)st.st_mtim.tv_sec + st.st_mtim.tv_nsec * 1e-9;
}

static fl_policy_params policy_params(const fl_runtime *rt) {
    fl_policy_params pp = fl_policy_default_params();
    pp.time_budget = rt->p.policy_time_budget;
    pp.mem_limit = rt->p.policy_mem_limit;
    pp.max_failures = rt->p.policy_max_failures;
    pp.options = rt->options;
    return pp;
}

fl_runtime *fl_runtime_new(fl_context *ctx, const fl_runtime_params *params) {
    fl_runtime_params p = params ? *params : fl_runtime_default_params();
    if (p.prefill_chunk <= 0) {
        fl_error("runtime: prefill_chunk %d must be positive", p.prefill_chunk);
        return NULL;
    }
    fl_runtime *rt = fl_calloc(1, sizeof *rt);
    if (!rt) return NULL;
    rt->ctx = ctx;
    rt->p = p;
    rt->p.policy = rt->p.policy_options = NULL;
    if (p.policy_options && !(rt->options = strdup(p.policy_options))) goto fail;
    rt->clock0 = now_s();
    rt->stats.policy_error = "";
    int T = ctx->params.max_batch_tokens;
    rt->tok = fl_malloc(sizeof(int32_t) * T);
    rt->seq = fl_malloc(sizeof(int32_t) * T);
    rt->pos = fl_malloc(sizeof(int32_t) * T);
    rt->want = fl_malloc((size_t)T);
    rt->adapter = fl_malloc(sizeof(*rt->adapter) * T);
    rt->row_req = fl_malloc(sizeof(int) * T);
    rt->logits = fl_malloc(sizeof(float) * (size_t)T * ctx->model->cfg.vocab_size);
    rt->plan.cap_items = T;
    rt->plan.items = fl_malloc(sizeof(fl_sched_item) * T);
    if (!rt->tok || !rt->seq || !rt->pos || !rt->want || !rt->adapter || !rt->row_req ||
        !rt->logits || !rt->plan.items)
        goto fail;
    rt->changed_at = -1;
    if (p.policy) {
        fl_policy_params pp = policy_params(rt);
        if (!(rt->policy_path = strdup(p.policy)) ||
            !(rt->policy = fl_policy_load(p.policy, &rt->st, &rt->plan, &pp, NULL)))
            goto fail;
        rt->seen_mtime = mtime_of(p.policy);
    }
    return rt;
fail:
    fl_runtime_free(rt);
    return NULL;
}

static void request_release(request *r) {
    free(r->tokens);
    for (int i = 0; i < r->p.n_stop; i++) free(r->stop[i]);
    free(r->stop);
    fl_sampler_free(r->sampler);
    free(r->text);
    memset(r, 0, sizeof *r);
}

void fl_runtime_free(fl_runtime *rt) {
    if (!rt) return;
    for (int i = 0; i < rt->n_reqs; i++) {
        if (rt->reqs[i].state == REQ_RUNNING) fl_seq_free(rt->ctx, rt->reqs[i].seq);
        request_release(&rt->reqs[i]);
    }
    for (int j = 0; j < rt->n_jobs; j++) fl_finetune_free(rt->jobs[j].ft);
    fl_policy_free(rt->policy);
    free(rt->policy_path);
    free(rt->options);
    free(rt->reqs);
    free(rt->jobs);
    free(rt->st.requests);
    free(rt->st.jobs);
    free(rt->st_job_slot);
    free(rt->adapters);
    free(rt->plan.items);
    free(rt->plan.ft);
    free(rt->tok);
    free(rt->seq);
    free(rt->pos);
    free(rt->want);
    free(rt->adapter);
    free(rt->row_req);
    free(rt->logits);
    free(rt->events);
    free(rt->event_text);
    free(rt);
}

static int pages_for(int tokens) { return (tokens + FL_KV_PAGE_TOKENS - 1) / FL_KV_PAGE_TOKENS; }

static int generated(const request *r) { return r->n_tokens - r->n_prompt; }

/* The adapter's slot: its index among the adapters requests have named so far. */
static int adapter_slot(fl_runtime *rt, const fl_adapter *a) {
    if (!a) return -1;
    for (int i = 0; i < rt->n_adapters; i++)
        if (rt->adapters[i] == a) return i;
    const fl_adapter **na = realloc(rt->adapters, sizeof(*na) * (size_t)(rt->n_adapters + 1));
    if (!na) return fl_error("out of memory recording an adapter");
    rt->adapters = na;
    rt->adapters[rt->n_adapters] = a;
    return rt->n_adapters++;
}

int fl_runtime_submit(fl_runtime *rt, const int32_t *prompt, int n_prompt,
                      const fl_request_params *params) {
    fl_request_params p = params ? *params : fl_request_default_params();
    const fl_config *c = &rt->ctx->model->cfg;
    if (n_prompt <= 0) return fl_error("request: the prompt has no tokens");
    if (p.max_tokens <= 0) return fl_error("request: max_tokens %d must be positive", p.max_tokens);
    if (n_prompt + p.max_tokens > c->max_seq_len)
        return fl_error("request: prompt (%d tokens) + max_tokens (%d) exceeds the model's "
                        "context of %d",
                        n_prompt, p.max_tokens, c->max_seq_len);
    /* Alone in the pool it always runs to the end: preemption cannot starve it. */
    if (pages_for(n_prompt + p.max_tokens) > rt->ctx->n_pages)
        return fl_error("request: needs %d KV pages, the pool has %d",
                        pages_for(n_prompt + p.max_tokens), rt->ctx->n_pages);
    if (!(p.ttft_slo >= 0) || !(p.tpot_slo >= 0))
        return fl_error("request: ttft_slo (%g) and tpot_slo (%g) must be seconds >= 0",
                        p.ttft_slo, p.tpot_slo);
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= c->vocab_size)
            return fl_error("request: prompt token %d is id %d, outside the vocabulary [0, %d)",
                            i, prompt[i], c->vocab_size);
    int slot = adapter_slot(rt, p.adapter);
    if (p.adapter && slot < 0) return -1;
    if (rt->n_reqs == rt->cap_reqs) {
        int cap = rt->cap_reqs ? rt->cap_reqs * 2 : 16;
        request *nr = realloc(rt->reqs, sizeof(request) * (size_t)cap);
        if (!nr) return fl_error("out of memory queueing a request");
        rt->reqs = nr;
        rt->cap_reqs = cap;
    }
    request *r = &rt->reqs[rt->n_reqs];
    memset(r, 0, sizeof *r);
    r->p = p;
    r->p.n_stop = 0;
    r->sampler = fl_sampler_new(&p.sampling, c->vocab_size);
    r->tokens = fl_malloc(sizeof(int32_t) * (size_t)(n_prompt + p.max_tokens));
    r->stop = fl_calloc((size_t)(p.n_stop > 0 ? p.n_stop : 1), sizeof(char *));
    if (!r->sampler || !r->tokens || !r->stop) {
        request_release(r);
        return -1;
    }
    for (int i = 0; i < p.n_stop; i++) {
        if (!p.stop[i] || !p.stop[i][0]) continue; /* an empty stop string never matches */
        if (!(r->stop[r->p.n_stop] = strdup(p.stop[i]))) {
            request_release(r);
            return fl_error("out of memory copying stop strings");
        }
        int len = (int)strlen(p.stop[i]);
        if (len > r->max_stop_len) r->max_stop_len = len;
        r->p.n_stop++;
    }
    r->p.stop = NULL;
    memcpy(r->tokens, prompt, sizeof(int32_t) * (size_t)n_prompt);
    r->n_prompt = r->n_tokens = r->n_fill = n_prompt;
    r->id = rt->next_id++;
    r->state = REQ_QUEUED;
    r->seq = -1;
    r->arrival = now_s() - rt->clock0;
    r->first_at = r->last_at = -1;
    r->ttft_slo = p.ttft_slo > 0 ? p.ttft_slo : rt->p.ttft_slo;
    r->tpot_slo = p.tpot_slo > 0 ? p.tpot_slo : rt->p.tpot_slo;
    r->adapter_slot = slot;
    fl_detok_init(&r->detok, 1);
    rt->n_reqs++;
    return r->id;
}

int fl_runtime_add_job(fl_runtime *rt, fl_finetune *job) {
    if (rt->n_jobs == rt->cap_jobs) {
        int cap = rt->cap_jobs ? rt->cap_jobs * 2 : 4;
        job_slot *nj = realloc(rt->jobs, sizeof(job_slot) * (size_t)cap);
        fl_sched_ft *nf = realloc(rt->plan.ft, sizeof(fl_sched_ft) * (size_t)cap);
        if (nj) rt->jobs = nj;
        if (nf) rt->plan.ft = nf;
        if (!nj || !nf) return fl_error("out of memory adding a finetuning job");
        rt->cap_jobs = rt->plan.cap_ft = cap;
    }
    job_slot *s = &rt->jobs[rt->n_jobs++];
    memset(s, 0, sizeof *s);
    s->id = rt->next_job++;
    s->ft = job;
    return s->id;
}

int fl_runtime_active(const fl_runtime *rt) {
    int n = 0;
    for (int i = 0; i < rt->n_reqs; i++) n += rt->reqs[i].state != REQ_DONE;
    for (int j = 0; j < rt->n_jobs; j++) n += !rt->jobs[j].done;
    return n;
}

static job_slot *find_job(const fl_runtime *rt, int job) {
    for (int j = 0; j < rt->n_jobs; j++)
        if (rt->jobs[j].id == job) return &rt->jobs[j];
    return NULL;
}

const char *fl_runtime_job_error(const fl_runtime *rt, int job) {
    const job_slot *s = find_job(rt, job);
    return s ? s->error : "";
}

int fl_runtime_job_done(const fl_runtime *rt, int job) {
    const job_slot *s = find_job(rt, job);
    return s ? s->done : fl_error("runtime: no finetuning job %d", job);
}

void fl_runtime_get_stats(const fl_runtime *rt, fl_runtime_stats *stats) {
    *stats = rt->stats;
    if (rt->policy) {
        stats->policy_disabled = fl_policy_disabled(rt->policy);
        stats->policy_error = fl_policy_last_error(rt->policy);
    }
}

/* ------------------------------------------------------- the scheduling state */

/* Drops finished and cancelled requests; their last events were returned already. */
static void compact(fl_runtime *rt) {
    int kept = 0;
    for (int i = 0; i < rt->n_reqs; i++) {
        if (rt->reqs[i].state == REQ_DONE) request_release(&rt->reqs[i]);
        else rt->reqs[kept++] = rt->reqs[i];
    }
    rt->n_reqs = kept;
}

static int grow_state(fl_runtime *rt) {
    if (rt->n_reqs > rt->cap_st_reqs) {
        fl_sched_request *r = realloc(rt->st.requests, sizeof(*r) * (size_t)rt->n_reqs);
        if (!r) return fl_error("out of memory for the scheduling state");
        rt->st.requests = r;
        rt->cap_st_reqs = rt->n_reqs;
    }
    if (rt->n_jobs > rt->cap_st_jobs) {
        fl_sched_job *j = realloc(rt->st.jobs, sizeof(*j) * (size_t)rt->n_jobs);
        int *slot = realloc(rt->st_job_slot, sizeof(int) * (size_t)rt->n_jobs);
        if (j) rt->st.jobs = j;
        if (slot) rt->st_job_slot = slot;
        if (!j || !slot) return fl_error("out of memory for the scheduling state");
        rt->cap_st_jobs = rt->n_jobs;
    }
    return 0;
}

/* A job stops, failed or cancelled: its sample in flight is dropped and its pages return. */
static void job_fail(fl_runtime *rt, job_slot *s, const char *why) {
    snprintf(s->error, sizeof s->error, "%s", why);
    s->done = 1;
    fl_finetune_abandon(s->ft);
    rt->reserved_pages -= s->pages;
    s->pages = 0;
}

/* A job's entry in the state, beginning its next sample when the pool can hold it.
 * Returns 0 when the job has nothing to offer this iteration. */
static int job_entry(fl_runtime *rt, job_slot *s, fl_sched_job *e) {
    int rc;
    if (!s->pages && fl_seqs_free(rt->ctx) == 0) return 0; /* a new sample needs a slot */
    fl_train_sample *t = fl_finetune_sample(s->ft, &rc);
    if (!t) {
        if (rc < 0) job_fail(rt, s, fl_last_error());
        else s->done = 1;
        return 0;
    }
    if (!s->pages) { /* a new sample: reserve its pages, or wait for them */
        int need = pages_for(fl_train_length(t));
        if (rt->ctx->n_pages - rt->reserved_pages < need) return 0;
        s->pages = need;
        rt->reserved_pages += need;
    }
    fl_finetune_progress pr;
    fl_finetune_get_progress(s->ft, &pr);
    *e = (fl_sched_job){.id = s->id, .adapter = -1, .sample_len = fl_train_length(t),
                        .forwarded = fl_train_forwarded(t),
                        .backward_left = fl_train_backward_left(t), .step = pr.step,
                        .total_steps = pr.total_steps, .loss = (float)pr.loss,
                        .tokens = pr.tokens};
    e->phase = e->forwarded < e->sample_len ? FL_JOB_FORWARD : FL_JOB_BACKWARD;
    return 1;
}

/* The state's requests are reqs in order, done ones dropped first: a plan item's request
 * index is an index into reqs. */
static int fill_state(fl_runtime *rt) {
    compact(rt);
    if (grow_state(rt) != 0) return -1;
    fl_sched_state *st = &rt->st;
    st->now = now_s() - rt->clock0;
    st->iteration = rt->stats.iterations;
    st->max_batch_tokens = rt->ctx->params.max_batch_tokens;
    st->kv_pages_total = rt->ctx->n_pages;
    st->ttft_slo = rt->p.ttft_slo;
    st->tpot_slo = rt->p.tpot_slo;
    st->n_jobs = 0;
    for (int j = 0; j < rt->n_jobs; j++)
        if (!rt->jobs[j].done && job_entry(rt, &rt->jobs[j], &st->jobs[st->n_jobs]))
            rt->st_job_slot[st->n_jobs++] = j;
    st->kv_pages_free = rt->ctx->n_pages - rt->reserved_pages;
    st->seqs_free = fl_seqs_free(rt->ctx);
    st->n_requests = rt->n_reqs;
    for (int i = 0; i < rt->n_reqs; i++) {
        const request *r = &rt->reqs[i];
        fl_sched_request *e = &st->requests[i];
        int running = r->state == REQ_RUNNING;
        /* Tokens it recomputes count as prompt (see fl_sched.h). */
        *e = (fl_sched_request){.id = r->id, .adapter = r->adapter_slot,
                                .prompt_len = r->n_fill, .prefilled = r->n_prefilled,
                                .generated = r->n_tokens - r->n_fill,
                                .max_tokens = r->p.max_tokens - (r->n_fill - r->n_prompt),
                                .kv_pages = running ? r->reserved_pages : 0,
                                .pages_needed = running ? r->reserved_pages
                                                        : pages_for(r->n_fill + 1),
                                .preempted = r->preempted, .arrival = r->arrival,
                                .first_token = r->first_at, .last_token = r->last_at,
                                .ttft_slo = r->ttft_slo, .tpot_slo = r->tpot_slo};
        e->state = !running                     ? FL_REQ_WAITING
                   : r->n_prefilled < r->n_fill ? FL_REQ_PREFILL
                                                : FL_REQ_DECODE;
    }
    return 0;
}

/* The plan for this iteration, and the policy's share of the stats. */
static void make_plan(fl_runtime *rt) {
    int used = fl_sched_decide(rt->policy, &rt->st, &rt->plan, rt->p.prefill_chunk);
    if (!rt->policy) return;
    if (used != 0) {
        rt->stats.policy_calls++;
        rt->stats.policy_seconds += fl_policy_last_seconds(rt->policy);
    }
    if (used < 0) rt->stats.policy_failures++;
    if (used <= 0) rt->stats.fallback_iterations++;
}

/* Admission promises its prefill and the first token after it (the plan checked that
 * the pool can). */
static int admit(fl_runtime *rt, request *r) {
    int seq = fl_seq_new(rt->ctx);
    if (seq < 0) return -1;
    r->seq = seq;
    r->reserved_pages = pages_for(r->n_fill + 1);
    rt->reserved_pages += r->reserved_pages;
    r->admitted = rt->admissions++;
    r->state = REQ_RUNNING;
    return 0;
}

/* A running request gives its sequence and the pages promised to it back. */
static void release(fl_runtime *rt, request *r) {
    fl_seq_free(rt->ctx, r->seq);
    rt->reserved_pages -= r->reserved_pages;
    r->reserved_pages = 0;
    r->seq = -1;
}

/* A running request leaves the pool; it will recompute everything it had. */
static void preempt(fl_runtime *rt, request *r) {
    release(rt, r);
    r->state = REQ_QUEUED;
    r->n_fill = r->n_tokens;
    r->n_prefilled = 0;
    r->preempted++;
    rt->stats.preemptions++;
}

/* The running request admitted last other than r; r itself when it runs alone. */
static request *victim(fl_runtime *rt, request *r) {
    request *v = r;
    for (int i = 0; i < rt->n_reqs; i++) {
        request *q = &rt->reqs[i];
        if (q != r && q->state == REQ_RUNNING && (v == r || q->admitted > v->admitted)) v = q;
    }
    return v;
}

/* Promises every decoding request the page its next token starts, preempting while
 * the pool has none left. */
static void make_room(fl_runtime *rt) {
    for (int i = 0; i < rt->n_reqs; i++) {
        request *r = &rt->reqs[i];
        /* Its next forward writes position n_tokens - 1. */
        if (r->state != REQ_RUNNING || r->n_prefilled < r->n_fill ||
            pages_for(r->n_tokens) <= r->reserved_pages)
            continue;
        while (r->state == REQ_RUNNING && rt->reserved_pages >= rt->ctx->n_pages)
            preempt(rt, victim(rt, r));
        if (r->state == REQ_RUNNING) {
            r->reserved_pages++;
            rt->reserved_pages++;
        }
    }
}

static void push(fl_runtime *rt, int *n, int32_t tok, int seq, int pos, int want,
                 const fl_adapter *a) {
    rt->tok[*n] = tok;
    rt->seq[*n] = seq;
    rt->pos[*n] = pos;
    rt->want[*n] = (int8_t)want;
    rt->adapter[*n] = a;
    (*n)++;
}

/* The plan as one batch: decode and prefill tokens, then finetuning forward tokens. */
static int build_batch(fl_runtime *rt, int *n_rows) {
    int n = 0, rows = 0;
    for (int i = 0; i < rt->plan.n_items; i++) {
        const fl_sched_item *it = &rt->plan.items[i];
        request *r = &rt->reqs[it->request];
        if (r->state == REQ_QUEUED && admit(rt, r) != 0) return -1;
        if (r->n_prefilled == r->n_fill) { /* decode the last sampled token */
            push(rt, &n, r->tokens[r->n_tokens - 1], r->seq, r->n_tokens - 1, 1, r->p.adapter);
            rt->row_req[rows++] = (int)(r - rt->reqs);
            continue;
        }
        for (int j = 0; j < it->tokens; j++) {
            int p = r->n_prefilled + j, last = p == r->n_fill - 1;
            push(rt, &n, r->tokens[p], r->seq, p, last, r->p.adapter);
            if (last) rt->row_req[rows++] = (int)(r - rt->reqs);
        }
        r->n_prefilled += it->tokens;
    }
    for (int i = 0; i < rt->plan.n_ft; i++) {
        const fl_sched_ft *f = &rt->plan.ft[i];
        if (!f->forward_tokens) continue;
        int rc;
        fl_train_sample *t = fl_finetune_sample(rt->jobs[rt->st_job_slot[f->job]].ft, &rc);
        for (int j = 0; j < f->forward_tokens; j++) {
            int p = fl_train_forwarded(t) + j;
            push(rt, &n, fl_train_tokens(t)[p], fl_train_seq(t), p, 0, NULL);
        }
    }
    *n_rows = rows;
    return n;
}

/* After the forward: backward chunks, then each job's bookkeeping. */
static void run_jobs(fl_runtime *rt) {
    for (int i = 0; i < rt->plan.n_ft; i++) {
        const fl_sched_ft *f = &rt->plan.ft[i];
        job_slot *s = &rt->jobs[rt->st_job_slot[f->job]];
        int rc;
        fl_train_sample *t = fl_finetune_sample(s->ft, &rc);
        if (f->backward_tokens && fl_train_backward(rt->ctx, t, f->backward_tokens) < 0) {
            job_fail(rt, s, fl_last_error());
            continue;
        }
        int ended = fl_train_forwarded(t) == fl_train_length(t) &&
                    fl_train_backward_left(t) == 0;
        rt->stats.ft_forward_tokens += f->forward_tokens;
        rt->stats.ft_backward_tokens += f->backward_tokens;
        if (fl_finetune_advance(s->ft, f->forward_tokens) != 0)
            job_fail(rt, s, fl_last_error());
        else if (ended) { /* the sample's pages went back with it */
            rt->reserved_pages -= s->pages;
            s->pages = 0;
        }
    }
}

static int append_text(char **buf, size_t *len, size_t *cap, const char *s, size_t n) {
    if (*len + n + 1 > *cap) {
        size_t nc = *cap ? *cap : 256;
        while (nc < *len + n + 1) nc *= 2;
        char *nb = realloc(*buf, nc);
        if (!nb) return fl_error("out of memory holding generated text");
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = 0;
    return 0;
}

/* Earliest occurrence of any stop string at or after from, or -1. */
static long find_stop(const request *r, size_t from) {
    long best = -1;
    for (int i = 0; i < r->p.n_stop; i++) {
        const char *hit = strstr(r->text + from, r->stop[i]);
        if (hit && (best < 0 || hit - r->text < best)) best = hit - r->text;
    }
    return best;
}

/* Bytes at the end of the text that could begin a stop string: held back until known. */
static size_t held_back(const request *r) {
    size_t hold = 0;
    for (int i = 0; i < r->p.n_stop; i++) {
        size_t sl = strlen(r->stop[i]);
        for (size_t k = sl - 1; k > hold; k--)
            if (k <= r->text_len && memcmp(r->text + r->text_len - k, r->stop[i], k) == 0) {
                hold = k;
                break;
            }
    }
    return hold;
}

/* An event of r carrying token tok and its text up to emit_to (not finishing it), or NULL. */
static fl_gen_event *add_event(fl_runtime *rt, int *n_ev, request *r, int32_t tok,
                               size_t emit_to) {
    if (*n_ev == rt->cap_events) {
        int cap = rt->cap_events ? rt->cap_events * 2 : 64;
        fl_gen_event *ne = realloc(rt->events, sizeof(fl_gen_event) * (size_t)cap);
        if (!ne) {
            fl_error("out of memory recording events");
            return NULL;
        }
        rt->events = ne;
        rt->cap_events = cap;
    }
    size_t off = rt->event_text_len;
    if (emit_to > r->emitted &&
        append_text(&rt->event_text, &rt->event_text_len, &rt->event_text_cap,
                    r->text + r->emitted, emit_to - r->emitted) != 0)
        return NULL;
    fl_gen_event *e = &rt->events[(*n_ev)++];
    *e = (fl_gen_event){.request = r->id, .token = tok,
                        /* resolved to a pointer once the step is done */
                        .text = (const char *)(uintptr_t)off,
                        .text_len = (int)(rt->event_text_len - off)};
    if (emit_to > r->emitted) r->emitted = emit_to;
    return e;
}

/* A request leaves with its last event: its pages return, and its event carries its
 * measured TTFT and TPOT and their verdict, which the stats count. */
static int finish(fl_runtime *rt, int *n_ev, request *r, int32_t tok, fl_finish fin) {
    release(rt, r);
    r->state = REQ_DONE;
    fl_gen_event *e = add_event(rt, n_ev, r, tok, r->text_len);
    if (!e) return -1;
    int n = generated(r);
    e->finish = fin;
    e->ttft = r->first_at - r->arrival;
    e->tpot = n > 1 ? (r->last_at - r->first_at) / (n - 1) : 0;
    e->slo_met = (r->ttft_slo <= 0 || e->ttft <= r->ttft_slo) &&
                 (r->tpot_slo <= 0 || e->tpot <= r->tpot_slo);
    rt->stats.requests_done++;
    rt->stats.requests_slo_met += e->slo_met;
    return 0;
}

int fl_runtime_cancel(fl_runtime *rt, int id) {
    for (int i = 0; i < rt->n_reqs; i++) {
        request *r = &rt->reqs[i];
        if (r->id != id || r->state == REQ_DONE) continue;
        if (r->state == REQ_RUNNING) release(rt, r);
        r->state = REQ_DONE; /* released when the state is filled next, like a finished one */
        rt->stats.requests_cancelled++;
        return 0;
    }
    return fl_error("cancel: request %d is not queued or running", id);
}

int fl_runtime_cancel_job(fl_runtime *rt, int job) {
    job_slot *s = find_job(rt, job);
    if (!s) return fl_error("cancel: no finetuning job %d", job);
    if (s->done)
        return fl_error("cancel: finetuning job %d has already %s", job,
                        s->error[0] ? "failed" : "finished");
    job_fail(rt, s, "cancelled");
    return 0;
}

/* Takes one sampled token: EOS, stop strings, max_tokens; emits its text. */
static int accept_token(fl_runtime *rt, int *n_ev, request *r, int32_t tok, double now) {
    const fl_tokenizer *tk = rt->ctx->model->tok;
    r->tokens[r->n_tokens++] = tok;
    if (r->first_at < 0) r->first_at = now;
    r->last_at = now;
    if (!r->p.ignore_eos && fl_tokenizer_is_eos(tk, tok)) {
        char tail[16];
        int n = fl_detok_flush(tk, &r->detok, tail, sizeof tail);
        if (n > 0 && append_text(&r->text, &r->text_len, &r->text_cap, tail, (size_t)n) != 0)
            return -1;
        return finish(rt, n_ev, r, tok, FL_FINISH_EOS);
    }
    char piece[256];
    int n = fl_detok_piece(tk, &r->detok, tok, piece, sizeof piece);
    if (n < 0) n = 0; /* a single token longer than 256 bytes is not a real vocabulary */
    size_t before = r->text_len;
    if (append_text(&r->text, &r->text_len, &r->text_cap, piece, (size_t)n) != 0) return -1;
    int at_limit = generated(r) >= r->p.max_tokens;
    if (at_limit) {
        n = fl_detok_flush(tk, &r->detok, piece, sizeof piece);
        if (n > 0 && append_text(&r->text, &r->text_len, &r->text_cap, piece, (size_t)n) != 0)
            return -1;
    }
    if (r->p.n_stop > 0) {
        size_t from = before > (size_t)r->max_stop_len ? before - r->max_stop_len : 0;
        long hit = find_stop(r, from);
        if (hit >= 0) {
            r->text_len = (size_t)hit;
            return finish(rt, n_ev, r, tok, FL_FINISH_STOP);
        }
    }
    if (at_limit) return finish(rt, n_ev, r, tok, FL_FINISH_LENGTH);
    return add_event(rt, n_ev, r, tok, r->text_len - held_back(r)) ? 0 : -1;
}

int fl_runtime_step(fl_runtime *rt, const fl_gen_event **events) {
    int n_rows = 0, n_ev = 0;
    rt->event_text_len = 0;
    *events = NULL;
    double t0 = now_s();
    make_room(rt);
    if (fill_state(rt) != 0) return -1;
    make_plan(rt);
    fl_cost_features features;
    fl_sched_plan_features(&rt->st, &rt->plan, &features);
    int n = build_batch(rt, &n_rows);
    if (n < 0) return -1;
    if (n > 0) {
        fl_batch b = {.n_tokens = n, .token = rt->tok, .seq = rt->seq, .pos = rt->pos,
                      .logits = rt->want, .adapter = rt->adapter};
        if (fl_forward(rt->ctx, &b, rt->logits) != n_rows) return fl_error_prefix("runtime step");
    }
    run_jobs(rt);
    double now = now_s() - rt->clock0;
    int vocab = rt->ctx->model->cfg.vocab_size;
    for (int row = 0; row < n_rows; row++) {
        request *r = &rt->reqs[rt->row_req[row]];
        int32_t tok = fl_sampler_sample(r->sampler, rt->logits + (size_t)row * vocab);
        if (accept_token(rt, &n_ev, r, tok, now) != 0) return -1;
    }
    for (int i = 0; i < n_ev; i++)
        rt->events[i].text = rt->event_text + (uintptr_t)rt->events[i].text;
    double took = now_s() - t0;
    if (rt->plan.n_items || rt->plan.n_ft)
        fl_cost_observe(&rt->fit, &rt->st.cost, &features, took);
    rt->st.last_iteration_s = took;
    rt->stats.iterations++;
    rt->stats.busy_seconds += took;
    *events = rt->events;
    return n_ev;
}

static volatile sig_atomic_t sighup_count; /* SIGHUPs received */

static void on_sighup(int sig) {
    (void)sig;
    sighup_count++;
}

void fl_runtime_watch_sighup(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sighup;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGHUP, &sa, NULL);
}

int fl_runtime_poll_reload(fl_runtime *rt, double debounce) {
    if (!rt->policy_path) return 0;
    int hup = (int)sighup_count != rt->sighup_seen;
    rt->sighup_seen = (int)sighup_count;
    if (!hup) {
        double m = mtime_of(rt->policy_path), now = now_s();
        if (m != rt->seen_mtime) { /* a writer is at work: wait until it stops */
            rt->seen_mtime = m;
            rt->changed_at = now;
            return 0;
        }
        if (rt->changed_at < 0 || now - rt->changed_at < debounce) return 0;
        rt->changed_at = -1;
        if (fl_policy_hash_file(rt->policy_path) == fl_policy_hash(rt->policy)) return 0;
    }
    char *path = strdup(rt->policy_path);
    int rc = path ? fl_runtime_reload(rt, path) : fl_error("out of memory");
    free(path);
    return rc == 0 ? 1 : -1;
}

int fl_runtime_reload(fl_runtime *rt, const char *path) {
    fl_policy_params pp = policy_params(rt);
    if (fill_state(rt) != 0) return -1;
    /* Dry run on a copy of the live state, so a bad policy touches nothing real. */
    fl_sched_state copy = rt->st;
    fl_sched_plan plan = {.cap_items = rt->plan.cap_items, .cap_ft = rt->plan.cap_ft};
    copy.requests = fl_malloc(sizeof(fl_sched_request) * (size_t)(rt->st.n_requests + 1));
    copy.jobs = fl_malloc(sizeof(fl_sched_job) * (size_t)(rt->st.n_jobs + 1));
    plan.items = fl_malloc(sizeof(fl_sched_item) * (size_t)plan.cap_items);
    plan.ft = fl_malloc(sizeof(fl_sched_ft) * (size_t)(plan.cap_ft + 1));
    int rc = copy.requests && copy.jobs && plan.items && plan.ft ? 0 : -1;
    if (rc == 0 && rt->st.n_requests)
        memcpy(copy.requests, rt->st.requests, sizeof(fl_sched_request) * rt->st.n_requests);
    if (rc == 0 && rt->st.n_jobs)
        memcpy(copy.jobs, rt->st.jobs, sizeof(fl_sched_job) * rt->st.n_jobs);
    char *saved = rt->policy ? fl_policy_export(rt->policy) : NULL;
    fl_policy *trial = rc == 0 ? fl_policy_load(path, &copy, &plan, &pp, saved) : NULL;
    if (!trial) rc = -1;
    else if (fl_policy_schedule(trial) != 0)
        rc = fl_error("%s: its dry run failed: %s", path, fl_policy_last_error(trial));
    else if (fl_sched_validate(&copy, &plan) != 0)
        rc = fl_error_prefix("%s: its dry run gave an invalid plan", path);
    fl_policy_free(trial);
    free(copy.requests);
    free(copy.jobs);
    free(plan.items);
    free(plan.ft);
    fl_policy *next = NULL;
    char *next_path = NULL;
    if (rc == 0 && (!(next_path = strdup(path)) ||
                    !(next = fl_policy_load(path, &rt->st, &rt->plan, &pp, saved))))
        rc = -1;
    free(saved);
    if (rc != 0) {
        free(next_path);
        return -1;
    }
    fl_policy_free(rt->policy);
    free(rt->policy_path);
    rt->policy = next;
    rt->policy_path = next_path;
    rt->stats.reloads++;
    return 0;
}
