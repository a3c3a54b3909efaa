/* The policy host: plans reach C, state crosses a reload, and errors, endless loops and
 * allocation bombs fail one call (counted, then disabling the policy) without hurting the
 * process. Runs from the repository root with build/lua on LUA_PATH. */
#include <time.h>

#include "fl_internal.h"
#include "policy.h"
#include "tap.h"

enum { MAX_REQ = 256, CAP_ITEMS = 512, CAP_FT = 4 };

/* A synthetic scheduling state and the plan's arrays. */
typedef struct {
    fl_sched_state state;
    fl_sched_request req[MAX_REQ];
    fl_sched_job job;
    fl_sched_item items[CAP_ITEMS];
    fl_sched_ft ft[CAP_FT];
    fl_sched_plan plan;
} world;

/* n requests cycling through waiting, prefill and decode; one job in its forward phase. */
static void world_init(world *w, int n, int max_batch_tokens) {
    memset(w, 0, sizeof *w);
    for (int i = 0; i < n; i++) {
        fl_sched_request *r = &w->req[i];
        r->id = 100 + i;
        r->state = i % 3 == 0 ? FL_REQ_WAITING : i % 3 == 1 ? FL_REQ_PREFILL : FL_REQ_DECODE;
        r->adapter = -1;
        r->prompt_len = 16 + i;
        r->prefilled = r->state == FL_REQ_WAITING ? 0 : r->state == FL_REQ_PREFILL ? 4 : r->prompt_len;
        r->max_tokens = 32;
        r->arrival = 0.01 * i;
        r->first_token = r->last_token = -1;
    }
    w->job = (fl_sched_job){.id = 1, .phase = FL_JOB_FORWARD, .sample_len = 128, .total_steps = 10};
    w->state = (fl_sched_state){.now = 1.0, .iteration = 7, .max_batch_tokens = max_batch_tokens,
                                .kv_pages_free = 1000, .kv_pages_total = 1000, .n_requests = n,
                                .requests = w->req, .n_jobs = 1, .jobs = &w->job};
    w->plan = (fl_sched_plan){.cap_items = CAP_ITEMS, .items = w->items, .cap_ft = CAP_FT, .ft = w->ft};
}

