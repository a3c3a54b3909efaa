/* The forward pass and generation against independent truths: llama2.c's greedy ids
 * for stories260K, and batch/chunk invariance of logits. */
#include "flexllm.h"
#include "expected_ids.h"
#include "tap.h"

#include <math.h>

/* Greedy from BOS one token per forward, as llama2.c's run.c does. */
static void test_greedy_forward(fl_model *m, const int32_t *expect, int n_expect) {
    fl_context *ctx = fl_context_new(m, NULL);
    int vocab = fl_model_config(m)->vocab_size;
    float *logits = malloc(sizeof(float) * vocab);
    int seq = fl_seq_new(ctx), match = 0;
    int32_t tok = 1, pos = 0;
    for (int i = 0; i < n_expect; i++, pos++) {
        fl_batch b = {.n_tokens = 1, .token = &tok, .seq = &seq, .pos = &pos, .logits = NULL};
        if (fl_forward(ctx, &b, logits) != 1) break;
        tok = argmax(logits, vocab);
        if (tok != expect[i]) break;
        match++;
    }
    tap_ok(match == n_expect, "stories260K greedy from BOS, one token per forward: %d/%d ids "
                              "equal llama2.c's", match, n_expect);
    free(logits);
    fl_context_free(ctx);
}

/* The same 80 ids through the generator, while other requests share its batches. */
static void test_greedy_generator(fl_model *m, const int32_t *expect, int n_expect) {
    fl_context_params cp = fl_context_default_params();
    cp.max_batch_tokens = 64;
    fl_context *ctx = fl_context_new(m, &cp);
    fl_generator_params gp = fl_generator_default_params();
    gp.prefill_chunk = 5;
    fl_generator *g = fl_generator_new(ctx, &gp);
    int32_t bos = 1, other[40];
    for (int i = 0; i < 40; i++) other[i] = 3 + (i * 37) % 500;
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = n_expect;
    rp.ignore_eos = 1;
    fl_request_params op = rp;
    op.max_tokens = 30;
    op.sampling.temperature = 0.9f;
    op.sampling.seed = 7;
    fl_generator_add(g, other, 40, &op);
    int id = fl_generator_add(g, &bos, 1, &rp);
    fl_generator_add(g, other + 3, 37, &op);
    int32_t got[128];
    int n_got = 0, steps = 0;
    while (fl_generator_active(g) > 0 && steps++ < 1000) {
        const fl_gen_event *ev;
        int n = fl_generator_step(g, &ev);
        if (n < 0) break;
        for (int i = 0; i < n; i++)
            if (ev[i].request == id && ev[i].token >= 0 && n_got < 128) got[n_got++] = ev[i].token;
    }
    int same = n_got == n_expect && memcmp(got, expect, sizeof(int32_t) * n_expect) == 0;
    tap_ok(same, "stories260K greedy through the generator beside 2 sampled requests: %d ids, "
                 "equal to llama2.c's: %s", n_got, same ? "yes" : "no");
    tap_ok(fl_kv_pages_free(ctx) == fl_kv_pages_total(ctx),
           "every KV page is back in the pool after the requests finish (%d/%d)",
           fl_kv_pages_free(ctx), fl_kv_pages_total(ctx));
    fl_generator_free(g);
    fl_context_free(ctx);
}

typedef struct {
    char text[4096];
    int text_len;
    int32_t ids[256];
    int n_ids;
    fl_finish finish;
} run_result;

