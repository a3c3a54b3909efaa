/* The simulated executor (see flexllm.h): virtual requests and finetuning samples,
 * the runtime's scheduling state and plan checks, and a clock advanced by the cost
 * profile's prediction of each plan. */
#include "fl_internal.h"
#include "policy.h"
#include "scheduler.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double arrival, first_at, last_at;
    int prompt_len, output_len, prefilled, generated;
    int admitted, done;
} sim_request;

typedef struct {
    int *lens;
    int n, epochs, grad_accum;
    int next;          /* samples begun */
    int in_sample;     /* a sample in flight */
    int len, forwarded, backward_left, in_accum, step, total_steps;
} sim_job;

struct fl_sim {
    fl_sim_profile prof;
    fl_cost_model truth; /* the profile as a cost model: what an iteration takes */
    float ttft_slo, tpot_slo;
    fl_policy *policy;
    sim_request *reqs;
    int n_reqs, cap_reqs, first_live;
    sim_job *jobs;
    int n_jobs;
    int pages_used, seqs_used;
    fl_sched_state st;
    fl_sched_plan plan;
    int *st_req;       /* request of each state entry */
    fl_sim_stats stats;
};

static int pages_for(int tokens) { return (tokens + FL_KV_PAGE_TOKENS - 1) / FL_KV_PAGE_TOKENS; }

static int get_num(const char *path, const cJSON *o, const char *k, double *v) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(x) || x->valuedouble < 0)
        return fl_error("%s: field '%s' must be a non-negative number", path, k);
    *v = x->valuedouble;
    return 0;
}

int fl_sim_profile_load(const char *path, fl_sim_profile *p) {
    char *text = fl_read_file(path, NULL);
    if (!text) return -1;
    cJSON *o = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return fl_error("%s: not a JSON object", path);
    }
    memset(p, 0, sizeof *p);
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(o, "name");
    snprintf(p->name, sizeof p->name, "%s", cJSON_IsString(name) ? name->valuestring : "?");
    p->analytic = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "analytic"));
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(o, "per_token");
    double mbt = 0, pages = 0, seqs = 0;
    int rc = get_num(path, o, "fixed", &p->fixed) || get_num(path, o, "per_context", &p->per_context) ||
             get_num(path, o, "max_batch_tokens", &mbt) || get_num(path, o, "kv_pages", &pages) ||
             get_num(path, o, "max_seqs", &seqs) ||
             (!cJSON_IsObject(pt) ? fl_error("%s: field 'per_token' must be an object", path) : 0);
    static const char *kinds[4] = {"prefill", "decode", "ft_forward", "ft_backward"};
    for (int k = 0; rc == 0 && k < 4; k++) rc = get_num(path, pt, kinds[k], &p->per_token[k]);
    /* Optional: profiles measured before the term existed fold it into per_token. */
    if (rc == 0 && cJSON_GetObjectItemCaseSensitive(o, "per_backward_chunk"))
        rc = get_num(path, o, "per_backward_chunk", &p->per_backward_chunk);
    cJSON_Delete(o);
    if (rc) return -1;
    p->max_batch_tokens = (int)mbt, p->kv_pages = (int)pages, p->max_seqs = (int)seqs;
    if (p->max_batch_tokens < 1 || p->kv_pages < 1 || p->max_seqs < 1)
        return fl_error("%s: max_batch_tokens, kv_pages and max_seqs must be positive", path);
    return 0;
}

