/* Reads a Hugging Face config.json (LLaMA or Qwen2) into fl_config. Every
 * field is type- and range-checked, and every message names the file and the field. */
#include "fl_internal.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int is_int_in(const cJSON *v, double lo, double hi) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    return isfinite(d) && d == floor(d) && d >= lo && d <= hi;
}

/* An integer field >= min. When absent: dflt if optional, else an error. */
static int get_int(const char *path, const cJSON *obj, const char *key, const char *label,
                   int required, int dflt, int min, int *out) {
    const cJSON *v = fl_json_field(obj, key);
    if (!v) {
        if (required) return fl_error("%s: field '%s' missing", path, label);
        *out = dflt;
        return 0;
    }
    if (!is_int_in(v, min, INT_MAX)) {
        char got[80];
        fl_json_describe(v, got, sizeof got);
        return fl_error("%s: field '%s' must be a %s integer, got %s", path, label,
                        min > 0 ? "positive" : "non-negative", got);
    }
    *out = (int)v->valuedouble;
    return 0;
}

/* A positive finite number field. */
static int get_pos_float(const char *path, const cJSON *obj, const char *key, const char *label,
                         int required, float dflt, float *out) {
    const cJSON *v = fl_json_field(obj, key);
    if (!v) {
        if (required) return fl_error("%s: field '%s' missing", path, label);
        *out = dflt;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble <= 0) {
        char got[80];
        fl_json_describe(v, got, sizeof got);
        return fl_error("%s: field '%s' must be a positive number, got %s", path, label, got);
    }
    *out = (float)v->valuedouble;
    return 0;
}

static int get_bool(const char *path, const cJSON *obj, const char *key, int dflt, int *out) {
    const cJSON *v = fl_json_field(obj, key);
    if (!v) {
        *out = dflt;
        return 0;
    }
    if (!cJSON_IsBool(v)) {
        char got[80];
        fl_json_describe(v, got, sizeof got);
        return fl_error("%s: field '%s' must be true or false, got %s", path, key, got);
    }
    *out = cJSON_IsTrue(v);
    return 0;
}

static int arch_from_name(const char *name) {
    if (!strcmp(name, "LlamaForCausalLM") || !strcmp(name, "llama")) return FL_ARCH_LLAMA;
    if (!strcmp(name, "Qwen2ForCausalLM") || !strcmp(name, "qwen2")) return FL_ARCH_QWEN2;
    return 0;
}

/* `architectures` decides when present; `model_type` is the fallback. */
static int read_arch(const char *path, const cJSON *root, fl_config *c) {
    const cJSON *archs = fl_json_field(root, "architectures");
    const cJSON *name = NULL;
    if (archs) {
        if (!cJSON_IsArray(archs) || !cJSON_IsString(cJSON_GetArrayItem(archs, 0))) {
            char got[80];
            fl_json_describe(archs, got, sizeof got);
            return fl_error("%s: field 'architectures' must be a list of strings, got %s", path, got);
        }
        name = cJSON_GetArrayItem(archs, 0);
    } else {
        name = fl_json_field(root, "model_type");
        if (!name) return fl_error("%s: field 'architectures' missing (and no 'model_type')", path);
        if (!cJSON_IsString(name)) {
            char got[80];
            fl_json_describe(name, got, sizeof got);
            return fl_error("%s: field 'model_type' must be a string, got %s", path, got);
        }
    }
    c->arch = (fl_arch)arch_from_name(name->valuestring);
    if (!c->arch)
        return fl_error("%s: unsupported architecture '%s' (supported: llama, qwen2)", path,
                        name->valuestring);
    return 0;
}

