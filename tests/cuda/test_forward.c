/* The engine on the cuda device through the public API (fl_model_load with device cuda,
 * fl_forward, fl_generator, finetuning samples), against independent truths: llama2.c's 80
 * greedy ids for stories260K, and a CPU model's contexts fed the same batches (logits of
 * mixed prefill/decode batches with several LoRA adapters, an adapter changed in place or
 * replaced at the same address, finetuning rows beside inference rows: their loss and
 * gradients). Without a device: how the device is chosen and refused, then a skip. */
#include "cuda/cuda_model.h"
#include "cuda_test.h"
#include "expected_ids.h"
#include "lora.h"

#include <cjson/cJSON.h>
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

/* logits relative to the reference's largest: the largest difference */
static double rel_max(const float *got, const float *ref, size_t n) {
    double big = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) big = fabs(ref[i]) > big ? fabs(ref[i]) : big;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        worst = isnan(d) ? INFINITY : d > worst ? d : worst;
    }
    return worst / (big > 0 ? big : 1.0);
}

static fl_adapter *random_adapter(const fl_model *m, int rank, unsigned targets, uint64_t seed) {
    fl_lora_params lp = fl_lora_default_params();
    lp.rank = rank;
    lp.alpha = 2.0f * rank;
    lp.targets = targets;
    lp.seed = seed;
    fl_adapter *a = fl_adapter_new(m, &lp);
    if (!a) ct_check(-1, "fl_adapter_new");
    for (size_t i = 0; i < a->n_params; i++) a->params[i] += ct_uniform(-0.1f, 0.1f); /* B != 0 */
    return a;
}

typedef struct {
    fl_model *m;
    fl_context *ctx;
    int seq[4];
} side;

static side open_side(const char *dir, fl_device dev) {
    side s = {.m = load(dir, dev)};
    if (!s.m) ct_check(-1, "fl_model_load");
    fl_context_params cp = fl_context_default_params();
    cp.kv_pages = 64;
    cp.max_seqs = 8;
    if (!(s.ctx = fl_context_new(s.m, &cp))) ct_check(-1, "fl_context_new");
    for (int i = 0; i < 4; i++) s.seq[i] = fl_seq_new(s.ctx);
    return s;
}

/* The batch tokens of seq_of[t] (an index into the sides' sequences) on both sides; every
 * row gets logits. Returns the largest relative difference. */
static double both(side *gpu, side *cpu, int n, const int32_t *tok, const int *seq_of,
                   const int32_t *pos, const fl_adapter *const *ad) {
    int32_t sg[64], sc[64];
    int8_t want[64];
    for (int t = 0; t < n; t++) {
        sg[t] = gpu->seq[seq_of[t]];
        sc[t] = cpu->seq[seq_of[t]];
        want[t] = 1;
    }
    int vocab = fl_model_config(cpu->m)->vocab_size;
    float *lg = malloc(sizeof(float) * n * vocab), *lc = malloc(sizeof(float) * n * vocab);
    fl_batch bg = {.n_tokens = n, .token = tok, .seq = sg, .pos = pos, .logits = want, .adapter = ad};
    fl_batch bc = bg;
    bc.seq = sc;
    if (fl_forward(gpu->ctx, &bg, lg) != n) ct_check(-1, "fl_forward on cuda");
    if (fl_forward(cpu->ctx, &bc, lc) != n) ct_check(-1, "fl_forward on the CPU");
    double d = rel_max(lg, lc, (size_t)n * vocab);
    free(lg);
    free(lc);
    return d;
}

/* Prefill chunks of three sequences with three adapters (ranks 4, 8, 16 on different
 * targets) and one with none, in one batch; then a decode step of each; then one adapter
 * changed in place, and one freed and another made in its stead. */
static void test_adapters(const char *dir) {
    side gpu = open_side(dir, FL_DEVICE_CUDA), cpu = open_side(dir, FL_DEVICE_CPU);
    int vocab = fl_model_config(cpu.m)->vocab_size;
    fl_adapter *ad[3] = {
        random_adapter(cpu.m, 4, (1u << FL_LORA_Q) | (1u << FL_LORA_V), 1),
        random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 2),
        random_adapter(cpu.m, 16, (1u << FL_LORA_O) | (1u << FL_LORA_DOWN), 3)};
    int32_t tok[64], pos[64];
    int seq_of[64], len[4] = {0}, n = 0;
    const fl_adapter *use[64];
    for (int i = 0; i < 12; i++)
        for (int s = 0; s < 4; s++) {
            if (s == 3 && i >= 5) continue;
            tok[n] = ct_below(vocab);
            seq_of[n] = s;
            pos[n] = len[s]++;
            use[n++] = s < 3 ? ad[s] : NULL;
        }
    double d1 = both(&gpu, &cpu, n, tok, seq_of, pos, use);
    n = 0;
    for (int s = 0; s < 4; s++) {
        tok[n] = ct_below(vocab);
        seq_of[n] = s;
        pos[n] = len[s]++;
        use[n++] = s < 3 ? ad[s] : NULL;
    }
    double d2 = both(&gpu, &cpu, n, tok, seq_of, pos, use);
    tap_ok(d1 < 1e-4 && d2 < 1e-4,
           "cuda vs CPU with 3 adapters and none in one batch: prefill chunks %.1e, decode %.1e",
           d1, d2);

    /* trained in place (as the optimizer does): the device must see the new weights */
    for (size_t i = 0; i < ad[1]->n_params; i++) ad[1]->params[i] *= -1.5f;
    fl_lora_params lp = ad[0]->p;
    fl_adapter_free(ad[0]); /* another one, quite possibly at the same address */
    lp.seed = 99;
    ad[0] = random_adapter(cpu.m, lp.rank, lp.targets, 99);
    n = 0;
    for (int s = 0; s < 4; s++) {
        tok[n] = ct_below(vocab);
        seq_of[n] = s;
        pos[n] = len[s]++;
        use[n++] = s < 3 ? ad[s] : NULL;
    }
    double d3 = both(&gpu, &cpu, n, tok, seq_of, pos, use);
    tap_ok(d3 < 1e-4,
           "an adapter changed in place and one replaced by a new one are used as they are now "
           "(%.1e)",
           d3);
    for (int i = 0; i < 3; i++) fl_adapter_free(ad[i]);
    fl_context_free(gpu.ctx);
    fl_context_free(cpu.ctx);
    fl_model_free(gpu.m);
    fl_model_free(cpu.m);
}

