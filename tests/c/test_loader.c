/* Model-file loading: config.json, safetensors (single, sharded, written back),
 * crafted bad files that must fail with a precise message, and init-model. */
#include "fl_internal.h"
#include "flexllm.h"
#include "safetensors.h"
#include "tap.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char tmp[512];

/* fl_last_error() for a failed check, nothing for a passed one. */
static const char *why(int ok) {
    static char buf[2100];
    if (ok) return "";
    snprintf(buf, sizeof buf, " (error: %s)", fl_last_error());
    return buf;
}

static const char *tmp_path(const char *name) { return tap_path(tmp, name); }

/* The last error names the file and contains what. */
static int error_says(const char *file, const char *what) {
    const char *e = fl_last_error();
    return strstr(e, file) && strstr(e, what);
}

/* --------------------------------------------------------------- config */

static void test_config_real(void) {
    const char *p = tap_shared("models/configs/llama-3.1-8b/config.json");
    fl_config c;
    int ok;
    if (!p) {
        tap_skip("shared/models/configs absent: real LLaMA/Qwen configs not checked");
    } else if (ok = fl_config_load(p, &c) == 0, tap_ok(ok, "llama-3.1-8b config loads%s", why(ok))) {
        tap_ok(c.arch == FL_ARCH_LLAMA && c.dim == 4096 && c.hidden_dim == 14336 &&
                   c.n_layers == 32 && c.n_heads == 32 && c.n_kv_heads == 8 && c.head_dim == 128 &&
                   c.vocab_size == 128256 && c.max_seq_len == 131072 && !c.tie_embeddings &&
                   !c.qkv_bias,
               "llama-3.1-8b shape");
        tap_ok(c.rope_scaling == FL_ROPE_SCALING_LLAMA3 && c.rope_factor == 8.0f &&
                   c.rope_low_freq_factor == 1.0f && c.rope_high_freq_factor == 4.0f &&
                   c.rope_original_max_pos == 8192 && c.rope_theta == 500000.0f,
               "llama-3.1-8b rope_scaling llama3");
        tap_ok(c.bos_id == 128000 && c.n_eos == 3 && c.eos_ids[0] == 128001 &&
                   c.eos_ids[2] == 128009 && c.norm_eps == 1e-5f,
               "llama-3.1-8b bos and eos list");
    }
    p = tap_shared("models/configs/qwen2.5-14b/config.json");
    if (!p) {
        tap_skip("shared/models/configs absent: Qwen config not checked");
    } else if (ok = fl_config_load(p, &c) == 0, tap_ok(ok, "qwen2.5-14b config loads%s", why(ok))) {
        tap_ok(c.arch == FL_ARCH_QWEN2 && c.qkv_bias && c.head_dim == 128 && c.n_kv_heads == 8 &&
                   c.vocab_size == 152064 && c.rope_scaling == FL_ROPE_SCALING_NONE &&
                   c.n_eos == 1 && c.eos_ids[0] == 151645 && c.norm_eps == 1e-6f,
               "qwen2.5-14b: qkv bias, head_dim from hidden/heads, eos");
    }
}

/* Writes text as config.json and expects loading to fail saying what. */
static void config_fails(const char *json, const char *what, const char *label) {
    const char *p = tmp_path("config.json");
    tap_write_text(p, json);
    fl_config c;
    int rc = fl_config_load(p, &c);
    tap_ok(rc == -1 && error_says(p, what), "config %s: \"%s\"", label, fl_last_error());
}

#define GOOD_FIELDS                                                                               \
    "\"hidden_size\": 64, \"intermediate_size\": 172, \"num_hidden_layers\": 2, "               \
    "\"num_attention_heads\": 8, \"num_key_value_heads\": 4, \"vocab_size\": 512"

