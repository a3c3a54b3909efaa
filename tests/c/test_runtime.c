/* The co-serving runtime end to end: inference outputs do not change when a
 * finetuning job shares the iterations, nor does the job's result when inference does;
 * failing policies never stall requests; 200 requests survive 20 policy reloads;
 * cancelled requests and jobs leave cleanly; per-request SLOs; requests preempted in a
 * small KV pool give the outputs of a large one. */
#include "flexllm.h"
#include "lora.h"
#include "tap.h"
#include "train.h"

#include <math.h>
#include <signal.h>
#include <time.h>

#define N_REQ 200
#define MAX_TOK 8

static fl_model *model;
static char dir[4096];

typedef struct {
    int32_t ids[N_REQ][32];
    int n[N_REQ];
    int finishes[N_REQ];
} outputs;

static fl_runtime *new_runtime(fl_context *ctx, const char *policy) {
    fl_runtime_params rp = fl_runtime_default_params();
    rp.prefill_chunk = 5;
    rp.policy = policy;
    rp.policy_time_budget = 0.02;
    fl_runtime *rt = fl_runtime_new(ctx, &rp);
    if (!rt) tap_diag("runtime: %s", fl_last_error());
    return rt;
}

/* A job on data.txt that writes to dir/name: a rank-4 LoRA on every linear, 40-token
 * samples, grad_accum of them per optimizer step, max_steps steps. */
static fl_finetune *make_job(fl_context *ctx, const char *name, int grad_accum, int max_steps,
                             uint64_t seed, float lr) {
    char data[4300], out[4300];
    snprintf(data, sizeof data, "%s/data.txt", dir);
    snprintf(out, sizeof out, "%s/%s", dir, name);
    fl_finetune_params p = fl_finetune_default_params();
    p.data = data;
    p.out = out;
    p.lora.targets = FL_LORA_ALL_LINEARS;
    p.lora.rank = 4;
    p.optim.lr = lr;
    p.dataset.max_len = 40;
    p.grad_accum = grad_accum;
    p.max_steps = max_steps;
    p.seed = seed;
    fl_finetune *job = fl_finetune_new(ctx, &p);
    if (!job) tap_diag("job: %s", fl_last_error());
    return job;
}

/* The co-serving tests' job: one sample per optimizer step, 6 steps. */
static fl_finetune *new_job(fl_context *ctx, const char *name) {
    return make_job(ctx, name, 1, 6, 3, 2e-3f);
}

/* Submits n greedy requests (ids base..), then steps until they are all done. */
static int run_requests(fl_runtime *rt, int n, outputs *o, int reload_every, int *reloads) {
    memset(o, 0, sizeof *o);
    int first = -1;
    for (int i = 0; i < n; i++) {
        int32_t prompt[12];
        int len = 3 + i % 9;
        for (int j = 0; j < len; j++) prompt[j] = 3 + (i * 31 + j * 17) % 250;
        fl_request_params rp = fl_request_default_params();
        rp.max_tokens = MAX_TOK;
        rp.ignore_eos = 1;
        int id = fl_runtime_submit(rt, prompt, len, &rp);
        if (first < 0) first = id;
    }
    int done = 0;
    for (long step = 0; done < n && step < 20000; step++) {
        if (reload_every && step % reload_every == 0 && *reloads < 20) {
            if (fl_runtime_reload(rt, "tests/policies/rt_fifo.lua") == 0) (*reloads)++;
            else tap_diag("reload: %s", fl_last_error());
        }
        const fl_gen_event *ev;
        int ne = fl_runtime_step(rt, &ev);
        if (ne < 0) return -1;
        for (int e = 0; e < ne; e++) {
            int k = ev[e].request - first;
            if (k < 0 || k >= n) continue;
            if (ev[e].token >= 0 && o->n[k] < 32) o->ids[k][o->n[k]++] = ev[e].token;
            if (ev[e].finish) {
                o->finishes[k]++;
                done++;
            }
        }
    }
    return done == n ? 0 : -1;
}

