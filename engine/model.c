/* Loading a Hugging Face model folder into fp32 weights (mmapped when possible). */
#include "model.h"
#include "fl_internal.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

fl_model_params fl_model_default_params(void) {
    fl_model_params p = {.n_threads = 2,
                         .gemm = FL_GEMM_PACKED,
                         .device = FL_DEVICE_AUTO,
                         .device_weights = FL_DEVICE_WEIGHTS_AUTO};
    return p;
}

void fl_model_linear(const fl_model *m, float *y, const float *x, const fl_linear *lin,
                     const float *bias, int n, int in, int out) {
    if (m->gemm == FL_GEMM_PACKED) fl_cpu_matmul_packed(y, x, &lin->packed, bias, n);
    else fl_cpu_matmul(y, x, lin->w, bias, n, in, out);
}

static int pack(fl_linear *lin, int out, int in) {
    if (fl_cpu_pack(&lin->packed, lin->w, out, in) != 0)
        return fl_error("out of memory packing a [%d, %d] weight", out, in);
    return 0;
}

/* Packs every linear layer for the packed GEMM (the weights as stored stay for
 * other uses, mmapped when they came as aligned F32). */
static int pack_weights(fl_model *m) {
    const fl_config *c = &m->cfg;
    for (int l = 0; l < c->n_layers; l++) {
        fl_layer_weights *L = &m->layers[l];
        if (pack(&L->wq, m->q_dim, c->dim) || pack(&L->wk, m->kv_dim, c->dim) ||
            pack(&L->wv, m->kv_dim, c->dim) || pack(&L->wo, c->dim, m->q_dim) ||
            pack(&L->w_gate, c->hidden_dim, c->dim) || pack(&L->w_up, c->hidden_dim, c->dim) ||
            pack(&L->w_down, c->dim, c->hidden_dim))
            return -1;
    }
    return pack(&m->lm_head, c->vocab_size, c->dim);
}

static void free_packed(fl_model *m) {
    if (m->layers)
        for (int l = 0; l < m->cfg.n_layers; l++) {
            fl_layer_weights *L = &m->layers[l];
            fl_linear *all[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
            for (int i = 0; i < 7; i++) fl_cpu_packed_free(&all[i]->packed);
        }
    fl_cpu_packed_free(&m->lm_head.packed);
}

/* Finds a tensor, checks its shape, and returns fp32 data: the mmapped bytes when
 * they already are aligned F32, else a converted copy owned by the model. */
static const float *load_tensor(fl_model *m, const char *name, int ndim, int64_t d0, int64_t d1) {
    const fl_st_tensor *t = fl_st_find(m->st, name);
    if (!t) {
        fl_error("%s: tensor '%s' missing", fl_st_source(m->st), name);
        return NULL;
    }
    int64_t want[2] = {d0, d1};
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == want[i];
    if (!ok) {
        char got[128], exp[64];
        fl_st_shape_str(t->shape, t->ndim, ", ", got, sizeof got);
        fl_st_shape_str(want, ndim, ", ", exp, sizeof exp);
        fl_error("%s: tensor '%s' has shape %s, expected %s", t->file, name, got, exp);
        return NULL;
    }
    m->n_params += (size_t)t->numel;
    if (ndim == 2 && t->dtype != FL_DTYPE_BF16) m->non_bf16_matrices++;
    if (t->dtype == FL_DTYPE_F32 && ((uintptr_t)t->data % sizeof(float)) == 0)
        return (const float *)t->data;
    float *buf = fl_malloc(sizeof(float) * (size_t)t->numel);
    if (!buf) return NULL;
    fl_st_to_f32(t, buf);
    m->owned[m->n_owned++] = buf;
    return buf;
}

/* HF rotate-half frequencies, with LLaMA-3.1's piecewise rescaling when configured.
 * Computed in float as llama2.c does, so greedy outputs match it bit for bit. */
void fl_rope_inv_freq(const fl_config *c, float *inv_freq) {
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        float f = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)c->head_dim);
        if (c->rope_scaling == FL_ROPE_SCALING_LLAMA3) {
            double old_len = c->rope_original_max_pos;
            double low_wavelen = old_len / c->rope_low_freq_factor;
            double high_wavelen = old_len / c->rope_high_freq_factor;
            double wavelen = 2.0 * M_PI / f;
            if (wavelen > low_wavelen) {
                f = f / c->rope_factor;
            } else if (wavelen >= high_wavelen) {
                double smooth = (old_len / wavelen - c->rope_low_freq_factor) /
                                (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (float)((1.0 - smooth) * f / c->rope_factor + smooth * f);
            }
        }
        inv_freq[i] = f;
    }
}

