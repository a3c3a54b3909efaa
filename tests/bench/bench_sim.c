/* The FlexLLM comparison on the sim executor at LLaMA-3.1-8B scale (analytic H100
 * profile): over one arrival trace per rate, SLO attainment (TTFT 5 s, TPOT 45 ms) and
 * finetuning forward tokens/s for each policy; and the policy's time per call with 256
 * requests in the state, as a share of the iteration it schedules. */
#include "flexllm.h"
#include "fl_sched.h"
#include "policy.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TRACE_SECONDS 120.0
#define TTFT 5.0f
#define TPOT 0.045f

typedef struct {
    int prompt, response;
} pair;

static pair pairs[64];
static int n_pairs;

/* ShareGPT prompt/response token counts, or a fixed spread when the file is absent. */
static void load_pairs(const char *path) {
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (f) {
        fseek(f, 0, SEEK_END);
        long len = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *text = malloc((size_t)len + 1);
        text[fread(text, 1, (size_t)len, f)] = 0;
        fclose(f);
        cJSON *arr = cJSON_Parse(text), *it;
        free(text);
        cJSON_ArrayForEach(it, arr) {
            const cJSON *p = cJSON_GetObjectItem(it, "prompt_tokens"),
                        *r = cJSON_GetObjectItem(it, "response_tokens");
            if (cJSON_IsNumber(p) && cJSON_IsNumber(r) && n_pairs < 64 && p->valueint > 0 &&
                r->valueint > 0 && p->valueint + r->valueint <= 8192)
                pairs[n_pairs++] = (pair){p->valueint, r->valueint};
        }
        cJSON_Delete(arr);
    }
    if (n_pairs == 0)
        for (int i = 0; i < 50; i++) pairs[n_pairs++] = (pair){64 + i * 37 % 900, 32 + i * 53 % 480};
}

static uint64_t next(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 11;
}

static fl_sim_stats run(const fl_sim_profile *prof, const char *policy, const char *options,
                        double rate, int with_job, int *n_requests) {
    fl_sim *s = fl_sim_new(prof, policy, options, TTFT, TPOT);
    if (!s) {
        fprintf(stderr, "%s\n", fl_last_error());
        exit(1);
    }
    uint64_t seed = 1000 + (uint64_t)(rate * 10);
    double t = 0;
    int n = 0;
    for (;;) {
        t += -log((next(&seed) + 0.5) / 9007199254740992.0) / rate;
        if (t > TRACE_SECONDS) break;
        const pair *p = &pairs[next(&seed) % (uint64_t)n_pairs];
        fl_sim_submit(s, t, p->prompt, p->response);
        n++;
    }
    *n_requests = n;
    if (with_job) { /* Sky-T1-like samples under 8192 tokens, accumulation 8, enough to outlast the trace */
        int lens[200];
        for (int i = 0; i < 200; i++) lens[i] = 512 + (int)(next(&seed) % 3584);
        fl_sim_add_job(s, lens, 200, 50, 8);
    }
    /* Finetuning throughput over the trace; attainment once its requests have drained. */
    fl_sim_run(s, TRACE_SECONDS);
    fl_sim_stats during, after;
    fl_sim_get_stats(s, &during);
    fl_sim_run(s, TRACE_SECONDS + 600);
    fl_sim_get_stats(s, &after);
    fl_sim_free(s);
    after.ft_forward_tokens = during.ft_forward_tokens;
    after.ft_backward_tokens = during.ft_backward_tokens;
    return after;
}

/* The policy's time per call on a state of 256 requests and one job, the profile's
 * machine and its cost as a fitted model. */
static double policy_us(const char *path, const fl_sim_profile *prof) {
    static fl_sched_request reqs[256];
    static fl_sched_job job;
    static fl_sched_item items[1024];
    static fl_sched_ft ft[1];
    for (int i = 0; i < 256; i++)
        reqs[i] = (fl_sched_request){.id = i, .state = i < 200 ? FL_REQ_DECODE : FL_REQ_WAITING,
                                     .adapter = -1, .prompt_len = 500, .prefilled = i < 200 ? 500 : 0,
                                     .generated = i % 100, .max_tokens = 300, .kv_pages = i < 200 ? 50 : 0,
                                     .pages_needed = 50, .arrival = i * 0.01, .first_token = -1,
                                     .last_token = -1, .ttft_slo = TTFT, .tpot_slo = TPOT};
    job = (fl_sched_job){.id = 0, .phase = FL_JOB_FORWARD, .sample_len = 2048, .adapter = -1};
    fl_sched_state st = {.now = 5, .max_batch_tokens = prof->max_batch_tokens,
                         .kv_pages_free = 4000, .kv_pages_total = prof->kv_pages, .seqs_free = 56,
                         .n_requests = 256, .requests = reqs, .n_jobs = 1, .jobs = &job,
                         .ttft_slo = TTFT, .tpot_slo = TPOT,
                         .cost = {.fixed = prof->fixed, .per_context = prof->per_context,
                                  .per_backward_chunk = prof->per_backward_chunk, .fitted = 100}};
    memcpy(st.cost.per_token, prof->per_token, sizeof st.cost.per_token);
    fl_sched_plan plan = {.cap_items = 1024, .items = items, .cap_ft = 1, .ft = ft};
    fl_policy_params pp = fl_policy_default_params();
    pp.time_budget = 0.1;
    fl_policy *pol = fl_policy_load(path, &st, &plan, &pp, NULL);
    if (!pol) return NAN;
    double total = 0;
    int calls = 0;
    for (int i = 0; i < 300; i++, st.iteration++) {
        if (fl_policy_schedule(pol) != 0) break;
        if (i >= 20) total += fl_policy_last_seconds(pol), calls++; /* after warm-up */
    }
    fl_policy_free(pol);
    return calls ? 1e6 * total / calls : NAN;
}