static int same_outputs(const outputs *a, const outputs *b, int n) {
    for (int i = 0; i < n; i++)
        if (a->n[i] != b->n[i] || a->finishes[i] != 1 || b->finishes[i] != 1 ||
            memcmp(a->ids[i], b->ids[i], sizeof(int32_t) * a->n[i]) != 0)
            return 0;
    return 1;
}

static void run_job(fl_runtime *rt) {
    const fl_gen_event *ev;
    for (int i = 0; i < 5000 && fl_runtime_active(rt) > 0; i++)
        if (fl_runtime_step(rt, &ev) < 0) break;
}

static void test_coserving(void) {
    static outputs alone, shared, shared_policy;
    fl_context *ctx = fl_context_new(model, NULL);
    fl_runtime *rt = new_runtime(ctx, NULL);
    run_requests(rt, 12, &alone, 0, NULL);
    fl_runtime_free(rt);

    rt = new_runtime(ctx, NULL);
    fl_finetune *job = new_job(ctx, "job_shared");
    fl_runtime_add_job(rt, job);
    int rc = run_requests(rt, 12, &shared, 0, NULL);
    fl_runtime_stats st;
    fl_runtime_get_stats(rt, &st);
    tap_ok(rc == 0 && st.ft_forward_tokens > 0 && same_outputs(&alone, &shared, 12),
           "greedy outputs of 12 requests are identical with a finetuning job in the same "
           "iterations (%lld finetuning tokens ran beside them)", st.ft_forward_tokens);
    run_job(rt);
    fl_adapter *with = fl_finetune_adapter(job);
    float *p_with = malloc(sizeof(float) * with->n_params);
    memcpy(p_with, with->params, sizeof(float) * with->n_params);
    fl_finetune_progress pw;
    fl_finetune_get_progress(job, &pw);
    fl_runtime_free(rt);

    rt = new_runtime(ctx, NULL);
    job = new_job(ctx, "job_alone");
    fl_runtime_add_job(rt, job);
    run_job(rt);
    fl_finetune_progress pa;
    fl_finetune_get_progress(job, &pa);
    fl_adapter *alone_a = fl_finetune_adapter(job);
    double d = 0, scale = 0;
    for (size_t i = 0; i < alone_a->n_params; i++) {
        d = fmax(d, fabs((double)alone_a->params[i] - p_with[i]));
        scale = fmax(scale, fabs(alone_a->params[i]));
    }
    tap_ok(pa.done && pw.done && pa.step == 6 && fabs(pa.loss - pw.loss) <= 1e-5 * fabs(pa.loss) &&
               d <= 1e-4 * scale,
           "the job's last loss (%.6f vs %.6f) and adapter (max diff %.1e of %.2g) are the same "
           "with and without concurrent inference", pa.loss, pw.loss, d, scale);
    fl_runtime *alone_rt = rt;
    free(p_with);

    /* Every policy that runs both kinds of work: inference outputs as without the job,
     * and the job's adapter as when the same policy runs it without inference. */
    const char *policies[] = {"tests/policies/rt_fifo.lua", "policies/hybrid.lua",
                              "policies/static_split.lua", "policies/temporal.lua"};
    for (int k = 0; k < 4; k++) {
        fl_runtime *solo = new_runtime(ctx, policies[k]);
        rt = new_runtime(ctx, policies[k]);
        if (!tap_ok(rt && solo, "%s loads (%s)", policies[k], rt && solo ? "" : fl_last_error())) {
            fl_runtime_free(rt);
            fl_runtime_free(solo);
            continue;
        }
        char name[32];
        snprintf(name, sizeof name, "job_solo%d", k);
        fl_finetune *sj = new_job(ctx, name);
        fl_runtime_add_job(solo, sj);
        run_job(solo);
        snprintf(name, sizeof name, "job_policy%d", k);
        fl_finetune *pj = new_job(ctx, name);
        fl_runtime_add_job(rt, pj);
        rc = run_requests(rt, 12, &shared_policy, 0, NULL);
        run_job(rt);
        fl_runtime_get_stats(rt, &st);
        fl_finetune_progress pp;
        fl_finetune_get_progress(pj, &pp);
        const fl_adapter *ad = fl_finetune_adapter(pj), *sa = fl_finetune_adapter(sj);
        double dd = 0;
        for (size_t i = 0; i < ad->n_params; i++)
            dd = fmax(dd, fabs((double)ad->params[i] - sa->params[i]));
        tap_ok(rc == 0 && st.policy_calls > 0 && st.policy_failures == 0 && pp.done &&
                   same_outputs(&alone, &shared_policy, 12) && dd <= 1e-4 * scale,
               "%s: the same inference outputs, and the job's adapter within %.1e of the same "
               "job without inference (%lld policy calls, %.1f us each)", policies[k], dd,
               st.policy_calls, st.policy_calls ? 1e6 * st.policy_seconds / st.policy_calls : 0.0);
        fl_runtime_free(rt);
        fl_runtime_free(solo);
    }
    fl_runtime_free(alone_rt);
    fl_context_free(ctx);
}

