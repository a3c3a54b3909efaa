/* Finetuning jobs end to end on stories260K: the loss of a held-out slice falls,
 * runs are reproducible bit for bit, a crashed run resumes to the same adapter, a
 * NaN loss stops the job with its last checkpoint intact, bad data never starts. */
#include "flexllm.h"
#include "fl_internal.h"
#include "lora.h"
#include "tap.h"

#include <math.h>

static fl_model *model;
static fl_context *ctx;
static char dir[4096];

static const char *path_in(const char *name) { return tap_path(dir, name); }

/* Copies bytes [from, from+len) of src to dst. */
static int slice(const char *src, long from, long len, const char *dst) {
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    if (!in || !out) return -1;
    char *buf = malloc((size_t)len);
    fseek(in, from, SEEK_SET);
    size_t n = fread(buf, 1, (size_t)len, in);
    fwrite(buf, 1, n, out);
    free(buf);
    fclose(in);
    fclose(out);
    return n == (size_t)len ? 0 : -1;
}

static fl_finetune_params job_params(const char *out, int max_steps) {
    fl_finetune_params p = fl_finetune_default_params();
    p.data = path_in("train.txt");
    p.out = out;
    p.lora.targets = FL_LORA_ALL_LINEARS;
    p.lora.rank = 8;
    p.optim.lr = 1e-3f;
    p.dataset.max_len = 64;
    p.chunk = 24;
    p.grad_accum = 2;
    p.seed = 5;
    p.max_steps = max_steps;
    return p;
}

static int run_job(fl_finetune *job) {
    int rc;
    while ((rc = fl_finetune_step(job, 40)) == 1) {}
    return rc;
}

static int same_params(const fl_adapter *a, const fl_adapter *b) {
    return a->n_params == b->n_params &&
           memcmp(a->params, b->params, sizeof(float) * a->n_params) == 0;
}

static void test_training(const char *shakespeare) {
    slice(shakespeare, 0, 40000, path_in("train.txt"));
    slice(shakespeare, 600000, 6000, path_in("heldout.txt"));
    fl_dataset_params dp = fl_dataset_default_params();
    dp.max_len = 64;
    fl_dataset *held = fl_dataset_load(path_in("heldout.txt"), fl_model_tokenizer(model), &dp);
    double before = fl_evaluate(ctx, NULL, held, 0, 1000);

    fl_finetune_params p = job_params(path_in("run_a"), 80);
    p.checkpoint_every = 10;
    fl_finetune *a = fl_finetune_new(ctx, &p);
    int rc = a ? run_job(a) : -1;
    double after = a ? fl_evaluate(ctx, fl_finetune_adapter(a), held, 0, 1000) : NAN;
    tap_ok(rc == 0 && after < before - 1.0,
           "LoRA (all linears, r 8) on Shakespeare: held-out loss %.3f -> %.3f after 80 steps "
           "(%s)", before, after, rc ? fl_last_error() : "ok");

    p.out = path_in("run_b");
    fl_finetune *b = fl_finetune_new(ctx, &p);
    if (b) run_job(b);
    tap_ok(a && b && same_params(fl_finetune_adapter(a), fl_finetune_adapter(b)),
           "the same seed trains the same adapter, bit for bit");

    /* A run killed after step 23 (checkpoints every 10 steps: the last at 20), then a
     * new job that resumes from the checkpoint. */
    fl_finetune_params pc = p;
    pc.out = path_in("run_d");
    fl_finetune *d = fl_finetune_new(ctx, &pc);
    while (d && fl_finetune_step(d, 40) == 1) {
        fl_finetune_progress pr;
        fl_finetune_get_progress(d, &pr);
        if (pr.step == 23) break;
    }
    fl_finetune_free(d); /* no final save: steps 21..23 are lost */
    pc.resume = 1;
    fl_finetune *e = fl_finetune_new(ctx, &pc);
    fl_finetune_progress pe = {0};
    if (e) fl_finetune_get_progress(e, &pe);
    rc = e ? run_job(e) : -1;
    tap_ok(e && pe.step == 20 && rc == 0 && same_params(fl_finetune_adapter(a), fl_finetune_adapter(e)),
           "a run killed at step 23 resumes from its step-20 checkpoint and ends with the "
           "uninterrupted run's adapter, bit for bit (resumed at step %d)", pe.step);

    /* The finished adapter written in PEFT format loads back to the same numbers. */
    fl_adapter *loaded = fl_adapter_load(model, path_in("run_a"));
    double again = loaded ? fl_evaluate(ctx, loaded, held, 0, 1000) : NAN;
    tap_ok(loaded && same_params(loaded, fl_finetune_adapter(a)) && again == after,
           "the saved adapter loads back with the same weights and the same held-out loss "
           "(%.6f)", again);
    fl_adapter_free(loaded);
    fl_finetune_free(a);
    fl_finetune_free(b);
    fl_finetune_free(e);
    fl_dataset_free(held);
}

static void test_nan_stops(void) {
    fl_finetune_params p = job_params(path_in("run_nan"), 60);
    p.optim.lr = 1e30f;       /* the first update blows the weights up */
    p.optim.clip_norm = 0.0f;
    p.checkpoint_every = 1;
    fl_finetune *j = fl_finetune_new(ctx, &p);
    int rc = j ? run_job(j) : 0;
    const char *e = fl_last_error();
    tap_ok(rc == -1 && (strstr(e, "loss is") || strstr(e, "not finite")) &&
               strstr(e, "last checkpoint"),
           "a diverging job stops with an error: \"%s\"", e);
    fl_finetune_free(j);
    fl_adapter *last = NULL;
    char ck[4300];
    snprintf(ck, sizeof ck, "%s/checkpoint-1", p.out);
    last = fl_adapter_load(model, ck);
    int finite = last != NULL;
    for (size_t i = 0; last && i < last->n_params; i++) finite &= isfinite(last->params[i]);
    tap_ok(finite, "its last checkpoint (%s) is intact and loads with finite weights", ck);
    fl_adapter_free(last);
}

static void test_bad_data(void) {
    tap_write_text(path_in("bad.jsonl"),
                   "{\"text\": \"one\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"text\": 3}\n");
    fl_finetune_params p = job_params(path_in("run_bad"), 5);
    p.data = path_in("bad.jsonl");
    fl_finetune *j = fl_finetune_new(ctx, &p);
    tap_ok(!j && strstr(fl_last_error(), "bad.jsonl:3") && !fl_file_exists(p.out),
           "a malformed JSONL line stops the job before it starts: \"%s\"", fl_last_error());
    fl_finetune_free(j);
}

int main(void) {
    const char *stories = tap_shared("models/stories260K");
    const char *shakespeare = tap_shared("data/tinyshakespeare.txt");
    if (!stories || !shakespeare) {
        tap_skip("finetuning tests: ../shared stories260K or tinyshakespeare absent");
        return tap_done();
    }
    snprintf(dir, sizeof dir, "%s", tap_tmpdir("test_finetune"));
    model = fl_model_load(stories, NULL);
    ctx = fl_context_new(model, NULL);
    test_training(shakespeare);
    test_nan_stops();
    test_bad_data();
    fl_context_free(ctx);
    fl_model_free(model);
    return tap_done();
}
