/* LoRA adapters: creation (PEFT's initialisation), the dropout hash, and PEFT's folder
 * format (adapter_config.json + adapter_model.safetensors), read and written. */
#include "lora.h"
#include "model.h"
#include "fl_internal.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LORA_MAX_RANK 65536 /* far above any useful rank: larger is a typo, not a request */
#define CONFIG_NAME "adapter_config.json"
#define WEIGHTS_NAME "adapter_model.safetensors"
#define PREFIX "base_model.model.model.layers."

static const char *const short_names[FL_LORA_N_TARGETS] = {"q", "k", "v", "o", "gate", "up", "down"};
static const char *const proj_names[FL_LORA_N_TARGETS] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

/* -------------------------------------------------------------- targets */

fl_lora_params fl_lora_default_params(void) {
    fl_lora_params p = {.rank = 8, .alpha = 16.0f,
                        .targets = (1u << FL_LORA_Q) | (1u << FL_LORA_V),
                        .dropout = 0.0f, .seed = 0};
    return p;
}

const char *fl_lora_target_name(fl_lora_target t) {
    return (unsigned)t < FL_LORA_N_TARGETS ? proj_names[t] : NULL;
}

/* The mask of one name ("q" or "q_proj", or "all"), 0 when unknown. */
static unsigned target_bits(const char *name, size_t len) {
    if (len == 3 && !strncmp(name, "all", 3)) return FL_LORA_ALL_LINEARS;
    for (int t = 0; t < FL_LORA_N_TARGETS; t++)
        if ((strlen(short_names[t]) == len && !strncmp(name, short_names[t], len)) ||
            (strlen(proj_names[t]) == len && !strncmp(name, proj_names[t], len)))
            return 1u << t;
    return 0;
}

int fl_lora_parse_targets(const char *list, unsigned *targets) {
    if (!list || !targets) return fl_error("LoRA targets: no list given");
    unsigned mask = 0;
    const char *p = list;
    for (;;) {
        p += strspn(p, " \t");
        size_t len = strcspn(p, ",");
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t')) len--;
        unsigned bits = target_bits(p, len);
        if (!bits)
            return fl_error("unknown LoRA target '%.*s' (known: q, k, v, o, gate, up, down, all)",
                            (int)(len > 64 ? 64 : len), p);
        mask |= bits;
        p += strcspn(p, ",");
        if (!*p) break;
        p++;
    }
    *targets = mask;
    return 0;
}

/* ------------------------------------------------------------ the object */

static int target_in(const fl_model *m, int t) {
    return t == FL_LORA_O ? m->q_dim : t == FL_LORA_DOWN ? m->cfg.hidden_dim : m->cfg.dim;
}

static int target_out(const fl_model *m, int t) {
    switch (t) {
    case FL_LORA_Q: return m->q_dim;
    case FL_LORA_K:
    case FL_LORA_V: return m->kv_dim;
    case FL_LORA_GATE:
    case FL_LORA_UP: return m->cfg.hidden_dim;
    default: return m->cfg.dim;
    }
}

static int check_params(const fl_lora_params *p) {
    if (p->rank < 1 || p->rank > LORA_MAX_RANK)
        return fl_error("LoRA rank %d is out of range (1 to %d)", p->rank, LORA_MAX_RANK);
    if (!(p->alpha > 0) || !isfinite(p->alpha))
        return fl_error("LoRA alpha %g must be a positive number", (double)p->alpha);
    if (!p->targets)
        return fl_error("LoRA targets are empty (name at least one of q, k, v, o, gate, up, down)");
    if (p->targets & ~FL_LORA_ALL_LINEARS)
        return fl_error("LoRA targets mask 0x%x has bits beyond the 7 projections (0x%x)",
                        p->targets, FL_LORA_ALL_LINEARS);
    if (!(p->dropout >= 0 && p->dropout < 1))
        return fl_error("LoRA dropout %g must be in [0, 1)", (double)p->dropout);
    return 0;
}

void fl_adapter_changed(fl_adapter *a) {
    static uint64_t last; /* shared by every thread's adapters */
    a->version = __atomic_add_fetch(&last, 1, __ATOMIC_RELAXED);
}