static void test_failing_policies(void) {
    static outputs ref, got;
    fl_context *ctx = fl_context_new(model, NULL);
    fl_runtime *rt = new_runtime(ctx, NULL);
    run_requests(rt, 10, &ref, 0, NULL);
    fl_runtime_free(rt);
    const struct {
        const char *file, *why;
    } bad[] = {{"tests/policies/rt_raises.lua", "always fails"},
               {"tests/policies/rt_loops.lua", "time budget"},
               {"tests/policies/rt_garbage.lua", "request index 100000"},
               {"tests/policies/rt_hog.lua", "memory"}};
    for (int i = 0; i < 4; i++) {
        rt = new_runtime(ctx, bad[i].file);
        if (!tap_ok(rt != NULL, "%s loads (%s)", bad[i].file, rt ? "" : fl_last_error())) continue;
        int rc = rt ? run_requests(rt, 10, &got, 0, NULL) : -1;
        fl_runtime_stats st;
        if (rt) fl_runtime_get_stats(rt, &st);
        tap_ok(rc == 0 && same_outputs(&ref, &got, 10) && st.policy_failures > 0 &&
                   st.policy_disabled && strstr(st.policy_error, bad[i].why),
               "%s: every request completes as under the built-in plan; the policy failed %lld "
               "times, is disabled, and its error is kept (\"%.60s\")",
               bad[i].file, st.policy_failures, st.policy_error);
        int reloaded = rt && fl_runtime_reload(rt, "tests/policies/rt_fifo.lua") == 0;
        long long before = st.policy_calls;
        if (reloaded) run_requests(rt, 10, &got, 0, NULL);
        fl_runtime_stats after;
        if (rt) fl_runtime_get_stats(rt, &after);
        tap_ok(reloaded && after.policy_calls > before && after.policy_failures == st.policy_failures &&
                   same_outputs(&ref, &got, 10),
               "after it, a good policy reloads and takes over (%lld calls, no new failure)",
               after.policy_calls - before);
        fl_runtime_free(rt);
    }
    rt = new_runtime(ctx, "tests/policies/rt_fifo.lua");
    int rc = rt ? fl_runtime_reload(rt, "tests/policies/rt_raises.lua") : -1;
    tap_ok(rc == -1 && strstr(fl_last_error(), "dry run"),
           "a reload whose dry run fails is refused and the running policy stays (\"%.80s\")",
           fl_last_error());
    fl_runtime_free(rt);
    fl_context_free(ctx);
}

static void test_reloads(void) {
    static outputs ref, got;
    fl_context_params cp = fl_context_default_params();
    cp.max_seqs = 64;
    fl_context *ctx = fl_context_new(model, &cp);
    fl_runtime *rt = new_runtime(ctx, "tests/policies/rt_fifo.lua");
    int rc = run_requests(rt, N_REQ, &ref, 0, NULL);
    fl_runtime_free(rt);
    rt = new_runtime(ctx, "tests/policies/rt_fifo.lua");
    int reloads = 0;
    int rc2 = run_requests(rt, N_REQ, &got, 1, &reloads);
    int once = 1;
    for (int i = 0; i < N_REQ; i++) once &= got.finishes[i] == 1;
    if (rc || rc2) tap_diag("runs: %d %d (%s)", rc, rc2, fl_last_error());
    fl_runtime_stats st;
    fl_runtime_get_stats(rt, &st);
    tap_ok(rc == 0 && rc2 == 0 && reloads == 20 && st.reloads == 20 && once &&
               same_outputs(&ref, &got, N_REQ),
           "%d requests while the policy is reloaded %d times: each completes exactly once, "
           "with the output of a run without reloads", N_REQ, reloads);
    fl_runtime_free(rt);
    fl_context_free(ctx);
}

