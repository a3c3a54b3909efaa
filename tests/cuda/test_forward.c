/* The engine on the cuda device through the public API (fl_model_load with device cuda,
 * fl_forward, fl_generator, finetuning samples and jobs), against independent truths:
 * llama2.c's 80 greedy ids for stories260K, and a CPU model's contexts fed the same batches
 * (device_path.h's checks, which mock_backend.c runs on a CPU stand-in for the backend:
 * logits of mixed prefill/decode batches with several LoRA adapters, an adapter changed in
 * place or replaced at the same address, finetuning rows beside inference rows with their
 * loss and gradients, a finetuning job's adapter after each step). Without a device: how
 * the device is chosen and refused, then a skip. */
#include "cuda/cuda_model.h"
#include "device_path.h"
#include "expected_ids.h"

#include <string.h>

static fl_model *load(const char *dir, fl_device device) {
    fl_model_params p = fl_model_default_params();
    p.device = device;
    return fl_model_load(dir, &p);
}

/* Without a device: auto falls back to the CPU saying why; cuda is refused saying why. */
static void test_choice_without_device(const char *dir) {
    const char *why = "";
    fl_model *m = load(dir, FL_DEVICE_AUTO);
    fl_device d = m ? fl_model_device(m, &why) : FL_DEVICE_AUTO;
    tap_ok(d == FL_DEVICE_CPU && strstr(why, "no usable device"),
           "auto without a device runs on the CPU and says why (\"%s\")", why);
    fl_model_free(m);
    m = load(dir, FL_DEVICE_CUDA);
    tap_ok(!m && strstr(fl_last_error(), "no usable CUDA device"),
           "device cuda without a device is refused: %s", fl_last_error());
    fl_model_free(m);
}

static void test_bad_params(const char *dir) {
    fl_model_params p = fl_model_default_params();
    p.device = (fl_device)7;
    fl_model *m = fl_model_load(dir, &p);
    tap_ok(!m && strstr(fl_last_error(), "device 7"), "an unknown device is refused: %s",
           fl_last_error());
    p = fl_model_default_params();
    p.device_weights = (fl_device_weights)9;
    m = fl_model_load(dir, &p);
    tap_ok(!m && strstr(fl_last_error(), "device_weights 9"),
           "an unknown device_weights is refused: %s", fl_last_error());
}

/* stories260K on the device: 80 greedy ids from BOS, through fl_forward one token at a time
 * and through the generator. */
static void test_stories(const char *dir) {
    char path[4096];
    int32_t expect[80];
    snprintf(path, sizeof path, "%s/expected_greedy_from_bos_80.json", dir);
    if (!tap_ok(read_expected(path, expect, 80) == 80, "read llama2.c's 80 greedy ids")) return;
    fl_model *m = load(dir, FL_DEVICE_AUTO);
    if (!m) ct_check(-1, "fl_model_load stories260K");
    const char *why;
    fl_device d = fl_model_device(m, &why);
    tap_ok(d == FL_DEVICE_CUDA && strstr(why, "auto") &&
               strstr(why, "fp32 weights"),
           "auto with a device picks cuda, with the fp32 checkpoint's precision (\"%s\")", why);
    int vocab = fl_model_config(m)->vocab_size;
    fl_context *ctx = fl_context_new(m, NULL);
    if (!ctx) ct_check(-1, "fl_context_new on cuda");
    int seq = fl_seq_new(ctx), match = 0;
    float *logits = malloc(sizeof(float) * vocab);
    int32_t tok = 1;
    for (int i = 0; i < 80; i++) {
        int32_t pos = i;
        fl_batch b = {.n_tokens = 1, .token = &tok, .seq = &seq, .pos = &pos};
        if (fl_forward(ctx, &b, logits) != 1) ct_check(-1, "fl_forward on cuda");
        tok = argmax(logits, vocab);
        match += tok == expect[i];
    }
    tap_ok(match == 80, "stories260K on cuda through fl_forward: %d/80 greedy ids equal llama2.c's",
           match);
    fl_seq_free(ctx, seq);

    fl_generator *g = fl_generator_new(ctx, NULL);
    fl_request_params rp = fl_request_default_params();
    rp.max_tokens = 80;
    rp.ignore_eos = 1;
    int32_t bos = 1, got[80];
    int n = 0;
    fl_generator_add(g, &bos, 1, &rp);
    while (fl_generator_active(g) > 0) {
        const fl_gen_event *ev;
        int k = fl_generator_step(g, &ev);
        if (k < 0) ct_check(-1, "fl_generator_step on cuda");
        for (int i = 0; i < k; i++)
            if (ev[i].token >= 0 && n < 80) got[n++] = ev[i].token;
    }
    tap_ok(n == 80 && memcmp(got, expect, sizeof got) == 0,
           "stories260K on cuda through the generator: the same 80 ids (%d generated)", n);
    fl_generator_free(g);
    tap_ok(fl_kv_pages_free(ctx) == fl_kv_pages_total(ctx), "every page is back after it");
    free(logits);
    fl_context_free(ctx);
    fl_model_free(m);
}

int main(void) {
    ct_seed(17);
    const char *dir = tap_tmpdir("cuda_forward");
    char model[4200];
    snprintf(model, sizeof model, "%s/model", dir ? dir : "build/tmp");
    fl_init_model_params ip = fl_init_model_default_params();
    ip.seed = 3;
    ip.dim = 128;
    ip.hidden_dim = 352;
    ip.n_layers = 3;
    ip.n_heads = 4;
    ip.n_kv_heads = 2;
    ct_check(dir ? fl_init_model(model, &ip) : -1, "fl_init_model");
    test_bad_params(model);
    if (fl_cuda_device_count() == 0) {
        test_choice_without_device(model);
        tap_skip("the engine on the cuda device: no CUDA device on this machine");
        return tap_done();
    }
    const char *stories = tap_shared("models/stories260K");
    if (stories)
        test_stories(stories);
    else
        tap_skip("stories260K on cuda: no shared models (set FLEXLLM_SHARED)");
    dp_tol tol = {.logits = 1e-4, .loss = 1e-6, .grads = 1e-5};
    dp_check_adapters(model, tol, NULL);
    dp_check_finetuning_rows(model, tol);
    dp_check_job_adapter(model, dir, tol, NULL);
    return tap_done();
}
