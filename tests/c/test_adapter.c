/* LoRA adapters: PEFT's initialisation, the dropout hash, saving and loading PEFT's
 * folder format (including one written by hand as PEFT lays it out), and refusals of
 * broken adapters with messages that name the file (also run under ASan+UBSan). */
#include "flexllm.h"
#include "lora.h"
#include "model.h"
#include "safetensors.h"
#include "fl_internal.h"
#include "tap.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <unistd.h>

#define PRE "base_model.model.model.layers."

static char base[4096];

static const char *in_base(const char *name) { return tap_path(base, name); }

static fl_model *make_model(const char *name, int dim) {
    fl_init_model_params ip = fl_init_model_default_params();
    ip.dim = dim, ip.hidden_dim = 64, ip.n_layers = 2, ip.n_heads = 4, ip.n_kv_heads = 2;
    ip.vocab_size = 300;
    if (fl_init_model(in_base(name), &ip) != 0) return NULL;
    return fl_model_load(in_base(name), NULL);
}

/* ------------------------------------------------------------ targets */

static void test_targets(void) {
    unsigned m = 0;
    int rc = fl_lora_parse_targets("q,v,down", &m);
    tap_ok(rc == 0 && m == ((1u << FL_LORA_Q) | (1u << FL_LORA_V) | (1u << FL_LORA_DOWN)),
           "targets: \"q,v,down\" -> 0x%x", m);
    tap_ok(fl_lora_parse_targets("all", &m) == 0 && m == FL_LORA_ALL_LINEARS, "targets: \"all\"");
    tap_ok(fl_lora_parse_targets("q_proj, v_proj", &m) == 0 &&
               m == ((1u << FL_LORA_Q) | (1u << FL_LORA_V)),
           "targets: PEFT names with a space");
    tap_ok(fl_lora_parse_targets("gate,up,gate_proj", &m) == 0 &&
               m == ((1u << FL_LORA_GATE) | (1u << FL_LORA_UP)),
           "targets: a repeated target counts once");
    m = 123;
    tap_ok(fl_lora_parse_targets("q,qq", &m) == -1 && m == 123 &&
               strstr(fl_last_error(), "unknown LoRA target 'qq' (known: q, k, v, o, gate, up, down, all)"),
           "targets: unknown name: \"%s\"", fl_last_error());
    tap_ok(fl_lora_parse_targets("", &m) == -1 && strstr(fl_last_error(), "unknown LoRA target ''"),
           "targets: empty list refused");
    tap_ok(fl_lora_parse_targets("q,", &m) == -1, "targets: trailing comma refused");
    tap_ok(fl_lora_parse_targets("lm_head", &m) == -1 && strstr(fl_last_error(), "'lm_head'"),
           "targets: lm_head refused");
    const char *want[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    int ok = 1;
    for (int t = 0; t < FL_LORA_N_TARGETS; t++) ok &= !strcmp(fl_lora_target_name((fl_lora_target)t), want[t]);
    tap_ok(ok && fl_lora_target_name(FL_LORA_N_TARGETS) == NULL, "target names are PEFT's module names");
    fl_lora_params p = fl_lora_default_params();
    tap_ok(p.rank == 8 && p.alpha == 16 && p.targets == ((1u << FL_LORA_Q) | (1u << FL_LORA_V)) &&
               p.dropout == 0 && p.seed == 0,
           "default params: rank 8, alpha 16, q|v, no dropout, seed 0");
}

/* ---------------------------------------------------------------- new */

static int expect_in(const fl_model *m, int t) {
    return t == FL_LORA_O ? m->q_dim : t == FL_LORA_DOWN ? m->cfg.hidden_dim : m->cfg.dim;
}

static int expect_out(const fl_model *m, int t) {
    if (t == FL_LORA_Q) return m->q_dim;
    if (t == FL_LORA_K || t == FL_LORA_V) return m->kv_dim;
    if (t == FL_LORA_GATE || t == FL_LORA_UP) return m->cfg.hidden_dim;
    return m->cfg.dim;
}

static void test_new(const fl_model *m) {
    fl_lora_params p = fl_lora_default_params();
    p.targets = FL_LORA_ALL_LINEARS;
    p.seed = 7;
    fl_adapter *a = fl_adapter_new(m, &p);
    if (!tap_ok(a != NULL, "new: all targets, rank 8 %s", a ? "" : fl_last_error())) return;
    size_t want = 0;
    int shapes = 1, b_zero = 1, a_bound = 1, a_nonzero = 1, inside = 1;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int t = 0; t < FL_LORA_N_TARGETS; t++) {
            const fl_lora_weight *w = fl_lora_at(a, l, (fl_lora_target)t);
            if (!w) {
                shapes = 0;
                continue;
            }
            int in = expect_in(m, t), out = expect_out(m, t);
            shapes &= w->in == in && w->out == out;
            want += (size_t)8 * (in + out);
            float bound = 1.0f / sqrtf((float)in), any = 0;
            for (int i = 0; i < 8 * in; i++) {
                a_bound &= fabsf(w->A[i]) <= bound;
                any = fmaxf(any, fabsf(w->A[i]));
            }
            a_nonzero &= any > bound / 2;
            for (int i = 0; i < out * 8; i++) b_zero &= w->B[i] == 0;
            inside &= w->A >= a->params && w->B + out * 8 <= a->params + a->n_params &&
                      w->dA - a->grads == w->A - a->params && w->dB - a->grads == w->B - a->params;
        }
    tap_ok(shapes, "new: every target's in/out match the model (q %d->%d, k/v ->%d, o %d->, down %d->)",
           m->cfg.dim, m->q_dim, m->kv_dim, m->q_dim, m->cfg.hidden_dim);
    tap_ok(fl_adapter_n_params(a) == want, "new: n_params %zu == sum of r*(in+out) %zu",
           fl_adapter_n_params(a), want);
    tap_ok(b_zero, "new: B is all zero");
    tap_ok(a_bound && a_nonzero, "new: A within +-1/sqrt(in) and spread over it");
    tap_ok(inside, "new: A, B, dA, dB point into params/grads at the same offsets");
    int grads_zero = 1;
    for (size_t i = 0; i < a->n_params; i++) grads_zero &= a->grads[i] == 0;
    tap_ok(grads_zero, "new: grads zeroed");
    tap_ok(a->scale == 2.0f, "new: scale alpha / rank = 2");
    const fl_lora_weight *q0 = fl_lora_at(a, 0, FL_LORA_Q), *k0 = fl_lora_at(a, 0, FL_LORA_K);
    tap_ok(q0->B + 8 * q0->out == k0->A && q0->A + 8 * q0->in == q0->B && q0->A == a->params,
           "new: layout is layer by layer, target by target, A then B");

    fl_adapter *same = fl_adapter_new(m, &p);
    tap_ok(same && same->n_params == a->n_params &&
               !memcmp(same->params, a->params, a->n_params * sizeof(float)),
           "new: same seed, bitwise the same adapter");
    p.seed = 8;
    fl_adapter *other = fl_adapter_new(m, &p);
    tap_ok(other && memcmp(other->params, a->params, a->n_params * sizeof(float)) != 0,
           "new: another seed, another adapter");
    fl_adapter_free(same);
    fl_adapter_free(other);
    fl_adapter_free(a);

    a = fl_adapter_new(m, NULL);
    tap_ok(a && fl_adapter_params(a)->targets == ((1u << FL_LORA_Q) | (1u << FL_LORA_V)) &&
               !fl_lora_at(a, 0, FL_LORA_K) && fl_lora_at(a, 1, FL_LORA_V) &&
               fl_adapter_n_params(a) == (size_t)2 * 8 * (m->cfg.dim + m->q_dim + m->cfg.dim + m->kv_dim),
           "new: NULL params means the defaults (q and v only)");
    fl_adapter_free(a);

    struct {
        const char *label, *want;
        fl_lora_params p;
    } bad[] = {
        {"rank 0", "rank 0", {0, 16, 3, 0, 0}},
        {"alpha 0", "alpha 0", {8, 0, 3, 0, 0}},
        {"alpha NaN", "alpha", {8, NAN, 3, 0, 0}},
        {"no targets", "targets are empty", {8, 16, 0, 0, 0}},
        {"target bit 7", "beyond", {8, 16, 1u << 7, 0, 0}},
        {"dropout 1", "dropout 1", {8, 16, 3, 1, 0}},
        {"dropout -0.1", "dropout -0.1", {8, 16, 3, -0.1f, 0}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        a = fl_adapter_new(m, &bad[i].p);
        tap_ok(!a && strstr(fl_last_error(), bad[i].want), "new refuses %s: \"%s\"", bad[i].label,
               fl_last_error());
        fl_adapter_free(a);
    }
}

/* ------------------------------------------------------------ dropout */

static void test_dropout(const fl_model *m) {
    fl_lora_params p = fl_lora_default_params();
    fl_adapter *a = fl_adapter_new(m, &p);
    int ones = 1;
    for (int i = 0; i < 1000; i++) ones &= fl_lora_dropout(a, (uint64_t)i, i % 2, FL_LORA_V, i, i) == 1.0f;
    tap_ok(a && ones, "dropout 0: the scale is always 1");
    fl_adapter_free(a);

    p.dropout = 0.25f;
    p.seed = 3;
    a = fl_adapter_new(m, &p);
    if (!a) return;
    float keep = 1.0f / 0.75f;
    int values_ok = 1, zeros = 0, n = 100000;
    for (int i = 0; i < n; i++) {
        float s = fl_lora_dropout(a, 5, 1, FL_LORA_Q, i / 64, i % 64);
        values_ok &= s == 0 || s == keep;
        zeros += s == 0;
    }
    double frac = (double)zeros / n;
    tap_ok(values_ok, "dropout 0.25: values are 0 or 1/0.75");
    tap_ok(fabs(frac - 0.25) < 0.01, "dropout 0.25: %.4f of 100k draws are zero", frac);
    /* A second adapter with the same seed: the mask depends on the arguments alone, not on
     * the adapter's address or on earlier draws. */
    fl_adapter *twin = fl_adapter_new(m, &p);
    int same = twin != NULL, differ_step = 0;
    for (int i = 0; same && i < 1000; i++)
        same &= fl_lora_dropout(a, 9, 0, FL_LORA_V, 3, i) ==
                fl_lora_dropout(twin, 9, 0, FL_LORA_V, 3, i);
    for (int i = 0; i < 1000; i++)
        differ_step += fl_lora_dropout(a, 9, 0, FL_LORA_V, 3, i) != fl_lora_dropout(a, 10, 0, FL_LORA_V, 3, i);
    tap_ok(same, "dropout: another adapter with the same seed and arguments, the same values");
    tap_ok(differ_step > 200, "dropout: another step draws another mask (%d of 1000 differ)", differ_step);
    fl_adapter_free(twin);
    fl_adapter_free(a);
}

/* ------------------------------------------------------- save and load */

static cJSON *read_json(const char *path) {
    char *text = fl_read_file(path, NULL);
    cJSON *c = text ? cJSON_Parse(text) : NULL;
    free(text);
    return c;
}

static void test_round_trip(const fl_model *m) {
    fl_lora_params p = fl_lora_default_params();
    p.rank = 4, p.alpha = 8, p.dropout = 0.05f, p.seed = 11;
    p.targets = (1u << FL_LORA_Q) | (1u << FL_LORA_K) | (1u << FL_LORA_O) | (1u << FL_LORA_DOWN);
    fl_adapter *a = fl_adapter_new(m, &p);
    if (!a) return;
    for (size_t i = 0; i < a->n_params; i++) a->params[i] += (float)i * 1e-4f; /* B nonzero too */
    const char *dir = in_base("saved/nested");
    int rc = fl_adapter_save(a, dir, "tiny-llama");
    tap_ok(rc == 0, "save: creates the folder and writes %s", rc ? fl_last_error() : "");
    fl_adapter *b = fl_adapter_load(m, dir);
    if (tap_ok(b != NULL, "load: the saved adapter loads %s", b ? "" : fl_last_error())) {
        const fl_lora_params *q = fl_adapter_params(b);
        tap_ok(b->n_params == a->n_params &&
                   !memcmp(a->params, b->params, a->n_params * sizeof(float)),
               "load: params bitwise equal to the saved ones");
        tap_ok(q->rank == 4 && q->alpha == 8 && q->dropout == 0.05f && q->targets == p.targets &&
                   b->scale == 2.0f,
               "load: r, alpha, dropout, targets round trip (r %d alpha %g dropout %g targets 0x%x)",
               q->rank, (double)q->alpha, (double)q->dropout, q->targets);
    }
    fl_adapter_free(b);

    cJSON *c = read_json(tap_path(dir, "adapter_config.json"));
    const cJSON *mods = cJSON_GetObjectItem(c, "target_modules");
    char *mods_text = mods ? cJSON_PrintUnformatted(mods) : NULL;
    tap_ok(c && !strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(c, "peft_type")), "LORA") &&
               !strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(c, "task_type")), "CAUSAL_LM") &&
               !strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(c, "base_model_name_or_path")), "tiny-llama") &&
               !strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(c, "bias")), "none") &&
               cJSON_IsFalse(cJSON_GetObjectItem(c, "use_dora")) &&
               cJSON_IsNull(cJSON_GetObjectItem(c, "layers_to_transform")) &&
               cJSON_IsTrue(cJSON_GetObjectItem(c, "inference_mode")) && mods_text &&
               !strcmp(mods_text, "[\"q_proj\",\"k_proj\",\"o_proj\",\"down_proj\"]"),
           "save: adapter_config.json has PEFT's fields (target_modules %s)", mods_text ? mods_text : "?");
    char *text = fl_read_file(tap_path(dir, "adapter_config.json"), NULL);
    tap_ok(text && strstr(text, "\"lora_dropout\":\t0.05,") && strstr(text, "\"lora_alpha\":\t8,") &&
               strstr(text, "\"r\":\t4,"),
           "save: r 4, lora_alpha 8, lora_dropout 0.05 written as PEFT prints them");
    free(text);
    free(mods_text);
    cJSON_Delete(c);

    fl_st_set *st = fl_st_open(tap_path(dir, "adapter_model.safetensors"));
    const fl_st_tensor *ta = st ? fl_st_find(st, PRE "1.self_attn.o_proj.lora_A.weight") : NULL;
    const fl_st_tensor *tb = st ? fl_st_find(st, PRE "0.mlp.down_proj.lora_B.weight") : NULL;
    tap_ok(st && fl_st_count(st) == 2 * 2 * 4 && ta && ta->dtype == FL_DTYPE_F32 && ta->ndim == 2 &&
               ta->shape[0] == 4 && ta->shape[1] == m->q_dim && tb && tb->shape[0] == m->cfg.dim &&
               tb->shape[1] == 4,
           "save: F32 tensors with PEFT's names and shapes ([r, in], [out, r])");
    fl_st_close(st);

    fl_adapter *d = fl_adapter_new(m, NULL);
    tap_ok(d && fl_adapter_save(d, dir, NULL) == 0 && (b = fl_adapter_load(m, dir)) &&
               fl_adapter_params(b)->targets == d->p.targets &&
               !memcmp(b->params, d->params, d->n_params * sizeof(float)),
           "save: overwrites an adapter in place (no base model name)");
    fl_adapter_free(b);
    fl_adapter_free(d);
    fl_adapter_free(a);
}