static void write_policy(const char *path, const char *extra) {
    size_t len;
    FILE *in = fopen("tests/policies/rt_fifo.lua", "rb");
    static char text[16384];
    len = fread(text, 1, sizeof text, in);
    fclose(in);
    FILE *out = fopen(path, "wb");
    fwrite(text, 1, len, out);
    fputs(extra, out);
    fclose(out);
    struct timespec ts = {0, 20 * 1000 * 1000}; /* let the modification time move */
    nanosleep(&ts, NULL);
}

static void test_watch(void) {
    char path[4300];
    snprintf(path, sizeof path, "%s/watched.lua", dir);
    write_policy(path, "");
    fl_context *ctx = fl_context_new(model, NULL);
    fl_runtime *rt = new_runtime(ctx, path);
    int a = fl_runtime_poll_reload(rt, 0.0);
    write_policy(path, "-- edited\n");
    int b = fl_runtime_poll_reload(rt, 0.0), c = fl_runtime_poll_reload(rt, 0.0);
    tap_ok(a == 0 && b == 0 && c == 1,
           "an edited policy file reloads once its modification time has settled (%d %d %d)", a, b, c);
    write_policy(path, "-- edited\n");
    b = fl_runtime_poll_reload(rt, 0.0), c = fl_runtime_poll_reload(rt, 0.0);
    tap_ok(b == 0 && c == 0, "rewritten with the same bytes, it does not reload (content hash) (%d %d)", b, c);
    write_policy(path, "this is not Lua\n");
    b = fl_runtime_poll_reload(rt, 0.0), c = fl_runtime_poll_reload(rt, 0.0);
    static outputs o;
    int rc = run_requests(rt, 6, &o, 0, NULL);
    fl_runtime_stats st;
    fl_runtime_get_stats(rt, &st);
    tap_ok(c == -1 && rc == 0 && st.policy_failures == 0 && st.policy_calls > 0,
           "a broken edit is refused and the running policy keeps scheduling (%lld calls)",
           st.policy_calls);
    write_policy(path, "-- fixed\n");
    fl_runtime_watch_sighup();
    raise(SIGHUP);
    c = fl_runtime_poll_reload(rt, 60.0);
    fl_runtime_get_stats(rt, &st);
    tap_ok(c == 1 && st.reloads == 2, "SIGHUP reloads at once, whatever the debounce (%d reloads)",
           st.reloads);
    fl_runtime_free(rt);
    fl_context_free(ctx);
}

/* ------------------------------------------- cancel, SLOs, preemption */

#define T_REQ 16
#define T_TOK 200

/* Every event of a run by request id (ids of a fresh runtime count from 0). */
typedef struct {
    int32_t ids[T_REQ][T_TOK];
    int n[T_REQ], finishes[T_REQ];
    int gone[T_REQ];  /* cancelled */
    int late[T_REQ];  /* events after its finish or cancel */
    fl_gen_event fin[T_REQ];
} trace;

static void record(trace *t, const fl_gen_event *ev, int n) {
    for (int e = 0; e < n; e++) {
        int k = ev[e].request;
        if (k < 0 || k >= T_REQ) continue;
        if (t->finishes[k] || t->gone[k]) t->late[k]++;
        if (ev[e].token >= 0 && t->n[k] < T_TOK) t->ids[k][t->n[k]++] = ev[e].token;
        if (ev[e].finish) {
            t->finishes[k]++;
            t->fin[k] = ev[e];
        }
    }
}