static void test_config_errors(void) {
    fl_config c;
    tap_ok(fl_config_load(tmp_path("nope/config.json"), &c) == -1 &&
               error_says(tmp_path("nope/config.json"), "cannot open"),
           "config missing file: \"%s\"", fl_last_error());
    config_fails("{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64,,}",
                 "invalid JSON near byte", "malformed JSON");
    config_fails("[1, 2]", "JSON object", "top level not an object");
    config_fails("{\"architectures\": [\"GPT2LMHeadModel\"], " GOOD_FIELDS "}",
                 "unsupported architecture 'GPT2LMHeadModel' (supported: llama, qwen2)",
                 "unknown architecture");
    config_fails("{\"model_type\": \"mistral\", " GOOD_FIELDS "}", "unsupported architecture 'mistral'",
                 "unknown model_type");
    config_fails("{\"architectures\": [\"LlamaForCausalLM\"], \"intermediate_size\": 172, "
                 "\"num_hidden_layers\": 2, \"num_attention_heads\": 8, \"vocab_size\": 512}",
                 "field 'hidden_size' missing", "missing hidden_size");
    config_fails("{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 172, "
                 "\"num_hidden_layers\": 2, \"num_attention_heads\": \"abc\", \"vocab_size\": 512}",
                 "field 'num_attention_heads' must be a positive integer, got \"abc\"", "wrong type");
    config_fails("{\"model_type\": \"llama\", \"hidden_size\": 64.5, \"intermediate_size\": 172, "
                 "\"num_hidden_layers\": 2, \"num_attention_heads\": 8, \"vocab_size\": 512}",
                 "field 'hidden_size' must be a positive integer, got 64.5", "fractional int");
    config_fails("{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 172, "
                 "\"num_hidden_layers\": 0, \"num_attention_heads\": 8, \"vocab_size\": 512}",
                 "field 'num_hidden_layers' must be a positive integer, got 0", "zero layers");
    config_fails("{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 172, "
                 "\"num_hidden_layers\": 2, \"num_attention_heads\": 8, \"num_key_value_heads\": 3, "
                 "\"vocab_size\": 512}",
                 "'num_attention_heads' (8) must be divisible by 'num_key_value_heads' (3)",
                 "heads not divisible");
    config_fails("{\"model_type\": \"llama\", " GOOD_FIELDS ", \"rope_scaling\": "
                 "{\"type\": \"yarn\", \"factor\": 4.0}}",
                 "unsupported rope_scaling type 'yarn'", "rope_scaling yarn");
    config_fails("{\"model_type\": \"llama\", " GOOD_FIELDS ", \"rope_scaling\": "
                 "{\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, "
                 "\"high_freq_factor\": 4.0}}",
                 "field 'rope_scaling.original_max_position_embeddings' missing",
                 "llama3 rope_scaling incomplete");
    config_fails("{\"model_type\": \"llama\", " GOOD_FIELDS ", \"tie_word_embeddings\": 1}",
                 "field 'tie_word_embeddings' must be true or false, got 1", "bool as number");
    config_fails("{\"model_type\": \"llama\", " GOOD_FIELDS ", \"eos_token_id\": [1, 600]}",
                 "field 'eos_token_id' value 600 is not below vocab_size 512", "eos out of vocab");
    config_fails("{\"model_type\": \"llama\", " GOOD_FIELDS ", \"rms_norm_eps\": -1}",
                 "field 'rms_norm_eps' must be a positive number, got -1", "negative eps");
    config_fails("{\"model_type\": \"llama\", " GOOD_FIELDS ", \"head_dim\": 7}",
                 "field 'head_dim' (7) must be even", "odd head_dim");

    /* Defaults: kv heads = heads, head_dim = hidden / heads, theta 10000, untied. */
    const char *p = tmp_path("config.json");
    tap_write_text(p, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 172, "
                  "\"num_hidden_layers\": 2, \"num_attention_heads\": 8, \"vocab_size\": 512, "
                  "\"attention_bias\": true, \"rope_scaling\": null, \"eos_token_id\": 2}");
    int ok = fl_config_load(p, &c) == 0;
    tap_ok(ok && c.n_kv_heads == 8 && c.head_dim == 8 && c.rope_theta == 10000.0f &&
               !c.tie_embeddings && c.qkv_bias && c.o_bias && c.bos_id == -1 && c.n_eos == 1 &&
               c.eos_ids[0] == 2 && c.rope_scaling == FL_ROPE_SCALING_NONE,
           "config defaults, and llama attention_bias biases q/k/v/o%s", why(ok));
}

/* ----------------------------------------------------------- stories260K */

static void test_stories_config(const char *dir) {
    char p[4096];
    snprintf(p, sizeof p, "%s/config.json", dir);
    fl_config c;
    int ok = fl_config_load(p, &c) == 0;
    if (!tap_ok(ok, "stories260K config loads%s", why(ok))) return;
    tap_ok(c.arch == FL_ARCH_LLAMA && c.dim == 64 && c.hidden_dim == 172 && c.n_layers == 5 &&
               c.n_heads == 8 && c.n_kv_heads == 4 && c.head_dim == 8 && c.vocab_size == 512 &&
               c.max_seq_len == 512 && c.tie_embeddings && !c.qkv_bias && c.bos_id == 1 &&
               c.n_eos == 1 && c.eos_ids[0] == 2 && c.norm_eps == 1e-5f,
           "stories260K config values");
}

static int same_floats(const fl_st_tensor *t, const float *want, int64_t n) {
    if (!t || t->dtype != FL_DTYPE_F32 || t->numel != n) return 0;
    return memcmp(t->data, want, (size_t)n * sizeof(float)) == 0;
}

/* HF's q/k permutation: row h*hd + j*hd/2 + i holds llama2.c's row h*hd + 2i + j. */
static int is_rotate_half_permutation(const fl_st_tensor *t, const float *w, int heads, int hd,
                                      int dim) {
    if (!t || t->numel != (int64_t)heads * hd * dim) return 0;
    const char *hf = t->data;
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < hd / 2; i++)
            for (int j = 0; j < 2; j++) {
                const char *row = hf + ((size_t)(h * hd + j * hd / 2 + i) * dim) * sizeof(float);
                if (memcmp(row, w + (size_t)(h * hd + 2 * i + j) * dim, (size_t)dim * sizeof(float)))
                    return 0;
            }
    return 1;
}