/* An adapter with zeroed params and grads and A/B pointing into them. */
static fl_adapter *adapter_alloc(const fl_model *m, const fl_lora_params *p) {
    if (check_params(p)) return NULL;
    fl_adapter *a = fl_calloc(1, sizeof *a);
    if (!a) return NULL;
    a->p = *p;
    a->scale = p->alpha / (float)p->rank;
    a->n_layers = m->cfg.n_layers;
    a->w = fl_calloc((size_t)a->n_layers * FL_LORA_N_TARGETS, sizeof *a->w);
    size_t r = (size_t)p->rank, n = 0;
    for (int t = 0; t < FL_LORA_N_TARGETS; t++)
        if (p->targets & (1u << t))
            n += r * (size_t)(target_in(m, t) + target_out(m, t)) * (size_t)a->n_layers;
    a->n_params = n;
    fl_adapter_changed(a); /* a fresh version: one freed at the same address had another */
    a->params = fl_calloc(n, sizeof(float));
    a->grads = fl_calloc(n, sizeof(float));
    if (!a->w || !a->params || !a->grads) {
        fl_adapter_free(a);
        return NULL;
    }
    size_t off = 0;
    for (int l = 0; l < a->n_layers; l++)
        for (int t = 0; t < FL_LORA_N_TARGETS; t++) {
            fl_lora_weight *w = &a->w[l * FL_LORA_N_TARGETS + t];
            w->in = target_in(m, t);
            w->out = target_out(m, t);
            if (!(p->targets & (1u << t))) continue;
            w->A = a->params + off, w->dA = a->grads + off;
            off += r * (size_t)w->in;
            w->B = a->params + off, w->dB = a->grads + off;
            off += r * (size_t)w->out;
        }
    return a;
}

void fl_adapter_free(fl_adapter *a) {
    if (!a) return;
    free(a->w);
    free(a->params);
    free(a->grads);
    free(a);
}

const fl_lora_params *fl_adapter_params(const fl_adapter *a) { return a ? &a->p : NULL; }

size_t fl_adapter_n_params(const fl_adapter *a) { return a ? a->n_params : 0; }

/* ------------------------------------------------ initialisation, dropout */

/* Folds one more word into a hash: splitmix64's next output from the state h ^ x (its
 * golden-ratio step keeps zero from mapping to zero). */
static uint64_t hash_in(uint64_t h, uint64_t x) {
    uint64_t state = h ^ x;
    return fl_splitmix64(&state);
}

/* Domain tags keep A's streams and the dropout masks apart for the same seed. */
#define TAG_INIT 0x696e6974ull
#define TAG_DROP 0x64726f70ull

/* A ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT's kaiming_uniform_(a=sqrt(5)) on a [rank, in]
 * weight. One splitmix64 stream per (seed, layer, target), so the bytes depend on the
 * seed alone. */
static void init_a(fl_lora_weight *w, int rank, uint64_t seed, int layer, int t) {
    uint64_t state = hash_in(hash_in(hash_in(seed, TAG_INIT), (uint64_t)layer), (uint64_t)t);
    float bound = 1.0f / sqrtf((float)w->in);
    size_t n = (size_t)rank * (size_t)w->in;
    for (size_t i = 0; i < n; i++) {
        double u = (double)(fl_splitmix64(&state) >> 11) * 0x1p-53; /* [0, 1) */
        w->A[i] = (float)((2.0 * u - 1.0) * bound);
    }
}

fl_adapter *fl_adapter_new(const fl_model *model, const fl_lora_params *params) {
    if (!model) {
        fl_error("LoRA adapter: no model given");
        return NULL;
    }
    fl_lora_params p = params ? *params : fl_lora_default_params();
    fl_adapter *a = adapter_alloc(model, &p);
    if (!a) return NULL;
    for (int l = 0; l < a->n_layers; l++)
        for (int t = 0; t < FL_LORA_N_TARGETS; t++) {
            fl_lora_weight *w = fl_lora_at(a, l, (fl_lora_target)t);
            if (w) init_a(w, p.rank, p.seed, l, t);
        }
    return a;
}

