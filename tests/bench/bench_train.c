/* Training benchmarks: activation memory of the pruned plan against keep-everything
 * (planner figures, and the arena a real sample allocates), and finetuning tokens/s
 * against inference prefill tokens/s of the same model measured in the same run. */
#include "flexllm.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static const struct {
    const char *name;
    unsigned targets;
} target_sets[] = {
    {"q,v", (1u << FL_LORA_Q) | (1u << FL_LORA_V)},
    {"down", 1u << FL_LORA_DOWN},
    {"all", FL_LORA_ALL_LINEARS},
};

/* Planner figures, bytes per token and layer, for every target set and remat choice. */
static void memory_rows(cJSON *arr, const char *model, const fl_config *cfg, int seq, int rank) {
    for (int t = 0; t < 3; t++)
        for (int remat = 0; remat <= 1; remat++) {
            fl_plan_params pp = {.targets = target_sets[t].targets, .rank = rank,
                                 .remat_q = remat, .remat_gate_up = remat};
            fl_plan plan;
            if (fl_plan_make(cfg, &pp, seq, &plan) != 0) continue;
            double pruned = 4.0 * (plan.arena_floats + plan.pool_floats);
            double keep = 4.0 * plan.keep_all_floats;
            double keep_no_probs = keep - 4.0 * plan.floats[FL_ACT_PROBS];
            printf("  %-12s seq %5d targets %-5s remat %-10s pruned %9.0f B/token/layer, "
                   "keep-everything %10.0f (%5.1f%%), without attention probs %8.0f (%5.1f%%)\n",
                   model, seq, target_sets[t].name, remat ? "q,gate_up" : "none", pruned, keep,
                   100 * pruned / keep, keep_no_probs, 100 * pruned / keep_no_probs);
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "model", model);
            cJSON_AddNumberToObject(o, "seq", seq);
            cJSON_AddStringToObject(o, "targets", target_sets[t].name);
            cJSON_AddStringToObject(o, "remat", remat ? "q,gate_up" : "none");
            cJSON_AddNumberToObject(o, "pruned_bytes_per_token_layer", pruned);
            cJSON_AddNumberToObject(o, "keep_everything_bytes_per_token_layer", keep);
            cJSON_AddNumberToObject(o, "keep_everything_without_probs", keep_no_probs);
            cJSON_AddNumberToObject(o, "ratio", pruned / keep);
            cJSON_AddNumberToObject(o, "ratio_without_probs", pruned / keep_no_probs);
            cJSON_AddItemToArray(arr, o);
        }
}

/* Forward+backward of samples of seq tokens; returns finetuning (forward) tokens/s, and
 * sets *prefill_tps to inference prefill tokens/s of the same tokens, and *arena to the
 * arena bytes one sample allocated. */
static double train_speed(fl_model *m, int seq, int n_samples, int rank, double *prefill_tps,
                          size_t *arena, size_t *planned) {
    const fl_config *c = fl_model_config(m);
    fl_context_params cp = fl_context_default_params();
    cp.max_batch_tokens = seq;
    fl_context *ctx = fl_context_new(m, &cp);
    fl_lora_params lp = fl_lora_default_params();
    lp.targets = FL_LORA_ALL_LINEARS;
    lp.rank = rank;
    fl_adapter *a = fl_adapter_new(m, &lp);
    int32_t *tok = malloc(sizeof(int32_t) * seq), *lab = malloc(sizeof(int32_t) * seq);
    int32_t *sq = malloc(sizeof(int32_t) * seq), *ps = malloc(sizeof(int32_t) * seq);
    for (int i = 0; i < seq; i++) tok[i] = 3 + (i * 7919) % (c->vocab_size - 3);
    for (int i = 0; i < seq; i++) lab[i] = i + 1 < seq ? tok[i + 1] : -1;
    fl_sample s = {tok, lab, seq};
    float *logits = malloc(sizeof(float) * c->vocab_size);
    double t0 = now_s();
    for (int k = 0; k < n_samples; k++) {
        int q = fl_seq_new(ctx);
        for (int i = 0; i < seq; i++) sq[i] = q, ps[i] = i;
        fl_batch b = {.n_tokens = seq, .token = tok, .seq = sq, .pos = ps};
        fl_forward(ctx, &b, logits);
        fl_seq_free(ctx, q);
    }
    *prefill_tps = (double)n_samples * seq / (now_s() - t0);
    t0 = now_s();
    for (int k = 0; k < n_samples; k++) {
        fl_train_sample *t = fl_train_begin(ctx, a, &s, NULL);
        *arena = fl_train_arena_bytes(t);
        while (fl_train_forwarded(t) < seq) fl_train_forward(ctx, t, seq);
        while (fl_train_backward_left(t) > 0) fl_train_backward(ctx, t, seq);
        fl_train_end(ctx, t);
    }
    double tps = (double)n_samples * seq / (now_s() - t0);
    fl_plan plan;
    fl_plan_params pp = {.targets = FL_LORA_ALL_LINEARS, .rank = rank};
    fl_plan_make(c, &pp, seq, &plan);
    *planned = fl_plan_arena_bytes(&plan, seq);
    fl_adapter_free(a);
    fl_context_free(ctx);
    free(tok), free(lab), free(sq), free(ps), free(logits);
    return tps;
}

