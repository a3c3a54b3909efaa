/* The engine's device path (fl_forward on a cuda context: the batch split between device
 * and CPU, page tables, logit rows, adapter slots) checked against a CPU context fed the
 * same batches. One set of checks for both backends: mock_backend.c runs them on a CPU
 * stand-in for the backend (exact but for the tolerance it passes), test_forward.c on the
 * device (fp32 rounding tolerances). */
#ifndef FL_DEVICE_PATH_H
#define FL_DEVICE_PATH_H

#include "cuda_test.h"
#include "lora.h"

#include <string.h>

/* Largest differences a check accepts: logits relative to the reference's largest, the
 * training loss relative to the CPU's, gradients relative to the CPU's largest. */
typedef struct {
    double logits, loss, grads;
} dp_tol;

/* A model on one device with a context of four sequences. */
typedef struct {
    fl_model *m;
    fl_context *ctx;
    int seq[4];
} dp_side;

static inline dp_side dp_open(const char *dir, fl_device device) {
    fl_model_params mp = fl_model_default_params();
    mp.device = device;
    dp_side s = {.m = fl_model_load(dir, &mp)};
    if (!s.m) ct_check(-1, "fl_model_load");
    fl_context_params cp = fl_context_default_params();
    cp.kv_pages = 64;
    cp.max_seqs = 8;
    cp.max_batch_tokens = 128;
    if (!(s.ctx = fl_context_new(s.m, &cp))) ct_check(-1, "fl_context_new");
    for (int i = 0; i < 4; i++) s.seq[i] = fl_seq_new(s.ctx);
    return s;
}

static inline void dp_close(dp_side *s) {
    fl_context_free(s->ctx);
    fl_model_free(s->m);
}

/* The largest difference relative to the reference's largest value; NaN fails. */
static inline double dp_rel_max(const float *got, const float *ref, size_t n) {
    double big = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) big = fabs(ref[i]) > big ? fabs(ref[i]) : big;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        worst = isnan(d) ? INFINITY : d > worst ? d : worst;
    }
    return worst / (big > 0 ? big : 1.0);
}

static inline fl_adapter *dp_random_adapter(const fl_model *m, int rank, unsigned targets,
                                            uint64_t seed) {
    fl_lora_params lp = fl_lora_default_params();
    lp.rank = rank;
    lp.alpha = 2.0f * rank;
    lp.targets = targets;
    lp.seed = seed;
    fl_adapter *a = fl_adapter_new(m, &lp);
    if (!a) ct_check(-1, "fl_adapter_new");
    for (size_t i = 0; i < a->n_params; i++) a->params[i] += ct_uniform(-0.1f, 0.1f); /* B != 0 */
    fl_adapter_changed(a);
    return a;
}

/* A batch over the sides' sequences: seq_of[t] indexes dp_side.seq. */
typedef struct {
    int n;
    int32_t tok[128], pos[128];
    int seq_of[128];
    int8_t want[128];
    const fl_adapter *ad[128];
} dp_batch;

static inline void dp_add(dp_batch *b, int32_t tok, int seq, int32_t pos, int want,
                          const fl_adapter *a) {
    b->tok[b->n] = tok, b->seq_of[b->n] = seq, b->pos[b->n] = pos, b->want[b->n] = (int8_t)want;
    b->ad[b->n++] = a;
}

/* Runs b on dev and, when cpu is given, on cpu; dev's return value, and in *diff the
 * largest relative difference of their logits (infinite when the row counts differ). */
static inline int dp_run(dp_side *dev, dp_side *cpu, const dp_batch *b, double *diff) {
    int32_t sd[128], sc[128];
    for (int t = 0; t < b->n; t++)
        sd[t] = dev->seq[b->seq_of[t]], sc[t] = cpu ? cpu->seq[b->seq_of[t]] : 0;
    int vocab = fl_model_config(dev->m)->vocab_size;
    float *ld = malloc(sizeof(float) * b->n * vocab), *lc = malloc(sizeof(float) * b->n * vocab);
    fl_batch bd = {.n_tokens = b->n, .token = b->tok, .seq = sd, .pos = b->pos, .logits = b->want,
                   .adapter = b->ad};
    fl_batch bc = bd;
    bc.seq = sc;
    int rd = fl_forward(dev->ctx, &bd, ld);
    if (cpu) {
        int rc = fl_forward(cpu->ctx, &bc, lc);
        *diff = rd == rc && rd >= 0 ? dp_rel_max(ld, lc, (size_t)rd * vocab) : INFINITY;
    }
    free(ld);
    free(lc);
    return rd;
}

/* Prefill chunks of four sequences (three adapters of ranks 4, 8 and 16 on different
 * targets, and none) interleaved in one batch with logits on some rows, then decode steps;
 * then one adapter trained in place and one freed and another made (quite possibly at the
 * same address). uploads: the backend's count of adapter uploads where it keeps one (the
 * mock), else NULL: each adapter, and each change of one, goes to the device once. */