float fl_lora_dropout(const fl_adapter *a, uint64_t step, int layer, fl_lora_target t, int pos,
                      int i) {
    float p = a->p.dropout;
    if (p <= 0) return 1.0f;
    uint64_t h = hash_in(hash_in(a->p.seed, TAG_DROP), step);
    h = hash_in(h, (uint64_t)(uint32_t)layer << 32 | (uint32_t)t);
    h = hash_in(h, (uint64_t)(uint32_t)pos << 32 | (uint32_t)i);
    double u = (double)(h >> 11) * 0x1p-53;
    return u < (double)p ? 0.0f : 1.0f / (1.0f - p);
}

/* ----------------------------------------------------------------- saving */

/* PEFT's name of one A or B weight (without the ".default" infix). */
static void tensor_name(char *out, size_t cap, int layer, int t, int is_b) {
    snprintf(out, cap, PREFIX "%d.%s.%s.lora_%c.weight", layer,
             t <= FL_LORA_O ? "self_attn" : "mlp", proj_names[t], is_b ? 'B' : 'A');
}

/* A float as JSON with the shortest decimal that reads back as the same float
 * (0.05, not 0.05000000074505806, as PEFT's Python floats print). */
static cJSON *float_number(float f) {
    char buf[32];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if (strtof(buf, NULL) == f) break;
    }
    return cJSON_CreateNumber(strtod(buf, NULL));
}

static cJSON *config_json(const fl_adapter *a, const char *base_model_name) {
    cJSON *c = cJSON_CreateObject(), *mods = cJSON_CreateArray();
    if (!c || !mods) {
        cJSON_Delete(c);
        cJSON_Delete(mods);
        return NULL;
    }
    for (int t = 0; t < FL_LORA_N_TARGETS; t++)
        if (a->p.targets & (1u << t)) cJSON_AddItemToArray(mods, cJSON_CreateString(proj_names[t]));
    cJSON_AddStringToObject(c, "peft_type", "LORA");
    cJSON_AddStringToObject(c, "task_type", "CAUSAL_LM");
    cJSON_AddNumberToObject(c, "r", a->p.rank);
    cJSON_AddItemToObject(c, "lora_alpha", float_number(a->p.alpha));
    cJSON_AddItemToObject(c, "lora_dropout", float_number(a->p.dropout));
    cJSON_AddItemToObject(c, "target_modules", mods);
    if (base_model_name) cJSON_AddStringToObject(c, "base_model_name_or_path", base_model_name);
    else cJSON_AddNullToObject(c, "base_model_name_or_path");
    cJSON_AddStringToObject(c, "bias", "none");
    cJSON_AddFalseToObject(c, "fan_in_fan_out");
    cJSON_AddTrueToObject(c, "inference_mode");
    cJSON_AddTrueToObject(c, "init_lora_weights");
    cJSON_AddNullToObject(c, "modules_to_save");
    cJSON_AddFalseToObject(c, "use_rslora");
    cJSON_AddFalseToObject(c, "use_dora");
    cJSON_AddNullToObject(c, "revision");
    cJSON_AddNullToObject(c, "layers_to_transform");
    return c;
}

static int save_config(const fl_adapter *a, const char *dir, const char *base_model_name) {
    char path[4096];
    if (fl_path_join(path, sizeof path, dir, CONFIG_NAME)) return -1;
    cJSON *c = config_json(a, base_model_name);
    char *text = c ? cJSON_Print(c) : NULL;
    cJSON_Delete(c);
    if (!text) return fl_error("%s: out of memory building JSON", path);
    int rc = fl_write_file_atomic(path, text, strlen(text));
    free(text);
    return rc;
}