/* Runs n requests (prompt i = prompts[i], n_prompt[i] tokens) to completion in ctx. */
static int run_requests(fl_context *ctx, const int32_t *const *prompts, const int *n_prompt, int n,
                        const fl_request_params *rp, run_result *out) {
    fl_generator_params gp = fl_generator_default_params();
    gp.prefill_chunk = 8;
    fl_generator *g = fl_generator_new(ctx, &gp);
    int ids[16] = {0};
    if (n > 16) return -1;
    memset(out, 0, sizeof(run_result) * n);
    for (int i = 0; i < n; i++) ids[i] = fl_generator_add(g, prompts[i], n_prompt[i], rp);
    int steps = 0, rc = 0;
    while (fl_generator_active(g) > 0 && steps++ < 5000 && rc == 0) {
        const fl_gen_event *ev;
        int ne = fl_generator_step(g, &ev);
        if (ne < 0) rc = -1;
        for (int e = 0; e < ne; e++) {
            int i = 0;
            while (i < n - 1 && ids[i] != ev[e].request) i++;
            run_result *r = &out[i];
            memcpy(r->text + r->text_len, ev[e].text, ev[e].text_len);
            r->text_len += ev[e].text_len;
            if (ev[e].token >= 0 && r->n_ids < 256) r->ids[r->n_ids++] = ev[e].token;
            if (ev[e].finish) r->finish = ev[e].finish;
        }
    }
    fl_generator_free(g);
    return rc;
}

/* A stop string that spans tokens ends the text before it, and the streamed pieces
 * never held text that the stop later took back. */
static void test_stop_strings(fl_model *m) {
    fl_context *ctx = fl_context_new(m, NULL);
    int32_t bos = 1;
    const int32_t *prompts[] = {&bos};
    int n_prompt[] = {1};
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = 60;
    rp.ignore_eos = 1;
    run_result full, stopped;
    run_requests(ctx, prompts, n_prompt, 1, &rp, &full);
    full.text[full.text_len] = 0;
    const char *stops[] = {"zebra", "little girl"};
    rp.stop = stops;
    rp.n_stop = 2;
    run_requests(ctx, prompts, n_prompt, 1, &rp, &stopped);
    const char *hit = strstr(full.text, "little girl");
    int want_len = hit ? (int)(hit - full.text) : -1;
    tap_ok(hit && stopped.finish == FL_FINISH_STOP && stopped.text_len == want_len &&
               memcmp(stopped.text, full.text, want_len) == 0,
           "stop string \"little girl\" ends the streamed text just before it (%d bytes: \"%.*s\")",
           stopped.text_len, stopped.text_len, stopped.text);
    tap_ok(full.finish == FL_FINISH_LENGTH && full.n_ids == 60,
           "without a stop string it runs to max_tokens (%d ids)", full.n_ids);
    fl_context_free(ctx);
}

/* A pool too small for all requests at once: they wait for pages, pages are reused,
 * and every request gets the output it gets with a large pool. */
static void test_page_reuse(fl_model *m) {
    enum { N = 8 };
    int32_t store[N][12];
    const int32_t *prompts[N];
    int n_prompt[N];
    for (int i = 0; i < N; i++) {
        n_prompt[i] = 4 + i;
        for (int j = 0; j < n_prompt[i]; j++) store[i][j] = 3 + (i * 31 + j * 7) % 250;
        prompts[i] = store[i];
    }
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = 30;
    rp.ignore_eos = 1;
    static run_result big[N], small[N];
    fl_context *ctx = fl_context_new(m, NULL);
    run_requests(ctx, prompts, n_prompt, N, &rp, big);
    fl_context_free(ctx);
    fl_context_params cp = fl_context_default_params();
    cp.kv_pages = 6; /* each request grows to 3 pages: preemption and page reuse */
    ctx = fl_context_new(m, &cp);
    int rc = run_requests(ctx, prompts, n_prompt, N, &rp, small);
    int same = rc == 0;
    for (int i = 0; i < N; i++)
        same &= small[i].n_ids == 30 && memcmp(small[i].ids, big[i].ids, sizeof(int32_t) * 30) == 0;
    tap_ok(same, "%d requests through a 6-page pool (2 at a time) give the outputs of a large pool",
           N);
    tap_ok(fl_kv_pages_free(ctx) == 6, "all 6 pages are free again afterwards");
    fl_context_free(ctx);
}

/* EOS ends a request: sampling hot from a random model, find a seed whose text
 * reaches EOS with ignore_eos; without it the same seed stops right there. */