/* A finetuning sample's chunk beside inference tokens in one batch on a cuda context: the
 * training rows run on the CPU, so loss and gradients are the CPU context's; the inference
 * rows' logits are the CPU's to fp32 rounding. */
static void test_finetuning_rows(const char *dir) {
    side gpu = open_side(dir, FL_DEVICE_CUDA), cpu = open_side(dir, FL_DEVICE_CPU);
    int vocab = fl_model_config(cpu.m)->vocab_size;
    fl_adapter *ag = random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 5);
    fl_adapter *ac = random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 5);
    memcpy(ac->params, ag->params, sizeof(float) * ag->n_params);
    int32_t stok[24], slab[24];
    for (int i = 0; i < 24; i++) stok[i] = ct_below(vocab);
    for (int i = 0; i < 24; i++) slab[i] = i + 1 < 24 ? stok[i + 1] : -1;
    fl_sample sample = {stok, slab, 24};
    fl_train_sample *tg = fl_train_begin(gpu.ctx, ag, &sample, NULL);
    fl_train_sample *tc = fl_train_begin(cpu.ctx, ac, &sample, NULL);
    if (!tg || !tc) ct_check(-1, "fl_train_begin");
    int32_t itok[8];
    for (int i = 0; i < 8; i++) itok[i] = ct_below(vocab);
    double worst = 0.0;
    float *lg = malloc(sizeof(float) * 8 * vocab), *lc = malloc(sizeof(float) * 8 * vocab);
    for (int chunk = 0; chunk < 3; chunk++) { /* 8 sample positions + 8 or 1 inference ones */
        int32_t tok[16], sg[16], sc[16], pos[16];
        int8_t want[16];
        int n = 0, n_inf = chunk == 0 ? 8 : 1;
        for (int i = 0; i < n_inf; i++) {
            int p = chunk == 0 ? i : 7 + chunk;
            tok[n] = chunk == 0 ? itok[i] : ct_below(vocab);
            sg[n] = gpu.seq[0], sc[n] = cpu.seq[0], pos[n] = p, want[n++] = 1;
        }
        for (int i = 0; i < 8; i++) {
            tok[n] = stok[chunk * 8 + i];
            sg[n] = fl_train_seq(tg), sc[n] = fl_train_seq(tc), pos[n] = chunk * 8 + i;
            want[n++] = 0;
        }
        fl_batch bg = {.n_tokens = n, .token = tok, .seq = sg, .pos = pos, .logits = want};
        fl_batch bc = bg;
        bc.seq = sc;
        if (fl_forward(gpu.ctx, &bg, lg) != n_inf || fl_forward(cpu.ctx, &bc, lc) != n_inf)
            ct_check(-1, "fl_forward with finetuning rows");
        double d = rel_max(lg, lc, (size_t)n_inf * vocab);
        worst = d > worst ? d : worst;
    }
    if (fl_train_backward(gpu.ctx, tg, 24) != 24 || fl_train_backward(cpu.ctx, tc, 24) != 24)
        ct_check(-1, "fl_train_backward");
    double lg_loss = fl_train_loss(tg), lc_loss = fl_train_loss(tc), gd = 0.0, gbig = 0.0;
    for (size_t i = 0; i < ag->n_params; i++) {
        double d = fabs((double)ag->grads[i] - ac->grads[i]);
        gd = d > gd ? d : gd;
        gbig = fabs(ac->grads[i]) > gbig ? fabs(ac->grads[i]) : gbig;
    }
    tap_ok(fabs(lg_loss - lc_loss) <= 1e-6 * fabs(lc_loss) && gd <= 1e-5 * gbig && gbig > 0,
           "finetuning rows beside inference rows on a cuda context: loss %.6f vs the CPU's %.6f, "
           "gradients within %.1e of the largest %.1e",
           lg_loss, lc_loss, gd, gbig);
    tap_ok(worst < 1e-4, "the inference rows of those batches: logits within %.1e of the CPU's",
           worst);
    fl_train_end(gpu.ctx, tg);
    fl_train_end(cpu.ctx, tc);
    free(lg);
    free(lc);
    fl_adapter_free(ag);
    fl_adapter_free(ac);
    fl_context_free(gpu.ctx);
    fl_context_free(cpu.ctx);
    fl_model_free(gpu.m);
    fl_model_free(cpu.m);
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
    test_adapters(model);
    test_finetuning_rows(model);
    return tap_done();
}