int main(int argc, char **argv) {
    const char *profile = "profiles/llama-3.1-8b-h100-analytic.json", *out = "tests/bench/results/sim_coserving.json";
    const char *data = argc > 1 ? argv[1] : NULL;
    if (argc > 2) out = argv[2];
    load_pairs(data);
    fl_sim_profile prof;
    if (fl_sim_profile_load(profile, &prof) != 0) {
        fprintf(stderr, "%s\n", fl_last_error());
        return 1;
    }
    static const struct {
        const char *name, *file, *options;
        int job;
    } pol[] = {
        {"hybrid", "policies/hybrid.lua", NULL, 1},
        {"temporal/64", "policies/temporal.lua", "{ every = 64 }", 1},
        {"temporal/128", "policies/temporal.lua", "{ every = 128 }", 1},
        {"temporal/512", "policies/temporal.lua", "{ every = 512 }", 1},
        {"static_split/0.25", "policies/static_split.lua", "{ share = 0.25 }", 1},
        {"static_split/0.5", "policies/static_split.lua", "{ share = 0.5 }", 1},
        {"inference_only", "policies/inference_only.lua", NULL, 1},
    };
    const int n_pol = (int)(sizeof pol / sizeof pol[0]);
    const double rates[] = {1, 2, 5, 10, 15, 20};
    cJSON *root = cJSON_CreateObject(), *rows = cJSON_AddArrayToObject(root, "runs");
    cJSON_AddStringToObject(root, "profile", prof.name);
    cJSON_AddBoolToObject(root, "analytic_profile", prof.analytic);
    cJSON_AddNumberToObject(root, "trace_seconds", TRACE_SECONDS);
    cJSON_AddStringToObject(root, "lengths", n_pairs && data ? data : "synthetic");
    printf("sim, %s: %0.f s Poisson trace per rate, SLO TTFT %.0f s + TPOT %.0f ms;\n"
           "attainment %% / finetuning forward tokens/s\n%-18s", prof.name, TRACE_SECONDS, TTFT,
           TPOT * 1e3, "policy \\ req/s");
    for (int r = 0; r < 6; r++) printf("%15.0f", rates[r]);
    printf("\n");
    for (int k = 0; k < n_pol; k++) {
        printf("%-18s", pol[k].name);
        for (int r = 0; r < 6; r++) {
            int n;
            fl_sim_stats st = run(&prof, pol[k].file, pol[k].options, rates[r], pol[k].job, &n);
            double att = st.requests_done ? 100.0 * st.requests_slo_met / n : 0;
            double ftps = st.ft_forward_tokens / TRACE_SECONDS;
            printf("%8.1f/%6.0f", att, ftps);
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "policy", pol[k].name);
            cJSON_AddNumberToObject(o, "rate", rates[r]);
            cJSON_AddNumberToObject(o, "requests", n);
            cJSON_AddNumberToObject(o, "done", (double)st.requests_done);
            cJSON_AddNumberToObject(o, "slo_attainment", att / 100);
            cJSON_AddNumberToObject(o, "ttft_p99", st.ttft_p99);
            cJSON_AddNumberToObject(o, "tpot_p99", st.tpot_p99);
            cJSON_AddNumberToObject(o, "finetune_forward_tokens_per_s", ftps);
            cJSON_AddItemToArray(rows, o);
        }
        printf("\n");
    }
    int n;
    fl_sim_stats ft_only = run(&prof, "policies/finetune_only.lua", NULL, 0.001, 1, &n);
    printf("%-18s finetuning alone (no inference): %.0f forward tokens/s\n", "finetune_only",
           ft_only.ft_forward_tokens / TRACE_SECONDS);
    cJSON_AddNumberToObject(root, "finetune_only_tokens_per_s", ft_only.ft_forward_tokens / TRACE_SECONDS);
    printf("\npolicy time per call, 256 requests in the state (JIT off, as the host runs it):\n");
    cJSON *over = cJSON_AddArrayToObject(root, "policy_overhead");
    /* a full prefill iteration at 8B scale */
    double iter = prof.fixed + prof.max_batch_tokens * prof.per_token[FL_KIND_PREFILL];
    for (int k = 0; k < n_pol; k += (k == 0 ? 1 : 3)) {
        double us = policy_us(pol[k].file, &prof);
        printf("  %-18s %7.1f us = %.2f%% of a %.1f ms iteration\n", pol[k].name, us,
               100 * us * 1e-6 / iter, iter * 1e3);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "policy", pol[k].name);
        cJSON_AddNumberToObject(o, "us_per_call", us);
        cJSON_AddNumberToObject(o, "share_of_8b_iteration", us * 1e-6 / iter);
        cJSON_AddItemToArray(over, o);
    }
    char *text = cJSON_Print(root);
    FILE *f = fopen(out, "wb");
    if (f) fputs(text, f), fputc('\n', f), fclose(f);
    printf("wrote %s\n", out);
    free(text);
    cJSON_Delete(root);
    return 0;
}
