/* The training graph planner. A decoder layer is a static table of ops; each op
 * names what its forward makes and what its backward reads (a frozen linear reads
 * nothing: dx = dy @ W; a LoRA linear also reads its input and u = x @ A^T). From
 * the LoRA targets, the planner collects what the backward reads and resolves it
 * through recomputation rules (cheap elementwise ones always, GEMM ones on request),
 * giving the tensors the training arena keeps per token and layer. */
#include "fl_internal.h"

#include <string.h>

typedef enum { SZ_ONE, SZ_DIM, SZ_QDIM, SZ_KVDIM, SZ_HEADS, SZ_HIDDEN, SZ_RANK, SZ_HEADS_SEQ } size_kind;

static const struct {
    const char *name;
    size_kind size;
} tensors[FL_ACT_N] = {
    [FL_ACT_X_IN] = {"x_in", SZ_DIM},       [FL_ACT_RMS1] = {"rms1", SZ_ONE},
    [FL_ACT_XN1] = {"xn1", SZ_DIM},         [FL_ACT_Q_PRE] = {"q_pre", SZ_QDIM},
    [FL_ACT_K_PRE] = {"k_pre", SZ_KVDIM},   [FL_ACT_Q] = {"q", SZ_QDIM},
    [FL_ACT_K] = {"k", SZ_KVDIM},           [FL_ACT_V] = {"v", SZ_KVDIM},
    [FL_ACT_PROBS] = {"probs", SZ_HEADS_SEQ}, [FL_ACT_ATT] = {"att", SZ_QDIM},
    [FL_ACT_LSE] = {"lse", SZ_HEADS},       [FL_ACT_O_OUT] = {"o_out", SZ_DIM},
    [FL_ACT_X_MID] = {"x_mid", SZ_DIM},     [FL_ACT_RMS2] = {"rms2", SZ_ONE},
    [FL_ACT_XN2] = {"xn2", SZ_DIM},         [FL_ACT_GATE] = {"gate", SZ_HIDDEN},
    [FL_ACT_UP] = {"up", SZ_HIDDEN},        [FL_ACT_H] = {"h", SZ_HIDDEN},
    [FL_ACT_DOWN_OUT] = {"down_out", SZ_DIM}, [FL_ACT_U_Q] = {"lora_u_q", SZ_RANK},
    [FL_ACT_U_K] = {"lora_u_k", SZ_RANK},   [FL_ACT_U_V] = {"lora_u_v", SZ_RANK},
    [FL_ACT_U_O] = {"lora_u_o", SZ_RANK},   [FL_ACT_U_GATE] = {"lora_u_gate", SZ_RANK},
    [FL_ACT_U_UP] = {"lora_u_up", SZ_RANK}, [FL_ACT_U_DOWN] = {"lora_u_down", SZ_RANK},
};

#define NONE (-1)
typedef struct {
    const char *name;
    int out[3];   /* tensors the forward makes (NONE-padded) */
    int needs[5]; /* tensors the frozen op's backward reads */
    int lora;     /* fl_lora_target, or NONE */
    int lora_in;  /* the LoRA's input */
} layer_op;

static const layer_op ops[] = {
    {"input_layernorm", {FL_ACT_XN1, FL_ACT_RMS1, NONE}, {FL_ACT_X_IN, FL_ACT_RMS1, NONE}, NONE, NONE},
    {"q_proj", {FL_ACT_Q_PRE, NONE, NONE}, {NONE}, FL_LORA_Q, FL_ACT_XN1},
    {"k_proj", {FL_ACT_K_PRE, NONE, NONE}, {NONE}, FL_LORA_K, FL_ACT_XN1},
    {"v_proj", {FL_ACT_V, NONE, NONE}, {NONE}, FL_LORA_V, FL_ACT_XN1},
    {"rope", {FL_ACT_Q, FL_ACT_K, NONE}, {NONE}, NONE, NONE},
    {"attention", {FL_ACT_PROBS, FL_ACT_ATT, FL_ACT_LSE},
     {FL_ACT_Q, FL_ACT_K, FL_ACT_V, FL_ACT_ATT, FL_ACT_LSE}, NONE, NONE},
    {"o_proj", {FL_ACT_O_OUT, NONE, NONE}, {NONE}, FL_LORA_O, FL_ACT_ATT},
    {"residual", {FL_ACT_X_MID, NONE, NONE}, {NONE}, NONE, NONE},
    {"post_attention_layernorm", {FL_ACT_XN2, FL_ACT_RMS2, NONE}, {FL_ACT_X_MID, FL_ACT_RMS2, NONE},
     NONE, NONE},
    {"gate_proj", {FL_ACT_GATE, NONE, NONE}, {NONE}, FL_LORA_GATE, FL_ACT_XN2},
    {"up_proj", {FL_ACT_UP, NONE, NONE}, {NONE}, FL_LORA_UP, FL_ACT_XN2},
    {"swiglu", {FL_ACT_H, NONE, NONE}, {FL_ACT_GATE, FL_ACT_UP, NONE}, NONE, NONE},
    {"down_proj", {FL_ACT_DOWN_OUT, NONE, NONE}, {NONE}, FL_LORA_DOWN, FL_ACT_H},
    {"residual", {FL_ACT_X_IN, NONE, NONE}, {NONE}, NONE, NONE}, /* the next layer's input */
};