static int save_weights(const fl_adapter *a, const char *dir) {
    char path[4096];
    if (fl_path_join(path, sizeof path, dir, WEIGHTS_NAME)) return -1;
    size_t cap = (size_t)a->n_layers * FL_LORA_N_TARGETS * 2;
    fl_st_tensor *ts = fl_calloc(cap, sizeof *ts);
    char (*names)[128] = fl_calloc(cap, sizeof *names);
    int n = 0, rc = -1;
    if (ts && names) {
        for (int l = 0; l < a->n_layers; l++)
            for (int t = 0; t < FL_LORA_N_TARGETS; t++) {
                const fl_lora_weight *w = fl_lora_at(a, l, (fl_lora_target)t);
                if (!w) continue;
                for (int is_b = 0; is_b < 2; is_b++, n++) {
                    fl_st_tensor *x = &ts[n];
                    tensor_name(names[n], sizeof names[n], l, t, is_b);
                    x->name = names[n];
                    x->dtype = FL_DTYPE_F32;
                    x->ndim = 2;
                    x->shape[0] = is_b ? w->out : a->p.rank;
                    x->shape[1] = is_b ? a->p.rank : w->in;
                    x->numel = x->shape[0] * x->shape[1];
                    x->nbytes = (size_t)x->numel * sizeof(float);
                    x->data = is_b ? w->B : w->A;
                }
            }
        const char *keys[] = {"format"}, *values[] = {"pt"};
        rc = fl_st_write(path, ts, n, keys, values, 1);
    }
    free(ts);
    free(names);
    return rc;
}

int fl_adapter_save(const fl_adapter *a, const char *dir, const char *base_model_name) {
    if (!a || !dir) return fl_error("saving a LoRA adapter: no adapter or folder given");
    /* The config last: a folder that has one holds a complete adapter. */
    if (fl_make_dirs(dir) || save_weights(a, dir) || save_config(a, dir, base_model_name))
        return fl_error_prefix("saving LoRA adapter %s", dir);
    return 0;
}

/* ---------------------------------------------------------------- loading */

/* A number field within [lo, hi]; dflt when optional and absent. */
static int get_number(const char *path, const cJSON *obj, const char *key, int required,
                      double dflt, double lo, double hi, double *out) {
    const cJSON *v = fl_json_field(obj, key);
    if (!v) {
        if (required) return fl_error("%s: field '%s' missing", path, key);
        *out = dflt;
        return 0;
    }
    double d = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    if (!(d >= lo && d <= hi)) {
        char got[80];
        fl_json_describe(v, got, sizeof got);
        return fl_error("%s: field '%s' must be a number in [%g, %g], got %s", path, key, lo, hi, got);
    }
    *out = d;
    return 0;
}

/* Fields whose non-default values change what the weights mean: refused, not ignored. */
static int check_unsupported(const char *path, const cJSON *c) {
    static const char *const flags[] = {"use_rslora", "use_dora"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = fl_json_field(c, flags[i]);
        if (v && !cJSON_IsFalse(v))
            return fl_error("%s: '%s' is set; flexllm supports plain LoRA only (scale alpha / r)",
                            path, flags[i]);
    }
    static const char *const nulls[] = {"layers_to_transform", "modules_to_save"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = fl_json_field(c, nulls[i]);
        if (v && !(cJSON_IsArray(v) && cJSON_GetArraySize(v) == 0)) {
            char got[80];
            fl_json_describe(v, got, sizeof got);
            return fl_error("%s: '%s' is %s; flexllm supports only null (every layer, LoRA weights only)",
                            path, nulls[i], got);
        }
    }
    static const char *const patterns[] = {"rank_pattern", "alpha_pattern"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = fl_json_field(c, patterns[i]);
        if (v && !(cJSON_IsObject(v) && !v->child))
            return fl_error("%s: '%s' is not empty; flexllm supports one rank and alpha for all layers",
                            path, patterns[i]);
    }
    const cJSON *bias = fl_json_field(c, "bias");
    if (bias && !(cJSON_IsString(bias) && !strcmp(bias->valuestring, "none")))
        return fl_error("%s: 'bias' must be \"none\" (flexllm trains no LoRA biases)", path);
    return 0;
}

static int parse_target_modules(const char *path, const cJSON *c, unsigned *targets) {
    const cJSON *v = fl_json_field(c, "target_modules");
    if (!v) return fl_error("%s: field 'target_modules' missing", path);
    if (cJSON_IsString(v) && !strcmp(v->valuestring, "all-linear")) {
        *targets = FL_LORA_ALL_LINEARS;
        return 0;
    }
    if (!cJSON_IsArray(v) || !v->child) {
        char got[80];
        fl_json_describe(v, got, sizeof got);
        return fl_error("%s: field 'target_modules' must be a list of module names or \"all-linear\", got %s",
                        path, got);
    }
    unsigned mask = 0;
    for (const cJSON *e = v->child; e; e = e->next) {
        int t = -1;
        for (int k = 0; k < FL_LORA_N_TARGETS && cJSON_IsString(e); k++)
            if (!strcmp(e->valuestring, proj_names[k])) t = k;
        if (t < 0) {
            char got[80];
            fl_json_describe(e, got, sizeof got);
            return fl_error("%s: target_modules names %s, which flexllm cannot adapt (supported: "
                            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
                            path, got);
        }
        mask |= 1u << t;
    }
    *targets = mask;
    return 0;
}