static inline void dp_check_adapters(const char *dir, dp_tol tol, const int *uploads) {
    dp_side dev = dp_open(dir, FL_DEVICE_CUDA), cpu = dp_open(dir, FL_DEVICE_CPU);
    int vocab = fl_model_config(cpu.m)->vocab_size, len[4] = {0};
    int up0 = uploads ? *uploads : 0;
    fl_adapter *ad[3] = {dp_random_adapter(cpu.m, 4, (1u << FL_LORA_Q) | (1u << FL_LORA_V), 1),
                         dp_random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 2),
                         dp_random_adapter(cpu.m, 16, (1u << FL_LORA_O) | (1u << FL_LORA_DOWN), 3)};
    dp_batch b = {0};
    for (int i = 0; i < 20; i++)
        for (int s = 0; s < 4; s++)
            if (s != 3 || i < 7)
                dp_add(&b, ct_below(vocab), s, len[s]++, i % 3 == 0, s < 3 ? ad[s] : NULL);
    double d1, d2, d3 = 0;
    int n1 = dp_run(&dev, &cpu, &b, &d1), up1 = uploads ? *uploads - up0 : 0;
    for (int step = 0; step < 3; step++) {
        dp_batch dec = {0};
        for (int s = 3; s >= 0; s--) dp_add(&dec, ct_below(vocab), s, len[s]++, 1, s < 3 ? ad[s] : NULL);
        double d;
        dp_run(&dev, &cpu, &dec, &d);
        d3 = d > d3 ? d : d3;
    }
    tap_ok(n1 == 24 && d1 < tol.logits && d3 < tol.logits,
           "prefill chunks of 4 sequences (3 adapters and none) then decode steps: the device "
           "path's logits are the CPU's (%.1e, %.1e; %d rows)",
           d1, d3, n1);
    if (uploads)
        tap_ok(up1 == 3 && *uploads - up0 == 3,
               "each adapter went to the device once (%d uploads after the prefill, %d after "
               "decoding)",
               up1, *uploads - up0);

    /* trained in place (as the optimizer does), freed and made anew, unchanged */
    for (size_t i = 0; i < ad[1]->n_params; i++) ad[1]->params[i] *= -1.5f;
    fl_adapter_changed(ad[1]);
    fl_adapter_free(ad[0]);
    ad[0] = dp_random_adapter(cpu.m, 4, (1u << FL_LORA_Q) | (1u << FL_LORA_V), 9);
    dp_batch dec = {0};
    for (int s = 0; s < 4; s++) dp_add(&dec, ct_below(vocab), s, len[s]++, 1, s < 3 ? ad[s] : NULL);
    dp_run(&dev, &cpu, &dec, &d2);
    tap_ok(d2 < tol.logits,
           "an adapter changed in place and one made anew are used as they are now (%.1e)", d2);
    if (uploads)
        tap_ok(*uploads - up0 == 5, "those two were uploaded again, the unchanged one not (%d "
                                    "uploads)",
               *uploads - up0);
    for (int i = 0; i < 3; i++) fl_adapter_free(ad[i]);
    dp_close(&dev);
    dp_close(&cpu);
}

/* A finetuning sample's chunks among inference tokens (one with the sample's adapter, the
 * rest with another) on a cuda context: the finetuning rows run on the CPU, so loss and
 * gradients are the CPU context's, and the inference rows' logits are the CPU's. */