fl_sim *fl_sim_new(const fl_sim_profile *profile, const char *policy, const char *options,
                   float ttft_slo, float tpot_slo) {
    fl_sim *s = fl_calloc(1, sizeof *s);
    if (!s) return NULL;
    s->prof = *profile;
    s->ttft_slo = ttft_slo;
    s->tpot_slo = tpot_slo;
    s->plan.cap_items = profile->max_batch_tokens;
    s->plan.items = fl_malloc(sizeof(fl_sched_item) * (size_t)profile->max_batch_tokens);
    if (!s->plan.items) goto fail;
    /* The profile is the simulated machine's true cost: a model fitted without end. */
    s->truth.fixed = profile->fixed;
    memcpy(s->truth.per_token, profile->per_token, sizeof profile->per_token);
    s->truth.per_context = profile->per_context;
    s->truth.per_backward_chunk = profile->per_backward_chunk;
    s->truth.fitted = 1 << 30;
    s->st.cost = s->truth;
    if (policy) {
        fl_policy_params pp = fl_policy_default_params();
        /* The clock is virtual: a call's wall time, which the machine's load stretches,
         * must not fail it and change the run; the budget only stops a runaway policy. */
        pp.time_budget = 1.0;
        pp.options = options;
        if (!(s->policy = fl_policy_load(policy, &s->st, &s->plan, &pp, NULL))) goto fail;
    }
    return s;
fail:
    fl_sim_free(s);
    return NULL;
}

void fl_sim_free(fl_sim *s) {
    if (!s) return;
    fl_policy_free(s->policy);
    for (int j = 0; j < s->n_jobs; j++) free(s->jobs[j].lens);
    free(s->jobs);
    free(s->reqs);
    free(s->st.requests);
    free(s->st_req);
    free(s->st.jobs);
    free(s->plan.items);
    free(s->plan.ft);
    free(s);
}

int fl_sim_submit(fl_sim *s, double arrival, int prompt_len, int output_len) {
    if (prompt_len < 1 || output_len < 1) return fl_error("sim: prompt and output lengths must be positive");
    if (pages_for(prompt_len + output_len) > s->prof.kv_pages)
        return fl_error("sim: a request of %d tokens needs more than the %d KV pages",
                        prompt_len + output_len, s->prof.kv_pages);
    if (s->n_reqs > 0 && arrival < s->reqs[s->n_reqs - 1].arrival)
        return fl_error("sim: requests must be submitted in arrival order");
    if (s->n_reqs == s->cap_reqs) {
        int cap = s->cap_reqs ? s->cap_reqs * 2 : 64;
        sim_request *r = realloc(s->reqs, sizeof *r * (size_t)cap);
        fl_sched_request *e = realloc(s->st.requests, sizeof *e * (size_t)cap);
        int *m = realloc(s->st_req, sizeof(int) * (size_t)cap);
        if (r) s->reqs = r;
        if (e) s->st.requests = e;
        if (m) s->st_req = m;
        if (!r || !e || !m) return fl_error("out of memory");
        s->cap_reqs = cap;
    }
    s->reqs[s->n_reqs] = (sim_request){.arrival = arrival, .first_at = -1, .last_at = -1,
                                       .prompt_len = prompt_len, .output_len = output_len};
    return s->n_reqs++;
}

int fl_sim_add_job(fl_sim *s, const int *lens, int n, int epochs, int grad_accum) {
    if (n < 1 || epochs < 1 || grad_accum < 1) return fl_error("sim: a job needs samples, epochs and grad_accum");
    sim_job *nj = realloc(s->jobs, sizeof *nj * (size_t)(s->n_jobs + 1));
    fl_sched_job *ne = realloc(s->st.jobs, sizeof *ne * (size_t)(s->n_jobs + 1));
    fl_sched_ft *nf = realloc(s->plan.ft, sizeof *nf * (size_t)(s->n_jobs + 1));
    if (nj) s->jobs = nj;
    if (ne) s->st.jobs = ne;
    if (nf) s->plan.ft = nf;
    if (!nj || !ne || !nf) return fl_error("out of memory");
    s->plan.cap_ft = s->n_jobs + 1;
    sim_job *j = &s->jobs[s->n_jobs];
    memset(j, 0, sizeof *j);
    if (!(j->lens = fl_malloc(sizeof(int) * (size_t)n))) return -1;
    memcpy(j->lens, lens, sizeof(int) * (size_t)n);
    j->n = n, j->epochs = epochs, j->grad_accum = grad_accum;
    j->total_steps = (n * epochs + grad_accum - 1) / grad_accum;
    return s->n_jobs++;
}