static fl_policy *load(world *w, const char *name, const fl_policy_params *p, const char *saved) {
    char path[256];
    snprintf(path, sizeof path, "tests/policies/%s", name);
    return fl_policy_load(path, &w->state, &w->plan, p, saved);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int contains(const char *s, const char *part) { return s && strstr(s, part) != NULL; }

/* good.lua's plan, computed here: decodes, then prefills in the budget, then the job. */
static int plan_is_good(const world *w) {
    int k = 0, budget = w->state.max_batch_tokens;
    for (int i = 0; i < w->state.n_requests; i++) {
        if (w->req[i].state != FL_REQ_DECODE || budget == 0) continue;
        if (w->items[k].request != i || w->items[k].tokens != 1) return 0;
        k++, budget--;
    }
    for (int i = 0; i < w->state.n_requests; i++) {
        if (w->req[i].state == FL_REQ_DECODE || budget == 0) continue;
        int t = w->req[i].prompt_len - w->req[i].prefilled;
        if (t > budget) t = budget;
        if (w->items[k].request != i || w->items[k].tokens != t) return 0;
        k++, budget -= t;
    }
    if (w->plan.n_items != k) return 0;
    if (budget == 0) return w->plan.n_ft == 0;
    return w->plan.n_ft == 1 && w->ft[0].job == 0 && w->ft[0].forward_tokens == budget &&
           w->ft[0].backward_tokens == 0;
}

static void test_good(world *w) {
    world_init(w, 8, 100);
    fl_policy *pol = load(w, "good.lua", NULL, NULL);
    if (!tap_ok(pol != NULL, "good.lua loads (%s)", pol ? "" : fl_last_error())) return;
    w->plan.n_items = 99;
    tap_ok(fl_policy_schedule(pol) == 0, "schedule() returns normally");
    tap_ok(w->plan.n_items == 8 && plan_is_good(w), "its plan arrives in C: 8 items, decodes first, then the job");
    tap_ok(fl_policy_last_seconds(pol) > 0, "the call is timed (%.1f us)", fl_policy_last_seconds(pol) * 1e6);
    tap_ok(strcmp(fl_policy_last_error(pol), "") == 0 && fl_policy_failures(pol) == 0, "no error, no failure");

    w->state.max_batch_tokens = 3;
    fl_policy_schedule(pol);
    tap_ok(w->plan.n_items == 3 && w->plan.n_ft == 0 && plan_is_good(w),
           "the plan follows the state read through the pointer (budget 3: 3 decodes, no job)");

    char *saved = fl_policy_export(pol);
    tap_ok(contains(saved, "[\"calls\"]=2"), "export_state serialises its table (%s)", saved ? saved : fl_last_error());
    free(saved);
    fl_policy_free(pol);
}

static void test_saved(world *w) {
    world_init(w, 8, 100);
    fl_policy *first = load(w, "saved.lua", NULL, NULL);
    if (!tap_ok(first != NULL, "saved.lua loads (%s)", first ? "" : fl_last_error())) return;
    fl_policy_schedule(first);
    tap_ok(w->items[0].request == -1, "init without a predecessor sees ctx.saved == nil");
    char *text = fl_policy_export(first);
    tap_ok(text != NULL, "its export_state is serialised (%zu bytes)", text ? strlen(text) : 0);
    fl_policy_free(first);

    fl_policy *second = load(w, "saved.lua", NULL, text);
    tap_ok(second != NULL, "a second load takes the export as saved state (%s)", second ? "" : fl_last_error());
    if (second) {
        fl_policy_schedule(second);
        tap_ok(w->items[0].request == 1 && w->items[0].tokens == 42,
               "init's ctx.saved equals the exported table (numbers, strings with every escape, "
               "booleans, nested tables, infinity)");
    }
    fl_policy_free(second);
    free(text);

    fl_policy *other = load(w, "saved.lua", NULL, "{ n = 7 }");
    if (other) fl_policy_schedule(other);
    tap_ok(other && w->items[0].request == 0 && w->items[0].tokens == 7, "init sees ctx.saved as given");
    fl_policy_free(other);

    fl_policy *bad = load(w, "saved.lua", NULL, "{ n = ");
    tap_ok(!bad && contains(fl_last_error(), "saved state does not parse"), "a saved state that does not parse fails the load: %s",
           fl_last_error());
    fl_policy_free(bad);
}

static void test_load_errors(world *w) {
    world_init(w, 8, 100);
    fl_policy *pol = load(w, "syntax.lua", NULL, NULL);
    tap_ok(!pol && contains(fl_last_error(), "tests/policies/syntax.lua:3:"),
           "a syntax error fails the load with file and line: %s", fl_last_error());
    fl_policy_free(pol);
    pol = load(w, "no_schedule.lua", NULL, NULL);
    tap_ok(!pol && contains(fl_last_error(), "no schedule function"), "a policy without schedule() does not load: %s",
           fl_last_error());
    fl_policy_free(pol);
    pol = load(w, "missing.lua", NULL, NULL);
    tap_ok(!pol && contains(fl_last_error(), "cannot open"), "a missing file does not load: %s", fl_last_error());
    fl_policy_free(pol);

    fl_policy_params p = fl_policy_default_params();
    p.mem_limit = 16 << 10;
    pol = load(w, "good.lua", &p, NULL);
    tap_ok(!pol && contains(fl_last_error(), "memory limit of 0.015625 MiB"),
           "a state that does not fit its memory limit does not load: %s", fl_last_error());
    fl_policy_free(pol);
    p = fl_policy_default_params();
    p.max_failures = 0;
    pol = load(w, "good.lua", &p, NULL);
    tap_ok(!pol && contains(fl_last_error(), "max_failures"), "bad params are refused: %s", fl_last_error());
    fl_policy_free(pol);
}

/* Loads good.lua with LUA_PATH set to lua_path, then puts LUA_PATH back. */
static fl_policy *load_with_lua_path(world *w, const char *lua_path) {
    const char *old = getenv("LUA_PATH");
    char *keep = old ? strdup(old) : NULL;
    setenv("LUA_PATH", lua_path, 1);
    fl_policy *pol = load(w, "good.lua", NULL, NULL);
    if (keep)
        setenv("LUA_PATH", keep, 1);
    else
        unsetenv("LUA_PATH");
    free(keep);
    return pol;
}

static void test_abi_check(world *w) {
    world_init(w, 8, 100);
    char msg[2048];
    fl_policy *pol = load_with_lua_path(w, "tests/policies/stale_abi/?.lua");
    snprintf(msg, sizeof msg, "%s", fl_last_error());
    tap_ok(!pol && contains(msg, "sizeof(fl_sched_state) is 4 in Lua"),
           "FFI declarations whose sizes differ from C fail the load: %s", msg);
    fl_policy_free(pol);
    pol = load_with_lua_path(w, "build/nowhere/?.lua");
    snprintf(msg, sizeof msg, "%s", fl_last_error());
    tap_ok(!pol && contains(msg, "cannot load flexllm.sched_abi"), "so does a missing flexllm.sched_abi: %.120s...", msg);
    fl_policy_free(pol);
}

static void test_raise(world *w) {
    world_init(w, 8, 100);
    fl_policy *pol = load(w, "raise.lua", NULL, NULL);
    if (!tap_ok(pol != NULL, "raise.lua loads (%s)", pol ? "" : fl_last_error())) return;
    tap_ok(fl_policy_schedule(pol) == -1, "a policy that raises returns -1");
    const char *e = fl_policy_last_error(pol);
    tap_ok(contains(e, "raise.lua:3: policy broke on purpose"), "its message is kept");
    tap_ok(contains(e, "stack traceback:") && contains(e, "raise.lua:7"), "with a traceback through the policy's frames");
    tap_ok(fl_policy_failures(pol) == 1 && !fl_policy_disabled(pol), "one failure counted, not disabled");
    char *text = fl_policy_export(pol);
    tap_ok(!text && contains(fl_last_error(), "state[f] is a function"),
           "an export_state with a function in it exports nothing: %.100s", fl_last_error());
    free(text);
    fl_policy_free(pol);
}

/* One call of an endless policy under a 10 ms budget; the call's wall time in *secs. */
static int run_endless(world *w, const char *name, double *secs) {
    fl_policy_params p = fl_policy_default_params();
    p.time_budget = 0.010;
    fl_policy *pol = load(w, name, &p, NULL);
    if (!tap_ok(pol != NULL, "%s loads (%s)", name, pol ? "" : fl_last_error())) return 0;
    int ok = 1;
    for (int call = 0; call < 2; call++) {
        double t0 = now_seconds();
        int rc = fl_policy_schedule(pol);
        *secs = now_seconds() - t0;
        ok = ok && rc == -1 && *secs < 1.0 && contains(fl_policy_last_error(pol), "time budget of 10 ms");
    }
    fl_policy_free(pol);
    return ok;
}

static void test_endless(world *w) {
    world_init(w, 8, 100);
    static const struct {
        const char *file, *what;
    } cases[] = {
        {"loop.lua", "`while true do end`"},
        {"loop_pcall.lua", "a loop that pcalls an endless loop"},
        {"escape_loop.lua", "a loop after jit.on() and debug.sethook()"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double secs = 0;
        int ok = run_endless(w, cases[i].file, &secs);
        tap_ok(ok, "%s is stopped at its 10 ms budget, twice (%.1f ms)", cases[i].what, secs * 1e3);
    }
}

static void test_bomb(world *w) {
    world_init(w, 8, 100);
    fl_policy_params p = fl_policy_default_params();
    p.mem_limit = 8 << 20;
    p.time_budget = 30;
    fl_policy *pol = load(w, "bomb.lua", &p, NULL);
    if (!tap_ok(pol != NULL, "bomb.lua loads (%s)", pol ? "" : fl_last_error())) return;
    tap_ok(fl_policy_schedule(pol) == -1 && contains(fl_policy_last_error(pol), "memory limit of 8 MiB"),
           "an allocation bomb fails at the memory limit: %.80s", fl_policy_last_error(pol));
    tap_ok(fl_policy_schedule(pol) == -1 && fl_policy_failures(pol) == 2, "and again on the next call; both counted");
    fl_policy_free(pol);
    pol = load(w, "good.lua", &p, NULL);
    tap_ok(pol && fl_policy_schedule(pol) == 0 && plan_is_good(w),
           "the host goes on: good.lua under the same limits then plans as it should");
    fl_policy_free(pol);
}

static void test_disable(world *w) {
    world_init(w, 8, 100);
    fl_policy_params p = fl_policy_default_params();
    p.max_failures = 3;
    fl_policy *pol = load(w, "raise.lua", &p, NULL);
    if (!pol) return (void)tap_ok(0, "raise.lua loads (%s)", fl_last_error());
    for (int i = 0; i < 3; i++) fl_policy_schedule(pol);
    tap_ok(fl_policy_disabled(pol) && contains(fl_policy_last_error(pol), "disabled after 3 consecutive failures"),
           "max_failures consecutive failures disable the policy: %.60s...", fl_policy_last_error(pol));
    w->plan.n_items = 5;
    tap_ok(fl_policy_schedule(pol) == -1 && fl_policy_last_seconds(pol) == 0 && w->plan.n_items == 0,
           "a disabled policy returns -1 at once, with an empty plan");
    tap_ok(fl_policy_failures(pol) == 3, "calls skipped while disabled are not failures");
    fl_policy_free(pol);
}

static void test_streak(world *w) {
    world_init(w, 8, 100);
    fl_policy_params p = fl_policy_default_params();
    p.max_failures = 2;
    fl_policy *pol = load(w, "flaky.lua", &p, NULL);
    if (!pol) return (void)tap_ok(0, "flaky.lua loads (%s)", fl_last_error());
    int iters[] = {-1, 1, -1, 1, -1};
    int ok = 1;
    for (int i = 0; i < 5; i++) {
        w->state.iteration = iters[i];
        ok = ok && fl_policy_schedule(pol) == (iters[i] < 0 ? -1 : 0);
    }
    tap_ok(ok && !fl_policy_disabled(pol) && fl_policy_failures(pol) == 3,
           "a success resets the consecutive count (fail, ok, fail, ok, fail: not disabled at 2)");
    w->state.iteration = -1;
    fl_policy_schedule(pol);
    tap_ok(fl_policy_disabled(pol), "two failures in a row disable it");
    fl_policy_free(pol);

    pol = load(w, "good.lua", &p, NULL);
    if (!pol) return (void)tap_ok(0, "good.lua loads (%s)", fl_last_error());
    fl_policy_schedule(pol);
    fl_policy_report_invalid(pol, "too many tokens");
    tap_ok(fl_policy_failures(pol) == 1 && strcmp(fl_policy_last_error(pol), "invalid plan: too many tokens") == 0 &&
               !fl_policy_disabled(pol),
           "report_invalid counts a failure with its reason");
    fl_policy_schedule(pol);
    fl_policy_report_invalid(pol, "too many tokens");
    tap_ok(fl_policy_disabled(pol), "invalid plans in a row disable it although each call returned normally");
    fl_policy_free(pol);
}

static uint64_t fnv1a(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

/* Writes text to path and loads it; its hash in *hash (0 when it does not load). */
static void load_text(world *w, const char *path, const char *text, uint64_t *hash) {
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
    fl_policy *pol = fl_policy_load(path, &w->state, &w->plan, NULL, NULL);
    *hash = pol ? fl_policy_hash(pol) : 0;
    fl_policy_free(pol);
}

static void test_hash(world *w) {
    world_init(w, 8, 100);
    const char *dir = tap_tmpdir("test_policy");
    if (!dir) return (void)tap_ok(0, "a scratch directory");
    char path[4200];
    snprintf(path, sizeof path, "%s/p.lua", dir);
    const char *a = "return { schedule = function() end }\n";
    const char *b = "return { schedule = function() local x = 1 end }\n";
    uint64_t ha, hb, ha2;
    load_text(w, path, a, &ha);
    load_text(w, path, b, &hb);
    load_text(w, path, a, &ha2);
    tap_ok(ha == fnv1a(a), "the hash is FNV-1a of the file's bytes (%016llx)", (unsigned long long)ha);
    tap_ok(hb != ha && ha2 == ha, "it changes with the file and comes back with its bytes");
}

/* Mean seconds of one call over many calls. */
static double mean_call_seconds(fl_policy *pol, int calls) {
    double t0 = now_seconds();
    for (int i = 0; i < calls; i++) fl_policy_schedule(pol);
    return (now_seconds() - t0) / calls;
}

static void test_overhead(world *w) {
    world_init(w, MAX_REQ, 512);
    /* A budget no machine misses: this measures, the budget tests are above. */
    fl_policy_params p = fl_policy_default_params();
    p.time_budget = 1;
    fl_policy *good = load(w, "good.lua", &p, NULL);
    fl_policy *empty = load(w, "empty.lua", &p, NULL);
    if (tap_ok(good && empty, "good.lua and empty.lua load over 256 requests")) {
        mean_call_seconds(good, 100);
        double g = mean_call_seconds(good, 2000);
        int items = w->plan.n_items;
        tap_ok(fl_policy_failures(good) == 0 && plan_is_good(w), "good.lua plans 256 requests without failing");
        double e = mean_call_seconds(empty, 2000);
        tap_diag("per call over 256 requests: good.lua %.1f us (%d items), empty.lua %.2f us (JIT off)", g * 1e6,
                 items, e * 1e6);
    }
    fl_policy_free(good);
    fl_policy_free(empty);
}

int main(void) {
    static world w;
    test_good(&w);
    test_saved(&w);
    test_load_errors(&w);
    test_abi_check(&w);
    test_raise(&w);
    test_endless(&w);
    test_bomb(&w);
    test_disable(&w);
    test_streak(&w);
    test_hash(&w);
    test_overhead(&w);
    fl_policy_free(NULL);
    return tap_done();
}
