/* LoRA adapter internals: one flat parameter buffer (and a gradient buffer of the
 * same layout), so optimizers and checkpoints see plain arrays. */
#ifndef FL_LORA_H
#define FL_LORA_H

#include "flexllm.h"

typedef struct {
    float *A;     /* [rank, in], NULL when the target is off */
    float *B;     /* [out, rank] */
    float *dA;    /* gradients, same shapes */
    float *dB;
    int in, out;
} fl_lora_weight;

struct fl_adapter {
    fl_lora_params p;
    float scale;          /* alpha / rank */
    int n_layers;
    fl_lora_weight *w;    /* [n_layers * FL_LORA_N_TARGETS], index layer * FL_LORA_N_TARGETS + target */
    float *params;        /* [n_params]: every A then B, layer by layer, target by target */
    float *grads;         /* [n_params] */
    size_t n_params;
    uint64_t version;     /* unique in the process: new for each adapter and each change of
                             params (fl_adapter_changed), so a copy of the weights (a cuda
                             context's device slot) knows by one compare whether it is stale */
};

/* Call after writing an adapter's params (the optimizer step does): gives it a version no
 * adapter has had, so every copy of its old weights is stale. */
void fl_adapter_changed(fl_adapter *a);

static inline fl_lora_weight *fl_lora_at(const fl_adapter *a, int layer, fl_lora_target t) {
    fl_lora_weight *w = &a->w[layer * FL_LORA_N_TARGETS + t];
    return w->A ? w : NULL;
}

/* The dropout keep-mask scale for element i of token pos's LoRA input (0 or 1/(1-p)),
 * a pure hash of (seed, step, layer, target, pos, i) so backward recomputes it. */
float fl_lora_dropout(const fl_adapter *a, uint64_t step, int layer, fl_lora_target t, int pos,
                      int i);

#endif