/* ----------------------------------------- an adapter written as PEFT does */

/* Exact small float to IEEE half (normal numbers and zero only). */
static uint16_t to_f16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (!(bits & 0x7fffffff)) return (uint16_t)(bits >> 16);
    uint32_t sign = bits >> 16 & 0x8000, exp = (bits >> 23 & 0xff) - 127 + 15;
    return (uint16_t)(sign | exp << 10 | (bits & 0x7fffff) >> 13);
}

/* The value of element i of hand tensor k: multiples of 1/64 (exact in F16 and BF16). */
static float hand_value(int k, int i) { return (float)((k * 37 + i * 11) % 129 - 64) / 64.0f; }

typedef struct {
    fl_st_tensor t[32];
    char names[32][128];
    void *data[32]; /* owned buffers, kept when a tensor is removed from t */
    int n, n_data;
} hand_list;

static void hand_add(hand_list *h, const char *name, int64_t d0, int64_t d1, fl_dtype dt) {
    int k = h->n++;
    fl_st_tensor *x = &h->t[k];
    snprintf(h->names[k], sizeof h->names[k], "%s", name);
    x->name = h->names[k];
    x->dtype = dt;
    x->ndim = 2;
    x->shape[0] = d0, x->shape[1] = d1;
    x->numel = d0 * d1;
    x->nbytes = (size_t)x->numel * (dt == FL_DTYPE_F32 ? 4 : 2);
    h->data[h->n_data] = malloc(x->nbytes);
    x->data = h->data[h->n_data++];
    for (int64_t i = 0; i < x->numel; i++) {
        float v = hand_value(k, (int)i);
        if (dt == FL_DTYPE_F32) ((float *)x->data)[i] = v;
        else ((uint16_t *)x->data)[i] = dt == FL_DTYPE_F16 ? to_f16(v) : fl_f32_to_bf16(v);
    }
}

