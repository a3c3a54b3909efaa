/* The simulated executor: deterministic for a seed, queueing that behaves as a queue
 * should (light load meets the SLO, overload does not), finetuning progress, and the
 * analytic 8B profile loads. */
#include "flexllm.h"
#include "tap.h"

#include <math.h>

/* A Poisson trace of n requests at rate per second, lengths from a seeded generator. */
static void submit_trace(fl_sim *s, int n, double rate, uint64_t seed) {
    double t = 0;
    for (int i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        double u = ((seed >> 11) + 0.5) / 9007199254740992.0;
        t += -log(u) / rate;
        int prompt = 64 + (int)((seed >> 20) % 1024), out = 16 + (int)((seed >> 40) % 240);
        fl_sim_submit(s, t, prompt, out);
    }
}

static fl_sim_stats run_with(const fl_sim_profile *p, const char *policy, const char *options,
                             double rate, int job, uint64_t seed) {
    fl_sim *s = fl_sim_new(p, policy, options, 5.0f, 0.045f);
    if (!s) {
        tap_diag("sim: %s", fl_last_error());
        return (fl_sim_stats){0};
    }
    submit_trace(s, 400, rate, seed);
    int lens[50];
    for (int i = 0; i < 50; i++) lens[i] = 512 + (i * 97) % 1024;
    if (job) fl_sim_add_job(s, lens, 50, 1, 8);
    fl_sim_run(s, 1e9);
    fl_sim_stats st;
    fl_sim_get_stats(s, &st);
    fl_sim_free(s);
    return st;
}

static fl_sim_stats run(const fl_sim_profile *p, const char *policy, double rate, int job,
                        uint64_t seed) {
    return run_with(p, policy, NULL, rate, job, seed);
}

int main(void) {
    fl_sim_profile p;
    int rc = fl_sim_profile_load("profiles/llama-3.1-8b-h100-analytic.json", &p);
    if (!tap_ok(rc == 0 && p.analytic && p.max_batch_tokens == 1024,
                "the analytic LLaMA-3.1-8B / H100 profile loads (%s)", rc ? fl_last_error() : p.name))
        return tap_done();
    fl_sim_stats a = run(&p, NULL, 5.0, 1, 7), b = run(&p, NULL, 5.0, 1, 7), c = run(&p, NULL, 5.0, 1, 8);
    tap_ok(a.requests_done == 400 && a.clock == b.clock && a.iterations == b.iterations &&
               a.ttft_p99 == b.ttft_p99 && a.ft_forward_tokens == b.ft_forward_tokens &&
               c.clock != a.clock,
           "the same seed gives the same run to the last bit (%.3f virtual s, %lld iterations); "
           "another seed does not", a.clock, a.iterations);
    fl_sim_stats light = run(&p, NULL, 1.0, 0, 3), heavy = run(&p, NULL, 300.0, 0, 3);
    tap_ok(light.requests_slo_met >= 0.99 * light.requests_done &&
               heavy.requests_slo_met < 0.9 * heavy.requests_done && heavy.ttft_p99 > light.ttft_p99,
           "1 req/s meets TTFT 5 s / TPOT 45 ms for %.1f%% of requests, 300 req/s for %.1f%% "
           "(TTFT p99 %.2f s vs %.2f s)",
           100.0 * light.requests_slo_met / light.requests_done,
           100.0 * heavy.requests_slo_met / heavy.requests_done, light.ttft_p99, heavy.ttft_p99);
    tap_ok(a.ft_forward_tokens == a.ft_backward_tokens && a.ft_forward_tokens > 0,
           "a finetuning job runs every sample forward and backward beside inference (%lld tokens "
           "each way, %.0f forward tokens/s)", a.ft_forward_tokens, a.ft_forward_tokens / a.clock);
    fl_sim_stats often = run_with(&p, "policies/temporal.lua", "{ every = 2 }", 5.0, 1, 7);
    fl_sim_stats rarely = run_with(&p, "policies/temporal.lua", "{ every = 512 }", 5.0, 1, 7);
    fl_sim_stats h1 = run(&p, "policies/hybrid.lua", 20.0, 1, 7);
    fl_sim_stats h2 = run(&p, "policies/hybrid.lua", 20.0, 1, 7);
    tap_ok(h1.requests_done == 400 && h1.clock == h2.clock && h1.iterations == h2.iterations &&
               h1.policy_failures == 0 && h2.policy_failures == 0 && often.policy_failures == 0 &&
               rarely.policy_failures == 0,
           "with a policy too, whatever the machine's load: hybrid twice gives the same run "
           "(%.3f virtual s), and no policy call fails (%lld, %lld, %lld, %lld)", h1.clock,
           h1.policy_failures, h2.policy_failures, often.policy_failures, rarely.policy_failures);
    tap_ok(often.requests_done == 400 && often.ft_forward_tokens > 0 &&
               often.clock != rarely.clock,
           "policy options reach the policy: temporal every 2 iterations and every 512 run "
           "differently (%.1f s vs %.1f s of virtual time)", often.clock, rarely.clock);
    fl_sim_profile bad;
    FILE *f = fopen("build/tmp/bad_profile.json", "wb");
    fputs("{\"fixed\": 0.001, \"per_token\": {\"prefill\": 1e-5}}", f);
    fclose(f);
    tap_ok(fl_sim_profile_load("build/tmp/bad_profile.json", &bad) == -1 &&
               strstr(fl_last_error(), "bad_profile.json") &&
               strstr(fl_last_error(), "'per_context'"),
           "a profile with missing fields is refused with the file and field named (\"%s\")",
           fl_last_error());
    f = fopen("build/tmp/bad_profile.json", "wb");
    fputs("{\"fixed\": 0.001, \"per_context\": 0, \"max_batch_tokens\": 8, \"kv_pages\": 8, "
          "\"max_seqs\": 1, \"per_token\": {\"prefill\": 0, \"decode\": 0, \"ft_forward\": 0, "
          "\"ft_backward\": 0}, \"per_backward_chunk\": \"slow\"}", f);
    fclose(f);
    tap_ok(p.per_backward_chunk == 0 &&
               fl_sim_profile_load("build/tmp/bad_profile.json", &bad) == -1 &&
               strstr(fl_last_error(), "'per_backward_chunk'"),
           "per_backward_chunk is optional (0 in the analytic profile) and a malformed one is "
           "refused by name (\"%s\")", fl_last_error());
    return tap_done();
}
