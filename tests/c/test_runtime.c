/* The co-serving runtime end to end: inference outputs do not change when a
 * finetuning job shares the iterations, nor does the job's result when inference does;
 * failing policies never stall requests; 200 requests survive 20 policy reloads. */
#include "flexllm.h"
#include "lora.h"
#include "tap.h"

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

static fl_finetune *new_job(fl_context *ctx, const char *out) {
    fl_finetune_params p = fl_finetune_default_params();
    char data[4300];
    snprintf(data, sizeof data, "%s/data.txt", dir);
    p.data = data;
    p.out = out;
    p.lora.targets = FL_LORA_ALL_LINEARS;
    p.lora.rank = 4;
    p.optim.lr = 2e-3f;
    p.dataset.max_len = 40;
    p.max_steps = 6;
    p.seed = 3;
    fl_finetune *job = fl_finetune_new(ctx, &p);
    if (!job) tap_diag("job: %s", fl_last_error());
    return job;
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
            char good[4300];
            snprintf(good, sizeof good, "tests/policies/rt_fifo.lua");
            if (fl_runtime_reload(rt, good) == 0) (*reloads)++;
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

    char out[4300];
    snprintf(out, sizeof out, "%s/job_shared", dir);
    rt = new_runtime(ctx, NULL);
    fl_finetune *job = new_job(ctx, out);
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

    snprintf(out, sizeof out, "%s/job_alone", dir);
    rt = new_runtime(ctx, NULL);
    job = new_job(ctx, out);
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
        snprintf(out, sizeof out, "%s/job_solo%d", dir, k);
        fl_finetune *sj = new_job(ctx, out);
        fl_runtime_add_job(solo, sj);
        run_job(solo);
        snprintf(out, sizeof out, "%s/job_policy%d", dir, k);
        fl_finetune *pj = new_job(ctx, out);
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
    int rc = fl_runtime_reload(rt, "tests/policies/rt_raises.lua");
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
    fl_model_free(model);
    return tap_done();
}