static int load_layers(fl_model *m) {
    const fl_config *c = &m->cfg;
    char name[256];
#define T2(field, suffix, d0, d1)                                                     \
    snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix);                     \
    if (!(L->field = load_tensor(m, name, 2, d0, d1))) return -1;
#define T1(field, suffix, d0)                                                         \
    snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix);                     \
    if (!(L->field = load_tensor(m, name, 1, d0, 0))) return -1;
    for (int l = 0; l < c->n_layers; l++) {
        fl_layer_weights *L = &m->layers[l];
        T1(attn_norm, "input_layernorm.weight", c->dim);
        T2(wq.w, "self_attn.q_proj.weight", m->q_dim, c->dim);
        T2(wk.w, "self_attn.k_proj.weight", m->kv_dim, c->dim);
        T2(wv.w, "self_attn.v_proj.weight", m->kv_dim, c->dim);
        T2(wo.w, "self_attn.o_proj.weight", c->dim, m->q_dim);
        if (c->o_bias) {
            T1(bo, "self_attn.o_proj.bias", c->dim);
        }
        if (c->qkv_bias) {
            T1(bq, "self_attn.q_proj.bias", m->q_dim);
            T1(bk, "self_attn.k_proj.bias", m->kv_dim);
            T1(bv, "self_attn.v_proj.bias", m->kv_dim);
        }
        T1(ffn_norm, "post_attention_layernorm.weight", c->dim);
        T2(w_gate.w, "mlp.gate_proj.weight", c->hidden_dim, c->dim);
        T2(w_up.w, "mlp.up_proj.weight", c->hidden_dim, c->dim);
        T2(w_down.w, "mlp.down_proj.weight", c->dim, c->hidden_dim);
    }
#undef T1
#undef T2
    return 0;
}

static int load_weights(fl_model *m) {
    const fl_config *c = &m->cfg;
    int max_tensors = 3 + c->n_layers * 13;
    m->owned = fl_calloc((size_t)max_tensors, sizeof(float *));
    m->layers = fl_calloc((size_t)c->n_layers, sizeof(fl_layer_weights));
    m->inv_freq = fl_calloc((size_t)c->head_dim / 2, sizeof(float));
    if (!m->owned || !m->layers || !m->inv_freq) return -1;
    if (!(m->embed = load_tensor(m, "model.embed_tokens.weight", 2, c->vocab_size, c->dim)))
        return -1;
    if (load_layers(m) != 0) return -1;
    if (!(m->final_norm = load_tensor(m, "model.norm.weight", 1, c->dim, 0))) return -1;
    if (c->tie_embeddings && !fl_st_find(m->st, "lm_head.weight")) {
        m->lm_head.w = m->embed;
    } else if (!(m->lm_head.w = load_tensor(m, "lm_head.weight", 2, c->vocab_size, c->dim))) {
        return -1;
    }
    fl_rope_inv_freq(c, m->inv_freq);
    return 0;
}

/* Weak: NULL unless the program links the CUDA library (see fl_cuda_backend_api). */
extern const fl_cuda_backend_api *fl_cuda_backend(void) __attribute__((weak));

/* Picks the forward's device and, on cuda, uploads the weights. Asked for cuda, any reason
 * it cannot be is an error; on auto it is the message of the cpu choice. */