int main(int argc, char **argv) {
    const char *out = "tests/bench/results/cpu_train.json", *config8b = NULL;
    cJSON *root = cJSON_CreateObject(), *mem = cJSON_AddArrayToObject(root, "memory");
    cJSON *speed = cJSON_AddArrayToObject(root, "finetune_speed");
    cJSON_AddStringToObject(root, "benchmark", "cpu_train");
    printf("activation memory, LoRA rank 16, fp32 (planner):\n");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) {
            out = argv[++i];
        } else if (!strcmp(argv[i], "--config-8b") && i + 1 < argc) {
            config8b = argv[++i];
        } else {
            char *eq = strchr(argv[i], '=');
            if (!eq) continue;
            *eq = 0;
            fl_model *m = fl_model_load(eq + 1, NULL);
            if (!m) {
                fprintf(stderr, "%s\n", fl_last_error());
                return 1;
            }
            const fl_config *c = fl_model_config(m);
            memory_rows(mem, argv[i], c, c->max_seq_len, 16);
            int seq = c->max_seq_len < 256 ? c->max_seq_len : 256;
            double prefill, tps;
            size_t arena = 0, planned = 0;
            int n = c->dim <= 64 ? 40 : 3;
            tps = train_speed(m, seq, n, 16, &prefill, &arena, &planned);
            printf("  %s: finetuning (all linears, r 16, %d-token samples) %.0f tokens/s; "
                   "inference prefill %.0f tokens/s; ratio %.2f; arena %zu bytes (planner %zu)\n",
                   argv[i], seq, tps, prefill, tps / prefill, arena, planned);
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "model", argv[i]);
            cJSON_AddNumberToObject(o, "sample_tokens", seq);
            cJSON_AddNumberToObject(o, "finetune_tokens_per_s", tps);
            cJSON_AddNumberToObject(o, "prefill_tokens_per_s", prefill);
            cJSON_AddNumberToObject(o, "finetune_over_prefill", tps / prefill);
            cJSON_AddNumberToObject(o, "arena_bytes_measured", (double)arena);
            cJSON_AddNumberToObject(o, "arena_bytes_planner", (double)planned);
            cJSON_AddItemToArray(speed, o);
            fl_model_free(m);
        }
    }
    if (config8b) {
        fl_config c;
        if (fl_config_load(config8b, &c) == 0) memory_rows(mem, "llama-3.1-8b", &c, 8192, 16);
        else fprintf(stderr, "%s\n", fl_last_error());
    }
    char *text = cJSON_Print(root);
    FILE *f = fopen(out, "wb");
    int ok = f && fputs(text, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0) ok = 0;
    if (ok) printf("wrote %s\n", out);
    else fprintf(stderr, "bench_train: cannot write %s\n", out);
    free(text);
    cJSON_Delete(root);
    return ok ? 0 : 1;
}