/* Steps until nothing is active. */
static int drive(fl_runtime *rt, trace *t) {
    const fl_gen_event *ev;
    for (int i = 0; i < 50000 && fl_runtime_active(rt) > 0; i++) {
        int n = fl_runtime_step(rt, &ev);
        if (n < 0) return -1;
        record(t, ev, n);
    }
    return fl_runtime_active(rt) == 0 ? 0 : -1;
}

/* Prompt k of the tests below: 5 + k % 7 tokens. */
static int submit_prompt(fl_runtime *rt, int k, int max_tokens, float temperature) {
    int32_t prompt[16];
    int len = 5 + k % 7;
    for (int j = 0; j < len; j++) prompt[j] = 3 + (k * 37 + j * 11) % 250;
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = max_tokens;
    rp.ignore_eos = 1;
    rp.sampling.temperature = temperature;
    rp.sampling.seed = 1000 + (uint64_t)k;
    return fl_runtime_submit(rt, prompt, len, &rp);
}

static int same_ids(const trace *a, int ka, const trace *b, int kb) {
    return a->n[ka] == b->n[kb] && a->finishes[ka] == 1 && b->finishes[kb] == 1 &&
           memcmp(a->ids[ka], b->ids[kb], sizeof(int32_t) * a->n[ka]) == 0;
}

static void test_cancel(void) {
    static trace ref, got;
    fl_context_params cp = fl_context_default_params();
    cp.max_seqs = 2; /* two run, the rest queue */
    fl_context *ctx = fl_context_new(model, &cp);
    /* Prompts 1..4 alone; then 0..5 with 0 cancelled while running, 5 while queued. */
    fl_runtime *rt = new_runtime(ctx, NULL);
    memset(&ref, 0, sizeof ref);
    for (int k = 1; k <= 4; k++) submit_prompt(rt, k, 12, 0);
    int rc = drive(rt, &ref);
    fl_runtime_free(rt);

    rt = new_runtime(ctx, NULL);
    memset(&got, 0, sizeof got);
    for (int k = 0; k <= 5; k++) submit_prompt(rt, k, 12, 0);
    const fl_gen_event *ev;
    for (int i = 0; i < 100 && got.n[0] < 3; i++) record(&got, ev, fl_runtime_step(rt, &ev));
    int running = got.n[0] >= 3 && !got.finishes[0] && got.n[5] == 0;
    int c0 = fl_runtime_cancel(rt, 0), c5 = fl_runtime_cancel(rt, 5);
    got.gone[0] = got.gone[5] = 1;
    int again = fl_runtime_cancel(rt, 0);
    int again_msg = again == -1 && strstr(fl_last_error(), "request 0 is not queued or running");
    int unknown = fl_runtime_cancel(rt, 77);
    tap_ok(running && c0 == 0 && c5 == 0 && again_msg && unknown == -1,
           "a running request (after %d tokens) and a queued one are cancelled; cancelling one "
           "again or an unknown id fails (\"%s\")", got.n[0], fl_last_error());
    int n0 = got.n[0];
    rc |= drive(rt, &got);
    int same = rc == 0;
    for (int k = 1; k <= 4; k++) same &= same_ids(&ref, k - 1, &got, k);
    fl_runtime_stats st;
    fl_runtime_get_stats(rt, &st);
    tap_ok(same && st.requests_done == 4 && st.requests_cancelled == 2,
           "the other requests give the outputs they give without the cancelled ones (%lld done, "
           "%lld cancelled)", st.requests_done, st.requests_cancelled);
    tap_ok(got.late[0] == 0 && got.late[5] == 0 && got.n[0] == n0 && got.n[5] == 0 &&
               !got.finishes[0] && !got.finishes[5],
           "no event for a cancelled request after its cancel");
    tap_ok(fl_kv_pages_free(ctx) == fl_kv_pages_total(ctx) && fl_seqs_free(ctx) == 2,
           "every KV page (%d of %d) and sequence slot is free again", fl_kv_pages_free(ctx),
           fl_kv_pages_total(ctx));
    fl_runtime_free(rt);
    fl_context_free(ctx);
}

/* The cancel tests' job: two samples per optimizer step, 4 steps. */
static fl_finetune *cancel_job(fl_context *ctx, const char *name) {
    return make_job(ctx, name, 2, 4, 5, 2e-3f);
}