static int choose_device(fl_model *m, const fl_model_params *p) {
    const size_t cap = sizeof m->device_why;
    int asked = p->device == FL_DEVICE_CUDA;
    const char *how = asked ? "asked for" : "auto";
    if (p->device == FL_DEVICE_CPU) {
        snprintf(m->device_why, cap, "cpu: asked for");
        return 0;
    }
    const fl_cuda_backend_api *api = fl_cuda_backend ? fl_cuda_backend() : NULL;
    if (!api) {
        if (asked)
            return fl_error("device cuda: this program was built without the CUDA backend "
                            "(make CUDA=0, or libflexllm_cuda.a not linked)");
        snprintf(m->device_why, cap, "cpu: auto, built without CUDA");
        return 0;
    }
    char dev[192];
    if (api->probe(dev, sizeof dev) <= 0) {
        if (asked) return fl_error("device cuda: no usable CUDA device: %s", dev);
        snprintf(m->device_why, cap, "cpu: auto, built with CUDA but no usable device (%s)", dev);
        return 0;
    }
    int bf16 = p->device_weights == FL_DEVICE_WEIGHTS_BF16 ||
               (p->device_weights == FL_DEVICE_WEIGHTS_AUTO && m->non_bf16_matrices == 0);
    m->cuda_weights = api->weights_new(m, bf16 ? FL_CUDA_BF16 : FL_CUDA_F32);
    if (!m->cuda_weights) {
        if (asked) return fl_error_prefix("device cuda (%s)", dev);
        snprintf(m->device_why, cap, "cpu: auto, the weights did not go onto the device (%s): %s",
                 dev, fl_last_error());
        return 0;
    }
    m->cuda = api;
    snprintf(m->device_why, cap, "cuda: %s, %s, %s weights", dev, how, bf16 ? "bf16" : "fp32");
    return 0;
}

fl_device fl_model_device(const fl_model *m, const char **why) {
    if (why) *why = m->device_why;
    return m->cuda ? FL_DEVICE_CUDA : FL_DEVICE_CPU;
}

fl_model *fl_model_load(const char *dir, const fl_model_params *params) {
    fl_model_params p = params ? *params : fl_model_default_params();
    char path[4096];
    if (p.device < FL_DEVICE_AUTO || p.device > FL_DEVICE_CUDA) {
        fl_error("model params: device %d is not auto (0), cpu (1) or cuda (2)", (int)p.device);
        return NULL;
    }
    if (p.device_weights < FL_DEVICE_WEIGHTS_AUTO || p.device_weights > FL_DEVICE_WEIGHTS_F32) {
        fl_error("model params: device_weights %d is not auto (0), bf16 (1) or fp32 (2)",
                 (int)p.device_weights);
        return NULL;
    }
    fl_model *m = fl_calloc(1, sizeof *m);
    if (!m) return NULL;
    if (fl_path_join(path, sizeof path, dir, "config.json") != 0 ||
        fl_config_load(path, &m->cfg) != 0)
        goto fail;
    if (m->cfg.head_dim % 2 != 0 || m->cfg.head_dim > 1024) {
        fl_error("%s: head_dim %d must be even and at most 1024", path, m->cfg.head_dim);
        goto fail;
    }
    if (m->cfg.n_heads > FL_ATTN_MAX_HEADS) {
        fl_error("%s: num_attention_heads %d is more than the %d this engine supports", path,
                 m->cfg.n_heads, FL_ATTN_MAX_HEADS);
        goto fail;
    }
    m->q_dim = m->cfg.n_heads * m->cfg.head_dim;
    m->kv_dim = m->cfg.n_kv_heads * m->cfg.head_dim;
    if (!(m->tok = fl_tokenizer_load_dir(dir))) goto fail;
    if (!(m->st = fl_st_open(dir))) goto fail;
    int threads = p.n_threads > 0 ? p.n_threads : 1;
    openblas_set_num_threads(threads);
    omp_set_num_threads(threads);
    m->gemm = p.gemm;
    if (load_weights(m) != 0) goto fail;
    if (m->gemm == FL_GEMM_PACKED && pack_weights(m) != 0) goto fail;
    if (choose_device(m, &p) != 0) goto fail;
    return m;
fail:
    fl_model_free(m);
    return NULL;
}

void fl_model_free(fl_model *m) {
    if (!m) return;
    if (m->cuda_weights) m->cuda->weights_free(m->cuda_weights);
    free_packed(m);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    free(m->inv_freq);
    if (m->st) fl_st_close(m->st);
    if (m->tok) fl_tokenizer_free(m->tok);
    free(m);
}

const fl_config *fl_model_config(const fl_model *m) { return &m->cfg; }
const fl_tokenizer *fl_model_tokenizer(const fl_model *m) { return m->tok; }
size_t fl_model_n_params(const fl_model *m) { return m->n_params; }
