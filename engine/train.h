/* Training internals shared by the forward (context.c) and the backward (train.c). */
#ifndef FL_TRAIN_H
#define FL_TRAIN_H

#include "lora.h"
#include "model.h"

struct fl_train_sample {
    fl_adapter *adapter;
    fl_train_params p;
    fl_plan plan;
    int seq;            /* KV sequence */
    int n;              /* tokens */
    int32_t *tokens;    /* [n] */
    int32_t *labels;    /* [n] next-token targets, -1 for none */
    int n_labels;
    int forwarded;      /* positions done forward */
    int backwarded;     /* positions done backward, from the end */
    double loss_sum;    /* cross-entropy summed over label tokens forwarded so far */
    float *arena;       /* one block of arena_bytes: */
    float *saved;       /* [n_layers, n, plan.arena_floats] kept activations by position */
    float *dk_acc;      /* [n_layers, n, kv_dim] dK accumulators (post-RoPE) */
    float *dv_acc;      /* [n_layers, n, kv_dim] */
    float *dfinal;      /* [n, dim] loss gradient w.r.t. the last residual, from the forward */
    size_t arena_bytes;  /* the planner's figure: what the sample uses */
    size_t arena_cap;    /* the block's size (a reused block may be larger) */
};

/* Where activation a of layer l at position pos is kept. */
static inline float *fl_train_saved(const fl_train_sample *t, int l, int pos, fl_activation a) {
    return t->saved + ((size_t)l * t->n + pos) * t->plan.arena_floats + t->plan.offset[a];
}

/* Rows of a LoRA input as the adapter saw them in training: x times the dropout
 * mask of (layer, target, position). dst and x are [m, in]; pos [m]. */
void fl_lora_training_input(float *dst, const float *x, const fl_train_sample *t, int layer,
                            fl_lora_target target, const int32_t *pos, int m, int in);

/* A job's sample in flight, begun when there is none; NULL when the job has finished
 * (*rc 0: its adapter is written) or failed (*rc -1). */
fl_train_sample *fl_finetune_sample(fl_finetune *job, int *rc);
/* After positions of the job's sample ran (forward_tokens of them forward): checks the
 * loss once its forward is whole, and when its backward is done ends the sample, steps
 * the optimizer every grad_accum samples, checkpoints. 0, or -1 (the job stops). */
int fl_finetune_advance(fl_finetune *job, int forward_tokens);
/* Drops the sample in flight (its KV sequence and arena) and the gradient gathered since
 * the last optimizer step, for a job that stops: the adapter keeps that step's weights. */
void fl_finetune_abandon(fl_finetune *job);

/* Frees what the context keeps for training (spare arena, backward buffers). */
void fl_train_release(fl_context *ctx);

/* Fused loss of training rows at forward time: final norm, logits, cross-entropy,
 * and the gradient w.r.t. the last residual into t->dfinal. x [m, dim] holds the
 * rows' last residuals, pos [m] their positions. */
int fl_train_loss_rows(fl_context *ctx, fl_train_sample *t, const float *x, const int32_t *pos,
                       int m);

#endif