/* Only LLaMA-3's frequency-band scaling is implemented; "default" means none. */
static int read_rope_scaling(const char *path, const cJSON *root, fl_config *c) {
    c->rope_scaling = FL_ROPE_SCALING_NONE;
    c->rope_factor = 1.0f;
    c->rope_low_freq_factor = 1.0f;
    c->rope_high_freq_factor = 1.0f;
    c->rope_original_max_pos = 0;
    const cJSON *rs = fl_json_field(root, "rope_scaling");
    if (!rs) return 0;
    char got[80];
    if (!cJSON_IsObject(rs)) {
        fl_json_describe(rs, got, sizeof got);
        return fl_error("%s: field 'rope_scaling' must be an object or null, got %s", path, got);
    }
    const char *key = "rope_scaling.rope_type";
    const cJSON *type = fl_json_field(rs, "rope_type");
    if (!type) {
        key = "rope_scaling.type";
        type = fl_json_field(rs, "type");
    }
    if (!type) return fl_error("%s: field 'rope_scaling.rope_type' missing", path);
    if (!cJSON_IsString(type)) {
        fl_json_describe(type, got, sizeof got);
        return fl_error("%s: field '%s' must be a string, got %s", path, key, got);
    }
    if (!strcmp(type->valuestring, "default")) return 0;
    if (strcmp(type->valuestring, "llama3") != 0)
        return fl_error("%s: field '%s': unsupported rope_scaling type '%s' (supported: llama3)",
                        path, key, type->valuestring);
    c->rope_scaling = FL_ROPE_SCALING_LLAMA3;
    if (get_pos_float(path, rs, "factor", "rope_scaling.factor", 1, 0, &c->rope_factor) ||
        get_pos_float(path, rs, "low_freq_factor", "rope_scaling.low_freq_factor", 1, 0,
                      &c->rope_low_freq_factor) ||
        get_pos_float(path, rs, "high_freq_factor", "rope_scaling.high_freq_factor", 1, 0,
                      &c->rope_high_freq_factor) ||
        get_int(path, rs, "original_max_position_embeddings",
                "rope_scaling.original_max_position_embeddings", 1, 0, 1, &c->rope_original_max_pos))
        return -1;
    if (c->rope_high_freq_factor <= c->rope_low_freq_factor)
        return fl_error("%s: field 'rope_scaling.high_freq_factor' (%g) must exceed "
                        "'rope_scaling.low_freq_factor' (%g)",
                        path, c->rope_high_freq_factor, c->rope_low_freq_factor);
    return 0;
}

static int check_token_id(const char *path, const char *key, const cJSON *v, int vocab, int *out) {
    if (!is_int_in(v, 0, INT_MAX)) {
        char got[80];
        fl_json_describe(v, got, sizeof got);
        return fl_error("%s: field '%s' must be a non-negative integer, got %s", path, key, got);
    }
    if (v->valuedouble >= vocab)
        return fl_error("%s: field '%s' value %.0f is not below vocab_size %d", path, key,
                        v->valuedouble, vocab);
    *out = (int)v->valuedouble;
    return 0;
}

/* bos_token_id is one id; eos_token_id is one id or a list of them. */
static int read_special_ids(const char *path, const cJSON *root, fl_config *c) {
    c->bos_id = -1;
    c->n_eos = 0;
    const cJSON *bos = fl_json_field(root, "bos_token_id");
    if (bos && check_token_id(path, "bos_token_id", bos, c->vocab_size, &c->bos_id)) return -1;
    const cJSON *eos = fl_json_field(root, "eos_token_id");
    if (!eos) return 0;
    if (!cJSON_IsArray(eos)) {
        c->n_eos = 1;
        return check_token_id(path, "eos_token_id", eos, c->vocab_size, &c->eos_ids[0]);
    }
    int n = cJSON_GetArraySize(eos);
    if (n > FL_MAX_EOS)
        return fl_error("%s: field 'eos_token_id' lists %d ids, at most %d are supported", path, n,
                        FL_MAX_EOS);
    const cJSON *e;
    cJSON_ArrayForEach(e, eos) {
        if (check_token_id(path, "eos_token_id", e, c->vocab_size, &c->eos_ids[c->n_eos])) return -1;
        c->n_eos++;
    }
    return 0;
}