static inline void dp_check_finetuning_rows(const char *dir, dp_tol tol) {
    dp_side dev = dp_open(dir, FL_DEVICE_CUDA), cpu = dp_open(dir, FL_DEVICE_CPU);
    int vocab = fl_model_config(cpu.m)->vocab_size;
    fl_adapter *ad = dp_random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 5);
    fl_adapter *ac = dp_random_adapter(cpu.m, 8, FL_LORA_ALL_LINEARS, 5);
    memcpy(ac->params, ad->params, sizeof(float) * ad->n_params);
    fl_adapter_changed(ac);
    fl_adapter *inf = dp_random_adapter(cpu.m, 4, FL_LORA_ALL_LINEARS, 6);
    int32_t stok[30], slab[30];
    for (int i = 0; i < 30; i++) stok[i] = ct_below(vocab);
    for (int i = 0; i < 30; i++) slab[i] = i + 1 < 30 ? stok[i + 1] : -1;
    fl_sample sample = {stok, slab, 30};
    fl_train_sample *td = fl_train_begin(dev.ctx, ad, &sample, NULL);
    fl_train_sample *tc = fl_train_begin(cpu.ctx, ac, &sample, NULL);
    if (!td || !tc) ct_check(-1, "fl_train_begin");
    double worst = 0.0;
    int done = 0, len = 0;
    float *ld = malloc(sizeof(float) * 16 * vocab), *lc = malloc(sizeof(float) * 16 * vocab);
    while (done < 30) { /* chunks of 7 sample positions among inference tokens */
        int32_t tok[16], sd[16], sc[16], pos[16];
        int8_t want[16];
        const fl_adapter *use[16], *usec[16];
        int n = 0, k = 30 - done < 7 ? 30 - done : 7;
        for (int i = 0; i < k; i++) {
            tok[n] = stok[done + i], sd[n] = fl_train_seq(td), sc[n] = fl_train_seq(tc);
            pos[n] = done + i, want[n] = 0, use[n] = usec[n] = NULL, n++;
            if (i % 2 == 0) { /* an inference token in between */
                tok[n] = ct_below(vocab), sd[n] = dev.seq[0], sc[n] = cpu.seq[0], pos[n] = len++;
                want[n] = 1, use[n] = i == 0 ? ad : inf, usec[n] = i == 0 ? ac : inf, n++;
            }
        }
        done += k;
        fl_batch bd = {.n_tokens = n, .token = tok, .seq = sd, .pos = pos, .logits = want,
                       .adapter = use};
        fl_batch bc = bd;
        bc.seq = sc;
        bc.adapter = usec;
        int rd = fl_forward(dev.ctx, &bd, ld), rc = fl_forward(cpu.ctx, &bc, lc);
        double d = rd == rc && rd > 0 ? dp_rel_max(ld, lc, (size_t)rd * vocab) : INFINITY;
        worst = d > worst ? d : worst;
    }
    int bd = fl_train_backward(dev.ctx, td, 30), bc = fl_train_backward(cpu.ctx, tc, 30);
    double ld_loss = fl_train_loss(td), lc_loss = fl_train_loss(tc), gd = 0.0, gbig = 0.0;
    for (size_t i = 0; i < ad->n_params; i++) {
        gd = fmax(gd, fabs((double)ad->grads[i] - ac->grads[i]));
        gbig = fmax(gbig, fabs(ac->grads[i]));
    }
    tap_ok(worst < tol.logits, "inference rows among finetuning rows: logits as the CPU's (%.1e)",
           worst);
    tap_ok(bd == 30 && bc == 30 && fabs(ld_loss - lc_loss) <= tol.loss * fabs(lc_loss) &&
               gd <= tol.grads * gbig && gbig > 0,
           "the finetuning rows ran on the CPU: loss %.6f as the CPU context's %.6f, gradients "
           "within %.1e of the largest %.1e",
           ld_loss, lc_loss, gd, gbig);
    fl_train_end(dev.ctx, td);
    fl_train_end(cpu.ctx, tc);
    free(ld);
    free(lc);
    fl_adapter_free(ad);
    fl_adapter_free(ac);
    fl_adapter_free(inf);
    dp_close(&dev);
    dp_close(&cpu);
}

/* A finetuning job on a cuda context, its live adapter (fl_finetune_adapter) generating
 * beside it: after every optimizer step the device must use the new weights, as a CPU
 * context reading the same adapter does. work: a folder for the job's data and output.
 * uploads as for dp_check_adapters: one upload per step. */
static inline void dp_check_job_adapter(const char *dir, const char *work, dp_tol tol,
                                        const int *uploads) {
    dp_side dev = dp_open(dir, FL_DEVICE_CUDA), cpu = dp_open(dir, FL_DEVICE_CPU);
    int vocab = fl_model_config(cpu.m)->vocab_size;
    char data[4300], out[4300];
    snprintf(data, sizeof data, "%s/job.txt", work);
    snprintf(out, sizeof out, "%s/job", work);
    FILE *f = fopen(data, "w");
    for (int i = 0; f && i < 40; i++) fprintf(f, "The cat sat on mat number %d, and then it slept. ", i);
    if (!f || fclose(f) != 0) ct_check(-1, "writing the job's data");
    fl_finetune_params p = fl_finetune_default_params();
    p.data = data;
    p.out = out;
    p.lora.rank = 4;
    p.lora.targets = FL_LORA_ALL_LINEARS;
    p.optim.lr = 1e-2f;
    p.dataset.max_len = 24;
    p.grad_accum = 1;
    p.chunk = 12;
    p.max_steps = 3;
    fl_finetune *job = fl_finetune_new(dev.ctx, &p);
    if (!job) ct_check(-1, "fl_finetune_new");
    fl_adapter *a = fl_finetune_adapter(job);
    int up0 = uploads ? *uploads : 0, last = 0, checks = 0, rc, len = 0;
    double worst = 0.0;
    do {
        rc = fl_finetune_step(job, 12);
        fl_finetune_progress pr;
        fl_finetune_get_progress(job, &pr);
        if (pr.step == last) continue;
        last = pr.step;
        dp_batch b = {0};
        dp_add(&b, ct_below(vocab), 0, len++, 1, a);
        double d;
        if (dp_run(&dev, &cpu, &b, &d) != 1) ct_check(-1, "fl_forward with the job's adapter");
        worst = d > worst ? d : worst;
        checks++;
    } while (rc == 1);
    tap_ok(rc == 0 && checks == 3 && worst < tol.logits,
           "a finetuning job's adapter used for inference on the device after each of its %d "
           "optimizer steps: logits as the CPU's with the same adapter (%.1e)",
           checks, worst);
    if (uploads)
        tap_ok(*uploads - up0 == checks, "it went to the device once per step (%d uploads)",
               *uploads - up0);
    fl_finetune_free(job);
    dp_close(&dev);
    dp_close(&cpu);
}

#endif