/* Walks llama2.c's stories260K.bin and compares every weight with the safetensors. */
static void test_stories_bin(const char *dir, const fl_st_set *st) {
    char p[4096];
    snprintf(p, sizeof p, "%s/stories260K.bin", dir);
    size_t len;
    char *bin = fl_read_file(p, &len);
    if (!bin) {
        tap_skip("stories260K.bin absent: no independent weight check");
        return;
    }
    int32_t h[7];
    memcpy(h, bin, sizeof h);
    int dim = h[0], hidden = h[1], L = h[2], heads = h[3], kv = h[4], vocab = abs(h[5]);
    int hd = dim / heads, kv_dim = kv * hd;
    tap_ok(dim == 64 && hidden == 172 && L == 5 && heads == 8 && kv == 4 && vocab == 512 && h[5] > 0,
           "stories260K.bin header (dim %d hidden %d layers %d heads %d kv %d vocab %d)", dim,
           hidden, L, heads, kv, h[5]);
    size_t need = 28 + sizeof(float) * ((size_t)vocab * dim + (size_t)L * dim * 2 +
                                        (size_t)L * dim * (dim + 2 * kv_dim + dim) +
                                        (size_t)L * hidden * dim * 3 + dim);
    if (!tap_ok(len >= need, "stories260K.bin holds all weights (%zu >= %zu bytes)", len, need)) {
        free(bin);
        return;
    }
    const float *w = (const float *)(bin + 28);
    const float *emb = w, *rms_att = emb + vocab * dim, *wq = rms_att + L * dim;
    const float *wk = wq + L * dim * dim, *wv = wk + L * kv_dim * dim, *wo = wv + L * kv_dim * dim;
    const float *rms_ffn = wo + L * dim * dim, *w1 = rms_ffn + L * dim, *w2 = w1 + L * hidden * dim;
    const float *w3 = w2 + L * dim * hidden, *rms_final = w3 + L * hidden * dim;

    int ok_plain = same_floats(fl_st_find(st, "model.embed_tokens.weight"), emb, vocab * dim) &&
                   same_floats(fl_st_find(st, "model.norm.weight"), rms_final, dim);
    int ok_qk = 1;
    char n[128];
    for (int l = 0; l < L; l++) {
#define T(suffix) (snprintf(n, sizeof n, "model.layers.%d." suffix, l), fl_st_find(st, n))
        ok_plain = ok_plain && same_floats(T("input_layernorm.weight"), rms_att + l * dim, dim) &&
                   same_floats(T("post_attention_layernorm.weight"), rms_ffn + l * dim, dim) &&
                   same_floats(T("self_attn.v_proj.weight"), wv + l * kv_dim * dim, kv_dim * dim) &&
                   same_floats(T("self_attn.o_proj.weight"), wo + l * dim * dim, dim * dim) &&
                   same_floats(T("mlp.gate_proj.weight"), w1 + l * hidden * dim, hidden * dim) &&
                   same_floats(T("mlp.down_proj.weight"), w2 + l * dim * hidden, dim * hidden) &&
                   same_floats(T("mlp.up_proj.weight"), w3 + l * hidden * dim, hidden * dim);
        ok_qk = ok_qk &&
                is_rotate_half_permutation(T("self_attn.q_proj.weight"), wq + l * dim * dim, heads, hd, dim) &&
                is_rotate_half_permutation(T("self_attn.k_proj.weight"), wk + l * kv_dim * dim, kv, hd, dim);
#undef T
    }
    tap_ok(ok_plain, "stories260K: embedding, norms, v/o/gate/up/down equal the .bin exactly");
    tap_ok(ok_qk, "stories260K: q/k are the .bin's rows in HF rotate-half order");
    free(bin);
}

static void test_stories(void) {
    const char *dir = tap_shared("models/stories260K");
    if (!dir) {
        tap_skip("shared/models/stories260K absent (set FLEXLLM_SHARED): real model not checked");
        return;
    }
    test_stories_config(dir);
    fl_st_set *st = fl_st_open(dir);
    if (!tap_ok(st != NULL, "stories260K safetensors opens%s", why(st != NULL))) return;
    const fl_st_tensor *e = fl_st_find(st, "model.embed_tokens.weight");
    const fl_st_tensor *q = fl_st_find(st, "model.layers.4.self_attn.k_proj.weight");
    const fl_st_tensor *d = fl_st_find(st, "model.layers.0.mlp.down_proj.weight");
    tap_ok(fl_st_count(st) == 2 + 5 * 9 && !fl_st_find(st, "lm_head.weight"),
           "stories260K has %d tensors, no lm_head (tied)", fl_st_count(st));
    tap_ok(e && e->dtype == FL_DTYPE_F32 && e->ndim == 2 && e->shape[0] == 512 &&
               e->shape[1] == 64 && e->nbytes == 512 * 64 * 4 && q && q->shape[0] == 32 &&
               q->shape[1] == 64 && d && d->shape[0] == 64 && d->shape[1] == 172,
           "stories260K shapes: embed [512,64], k_proj [32,64], down_proj [64,172]");
    tap_ok(e && strstr(e->file, "model.safetensors") && strstr(fl_st_source(st), "model.safetensors"),
           "tensor file and set source name model.safetensors");
    tap_ok(fl_st_find(st, "model.layers.9.mlp.up_proj.weight") == NULL, "absent tensor: NULL");
    test_stories_bin(dir, st);
    fl_st_close(st);
}

/* ------------------------------------------------------ write and read */

static fl_st_tensor make_tensor(const char *name, fl_dtype dt, int64_t r, int64_t c, const void *data) {
    fl_st_tensor t;
    memset(&t, 0, sizeof t);
    t.name = name;
    t.dtype = dt;
    t.ndim = 2;
    t.shape[0] = r;
    t.shape[1] = c;
    t.data = data;
    return t;
}