static int read_shape(const char *path, const cJSON *root, fl_config *c) {
    if (get_int(path, root, "hidden_size", "hidden_size", 1, 0, 1, &c->dim) ||
        get_int(path, root, "intermediate_size", "intermediate_size", 1, 0, 1, &c->hidden_dim) ||
        get_int(path, root, "num_hidden_layers", "num_hidden_layers", 1, 0, 1, &c->n_layers) ||
        get_int(path, root, "num_attention_heads", "num_attention_heads", 1, 0, 1, &c->n_heads) ||
        get_int(path, root, "num_key_value_heads", "num_key_value_heads", 0, c->n_heads, 1,
                &c->n_kv_heads) ||
        get_int(path, root, "vocab_size", "vocab_size", 1, 0, 1, &c->vocab_size))
        return -1;
    /* HF's defaults when the file leaves these out. */
    int max_pos_default = c->arch == FL_ARCH_QWEN2 ? 32768 : 2048;
    if (get_int(path, root, "max_position_embeddings", "max_position_embeddings", 0,
                max_pos_default, 1, &c->max_seq_len) ||
        get_pos_float(path, root, "rms_norm_eps", "rms_norm_eps", 0, 1e-6f, &c->norm_eps) ||
        get_pos_float(path, root, "rope_theta", "rope_theta", 0, 10000.0f, &c->rope_theta))
        return -1;
    if (c->n_heads % c->n_kv_heads != 0)
        return fl_error("%s: field 'num_attention_heads' (%d) must be divisible by "
                        "'num_key_value_heads' (%d)",
                        path, c->n_heads, c->n_kv_heads);
    if (!fl_json_field(root, "head_dim") && c->dim % c->n_heads != 0)
        return fl_error("%s: field 'hidden_size' (%d) must be divisible by "
                        "'num_attention_heads' (%d) when 'head_dim' is not given",
                        path, c->dim, c->n_heads);
    if (get_int(path, root, "head_dim", "head_dim", 0, c->dim / c->n_heads, 1, &c->head_dim))
        return -1;
    if (c->head_dim % 2 != 0)
        return fl_error("%s: field 'head_dim' (%d) must be even for rotary embeddings", path,
                        c->head_dim);
    return 0;
}

/* Options that would change the network in ways this engine does not run. */
static int read_features(const char *path, const cJSON *root, fl_config *c) {
    int attention_bias = 0, mlp_bias = 0, sliding = 0;
    if (get_bool(path, root, "tie_word_embeddings", 0, &c->tie_embeddings) ||
        get_bool(path, root, "attention_bias", 0, &attention_bias) ||
        get_bool(path, root, "mlp_bias", 0, &mlp_bias) ||
        get_bool(path, root, "use_sliding_window", 0, &sliding))
        return -1;
    c->qkv_bias = c->arch == FL_ARCH_QWEN2 || attention_bias;
    c->o_bias = c->arch == FL_ARCH_LLAMA && attention_bias; /* Qwen2's o_proj has none */
    if (mlp_bias) return fl_error("%s: field 'mlp_bias' true is not supported", path);
    if (sliding) return fl_error("%s: field 'use_sliding_window' true is not supported", path);
    const cJSON *act = fl_json_field(root, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0)) {
        char got[80];
        fl_json_describe(act, got, sizeof got);
        return fl_error("%s: field 'hidden_act' must be \"silu\", got %s", path, got);
    }
    return 0;
}

int fl_config_load(const char *path, fl_config *cfg) {
    size_t len;
    char *text = fl_read_file(path, &len);
    if (!text) return -1;
    size_t nul = strlen(text);
    if (nul != len) {
        free(text);
        return fl_error("%s: invalid JSON near byte %zu (NUL byte)", path, nul);
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    if (!root) {
        size_t at = end ? (size_t)(end - text) : 0;
        free(text);
        return fl_error("%s: invalid JSON near byte %zu", path, at);
    }
    free(text);
    fl_config c;
    memset(&c, 0, sizeof c);
    int rc = -1;
    if (!cJSON_IsObject(root))
        fl_error("%s: top level must be a JSON object", path);
    else if (!read_arch(path, root, &c) && !read_shape(path, root, &c) &&
             !read_features(path, root, &c) && !read_rope_scaling(path, root, &c) &&
             !read_special_ids(path, root, &c))
        rc = 0;
    cJSON_Delete(root);
    if (rc == 0) *cfg = c;
    return rc;
}
