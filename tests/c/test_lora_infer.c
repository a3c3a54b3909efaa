/* LoRA at inference against its definition: a model whose weights are merged,
 * W + (alpha/r) B A, written as a new HF folder, gives the logits the base model gives
 * with the adapter. Tokens of different adapters in one batch do not affect each other. */
#include "flexllm.h"
#include "lora.h"
#include "safetensors.h"
#include "tap.h"

#include <math.h>

static const char *proj_name(int t) {
    static const char *names[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                  "mlp.down_proj"};
    return names[t];
}

/* Writes dst/ as src/ with every LoRA target of a merged into its weight. */
static int write_merged(const char *src, const char *dst, const fl_adapter *a) {
    char cmd[32768], path[4400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && cp '%s'/config.json '%s'/tokenizer*.json '%s'/",
             dst, dst, src, src, dst);
    if (system(cmd) != 0) return -1;
    snprintf(path, sizeof path, "%s/model.safetensors", src);
    fl_st_set *st = fl_st_open(path);
    if (!st) return -1;
    int n = fl_st_count(st);
    fl_st_tensor *ts = calloc((size_t)n, sizeof *ts);
    float **bufs = calloc((size_t)n, sizeof *bufs);
    for (int i = 0; i < n; i++) {
        ts[i] = *fl_st_at(st, i);
        for (int l = 0; l < a->n_layers; l++)
            for (int t = 0; t < FL_LORA_N_TARGETS; t++) {
                const fl_lora_weight *w = fl_lora_at(a, l, (fl_lora_target)t);
                char name[256];
                snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, proj_name(t));
                if (!w || strcmp(name, ts[i].name) != 0) continue;
                float *m = bufs[i] = malloc(sizeof(float) * ts[i].numel);
                fl_st_to_f32(&ts[i], m);
                for (int o = 0; o < w->out; o++)
                    for (int k = 0; k < w->in; k++) {
                        double d = 0;
                        for (int r = 0; r < a->p.rank; r++)
                            d += (double)w->B[o * a->p.rank + r] * w->A[r * w->in + k];
                        m[(size_t)o * w->in + k] += (float)(a->scale * d);
                    }
                ts[i].data = m;
                ts[i].dtype = FL_DTYPE_F32;
                ts[i].nbytes = sizeof(float) * ts[i].numel;
            }
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dst);
    int rc = fl_st_write(path, ts, n, NULL, NULL, 0);
    for (int i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    free(ts);
    fl_st_close(st);
    return rc;
}

/* Logits at every position of toks, one sequence, with adapter a (or none). */
static float *logits_of(fl_context *ctx, const fl_adapter *a, const int32_t *toks, int n, int vocab) {
    float *out = malloc(sizeof(float) * n * vocab);
    int32_t sq[64], ps[64];
    int8_t want[64];
    const fl_adapter *ad[64];
    int s = fl_seq_new(ctx);
    for (int i = 0; i < n; i++) sq[i] = s, ps[i] = i, want[i] = 1, ad[i] = a;
    fl_batch b = {.n_tokens = n, .token = toks, .seq = sq, .pos = ps, .logits = want, .adapter = ad};
    fl_forward(ctx, &b, out);
    fl_seq_free(ctx, s);
    return out;
}

static fl_adapter *random_adapter(const fl_model *m, unsigned targets, int rank, uint64_t seed) {
    fl_lora_params lp = fl_lora_default_params();
    lp.targets = targets;
    lp.rank = rank;
    lp.alpha = 3.0f * rank;
    lp.seed = seed;
    fl_adapter *a = fl_adapter_new(m, &lp);
    uint64_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < a->n_params; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        a->params[i] = ((float)(s % 20001) / 10000.0f - 1.0f) * 0.05f;
    }
    return a;
}