static void test_round_trip(void) {
    float f32[12];
    uint16_t f16[6], bf16[5];
    for (int i = 0; i < 12; i++) f32[i] = (float)i * 0.25f - 1.0f;
    for (int i = 0; i < 6; i++) f16[i] = (uint16_t)(0x3c00 + i * 0x40); /* 1 + i/16 */
    for (int i = 0; i < 5; i++) bf16[i] = fl_f32_to_bf16((float)i - 2.5f);
    fl_st_tensor in[4] = {make_tensor("w.f32", FL_DTYPE_F32, 3, 4, f32),
                          make_tensor("w.f16", FL_DTYPE_F16, 2, 3, f16),
                          make_tensor("w.bf16", FL_DTYPE_BF16, 5, 1, bf16),
                          make_tensor("empty", FL_DTYPE_F32, 0, 4, NULL)};
    in[2].ndim = 1;
    const char *keys[] = {"format", "note"}, *vals[] = {"pt", "quote \" and \\ survive"};
    const char *p = tmp_path("rt.safetensors");
    int ok = fl_st_write(p, in, 4, keys, vals, 2) == 0;
    tap_ok(ok, "fl_st_write F32/F16/BF16%s", why(ok));
    fl_st_set *st = fl_st_open(p);
    if (!tap_ok(st != NULL, "written file opens%s", why(st != NULL))) return;
    const fl_st_tensor *a = fl_st_find(st, "w.f32"), *b = fl_st_find(st, "w.f16");
    const fl_st_tensor *c = fl_st_find(st, "w.bf16"), *z = fl_st_find(st, "empty");
    tap_ok(fl_st_count(st) == 4 && a && b && c && z, "all 4 tensors back");
    if (a && b && c && z) {
        tap_ok(a->dtype == FL_DTYPE_F32 && a->shape[0] == 3 && a->shape[1] == 4 && a->numel == 12 &&
                   !memcmp(a->data, f32, sizeof f32),
               "F32 data and shape identical");
        tap_ok(b->dtype == FL_DTYPE_F16 && b->numel == 6 && !memcmp(b->data, f16, sizeof f16),
               "F16 data identical");
        tap_ok(c->dtype == FL_DTYPE_BF16 && c->ndim == 1 && c->shape[0] == 5 &&
                   !memcmp(c->data, bf16, sizeof bf16),
               "BF16 data identical, 1-D shape kept");
        tap_ok(z->numel == 0 && z->nbytes == 0, "empty tensor round trips");
        float out[12];
        fl_st_to_f32(b, out);
        ok = 1;
        for (int i = 0; i < 6; i++) ok = ok && out[i] == 1.0f + (float)i / 16;
        fl_st_to_f32(c, out);
        for (int i = 0; i < 5; i++) ok = ok && out[i] == (float)i - 2.5f;
        fl_st_to_f32(a, out);
        ok = ok && !memcmp(out, f32, sizeof f32);
        tap_ok(ok, "fl_st_to_f32 converts F16, BF16, F32");
    }
    fl_st_close(st);

    /* The header is padded to 8 bytes and carries the metadata. */
    size_t len;
    char *raw = fl_read_file(p, &len);
    uint64_t hlen = 0;
    if (raw) memcpy(&hlen, raw, 8);
    cJSON *hdr = raw && hlen < len ? cJSON_ParseWithLength(raw + 8, (size_t)hlen) : NULL;
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(hdr, "__metadata__");
    const cJSON *note = cJSON_GetObjectItemCaseSensitive(meta, "note");
    tap_ok(hlen % 8 == 0 && cJSON_IsString(note) && !strcmp(note->valuestring, vals[1]) &&
               len == 8 + hlen + sizeof f32 + sizeof f16 + sizeof bf16,
           "header 8-byte aligned, metadata kept, data packed");
    cJSON_Delete(hdr);
    free(raw);

    fl_st_tensor dup[2] = {in[0], in[0]};
    tap_ok(fl_st_write(p, dup, 2, NULL, NULL, 0) == -1 && error_says(p, "given twice"),
           "fl_st_write refuses duplicate names: \"%s\"", fl_last_error());
}