static void test_eos(fl_model *m) {
    int32_t eos = fl_tokenizer_eos(fl_model_tokenizer(m)), prompt[2] = {3, 4};
    const int32_t *prompts[] = {prompt};
    int n_prompt[] = {2};
    fl_context *ctx = fl_context_new(m, NULL);
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = 250;
    rp.sampling.temperature = 4.0f;
    static run_result through, stopped;
    int at = -1;
    for (uint64_t seed = 1; seed <= 40 && at < 0; seed++) {
        rp.sampling.seed = seed;
        rp.ignore_eos = 1;
        run_requests(ctx, prompts, n_prompt, 1, &rp, &through);
        for (int i = 0; i < through.n_ids && at < 0; i++)
            if (through.ids[i] == eos) at = i;
    }
    if (!tap_ok(at >= 0, "a seed whose sampled text reaches EOS (id %d) was found", eos)) {
        fl_context_free(ctx);
        return;
    }
    rp.ignore_eos = 0;
    run_requests(ctx, prompts, n_prompt, 1, &rp, &stopped);
    tap_ok(stopped.finish == FL_FINISH_EOS && stopped.n_ids == at + 1 &&
               memcmp(stopped.ids, through.ids, sizeof(int32_t) * (at + 1)) == 0,
           "the request ends at EOS after %d tokens, the same ids as with ignore_eos", at + 1);
    fl_context_free(ctx);
}

/* Logits of every position of seq A, computed alone in one prefill. */
static float *logits_alone(fl_model *m, const int32_t *toks, int n) {
    int vocab = fl_model_config(m)->vocab_size;
    fl_context_params cp = fl_context_default_params();
    cp.max_batch_tokens = 256;
    fl_context *ctx = fl_context_new(m, &cp);
    float *out = malloc(sizeof(float) * vocab * n);
    int32_t seqs[256], pos[256];
    int8_t all[256];
    int seq = fl_seq_new(ctx);
    for (int i = 0; i < n; i++) seqs[i] = seq, pos[i] = i, all[i] = 1;
    fl_batch b = {.n_tokens = n, .token = toks, .seq = seqs, .pos = pos, .logits = all};
    int got = fl_forward(ctx, &b, out);
    fl_context_free(ctx);
    if (got != n) {
        free(out);
        return NULL;
    }
    return out;
}

/* Seq A prefilled in chunks of `chunk`, each batch shared with a prefill chunk and
 * decode tokens of two other sequences. Returns the largest |difference| to ref. */
static double max_diff_chunked(fl_model *m, const int32_t *toks, int n, int chunk, int mixed,
                               const float *ref) {
    int vocab = fl_model_config(m)->vocab_size;
    fl_context_params cp = fl_context_default_params();
    cp.max_batch_tokens = 256;
    cp.kv_pages = 40;
    fl_context *ctx = fl_context_new(m, &cp);
    /* A third sequence takes pages first, so A's pages are not contiguous. */
    int b_seq = fl_seq_new(ctx), a_seq = fl_seq_new(ctx), c_seq = fl_seq_new(ctx);
    float *out = malloc(sizeof(float) * vocab * 256);
    int32_t tk[256], sq[256], ps[256];
    int8_t want[256];
    int b_len = 0, c_len = 0, a_done = 0;
    double worst = 0;
    while (a_done < n) {
        int t = 0;
        if (mixed) { /* decode-like single tokens of B, a prefill chunk of C */
            tk[t] = 5 + b_len % 100, sq[t] = b_seq, ps[t] = b_len++, want[t++] = 1;
            for (int j = 0; j < 3; j++) tk[t] = 9 + c_len % 50, sq[t] = c_seq, ps[t] = c_len++, want[t++] = 0;
        }
        int take = n - a_done < chunk ? n - a_done : chunk;
        for (int j = 0; j < take; j++)
            tk[t] = toks[a_done + j], sq[t] = a_seq, ps[t] = a_done + j, want[t++] = 1;
        if (mixed) tk[t] = 7, sq[t] = b_seq, ps[t] = b_len++, want[t++] = 0;
        fl_batch b = {.n_tokens = t, .token = tk, .seq = sq, .pos = ps, .logits = want};
        int rows = fl_forward(ctx, &b, out);
        if (rows < 0) {
            worst = INFINITY;
            break;
        }
        int row_a = mixed ? 1 : 0; /* B's first token has a row before A's */
        for (int j = 0; j < take; j++) {
            const float *x = out + (size_t)(row_a + j) * vocab, *y = ref + (size_t)(a_done + j) * vocab;
            for (int v = 0; v < vocab; v++) {
                double d = fabs((double)x[v] - y[v]);
                if (d > worst) worst = d;
            }
        }
        a_done += take;
    }
    free(out);
    fl_context_free(ctx);
    return worst;
}