/* Recomputation rules: a tensor rebuilt from others in backward. The elementwise
 * ones cost less than reading the tensor would; the GEMM ones are the remat choice. */
typedef struct {
    int target;
    int from[2];
    int gemm; /* 1: needs a GEMM, used only when asked for */
} rule;

static const rule rules[] = {
    {FL_ACT_XN1, {FL_ACT_X_IN, FL_ACT_RMS1}, 0},  /* x * rinv * w */
    {FL_ACT_XN2, {FL_ACT_X_MID, FL_ACT_RMS2}, 0},
    {FL_ACT_H, {FL_ACT_GATE, FL_ACT_UP}, 0},      /* silu(gate) * up */
    {FL_ACT_Q, {FL_ACT_XN1, NONE}, 1},            /* q_proj (+ LoRA) then RoPE */
    {FL_ACT_GATE, {FL_ACT_XN2, NONE}, 1},
    {FL_ACT_UP, {FL_ACT_XN2, NONE}, 1},
};

fl_plan_params fl_plan_default_params(void) {
    fl_plan_params p = {.targets = (1u << FL_LORA_Q) | (1u << FL_LORA_V), .rank = 8};
    return p;
}

const char *fl_activation_name(fl_activation a) {
    return a >= 0 && a < FL_ACT_N ? tensors[a].name : "?";
}

static size_t size_of(size_kind k, const fl_config *c, int rank, int seq_len) {
    switch (k) {
    case SZ_ONE: return 1;
    case SZ_DIM: return (size_t)c->dim;
    case SZ_QDIM: return (size_t)c->n_heads * c->head_dim;
    case SZ_KVDIM: return (size_t)c->n_kv_heads * c->head_dim;
    case SZ_HEADS: return (size_t)c->n_heads;
    case SZ_HIDDEN: return (size_t)c->hidden_dim;
    case SZ_RANK: return (size_t)rank;
    case SZ_HEADS_SEQ: return (size_t)c->n_heads * seq_len;
    }
    return 0;
}

static int rule_enabled(const rule *r, const fl_plan_params *p) {
    if (!r->gemm) return 1;
    if (r->target == FL_ACT_Q) return p->remat_q;
    return p->remat_gate_up;
}

int fl_plan_make(const fl_config *cfg, const fl_plan_params *p, int seq_len, fl_plan *plan) {
    if (p->rank < 1) return fl_error("plan: rank %d must be at least 1", p->rank);
    if (!p->targets || (p->targets & ~FL_LORA_ALL_LINEARS))
        return fl_error("plan: no valid LoRA target in mask 0x%x", p->targets);
    memset(plan, 0, sizeof *plan);
    int need[FL_ACT_N] = {0};
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        const layer_op *op = &ops[i];
        for (int j = 0; j < 3 && op->out[j] != NONE; j++) plan->produced[op->out[j]] = 1;
        for (int j = 0; j < 5 && op->needs[j] != NONE; j++) need[op->needs[j]] = 1;
        if (op->lora != NONE && (p->targets & (1u << op->lora))) {
            plan->produced[FL_ACT_U_Q + op->lora] = 1;
            need[FL_ACT_U_Q + op->lora] = 1;
            need[op->lora_in] = 1;
        }
    }
    for (int changed = 1; changed;) { /* replace rebuildable tensors by their sources */
        changed = 0;
        for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++) {
            const rule *r = &rules[i];
            if (!need[r->target] || !rule_enabled(r, p)) continue;
            need[r->target] = 0;
            for (int j = 0; j < 2 && r->from[j] != NONE; j++) need[r->from[j]] = 1;
            changed = 1;
        }
    }
    for (int a = 0; a < FL_ACT_N; a++) {
        plan->floats[a] = size_of(tensors[a].size, cfg, p->rank, seq_len);
        if (plan->produced[a]) plan->keep_all_floats += plan->floats[a];
        if (!need[a]) continue;
        if (a == FL_ACT_K || a == FL_ACT_V) {
            plan->in_pool[a] = 1;
            plan->pool_floats += plan->floats[a];
        } else {
            plan->kept[a] = 1;
            plan->offset[a] = plan->arena_floats;
            plan->arena_floats += plan->floats[a];
        }
    }
    plan->n_layers = cfg->n_layers;
    plan->workspace_floats = (size_t)cfg->n_layers * 2 * cfg->n_kv_heads * cfg->head_dim + cfg->dim;
    return 0;
}

size_t fl_plan_arena_bytes(const fl_plan *plan, int n) {
    return sizeof(float) * (size_t)n *
           ((size_t)plan->n_layers * plan->arena_floats + plan->workspace_floats);
}