static void test_sharded(void) {
    float a[6] = {1, 2, 3, 4, 5, 6}, b[4] = {7, 8, 9, 10};
    fl_st_tensor s1[2] = {make_tensor("a", FL_DTYPE_F32, 2, 3, a), make_tensor("b", FL_DTYPE_F32, 2, 2, b)};
    fl_st_tensor s2[1] = {make_tensor("c", FL_DTYPE_F32, 1, 4, b)};
    int ok = fl_st_write(tmp_path("model-00001-of-00002.safetensors"), s1, 2, NULL, NULL, 0) == 0 &&
             fl_st_write(tmp_path("model-00002-of-00002.safetensors"), s2, 1, NULL, NULL, 0) == 0;
    const char *index = tmp_path("model.safetensors.index.json");
    tap_write_text(index, "{\"metadata\": {\"total_size\": 56}, \"weight_map\": {"
                      "\"a\": \"model-00001-of-00002.safetensors\", "
                      "\"c\": \"model-00002-of-00002.safetensors\", "
                      "\"b\": \"model-00001-of-00002.safetensors\"}}");
    fl_st_set *st = ok ? fl_st_open(tmp) : NULL;
    if (!tap_ok(st != NULL, "sharded set opens%s", why(st != NULL))) return;
    const fl_st_tensor *ta = fl_st_find(st, "a"), *tc = fl_st_find(st, "c");
    tap_ok(fl_st_count(st) == 3 && ta && tc && !memcmp(ta->data, a, sizeof a) &&
               !memcmp(tc->data, b, sizeof b) && strstr(ta->file, "00001") &&
               strstr(tc->file, "00002") && !strcmp(fl_st_source(st), index),
           "tensors found in both shards; source is the index");
    fl_st_close(st);

    tap_write_text(index, "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\", "
                      "\"c\": \"model-00009-of-00009.safetensors\"}}");
    tap_ok(fl_st_open(tmp) == NULL && error_says(index, "model-00009-of-00009.safetensors") &&
               strstr(fl_last_error(), "cannot open"),
           "index naming a missing shard: \"%s\"", fl_last_error());
    tap_write_text(index, "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\", "
                      "\"c\": \"model-00001-of-00002.safetensors\"}}");
    tap_ok(fl_st_open(tmp) == NULL &&
               error_says(index, "index says 'c' is in shard 'model-00001-of-00002.safetensors' but "
                                 "model-00001-of-00002.safetensors has no such tensor"),
           "index naming a tensor absent in its shard: \"%s\"", fl_last_error());
    tap_write_text(index, "{\"weight_map\": {\"a\": \"../model-00001-of-00002.safetensors\"}}");
    tap_ok(fl_st_open(tmp) == NULL && error_says(index, "must be a plain file name"),
           "index shard outside the folder: \"%s\"", fl_last_error());
    tap_write_text(index, "{\"weight_map\": {\"a\": 3}}");
    tap_ok(fl_st_open(tmp) == NULL && error_says(index, "weight_map entry 'a'"),
           "index with a non-string shard: \"%s\"", fl_last_error());
    remove(index);
    remove(tmp_path("model-00001-of-00002.safetensors"));
    remove(tmp_path("model-00002-of-00002.safetensors"));
}

/* ------------------------------------------------------ bad safetensors */

/* A file of an 8-byte length (hlen, or the header's own length when -1),
 * the header, and data_len zero bytes. */
static const char *write_st(const char *name, int64_t hlen, const char *header, size_t data_len) {
    const char *p = tmp_path(name);
    size_t n = strlen(header);
    uint64_t len = hlen < 0 ? (uint64_t)n : (uint64_t)hlen;
    char *buf = calloc(1, 8 + n + data_len);
    for (int i = 0; i < 8; i++) buf[i] = (char)(len >> (8 * i));
    memcpy(buf + 8, header, n);
    tap_write(p, buf, 8 + n + data_len);
    free(buf);
    return p;
}

static void st_fails(const char *p, const char *what, const char *label) {
    fl_st_set *st = fl_st_open(p);
    tap_ok(st == NULL && error_says(p, what), "safetensors %s: \"%s\"", label, fl_last_error());
    fl_st_close(st);
}