/* Cancels the job once its sample in flight is in the phase wanted (forward: some
 * positions run forward, not all; backward: some run backward, not all) after at least
 * one optimizer step, then checks the job, the pool and the adapter against snapshots of
 * the adapter after each step of an uncancelled run (snap[step]). */
static void cancel_job_in(fl_context *ctx, int backward, float *const *snap) {
    int seqs = fl_seqs_free(ctx);
    fl_runtime *rt = new_runtime(ctx, NULL);
    fl_finetune *job = cancel_job(ctx, backward ? "cancel_bwd" : "cancel_fwd");
    int id = fl_runtime_add_job(rt, job);
    const fl_gen_event *ev;
    int found = 0, rc;
    fl_finetune_progress pr;
    for (int i = 0; i < 2000 && !found; i++) {
        if (fl_runtime_step(rt, &ev) < 0) break;
        fl_finetune_get_progress(job, &pr);
        fl_train_sample *t = pr.done ? NULL : fl_finetune_sample(job, &rc);
        if (!t || pr.step < 1) continue;
        int n = fl_train_length(t), f = fl_train_forwarded(t), b = n - fl_train_backward_left(t);
        found = backward ? f == n && b > 0 && b < n : f > 0 && f < n;
    }
    int free_before = fl_kv_pages_free(ctx);
    int cancelled = fl_runtime_cancel_job(rt, id);
    fl_finetune_get_progress(job, &pr);
    const fl_adapter *a = fl_finetune_adapter(job);
    int same = pr.step < 5 && memcmp(a->params, snap[pr.step], sizeof(float) * a->n_params) == 0;
    tap_ok(found && cancelled == 0 && fl_kv_pages_free(ctx) == fl_kv_pages_total(ctx) &&
               free_before < fl_kv_pages_total(ctx) && fl_seqs_free(ctx) == seqs,
           "cancelled mid-%s: its sample's KV pages (%d) and sequence return",
           backward ? "backward" : "forward", fl_kv_pages_total(ctx) - free_before);
    tap_ok(fl_runtime_job_done(rt, id) == 1 && strcmp(fl_runtime_job_error(rt, id), "cancelled") == 0 &&
               fl_runtime_active(rt) == 0 && fl_runtime_cancel_job(rt, id) == -1 &&
               strstr(fl_last_error(), "already failed"),
           "the job is done with the error \"cancelled\"; cancelling it again fails (\"%s\")",
           fl_last_error());
    tap_ok(same, "its adapter holds the weights of its last optimizer step (step %d), bitwise "
                 "those of an uncancelled run after that step", pr.step);
    /* The adapter stays usable: a request generates with it. */
    static trace t;
    memset(&t, 0, sizeof t);
    int32_t prompt[4] = {5, 6, 7, 8};
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = 4;
    rp.adapter = a;
    int rid = fl_runtime_submit(rt, prompt, 4, &rp);
    tap_ok(rid >= 0 && drive(rt, &t) == 0 && t.finishes[rid] == 1,
           "a request generates with the cancelled job's adapter afterwards");
    fl_runtime_free(rt);
}

static void test_cancel_job(void) {
    fl_context_params cp = fl_context_default_params();
    cp.max_batch_tokens = 16; /* forward and backward take several iterations per sample */
    fl_context *ctx = fl_context_new(model, &cp);
    fl_runtime *rt = new_runtime(ctx, NULL);
    fl_finetune *job = cancel_job(ctx, "cancel_ref");
    fl_runtime_add_job(rt, job);
    const fl_adapter *a = fl_finetune_adapter(job);
    float *snap[5];
    for (int s = 0; s < 5; s++) snap[s] = malloc(sizeof(float) * a->n_params);
    memcpy(snap[0], a->params, sizeof(float) * a->n_params);
    fl_finetune_progress pr;
    const fl_gen_event *ev;
    int last = 0;
    for (int i = 0; i < 5000 && fl_runtime_active(rt) > 0; i++) {
        if (fl_runtime_step(rt, &ev) < 0) break;
        fl_finetune_get_progress(job, &pr);
        if (pr.step != last && pr.step < 5) memcpy(snap[pr.step], a->params, sizeof(float) * a->n_params);
        last = pr.step;
    }
    fl_finetune_get_progress(job, &pr);
    if (tap_ok(pr.done && pr.step == 4, "the uncancelled reference job runs its 4 steps")) {
        cancel_job_in(ctx, 0, snap);
        cancel_job_in(ctx, 1, snap);
    }
    for (int s = 0; s < 5; s++) free(snap[s]);
    fl_runtime_free(rt);
    fl_context_free(ctx);
}