int main(void) {
    const char *dir = tap_tmpdir("test_lora_infer");
    char base[4300], merged[4300];
    snprintf(base, sizeof base, "%s/base", dir);
    snprintf(merged, sizeof merged, "%s/merged", dir);
    fl_init_model_params ip = fl_init_model_default_params();
    ip.dim = 64, ip.hidden_dim = 160, ip.n_layers = 2, ip.n_heads = 4, ip.n_kv_heads = 2;
    if (!tap_ok(fl_init_model(base, &ip) == 0, "a base model is written")) return tap_done();
    fl_model *m = fl_model_load(base, NULL);
    int vocab = fl_model_config(m)->vocab_size;
    fl_context *ctx = fl_context_new(m, NULL);
    fl_adapter *a = random_adapter(m, FL_LORA_ALL_LINEARS, 4, 7);
    fl_adapter *b = random_adapter(m, (1u << FL_LORA_Q) | (1u << FL_LORA_DOWN), 2, 9);
    int32_t toks[20];
    for (int i = 0; i < 20; i++) toks[i] = 3 + (i * 37) % 250;

    write_merged(base, merged, a);
    fl_model *mm = fl_model_load(merged, NULL);
    fl_context *mctx = mm ? fl_context_new(mm, NULL) : NULL;
    float *want = mctx ? logits_of(mctx, NULL, toks, 20, vocab) : NULL;
    float *got = logits_of(ctx, a, toks, 20, vocab), *plain = logits_of(ctx, NULL, toks, 20, vocab);
    double d = 0, scale = 0, moved = 0;
    for (int i = 0; want && i < 20 * vocab; i++) {
        d = fmax(d, fabs(got[i] - want[i]));
        scale = fmax(scale, fabs(want[i]));
        moved = fmax(moved, fabs(plain[i] - want[i]));
    }
    tap_ok(want && d <= 1e-4 * fmax(1, scale) && moved > 100 * d,
           "LoRA on all linears gives the logits of the merged model W + (alpha/r) B A (max |diff| "
           "%.1e; the adapter moves them by %.1e)", d, moved);

    /* Three sequences, three adapters (a, b, none) in one batch: each row as alone. */
    float *alone_b = logits_of(ctx, b, toks + 5, 10, vocab);
    int32_t tk[30], sq[30], ps[30];
    int8_t w[30];
    const fl_adapter *ad[30];
    int s1 = fl_seq_new(ctx), s2 = fl_seq_new(ctx), s3 = fl_seq_new(ctx), n = 0;
    for (int i = 0; i < 10; i++) {
        tk[n] = toks[i], sq[n] = s1, ps[n] = i, w[n] = 1, ad[n++] = a;
        tk[n] = toks[5 + i], sq[n] = s2, ps[n] = i, w[n] = 1, ad[n++] = b;
        tk[n] = toks[i], sq[n] = s3, ps[n] = i, w[n] = 1, ad[n++] = NULL;
    }
    float *mixed = malloc(sizeof(float) * 30 * vocab);
    fl_batch bb = {.n_tokens = n, .token = tk, .seq = sq, .pos = ps, .logits = w, .adapter = ad};
    int rows = fl_forward(ctx, &bb, mixed);
    int same = rows == 30;
    for (int i = 0; same && i < 10; i++) {
        same &= !memcmp(mixed + (size_t)(3 * i) * vocab, got + (size_t)i * vocab, sizeof(float) * vocab);
        same &= !memcmp(mixed + (size_t)(3 * i + 1) * vocab, alone_b + (size_t)i * vocab, sizeof(float) * vocab);
        same &= !memcmp(mixed + (size_t)(3 * i + 2) * vocab, plain + (size_t)i * vocab, sizeof(float) * vocab);
    }
    tap_ok(same, "tokens of two adapters and of none, interleaved in one batch, get bitwise the "
                 "logits each gets alone");
    free(want), free(got), free(plain), free(alone_b), free(mixed);
    fl_adapter_free(a);
    fl_adapter_free(b);
    fl_context_free(mctx);
    fl_model_free(mm);
    fl_context_free(ctx);
    fl_model_free(m);
    return tap_done();
}