static void test_bad_safetensors(void) {
    const char *p = tmp_path("short.safetensors");
    tap_write(p, "\x10\0\0", 3);
    st_fails(p, "too short", "shorter than 8 bytes");
    st_fails(write_st("hlen.safetensors", 1000, "{}", 0), "header length 1000 exceeds", "header length beyond the file");
    st_fails(write_st("huge.safetensors", INT64_MAX, "{}", 0), "exceeds", "header length 2^63");
    /* Past the 100 MB header limit, in a sparse file big enough to hold it. */
    p = write_st("limit.safetensors", (100 << 20) + 8, "{}", 0);
    tap_ok(truncate(p, (100 << 20) + 64) == 0, "sparse 100 MB file");
    st_fails(p, "header length 104857608 exceeds the 104857600-byte limit", "header over 100 MB");
    remove(p);
    /* Headers that must be refused, each followed by data_len bytes of data. */
#define W(dtype, shape, offsets)                                                            \
    "{\"w\": {\"dtype\": \"" dtype "\", \"shape\": " shape ", \"data_offsets\": " offsets "}}"
    static const struct {
        const char *name, *header;
        size_t data_len;
        const char *what, *label;
    } bad[] = {
        {"notjson.safetensors", "{\"a\": {\"dtype\": ", 0, "not valid JSON", "header not JSON"},
        {"trail.safetensors", "{} x", 0, "data after its JSON", "garbage after header"},
        {"array.safetensors", "[1]", 0, "must be a JSON object", "header an array"},
        {"trunc.safetensors", W("F32", "[4, 4]", "[0, 64]"), 32,
         "tensor 'w': data_offsets [0, 64] run past the end of the 32-byte data area",
         "truncated data"},
        {"overlap.safetensors",
         "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
         " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}", 24,
         "tensors 'a' [0, 16] and 'b' [8, 24] overlap", "overlapping offsets"},
        {"size.safetensors", W("F32", "[3, 4]", "[0, 40]"), 48,
         "tensor 'w': shape [3,4] of F32 needs 48 bytes but data_offsets give 40",
         "shape disagreeing with byte size"},
        {"i64.safetensors", "{\"ids\": {\"dtype\": \"I64\", \"shape\": [2], \"data_offsets\": [0, 16]}}",
         16, "tensor 'ids': unsupported dtype 'I64'", "unsupported dtype"},
        {"q9.safetensors", W("Q9", "[2]", "[0, 16]"), 16, "tensor 'w': unknown dtype 'Q9'",
         "unknown dtype"},
        {"neg.safetensors", W("F32", "[-1, 4]", "[0, 16]"), 16,
         "tensor 'w': shape entries must be non-negative integers", "negative dim"},
        {"ovf.safetensors", W("F32", "[4294967296, 4294967296]", "[0, 16]"), 16,
         "tensor 'w': shape overflows", "shape overflowing int64"},
        {"dims.safetensors", W("F32", "[1,1,1,1,1,1,1,1,1]", "[0, 4]"), 4,
         "tensor 'w': shape has 9 dimensions", "too many dims"},
        {"rev.safetensors", W("F32", "[1]", "[8, 4]"), 8,
         "tensor 'w': data_offsets [8, 4] end before they begin", "offsets reversed"},
        {"offs.safetensors", W("F32", "[1]", "[0]"), 8,
         "tensor 'w': field 'data_offsets' must be [begin, end]", "offsets malformed"},
        {"meta.safetensors", "{\"__metadata__\": {\"k\": 1}}", 0,
         "__metadata__ entry 'k' must be a string", "metadata not strings"},
        {"dup.safetensors",
         "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
         " \"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8,
         "tensor 'w' appears twice", "duplicate tensor name"},
    };
#undef W
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        st_fails(write_st(bad[i].name, -1, bad[i].header, bad[i].data_len), bad[i].what,
                 bad[i].label);
    st_fails(tmp_path("absent.safetensors"), "cannot open", "missing file");

    /* A header that is not 8-aligned leaves data unaligned: still readable. */
    fl_st_set *st = fl_st_open(write_st("odd.safetensors", -1,
                                        "{\"h\": {\"dtype\": \"F16\", \"shape\": [3], \"data_offsets\": [1, 7]}}", 8));
    float out[3] = {1, 1, 1};
    if (st) fl_st_to_f32(fl_st_find(st, "h"), out);
    tap_ok(st && out[0] == 0 && out[2] == 0, "unaligned F16 data converts%s", why(st != NULL));
    fl_st_close(st);
}

/* ------------------------------------------------------------ init-model */

static int files_equal(const char *a, const char *b) {
    size_t la, lb;
    char *x = fl_read_file(a, &la), *y = fl_read_file(b, &lb);
    int eq = x && y && la == lb && !memcmp(x, y, la);
    free(x);
    free(y);
    return eq;
}

static void join(char *out, const char *dir, const char *name) {
    if (fl_path_join(out, 4096, dir, name)) out[0] = 0;
}

static void check_init_shapes(const char *dir, const fl_init_model_params *ip) {
    fl_st_set *st = fl_st_open(dir);
    if (!tap_ok(st != NULL, "init-model safetensors opens%s", why(st != NULL))) return;
    int64_t hd = ip->dim / ip->n_heads;
    int ok = fl_st_count(st) == 3 + 9 * ip->n_layers;
    char n[128];
#define SHAPE(name, r, c)                                                                         \
    do {                                                                                          \
        const fl_st_tensor *t_ = fl_st_find(st, name);                                            \
        ok = ok && t_ && t_->dtype == FL_DTYPE_F32 && t_->shape[0] == (r) &&                      \
             ((c) != 0 ? t_->ndim == 2 && t_->shape[1] == (c) : t_->ndim == 1);                   \
        if (!t_) tap_diag("missing %s", name);                                                    \
    } while (0)
    SHAPE("model.embed_tokens.weight", ip->vocab_size, ip->dim);
    SHAPE("model.norm.weight", ip->dim, 0);
    SHAPE("lm_head.weight", ip->vocab_size, ip->dim);
    for (int l = 0; l < ip->n_layers; l++) {
#define L(suffix) (snprintf(n, sizeof n, "model.layers.%d." suffix, l), n)
        SHAPE(L("input_layernorm.weight"), ip->dim, 0);
        SHAPE(L("post_attention_layernorm.weight"), ip->dim, 0);
        SHAPE(L("self_attn.q_proj.weight"), ip->n_heads * hd, ip->dim);
        SHAPE(L("self_attn.k_proj.weight"), ip->n_kv_heads * hd, ip->dim);
        SHAPE(L("self_attn.v_proj.weight"), ip->n_kv_heads * hd, ip->dim);
        SHAPE(L("self_attn.o_proj.weight"), ip->dim, ip->n_heads * hd);
        SHAPE(L("mlp.gate_proj.weight"), ip->hidden_dim, ip->dim);
        SHAPE(L("mlp.up_proj.weight"), ip->hidden_dim, ip->dim);
        SHAPE(L("mlp.down_proj.weight"), ip->dim, ip->hidden_dim);
#undef L
    }
#undef SHAPE
    tap_ok(ok, "init-model writes all %d tensors with HF names and shapes", fl_st_count(st));

    /* Norms are 1; weights look like N(0, 0.02). */
    const fl_st_tensor *norm = fl_st_find(st, "model.norm.weight");
    const fl_st_tensor *emb = fl_st_find(st, "model.embed_tokens.weight");
    if (norm && emb) {
        float one;
        memcpy(&one, norm->data, 4);
        double s = 0, s2 = 0;
        float *x = malloc(emb->nbytes);
        fl_st_to_f32(emb, x);
        for (int64_t i = 0; i < emb->numel; i++) {
            s += x[i];
            s2 += (double)x[i] * x[i];
        }
        free(x);
        double mean = s / (double)emb->numel, sd = sqrt(s2 / (double)emb->numel - mean * mean);
        tap_ok(one == 1.0f && fabs(mean) < 1e-3 && fabs(sd - 0.02) < 1e-3,
               "norms 1, embedding mean %.5f std %.5f", mean, sd);
    }
    fl_st_close(st);
}