static void hand_free(hand_list *h) {
    for (int k = 0; k < h->n_data; k++) free(h->data[k]);
    h->n = h->n_data = 0;
}

static void hand_remove(hand_list *h, const char *name) {
    for (int k = 0; k < h->n; k++)
        if (!strcmp(h->t[k].name, name)) h->t[k] = h->t[--h->n];
}

static const char *hand_config =
    "{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n"
    "  \"base_model_name_or_path\": \"tiny\",\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n"
    "  \"inference_mode\": true,\n  \"init_lora_weights\": true,\n  \"layers_pattern\": null,\n"
    "  \"layers_to_transform\": null,\n  \"loftq_config\": {},\n  \"lora_alpha\": 4,\n"
    "  \"lora_dropout\": 0.1,\n  \"megatron_config\": null,\n  \"megatron_core\": \"megatron.core\",\n"
    "  \"modules_to_save\": null,\n  \"peft_type\": \"LORA\",\n  \"r\": 2,\n  \"rank_pattern\": {},\n"
    "  \"revision\": null,\n  \"target_modules\": [\n    \"down_proj\",\n    \"q_proj\"\n  ],\n"
    "  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": false,\n  \"use_rslora\": false\n}\n";

/* PEFT's layout for r 2 on q_proj and down_proj: layer 0 with the ".default" infix,
 * layer 1 without, down_proj A of layer 1 in F16 and its B in BF16. */