/* A job whose loss turns NaN in the middle of a sample (a learning rate of 1e30 blows the
 * adapter up at its first step) fails, and the sample's KV pages and sequence return as on
 * a cancel: afterwards a request that needs the whole pool runs to its end. */
static void test_failed_job(void) {
    fl_context_params cp = fl_context_default_params();
    cp.max_batch_tokens = 16; /* a 40-token sample's forward takes three iterations */
    cp.kv_pages = 8;
    fl_context *ctx = fl_context_new(model, &cp);
    int seqs = fl_seqs_free(ctx);
    fl_runtime *rt = new_runtime(ctx, NULL);
    int id = fl_runtime_add_job(rt, make_job(ctx, "job_fails", 1, 20, 5, 1e30f));
    const fl_gen_event *ev;
    for (int i = 0; i < 2000 && fl_runtime_active(rt) > 0; i++)
        if (fl_runtime_step(rt, &ev) < 0) break;
    const char *err = fl_runtime_job_error(rt, id);
    tap_ok(fl_runtime_job_done(rt, id) == 1 && strstr(err, "the loss is") &&
               fl_kv_pages_free(ctx) == cp.kv_pages && fl_seqs_free(ctx) == seqs,
           "a job that fails mid-sample gives its KV pages (%d of %d free) and sequence back "
           "(\"%.60s\")", fl_kv_pages_free(ctx), cp.kv_pages, err);
    static trace t;
    memset(&t, 0, sizeof t);
    int32_t prompt[4] = {5, 6, 7, 8};
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = cp.kv_pages * FL_KV_PAGE_TOKENS - 4;
    rp.ignore_eos = 1;
    int rid = fl_runtime_submit(rt, prompt, 4, &rp);
    tap_ok(rid >= 0 && drive(rt, &t) == 0 && t.finishes[rid] == 1,
           "then a request that needs all %d pages runs to its end (%s)", cp.kv_pages,
           rid >= 0 ? "" : fl_last_error());
    fl_runtime_free(rt);
    fl_context_free(ctx);
}

static void test_request_slo(void) {
    static trace t;
    memset(&t, 0, sizeof t);
    fl_context *ctx = fl_context_new(model, NULL);
    fl_runtime *rt = new_runtime(ctx, NULL);
    int32_t prompt[3] = {4, 5, 6};
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = 5;
    rp.ttft_slo = 1e-9f; /* no first token comes that fast */
    int tight = fl_runtime_submit(rt, prompt, 3, &rp);
    rp.ttft_slo = 1e3f;
    int lax = fl_runtime_submit(rt, prompt, 3, &rp);
    rp.ttft_slo = -1;
    int bad = fl_runtime_submit(rt, prompt, 3, &rp);
    int bad_msg = bad == -1 && strstr(fl_last_error(), "ttft_slo (-1)");
    int rc = drive(rt, &t);
    fl_runtime_stats st;
    fl_runtime_get_stats(rt, &st);
    const fl_gen_event *a = &t.fin[tight], *b = &t.fin[lax];
    tap_ok(rc == 0 && !a->slo_met && b->slo_met && st.requests_done == 2 && st.requests_slo_met == 1,
           "per-request TTFT SLOs of 1e-9 s and 1e3 s: missed and met in their finish events, "
           "1 of 2 met in the stats");
    tap_ok(a->ttft > 1e-9 && b->ttft > 1e-9 && a->ttft < 1e3 && a->tpot >= 0 && b->tpot >= 0 &&
               (a->tpot > 0 || b->tpot > 0),
           "finish events carry the measured ttft (%.2e s, %.2e s) and tpot (%.2e s, %.2e s)",
           a->ttft, b->ttft, a->tpot, b->tpot);
    tap_ok(bad_msg, "a negative SLO is refused (\"%s\")", fl_last_error());
    fl_runtime_free(rt);
    fl_context_free(ctx);
}