static int parse_config(const char *path, const char *text, fl_lora_params *p) {
    const char *end = NULL;
    cJSON *c = cJSON_ParseWithOpts(text, &end, 1);
    if (!c) {
        size_t at = end ? (size_t)(end - text) : 0;
        return fl_error("%s: invalid JSON near byte %zu", path, at);
    }
    int rc = 0;
    double r = 0, alpha = 0, dropout = 0;
    const cJSON *type = fl_json_field(c, "peft_type");
    if (!cJSON_IsObject(c)) {
        rc = fl_error("%s: not a JSON object", path);
    } else if (!cJSON_IsString(type) || strcmp(type->valuestring, "LORA") != 0) {
        char got[80];
        if (type) fl_json_describe(type, got, sizeof got);
        rc = fl_error("%s: peft_type must be \"LORA\", got %s", path, type ? got : "nothing");
    } else {
        rc = check_unsupported(path, c) ||
             get_number(path, c, "r", 1, 0, 1, LORA_MAX_RANK, &r) ||
             get_number(path, c, "lora_alpha", 1, 0, 0, 1e30, &alpha) ||
             get_number(path, c, "lora_dropout", 0, 0, 0, 1, &dropout) ||
             parse_target_modules(path, c, &p->targets);
        if (!rc && r != floor(r)) rc = fl_error("%s: field 'r' must be an integer, got %g", path, r);
        if (!rc && !(alpha > 0)) rc = fl_error("%s: field 'lora_alpha' must be positive", path);
        if (!rc && dropout >= 1) rc = fl_error("%s: field 'lora_dropout' must be below 1", path);
    }
    cJSON_Delete(c);
    p->rank = (int)r;
    p->alpha = (float)alpha;
    p->dropout = (float)dropout;
    return rc;
}

/* Reads "<prefix><layer>.<module>.<proj>.lora_<A|B>[.default].weight"; -1 when the name
 * is not of that form. Layers past INT_MAX read as INT_MAX (out of range for any model). */
static int parse_tensor_name(const char *name, int *layer, int *target, int *is_b) {
    size_t lp = strlen(PREFIX);
    if (strncmp(name, PREFIX, lp) != 0) return -1;
    const char *p = name + lp;
    if (*p < '0' || *p > '9') return -1;
    long long l = 0;
    while (*p >= '0' && *p <= '9') {
        if (l < INT_MAX) l = l * 10 + (*p - '0');
        p++;
    }
    *layer = l > INT_MAX ? INT_MAX : (int)l;
    *target = -1;
    for (int t = 0; t < FL_LORA_N_TARGETS; t++) {
        char mid[64];
        int n = snprintf(mid, sizeof mid, ".%s.%s.lora_", t <= FL_LORA_O ? "self_attn" : "mlp",
                         proj_names[t]);
        if (!strncmp(p, mid, (size_t)n)) {
            *target = t;
            p += n;
            break;
        }
    }
    if (*target < 0 || (*p != 'A' && *p != 'B')) return -1;
    *is_b = *p++ == 'B';
    return !strcmp(p, ".weight") || !strcmp(p, ".default.weight") ? 0 : -1;
}

/* Places one tensor in slots[layer, target, A|B] after checking its name, layer, target
 * and shape against the model and config. */