/* The state of this moment: arrived requests not done, jobs with work. Unlike the
 * runtime, which admits a request for its prompt and grows and preempts it page by page,
 * the sim promises a request its prompt and whole output at admission (pages_needed),
 * so it never preempts: its figures are those of full reservation. */
static void fill_state(fl_sim *s, double now) {
    fl_sched_state *st = &s->st;
    st->now = now;
    st->iteration = s->stats.iterations;
    st->max_batch_tokens = s->prof.max_batch_tokens;
    st->kv_pages_total = s->prof.kv_pages;
    st->ttft_slo = s->ttft_slo;
    st->tpot_slo = s->tpot_slo;
    st->n_jobs = 0;
    for (int k = 0; k < s->n_jobs; k++) {
        sim_job *j = &s->jobs[k];
        if (!j->in_sample && j->next < j->n * j->epochs) { /* begin a sample if it fits */
            int len = j->lens[j->next % j->n];
            if (s->pages_used + pages_for(len) <= s->prof.kv_pages && s->seqs_used < s->prof.max_seqs) {
                j->in_sample = 1, j->len = len, j->forwarded = 0, j->backward_left = len;
                j->next++;
                s->pages_used += pages_for(len);
                s->seqs_used++;
            }
        }
        fl_sched_job *e = &st->jobs[st->n_jobs];
        *e = (fl_sched_job){.id = k, .adapter = -1, .sample_len = j->len, .forwarded = j->forwarded,
                            .backward_left = j->backward_left, .step = j->step,
                            .total_steps = j->total_steps};
        e->phase = !j->in_sample ? FL_JOB_DONE : j->forwarded < j->len ? FL_JOB_FORWARD : FL_JOB_BACKWARD;
        st->n_jobs++;
    }
    st->kv_pages_free = s->prof.kv_pages - s->pages_used;
    st->seqs_free = s->prof.max_seqs - s->seqs_used;
    st->n_requests = 0;
    for (int i = s->first_live; i < s->n_reqs && s->reqs[i].arrival <= now; i++) {
        sim_request *r = &s->reqs[i];
        if (r->done) continue;
        fl_sched_request *e = &st->requests[st->n_requests];
        *e = (fl_sched_request){.id = i, .adapter = -1, .prompt_len = r->prompt_len,
                                .prefilled = r->prefilled, .generated = r->generated,
                                .max_tokens = r->output_len,
                                .pages_needed = pages_for(r->prompt_len + r->output_len),
                                .arrival = r->arrival, .first_token = r->first_at,
                                .last_token = r->last_at, .ttft_slo = s->ttft_slo,
                                .tpot_slo = s->tpot_slo};
        e->state = !r->admitted ? FL_REQ_WAITING
                   : r->prefilled < r->prompt_len ? FL_REQ_PREFILL : FL_REQ_DECODE;
        e->kv_pages = r->admitted ? e->pages_needed : 0;
        s->st_req[st->n_requests++] = i;
    }
}

static double tpot_of(const sim_request *r) {
    return r->generated > 1 ? (r->last_at - r->first_at) / (r->generated - 1) : 0;
}

static void finish_request(fl_sim *s, sim_request *r) {
    r->done = 1;
    s->pages_used -= pages_for(r->prompt_len + r->output_len);
    s->seqs_used--;
    double ttft = r->first_at - r->arrival, tpot = tpot_of(r);
    s->stats.requests_done++;
    s->stats.requests_slo_met += (s->ttft_slo <= 0 || ttft <= s->ttft_slo) &&
                                 (s->tpot_slo <= 0 || tpot <= s->tpot_slo);
}