static void hand_tensors(hand_list *h, const fl_model *m) {
    for (int l = 0; l < 2; l++) {
        const char *inf = l == 0 ? ".default" : "";
        char name[128];
        snprintf(name, sizeof name, PRE "%d.self_attn.q_proj.lora_A%s.weight", l, inf);
        hand_add(h, name, 2, m->cfg.dim, FL_DTYPE_F32);
        snprintf(name, sizeof name, PRE "%d.self_attn.q_proj.lora_B%s.weight", l, inf);
        hand_add(h, name, m->q_dim, 2, FL_DTYPE_F32);
        snprintf(name, sizeof name, PRE "%d.mlp.down_proj.lora_A%s.weight", l, inf);
        hand_add(h, name, 2, m->cfg.hidden_dim, l ? FL_DTYPE_F16 : FL_DTYPE_F32);
        snprintf(name, sizeof name, PRE "%d.mlp.down_proj.lora_B%s.weight", l, inf);
        hand_add(h, name, m->cfg.dim, 2, l ? FL_DTYPE_BF16 : FL_DTYPE_F32);
    }
}

static const char *write_hand(const char *name, const char *config, const hand_list *h) {
    static char dir[4200];
    snprintf(dir, sizeof dir, "%s/%s", base, name);
    char cmd[8600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", dir, dir);
    if (system(cmd) != 0) return dir;
    if (config) tap_write_text(tap_path(dir, "adapter_config.json"), config);
    if (h) fl_st_write(tap_path(dir, "adapter_model.safetensors"), h->t, h->n, NULL, NULL, 0);
    return dir;
}

static int weight_matches(const float *w, int k, int n) {
    for (int i = 0; i < n; i++)
        if (w[i] != hand_value(k, i)) return 0;
    return 1;
}

static void test_hand_written(const fl_model *m) {
    hand_list h = {0};
    hand_tensors(&h, m);
    const char *dir = write_hand("hand", hand_config, &h);
    fl_adapter *a = fl_adapter_load(m, dir);
    if (tap_ok(a != NULL, "hand-written PEFT adapter loads %s", a ? "" : fl_last_error())) {
        const fl_lora_params *p = fl_adapter_params(a);
        tap_ok(p->rank == 2 && p->alpha == 4 && p->dropout == 0.1f &&
                   p->targets == ((1u << FL_LORA_Q) | (1u << FL_LORA_DOWN)) && a->scale == 2.0f,
               "hand: r 2, alpha 4, dropout 0.1, targets q and down");
        int ok = 1;
        for (int l = 0; l < 2; l++) {
            const fl_lora_weight *q = fl_lora_at(a, l, FL_LORA_Q), *d = fl_lora_at(a, l, FL_LORA_DOWN);
            ok &= q && d && !fl_lora_at(a, l, FL_LORA_V);
            if (!ok) break;
            ok &= weight_matches(q->A, 4 * l + 0, 2 * m->cfg.dim) &&
                  weight_matches(q->B, 4 * l + 1, m->q_dim * 2) &&
                  weight_matches(d->A, 4 * l + 2, 2 * m->cfg.hidden_dim) &&
                  weight_matches(d->B, 4 * l + 3, m->cfg.dim * 2);
        }
        tap_ok(ok, "hand: every value read right (F32, F16, BF16; with and without '.default')");
    }
    fl_adapter_free(a);

    /* "all-linear": the tensors of a saved all-target adapter under a minimal config. */
    fl_lora_params p = fl_lora_default_params();
    p.targets = FL_LORA_ALL_LINEARS;
    fl_adapter *all = fl_adapter_new(m, &p);
    const char *adir = in_base("all_linear");
    if (all && fl_adapter_save(all, adir, "tiny") == 0) {
        tap_write_text(tap_path(adir, "adapter_config.json"),
                   "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, "
                   "\"target_modules\": \"all-linear\"}");
        a = fl_adapter_load(m, adir);
        tap_ok(a && fl_adapter_params(a)->targets == FL_LORA_ALL_LINEARS &&
                   fl_adapter_params(a)->dropout == 0 &&
                   !memcmp(a->params, all->params, all->n_params * sizeof(float)),
               "target_modules \"all-linear\" (lora_dropout absent: 0) %s", a ? "" : fl_last_error());
        fl_adapter_free(a);
    }
    fl_adapter_free(all);
    hand_free(&h);
}

/* ------------------------------------------------------------ refusals */

static void load_fails(const fl_model *m, const char *dir, const char *file, const char *want,
                       const char *label) {
    fl_adapter *a = fl_adapter_load(m, dir);
    const char *e = fl_last_error();
    tap_ok(!a && strstr(e, tap_path(dir, file)) && strstr(e, want), "refuses %s: \"%s\"", label, e);
    fl_adapter_free(a);
}

/* The hand config with one text replaced. */
static const char *config_with(const char *from, const char *to) {
    static char out[4096];
    const char *at = strstr(hand_config, from);
    if (!at) return hand_config;
    snprintf(out, sizeof out, "%.*s%s%s", (int)(at - hand_config), hand_config, to, at + strlen(from));
    return out;
}

static void test_refusals(const fl_model *m, const fl_model *wide) {
    const char *cfg = "adapter_config.json", *st = "adapter_model.safetensors";
    hand_list h = {0};
    hand_tensors(&h, m);

    fl_st_tensor saved = h.t[4];
    h.t[4].shape[0] = 1, h.t[4].numel = m->cfg.dim, h.t[4].nbytes = (size_t)m->cfg.dim * 4;
    load_fails(m, write_hand("wrong_rank", hand_config, &h), st,
               "tensor '" PRE "1.self_attn.q_proj.lora_A.weight' has shape [1, 32], expected [2, 32] (r 2, in 32)",
               "a wrong rank in a shape");
    h.t[4] = saved;

    float extra[64] = {0};
    fl_st_tensor x99 = {.name = PRE "99.self_attn.q_proj.lora_A.weight", .dtype = FL_DTYPE_F32,
                        .ndim = 2, .shape = {2, 32}, .numel = 64, .data = extra, .nbytes = sizeof extra};
    h.t[h.n++] = x99;
    load_fails(m, write_hand("layer99", hand_config, &h), st,
               "tensor '" PRE "99.self_attn.q_proj.lora_A.weight' is for layer 99, but the model has 2 layers",
               "a tensor for layer 99");
    h.n--;

    fl_st_tensor head = x99;
    head.name = "base_model.model.lm_head.lora_A.weight";
    h.t[h.n++] = head;
    load_fails(m, write_hand("lm_head_tensor", hand_config, &h), st,
               "unexpected tensor 'base_model.model.lm_head.lora_A.weight'", "an unknown tensor name");
    h.n--;

    fl_st_tensor v0 = x99;
    v0.name = PRE "0.self_attn.v_proj.lora_A.weight";
    h.t[h.n++] = v0;
    load_fails(m, write_hand("v_not_named", hand_config, &h), st,
               "is for v_proj, which target_modules in adapter_config.json does not name",
               "a tensor for a module the config does not name");
    h.n--;

    fl_st_tensor dup = h.t[4];
    dup.name = PRE "1.self_attn.q_proj.lora_A.default.weight";
    h.t[h.n++] = dup;
    load_fails(m, write_hand("duplicate", hand_config, &h), st, "are the same weight",
               "the same weight with and without '.default'");
    h.n--;

    hand_remove(&h, PRE "1.mlp.down_proj.lora_B.weight");
    load_fails(m, write_hand("no_b", hand_config, &h), st,
               "tensor '" PRE "1.mlp.down_proj.lora_B.weight' missing", "a missing lora_B");
    hand_free(&h);
    hand_tensors(&h, m);

    /* The hand config with one text replaced, and what loading it says (about the config,
     * or about the weights when weights is set). */
    static const struct {
        int weights;
        const char *name, *from, *to, *want, *label;
    } edits[] = {
        {0, "lm_head", "\"down_proj\"", "\"lm_head\"",
         "target_modules names \"lm_head\", which flexllm cannot adapt", "target_modules lm_head"},
        {0, "unknown_mod", "\"down_proj\"", "\"dense_h_to_4h\"", "\"dense_h_to_4h\"",
         "an unknown target module"},
        {0, "regex", "[\n    \"down_proj\",\n    \"q_proj\"\n  ]", "\".*proj\"",
         "must be a list of module names or \"all-linear\"", "a regex target_modules"},
        {0, "prefix", "\"LORA\"", "\"PREFIX_TUNING\"", "peft_type must be \"LORA\", got \"PREFIX_TUNING\"",
         "peft_type PREFIX_TUNING"},
        {0, "dora", "\"use_dora\": false", "\"use_dora\": true", "'use_dora' is set", "use_dora true"},
        {0, "rslora", "\"use_rslora\": false", "\"use_rslora\": true", "'use_rslora' is set",
         "use_rslora true"},
        {0, "layers", "\"layers_to_transform\": null", "\"layers_to_transform\": [0]",
         "'layers_to_transform' is [0]", "layers_to_transform [0]"},
        {0, "rank_pattern", "\"rank_pattern\": {}", "\"rank_pattern\": {\"q_proj\": 4}",
         "'rank_pattern' is not empty", "a rank_pattern"},
        {0, "bias", "\"bias\": \"none\"", "\"bias\": \"lora_only\"", "'bias' must be \"none\"",
         "bias lora_only"},
        {0, "r_zero", "\"r\": 2", "\"r\": 0", "field 'r' must be a number in [1, 65536], got 0", "r 0"},
        {0, "r_frac", "\"r\": 2", "\"r\": 2.5", "field 'r' must be an integer", "r 2.5"},
        {0, "r_string", "\"r\": 2", "\"r\": \"2\"", "got \"2\"", "r as a string"},
        {0, "no_alpha", "\"lora_alpha\": 4", "\"lora_beta\": 4", "field 'lora_alpha' missing",
         "lora_alpha missing"},
        {0, "dropout1", "\"lora_dropout\": 0.1", "\"lora_dropout\": 1", "'lora_dropout' must be below 1",
         "lora_dropout 1"},
        {1, "big_rank", "\"r\": 2", "\"r\": 65536", "expected [65536, 64] (r 65536, in 64)",
         "r 65536 against rank-2 tensors (no huge allocation)"},
    };
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++)
        load_fails(m, write_hand(edits[i].name, config_with(edits[i].from, edits[i].to), &h),
                   edits[i].weights ? st : cfg, edits[i].want, edits[i].label);
    load_fails(m, write_hand("no_config", NULL, &h), cfg, "cannot open", "a missing adapter_config.json");
    load_fails(m, write_hand("bad_json", "{\"peft_type\": \"LORA\", \"r\": ", &h), cfg, "invalid JSON",
               "malformed JSON");
    load_fails(m, write_hand("json_array", "[1, 2]", &h), cfg, "not a JSON object", "a JSON array");
    load_fails(m, write_hand("no_weights", hand_config, NULL), st, "cannot open", "missing safetensors");
    const char *bin = write_hand("only_bin", hand_config, NULL);
    tap_write_text(tap_path(bin, "adapter_model.bin"), "PK");
    load_fails(m, bin, st, "only adapter_model.bin", "only adapter_model.bin present");
    const char *trunc = write_hand("truncated", hand_config, &h);
    if (truncate(tap_path(trunc, st), 100) == 0)
        load_fails(m, trunc, st, "", "a truncated safetensors file");

    const char *ok_dir = write_hand("for_wide", hand_config, &h);
    load_fails(wide, ok_dir, st, "down_proj.lora_B.default.weight' has shape [32, 2], expected [48, 2] (out 48, r 2)",
               "an adapter for a model with another hidden size");
    hand_free(&h);

    fl_adapter *a = fl_adapter_load(m, NULL);
    tap_ok(!a && fl_adapter_save(NULL, base, NULL) == -1, "NULL folder or adapter refused");
    a = fl_adapter_new(m, NULL);
    tap_write_text(in_base("a_file"), "x");
    tap_ok(a && fl_adapter_save(a, in_base("a_file/sub"), NULL) == -1 &&
               strstr(fl_last_error(), "a_file"),
           "save into a path under a file fails: \"%s\"", fl_last_error());
    fl_adapter_free(a);
}

int main(void) {
    const char *tmp = tap_tmpdir("test_adapter");
    if (!tap_ok(tmp != NULL, "scratch folder")) return tap_done();
    snprintf(base, sizeof base, "%s", tmp);
    fl_model *m = make_model("model", 32), *wide = make_model("wide", 48);
    if (!tap_ok(m && wide, "init-model writes and loads two tiny models (dim 32, 48) %s",
                m && wide ? "" : fl_last_error())) {
        fl_model_free(m);
        fl_model_free(wide);
        return tap_done();
    }
    test_targets();
    test_new(m);
    test_dropout(m);
    test_round_trip(m);
    test_hand_written(m);
    test_refusals(m, wide);
    fl_model_free(m);
    fl_model_free(wide);
    return tap_done();
}