static void check_init_tokenizer(const char *dir, int vocab_size) {
    char p[4096];
    join(p, dir, "tokenizer.json");
    char *text = fl_read_file(p, NULL);
    cJSON *t = text ? cJSON_Parse(text) : NULL;
    free(text);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(t, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(t, "added_tokens");
    int bytes_ok = cJSON_IsObject(vocab) && cJSON_GetArraySize(vocab) >= 256;
    /* The first 256 entries are GPT-2's byte symbols in byte order: 'A' is 65, space is 'Ġ'. */
    const cJSON *v = vocab ? vocab->child : NULL;
    for (int i = 0; i < 256 && bytes_ok; i++, v = v->next) bytes_ok = v && v->valueint == i;
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(vocab, "\xc4\xa0");
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(vocab, "A");
    bytes_ok = bytes_ok && sp && sp->valueint == 32 && a && a->valueint == 65;
    tap_ok(t && bytes_ok, "tokenizer.json is JSON with the 256 byte tokens at ids 0..255");

    int n_vocab = cJSON_GetArraySize(vocab), n_merges = cJSON_GetArraySize(merges);
    const cJSON *bos = cJSON_GetArrayItem(added, 0), *eos = cJSON_GetArrayItem(added, 1);
    const cJSON *bos_id = cJSON_GetObjectItemCaseSensitive(bos, "id");
    const cJSON *bos_s = cJSON_GetObjectItemCaseSensitive(bos, "content");
    const cJSON *eos_s = cJSON_GetObjectItemCaseSensitive(eos, "content");
    /* Every merge's parts and result are in the vocabulary, each result new. */
    int merges_ok = n_vocab == 256 + n_merges;
    const cJSON *m;
    int k = 0;
    cJSON_ArrayForEach(m, merges) {
        char buf[256];
        snprintf(buf, sizeof buf, "%s", cJSON_IsString(m) ? m->valuestring : "");
        char *space = strchr(buf, ' ');
        if (!space) {
            merges_ok = 0;
            break;
        }
        *space = 0;
        const cJSON *l = cJSON_GetObjectItemCaseSensitive(vocab, buf);
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(vocab, space + 1);
        memmove(space, space + 1, strlen(space + 1) + 1);
        const cJSON *lr = cJSON_GetObjectItemCaseSensitive(vocab, buf);
        merges_ok = merges_ok && l && r && lr && lr->valueint == 256 + k &&
                    l->valueint < lr->valueint && r->valueint < lr->valueint;
        k++;
    }
    tap_ok(merges_ok && n_merges > 0, "%d merges, each built from earlier tokens", n_merges);
    tap_ok(cJSON_IsString(bos_s) && !strcmp(bos_s->valuestring, "<|begin_of_text|>") &&
               cJSON_IsString(eos_s) && !strcmp(eos_s->valuestring, "<|end_of_text|>") &&
               bos_id && bos_id->valueint == n_vocab && n_vocab + 2 <= vocab_size,
           "added tokens <|begin_of_text|> (%d) and <|end_of_text|> follow the vocabulary",
           bos_id ? bos_id->valueint : -1);
    cJSON_Delete(t);

    join(p, dir, "tokenizer_config.json");
    text = fl_read_file(p, NULL);
    t = text ? cJSON_Parse(text) : NULL;
    free(text);
    tap_ok(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(t, "add_bos_token")) &&
               cJSON_IsString(cJSON_GetObjectItemCaseSensitive(t, "bos_token")),
           "tokenizer_config.json: add_bos_token true, bos_token named");
    cJSON_Delete(t);
}

/* The generated tokenizer through the engine's tokenizer: BOS first, common
 * words as one token, and any UTF-8 back byte for byte. */
static void check_init_round_trip(const char *dir, const fl_config *cfg) {
    fl_tokenizer *tok = fl_tokenizer_load_dir(dir);
    if (!tap_ok(tok != NULL, "init-model tokenizer loads%s", why(tok != NULL))) return;
    const char *text = "Once upon a time, the little girl said: h\xc3\xa9llo \xe2\x80\x94 "
                       "\xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x99\x82\n\tThe end.";
    int32_t ids[256];
    int n = fl_tokenize(tok, text, strlen(text), 1, 0, ids, 256);
    int32_t the = fl_tokenizer_token_id(tok, "\xc4\xa0the"), little = fl_tokenizer_token_id(tok, "\xc4\xa0little");
    int has_the = 0, has_little = 0;
    for (int i = 0; i < n; i++) {
        has_the |= ids[i] == the;
        has_little |= ids[i] == little;
    }
    tap_ok(n > 1 && ids[0] == cfg->bos_id && fl_tokenizer_bos(tok) == cfg->bos_id &&
               fl_tokenizer_eos(tok) == cfg->eos_ids[0] && fl_tokenizer_add_bos(tok),
           "tokenizer BOS/EOS match config.json, BOS prepended");
    tap_ok(the >= 256 && little >= 256 && has_the && has_little && n < (int)strlen(text) * 2 / 3,
           "merges apply: ' the' and ' little' are single tokens (%d ids for %zu bytes)", n,
           strlen(text));
    char out[512];
    int m = fl_detokenize(tok, ids, n, 1, out, sizeof out);
    tap_ok(m == (int)strlen(text) && !memcmp(out, text, (size_t)m), "UTF-8 text round trips");
    fl_tokenizer_free(tok);
}