static int place_tensor(const char *file, const fl_model *m, const fl_lora_params *p,
                        const fl_st_tensor *x, const fl_st_tensor **slots) {
    int layer, t, is_b;
    if (parse_tensor_name(x->name, &layer, &t, &is_b))
        return fl_error("%s: unexpected tensor '%s' (expected only lora_A/lora_B weights of "
                        "q/k/v/o/gate/up/down_proj under '" PREFIX "N.')", file, x->name);
    if (layer >= m->cfg.n_layers)
        return fl_error("%s: tensor '%s' is for layer %d, but the model has %d layers", file,
                        x->name, layer, m->cfg.n_layers);
    if (!(p->targets & (1u << t)))
        return fl_error("%s: tensor '%s' is for %s, which target_modules in " CONFIG_NAME
                        " does not name", file, x->name, proj_names[t]);
    const fl_st_tensor **slot = &slots[(layer * FL_LORA_N_TARGETS + t) * 2 + is_b];
    if (*slot)
        return fl_error("%s: tensors '%s' and '%s' are the same weight", file, (*slot)->name, x->name);
    int64_t r = p->rank, in = target_in(m, t), out = target_out(m, t);
    int64_t want0 = is_b ? out : r, want1 = is_b ? r : in;
    if (x->ndim != 2 || x->shape[0] != want0 || x->shape[1] != want1) {
        char got[160];
        fl_st_shape_str(x->shape, x->ndim, ", ", got, sizeof got);
        return fl_error("%s: tensor '%s' has shape %s, expected [%lld, %lld] (%s %lld, %s %lld)",
                        file, x->name, got, (long long)want0, (long long)want1, is_b ? "out" : "r",
                        (long long)want0, is_b ? "r" : "in", (long long)want1);
    }
    *slot = x;
    return 0;
}

/* Checks every tensor of the file and that every enabled weight is there, before any
 * allocation sized by the config. */
static int place_tensors(const char *file, const fl_model *m, const fl_lora_params *p,
                         const fl_st_set *st, const fl_st_tensor **slots) {
    for (int i = 0; i < fl_st_count(st); i++)
        if (place_tensor(file, m, p, fl_st_at(st, i), slots)) return -1;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int t = 0; t < FL_LORA_N_TARGETS; t++)
            for (int is_b = 0; is_b < 2 && (p->targets & (1u << t)); is_b++)
                if (!slots[(l * FL_LORA_N_TARGETS + t) * 2 + is_b]) {
                    char name[128];
                    tensor_name(name, sizeof name, l, t, is_b);
                    return fl_error("%s: tensor '%s' missing", file, name);
                }
    return 0;
}

static fl_st_set *open_weights(const char *dir, char *path, size_t cap) {
    char bin[4096];
    if (fl_path_join(path, cap, dir, WEIGHTS_NAME) || fl_path_join(bin, sizeof bin, dir, "adapter_model.bin"))
        return NULL;
    if (!fl_file_exists(path) && fl_file_exists(bin)) {
        fl_error("%s: missing; the folder has only adapter_model.bin, a PyTorch pickle flexllm does "
                 "not read (save the adapter with safe_serialization=True)", path);
        return NULL;
    }
    return fl_st_open(path);
}

fl_adapter *fl_adapter_load(const fl_model *model, const char *dir) {
    if (!model || !dir) {
        fl_error("loading a LoRA adapter: no model or folder given");
        return NULL;
    }
    char cpath[4096], wpath[4096];
    if (fl_path_join(cpath, sizeof cpath, dir, CONFIG_NAME)) return NULL;
    char *text = fl_read_file(cpath, NULL);
    if (!text) return NULL;
    fl_lora_params p = fl_lora_default_params();
    int rc = parse_config(cpath, text, &p);
    free(text);
    if (rc) return NULL;
    fl_st_set *st = open_weights(dir, wpath, sizeof wpath);
    if (!st) return NULL;
    fl_adapter *a = NULL;
    const fl_st_tensor **slots = fl_calloc((size_t)model->cfg.n_layers * FL_LORA_N_TARGETS * 2,
                                           sizeof *slots);
    if (slots && !place_tensors(wpath, model, &p, st, slots) && (a = adapter_alloc(model, &p))) {
        for (int l = 0; l < a->n_layers; l++)
            for (int t = 0; t < FL_LORA_N_TARGETS; t++) {
                fl_lora_weight *w = fl_lora_at(a, l, (fl_lora_target)t);
                if (!w) continue;
                fl_st_to_f32(slots[(l * FL_LORA_N_TARGETS + t) * 2], w->A);
                fl_st_to_f32(slots[(l * FL_LORA_N_TARGETS + t) * 2 + 1], w->B);
            }
    }
    free(slots);
    fl_st_close(st);
    return a;
}