/* 8 requests with long outputs (one sampled at temperature 1) through a pool of pages
 * for about two of them: every request completes once with the output of a large pool. */
static void test_preemption(fl_model *m, const char *what) {
    enum { N = 8, LEN = 150 };
    static trace big, small;
    memset(&big, 0, sizeof big);
    memset(&small, 0, sizeof small);
    fl_context *ctx = fl_context_new(m, NULL);
    fl_runtime *rt = new_runtime(ctx, NULL);
    for (int k = 0; k < N; k++) submit_prompt(rt, k, LEN, k == 3 ? 1.0f : 0);
    int rc = drive(rt, &big);
    fl_runtime_free(rt);
    fl_context_free(ctx);

    fl_context_params cp = fl_context_default_params();
    cp.kv_pages = 2 * ((11 + LEN + FL_KV_PAGE_TOKENS - 1) / FL_KV_PAGE_TOKENS);
    ctx = fl_context_new(m, &cp);
    const char *policies[] = {NULL, "policies/hybrid.lua"};
    for (int p = 0; p < 2; p++) {
        rt = new_runtime(ctx, policies[p]);
        memset(&small, 0, sizeof small);
        for (int k = 0; k < N; k++) submit_prompt(rt, k, LEN, k == 3 ? 1.0f : 0);
        int rc2 = drive(rt, &small);
        fl_runtime_stats st;
        fl_runtime_get_stats(rt, &st);
        int same = rc == 0 && rc2 == 0, once = 1;
        for (int k = 0; k < N; k++) {
            same &= same_ids(&big, k, &small, k) && small.n[k] == LEN;
            once &= small.finishes[k] == 1 && small.late[k] == 0;
        }
        tap_ok(same && once && st.preemptions > 0 && st.requests_done == N &&
                   st.policy_failures == 0,
               "%s, %s: %d requests of %d tokens through %d KV pages: %lld preemptions, each "
               "completes exactly once with the output of a large pool (greedy and sampled)",
               what, policies[p] ? policies[p] : "built-in plan", N, LEN, cp.kv_pages,
               st.preemptions);
        tap_ok(fl_kv_pages_free(ctx) == cp.kv_pages, "%s: all %d pages are free afterwards", what,
               cp.kv_pages);
        fl_runtime_free(rt);
    }
    fl_context_free(ctx);
}

int main(void) {
    snprintf(dir, sizeof dir, "%s", tap_tmpdir("test_runtime"));
    char path[4300];
    snprintf(path, sizeof path, "%s/model", dir);
    fl_init_model_params ip = fl_init_model_default_params();
    ip.dim = 64, ip.hidden_dim = 160, ip.n_layers = 2, ip.n_heads = 4, ip.n_kv_heads = 2;
    fl_init_model(path, &ip);
    model = fl_model_load(path, NULL);
    snprintf(path, sizeof path, "%s/data.txt", dir);
    FILE *f = fopen(path, "wb");
    for (int i = 0; i < 60; i++) fputs("the cat sat on the mat. the dog ran to the log. ", f);
    fclose(f);
    if (!tap_ok(model != NULL, "a small model is written and loaded")) return tap_done();
    test_coserving();
    test_failing_policies();
    test_reloads();
    test_watch();
    test_cancel();
    test_cancel_job();
    test_failed_job();
    test_request_slo();
    test_preemption(model, "init-model");
    const char *stories = tap_shared("models/stories260K");
    if (!stories) {
        tap_skip("preemption on stories260K: ../shared/models/stories260K absent (set FLEXLLM_SHARED)");
    } else {
        fl_model *m = fl_model_load(stories, NULL);
        if (tap_ok(m != NULL, "stories260K loads (%s)", m ? "" : fl_last_error()))
            test_preemption(m, "stories260K");
        fl_model_free(m);
    }
    fl_model_free(model);
    return tap_done();
}