/* Applies the plan at the end of an iteration that ends at time end. */
static void apply_plan(fl_sim *s, double end) {
    for (int i = 0; i < s->plan.n_items; i++) {
        sim_request *r = &s->reqs[s->st_req[s->plan.items[i].request]];
        if (!r->admitted) {
            r->admitted = 1;
            s->pages_used += pages_for(r->prompt_len + r->output_len);
            s->seqs_used++;
        }
        if (r->prefilled < r->prompt_len) {
            r->prefilled += s->plan.items[i].tokens;
            if (r->prefilled < r->prompt_len) continue;
        }
        r->generated++; /* a decode, or the token sampled at the end of the prompt */
        if (r->first_at < 0) r->first_at = end;
        r->last_at = end;
        if (r->generated >= r->output_len) finish_request(s, r);
    }
    for (int i = 0; i < s->plan.n_ft; i++) {
        const fl_sched_ft *f = &s->plan.ft[i];
        sim_job *j = &s->jobs[s->st.jobs[f->job].id];
        j->forwarded += f->forward_tokens;
        j->backward_left -= f->backward_tokens;
        s->stats.ft_forward_tokens += f->forward_tokens;
        s->stats.ft_backward_tokens += f->backward_tokens;
        if (j->forwarded < j->len || j->backward_left > 0) continue;
        j->in_sample = 0;
        s->pages_used -= pages_for(j->len);
        s->seqs_used--;
        if (++j->in_accum == j->grad_accum || j->next == j->n * j->epochs) j->step++, j->in_accum = 0;
    }
    while (s->first_live < s->n_reqs && s->reqs[s->first_live].done) s->first_live++;
}

static int all_done(const fl_sim *s) {
    if (s->first_live < s->n_reqs) return 0;
    for (int k = 0; k < s->n_jobs; k++)
        if (s->jobs[k].in_sample || s->jobs[k].next < s->jobs[k].n * s->jobs[k].epochs) return 0;
    return 1;
}

int fl_sim_run(fl_sim *s, double until) {
    double now = s->stats.clock;
    while (!all_done(s) && now < until) {
        fill_state(s, now);
        s->stats.policy_failures += fl_sched_decide(s->policy, &s->st, &s->plan, 0) < 0;
        if (s->plan.n_items == 0 && s->plan.n_ft == 0) {
            /* Idle: wait for the next arrival (or stop when nothing can ever move). */
            int next = s->first_live;
            while (next < s->n_reqs && s->reqs[next].arrival <= now) next++;
            if (next == s->n_reqs) return fl_error("sim: stalled at %.3f s with work left", now);
            now = s->reqs[next].arrival;
            continue;
        }
        fl_cost_features f;
        fl_sched_plan_features(&s->st, &s->plan, &f);
        /* Not st.cost: a policy can write the state it is shown. */
        double took = fl_cost_predict(&s->truth, &f);
        now += took;
        apply_plan(s, now);
        s->st.last_iteration_s = took;
        s->stats.iterations++;
    }
    s->stats.clock = now;
    return 0;
}

static int by_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double quantile(double *v, int n, double q) {
    if (n == 0) return 0;
    qsort(v, (size_t)n, sizeof *v, by_double);
    int i = (int)ceil(q * n) - 1;
    return v[i < 0 ? 0 : i];
}

void fl_sim_get_stats(const fl_sim *s, fl_sim_stats *out) {
    *out = s->stats;
    double *ttft = malloc(sizeof(double) * (size_t)(s->n_reqs + 1));
    double *tpot = malloc(sizeof(double) * (size_t)(s->n_reqs + 1));
    int n = 0;
    for (int i = 0; ttft && tpot && i < s->n_reqs; i++) {
        const sim_request *r = &s->reqs[i];
        if (!r->done) continue;
        ttft[n] = r->first_at - r->arrival;
        tpot[n++] = tpot_of(r);
    }
    if (ttft && tpot) {
        out->ttft_p50 = quantile(ttft, n, 0.5), out->ttft_p99 = quantile(ttft, n, 0.99);
        out->tpot_p50 = quantile(tpot, n, 0.5), out->tpot_p99 = quantile(tpot, n, 0.99);
    }
    free(ttft);
    free(tpot);
}