static void test_init_model(void) {
    fl_init_model_params d = fl_init_model_default_params();
    tap_ok(d.seed == 42 && d.dim % d.n_heads == 0 && d.n_heads % d.n_kv_heads == 0 &&
               d.vocab_size >= 258 && d.max_seq_len > 0,
           "default init params are consistent (dim %d, %d layers, vocab %d)", d.dim, d.n_layers,
           d.vocab_size);

    fl_init_model_params ip = d;
    ip.dim = 64;
    ip.hidden_dim = 176;
    ip.n_layers = 2;
    ip.n_heads = 4;
    ip.n_kv_heads = 2;
    ip.vocab_size = 300; /* fewer merges fit: the list is cut, not the byte tokens */
    ip.max_seq_len = 128;
    char a[4096], b[4096], c[4096], p[4096], q[4096];
    snprintf(a, sizeof a, "%s/init/a/deep", tmp);
    snprintf(b, sizeof b, "%s/init/b", tmp);
    snprintf(c, sizeof c, "%s/init/c", tmp);
    int ok = fl_init_model(a, &ip) == 0;
    if (!tap_ok(ok, "init-model into a new nested folder%s", why(ok))) return;
    fl_config cfg;
    join(p, a, "config.json");
    ok = fl_config_load(p, &cfg) == 0;
    if (tap_ok(ok, "init-model config loads%s", why(ok)))
        tap_ok(cfg.arch == FL_ARCH_LLAMA && cfg.dim == 64 && cfg.hidden_dim == 176 &&
                   cfg.n_layers == 2 && cfg.n_heads == 4 && cfg.n_kv_heads == 2 &&
                   cfg.head_dim == 16 && cfg.vocab_size == 300 && cfg.max_seq_len == 128 &&
                   !cfg.tie_embeddings && cfg.bos_id >= 256 && cfg.n_eos == 1 &&
                   cfg.eos_ids[0] == cfg.bos_id + 1 && cfg.eos_ids[0] < 300,
               "init-model config has the requested values, bos %d eos %d", cfg.bos_id, cfg.eos_ids[0]);
    check_init_shapes(a, &ip);
    check_init_tokenizer(a, ip.vocab_size);

    tap_ok(fl_init_model(b, &ip) == 0, "second init-model, same seed");
    join(p, a, "model.safetensors");
    join(q, b, "model.safetensors");
    tap_ok(files_equal(p, q), "same seed: model.safetensors byte-identical");
    join(p, a, "tokenizer.json");
    join(q, b, "tokenizer.json");
    tap_ok(files_equal(p, q), "same seed: tokenizer.json identical");
    tap_ok(fl_init_model(b, &ip) == 0, "init-model over an existing model replaces it");
    ip.seed = 43;
    tap_ok(fl_init_model(c, &ip) == 0, "init-model with seed 43");
    join(p, a, "model.safetensors");
    join(q, c, "model.safetensors");
    tap_ok(!files_equal(p, q), "different seed: different weights");

    /* The default model, as `make demo` uses it. */
    snprintf(c, sizeof c, "%s/init/default", tmp);
    clock_t t0 = clock();
    int rc = fl_init_model(c, NULL);
    join(p, c, "config.json");
    tap_ok(rc == 0 && fl_config_load(p, &cfg) == 0 && cfg.dim == d.dim && cfg.vocab_size == d.vocab_size,
           "init-model with default params (%.2f s CPU)", (double)(clock() - t0) / CLOCKS_PER_SEC);
    check_init_tokenizer(c, d.vocab_size);
    check_init_round_trip(c, &cfg);

    ip.n_kv_heads = 3;
    tap_ok(fl_init_model(c, &ip) == -1 && strstr(fl_last_error(), "n_kv_heads 3"),
           "init-model rejects bad params: \"%s\"", fl_last_error());
    ip.n_kv_heads = 2;
    ip.vocab_size = 100;
    tap_ok(fl_init_model(c, &ip) == -1 && strstr(fl_last_error(), "vocab_size 100"),
           "init-model rejects a vocab below 258: \"%s\"", fl_last_error());
}

int main(void) {
    const char *dir = tap_tmpdir("test_loader");
    if (!dir) {
        printf("Bail out! cannot create build/tmp/test_loader\n");
        return 1;
    }
    snprintf(tmp, sizeof tmp, "%s", dir);
    test_config_real();
    test_config_errors();
    test_stories();
    test_round_trip();
    test_sharded();
    test_bad_safetensors();
    test_init_model();
    return tap_done();
}