/* With the packed GEMM every row is computed the same way whatever the batch, so
 * logits must be bitwise equal. OpenBLAS picks kernels by matrix size (small-matrix
 * kernels on AVX-512 for out*rows <= ~1200) that round differently, so on its path
 * the bound is 1e-5 of the logits' scale. */
static void test_batch_invariance(fl_model *m, const char *what, int exact) {
    int vocab = fl_model_config(m)->vocab_size;
    int32_t toks[100];
    for (int i = 0; i < 100; i++) toks[i] = 1 + (i * 131 + 17) % (vocab - 1);
    float *ref = logits_alone(m, toks, 100);
    if (!tap_ok(ref != NULL, "%s: 100-token prefill alone runs (%s)", what, fl_last_error())) return;
    double scale = 1.0;
    for (int i = 0; i < 100 * vocab; i++)
        if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    int chunks[] = {1, 7, 100};
    for (int i = 0; i < 3; i++) {
        for (int mixed = 0; mixed <= 1; mixed++) {
            double d = max_diff_chunked(m, toks, 100, chunks[i], mixed, ref);
            tap_ok(exact ? d == 0 : d <= 1e-5 * scale,
                   "%s: prefill in chunks of %d%s gives %s logits (max |diff| %.2e, "
                   "max |logit| %.1f)",
                   what, chunks[i], mixed ? " shared with 2 other sequences" : "",
                   exact ? "bitwise the same" : "the same", d, scale);
        }
    }
    free(ref);
}

int main(void) {
    const char *dir = tap_shared("models/stories260K");
    if (!dir) {
        tap_skip("stories260K tests: ../shared/models/stories260K absent (set FLEXLLM_SHARED)");
    } else {
        int32_t expect[80];
        char path[4200];
        snprintf(path, sizeof path, "%s/expected_greedy_from_bos_80.json", dir);
        int n = read_expected(path, expect, 80);
        tap_ok(n == 80, "read 80 expected ids from llama2.c");
        fl_model *m = fl_model_load(dir, NULL);
        if (tap_ok(m != NULL, "stories260K loads (%s)", m ? "" : fl_last_error())) {
            test_greedy_forward(m, expect, n);
            test_greedy_generator(m, expect, n);
            test_batch_invariance(m, "stories260K", 1);
            test_stop_strings(m);
            fl_model_free(m);
        }
        fl_model_params mp = fl_model_default_params();
        mp.gemm = FL_GEMM_OPENBLAS;
        m = fl_model_load(dir, &mp);
        if (tap_ok(m != NULL, "stories260K loads with OpenBLAS GEMMs")) {
            test_greedy_forward(m, expect, n);
            test_batch_invariance(m, "stories260K, OpenBLAS", 0);
            fl_model_free(m);
        }
    }
    const char *tmp = tap_tmpdir("generate_init_model");
    fl_init_model_params ip = fl_init_model_default_params();
    if (tap_ok(tmp && fl_init_model(tmp, &ip) == 0, "init-model writes the default model (%s)",
               fl_last_error())) {
        fl_model *m = fl_model_load(tmp, NULL);
        if (tap_ok(m != NULL, "the init-model model loads (%s)", m ? "" : fl_last_error())) {
            test_batch_invariance(m, "init-model default", 1);
            test_page_reuse(m);
            test_eos(m);
            fl_model_free(m);
        }
    }
    return tap_done();
}
