/* flexllm: co-serving LLM inference and LoRA finetuning. The public C API.
 *
 * Conventions: opaque handles; *_params structs come from *_default_params();
 * fallible functions return NULL or a negative value and leave a message that
 * says what is wrong and where (file, field, tensor) in fl_last_error(). */
#ifndef FLEXLLM_H
#define FLEXLLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FL_VERSION "0.1.0"
#define FL_KV_PAGE_TOKENS 16 /* tokens per KV cache page */
#define FL_MAX_EOS 8

/* The message of the last failed call on this thread ("" when none). */
const char *fl_last_error(void);

/* ---------------------------------------------------------------- config */

typedef enum { FL_ARCH_LLAMA = 1, FL_ARCH_QWEN2 = 2 } fl_arch;
typedef enum { FL_ROPE_SCALING_NONE = 0, FL_ROPE_SCALING_LLAMA3 = 1 } fl_rope_scaling;

typedef struct {
    fl_arch arch;
    int dim;          /* hidden_size */
    int hidden_dim;   /* intermediate_size */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;     /* head_dim, or hidden_size / num_attention_heads */
    int vocab_size;
    int max_seq_len;  /* max_position_embeddings */
    float norm_eps;
    float rope_theta;
    int tie_embeddings; /* lm_head is embed_tokens */
    int qkv_bias;       /* q/k/v projections carry a bias (Qwen2, LLaMA attention_bias) */
    int o_bias;         /* o_proj carries a bias (LLaMA attention_bias) */
    fl_rope_scaling rope_scaling;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_pos;
    int bos_id;                 /* -1 when config.json names none */
    int eos_ids[FL_MAX_EOS];
    int n_eos;
} fl_config;

/* Reads a Hugging Face config.json. Returns 0, or -1 with the file and field named. */
int fl_config_load(const char *path, fl_config *cfg);

/* ------------------------------------------------------------- tokenizer */

typedef struct fl_tokenizer fl_tokenizer;

/* Loads tokenizer.json from a model folder, with BOS/EOS and add_bos from
 * tokenizer_config.json and config.json when present. */
fl_tokenizer *fl_tokenizer_load_dir(const char *dir);
/* Loads one tokenizer.json (BOS/EOS then come from its added tokens only). */
fl_tokenizer *fl_tokenizer_load(const char *tokenizer_json_path);
void fl_tokenizer_free(fl_tokenizer *tok);

int fl_tokenizer_n_vocab(const fl_tokenizer *tok);
int fl_tokenizer_bos(const fl_tokenizer *tok);      /* -1 if none */
int fl_tokenizer_eos(const fl_tokenizer *tok);      /* -1 if none */
int fl_tokenizer_is_eos(const fl_tokenizer *tok, int32_t id);
int fl_tokenizer_add_bos(const fl_tokenizer *tok);  /* tokenizer_config's add_bos_token */
int fl_tokenizer_is_special(const fl_tokenizer *tok, int32_t id);
/* The token's string as stored in the vocabulary (NULL when out of range). */
const char *fl_tokenizer_token_text(const fl_tokenizer *tok, int32_t id);
/* Id of an exact vocabulary or added-token string, or -1. */
int32_t fl_tokenizer_token_id(const fl_tokenizer *tok, const char *text);

/* Encodes len bytes of text. add_bos prepends BOS (if the tokenizer has one);
 * parse_special matches added/special tokens in the text. Returns the number
 * of ids, or -(needed) when cap is too small, or INT32_MIN on error. */
int fl_tokenize(const fl_tokenizer *tok, const char *text, size_t len, int add_bos,
                int parse_special, int32_t *ids, int cap);

/* Streaming decode: bytes come out only as complete UTF-8 sequences, so a
 * character split across tokens appears once all its bytes are in. */
typedef struct {
    uint8_t pending[8]; /* bytes of an incomplete UTF-8 sequence */
    int n_pending;
    int n_decoded;      /* tokens decoded so far (for leading-space stripping) */
    int skip_special;   /* special tokens decode to nothing */
} fl_detok_state;
void fl_detok_init(fl_detok_state *st, int skip_special);
/* Appends the text of one token to out. Returns bytes written, or -(needed) when cap is too small. */
int fl_detok_piece(const fl_tokenizer *tok, fl_detok_state *st, int32_t id, char *out, int cap);
/* Writes what is left pending (invalid UTF-8 becomes U+FFFD). Returns bytes written. */
int fl_detok_flush(const fl_tokenizer *tok, fl_detok_state *st, char *out, int cap);
/* Decodes a whole id list; returns bytes written (not NUL-terminated), or -(needed). */
int fl_detokenize(const fl_tokenizer *tok, const int32_t *ids, int n, int skip_special,
                  char *out, int cap);

/* ----------------------------------------------------------------- model */

typedef struct fl_model fl_model;

typedef enum {
    FL_GEMM_PACKED = 0,   /* weights packed once at load, batch-invariant kernel (default) */
    FL_GEMM_OPENBLAS = 1, /* OpenBLAS sgemm on the weights as stored */
} fl_gemm;

/* Where inference forwards run. */
typedef enum {
    FL_DEVICE_AUTO = 0, /* cuda when built with CUDA and a usable device is present, else cpu */
    FL_DEVICE_CPU = 1,
    FL_DEVICE_CUDA = 2, /* loading fails when there is no usable device */
} fl_device;

/* The device's copy of the linear weights and the embedding. */
typedef enum {
    FL_DEVICE_WEIGHTS_AUTO = 0, /* bf16 when the checkpoint's matrices all are bf16, else fp32 */
    FL_DEVICE_WEIGHTS_BF16 = 1,
    FL_DEVICE_WEIGHTS_F32 = 2,
} fl_device_weights;

typedef struct {
    int n_threads; /* CPU threads for GEMMs and kernels (default 2) */
    fl_gemm gemm;
    fl_device device; /* default FL_DEVICE_AUTO. On cuda the weights are uploaded at load;
                         contexts keep their KV pool on the device and run inference rows
                         there, finetuning rows (and their sequences' KV) on the CPU. */
    fl_device_weights device_weights;
} fl_model_params;

fl_model_params fl_model_default_params(void);
/* Loads a Hugging Face model folder: config.json, model.safetensors or the
 * shards of model.safetensors.index.json, tokenizer.json. Every header and
 * tensor shape is validated before any weight is read. */
fl_model *fl_model_load(const char *dir, const fl_model_params *params);
void fl_model_free(fl_model *model);
const fl_config *fl_model_config(const fl_model *model);
const fl_tokenizer *fl_model_tokenizer(const fl_model *model);
size_t fl_model_n_params(const fl_model *model);
/* The device the model's forwards run on (FL_DEVICE_CPU or FL_DEVICE_CUDA); why, when not
 * NULL, gets how it was chosen ("cuda: NVIDIA H100 ..., asked for, bf16 weights", "cpu:
 * auto, built without CUDA", ...), valid while the model lives. */
fl_device fl_model_device(const fl_model *model, const char **why);

typedef struct {
    int seed;
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len;
} fl_init_model_params;
fl_init_model_params fl_init_model_default_params(void);
/* Writes a seeded random LLaMA with a byte-level BPE tokenizer, in the HF
 * layout, to dir (created if missing). */
int fl_init_model(const char *dir, const fl_init_model_params *params);

/* --------------------------------------------------------------- context */

typedef struct fl_context fl_context;

typedef struct {
    int kv_pages;         /* pages of FL_KV_PAGE_TOKENS tokens in the pool */
    int max_batch_tokens; /* most tokens in one forward */
    int max_seqs;         /* most live sequences */
} fl_context_params;

fl_context_params fl_context_default_params(void);
fl_context *fl_context_new(const fl_model *model, const fl_context_params *params);
void fl_context_free(fl_context *ctx);

/* A new empty sequence, or -1 when max_seqs are live. */
int fl_seq_new(fl_context *ctx);
/* Ends a sequence and returns its pages to the pool. */
int fl_seq_free(fl_context *ctx, int seq);
int fl_seq_len(const fl_context *ctx, int seq);
const fl_model *fl_context_model(const fl_context *ctx);
int fl_context_max_batch_tokens(const fl_context *ctx);
int fl_kv_pages_total(const fl_context *ctx);
int fl_seqs_free(const fl_context *ctx); /* sequence slots not live */
int fl_kv_pages_free(const fl_context *ctx);

/* One forward over tokens of many sequences. Each sequence's tokens appear in
 * order at consecutive positions starting at its current length. */
typedef struct fl_adapter fl_adapter;

typedef struct {
    int n_tokens;
    const int32_t *token; /* [n_tokens] */
    const int32_t *seq;   /* [n_tokens] */
    const int32_t *pos;   /* [n_tokens] */
    const int8_t *logits; /* [n_tokens] nonzero: write this token's logits (NULL: last token only) */
    const fl_adapter *const *adapter; /* [n_tokens] LoRA of each token, NULL entries for none
                                         (NULL: none); a finetuning sample's tokens use its own */
} fl_batch;

/* Runs the batch. logits receives [n_out, vocab] rows, one per marked token, in
 * batch order. Returns n_out, or -1 (nothing changed) on an invalid batch or
 * when the KV pool lacks pages. */
int fl_forward(fl_context *ctx, const fl_batch *batch, float *logits);

/* -------------------------------------------------------------- sampling */

typedef struct {
    float temperature; /* 0: greedy */
    int top_k;         /* 0: off */
    float top_p;       /* 1: off */
    uint64_t seed;
} fl_sampling_params;

fl_sampling_params fl_sampling_default_params(void);
typedef struct fl_sampler fl_sampler;
fl_sampler *fl_sampler_new(const fl_sampling_params *params, int n_vocab);
void fl_sampler_free(fl_sampler *s);
int32_t fl_sampler_sample(fl_sampler *s, const float *logits);

/* ------------------------------------------------------------ generation */

typedef enum { FL_FINISH_NONE = 0, FL_FINISH_LENGTH, FL_FINISH_EOS, FL_FINISH_STOP } fl_finish;

typedef struct {
    int max_tokens;
    const fl_adapter *adapter; /* LoRA to generate with, or NULL */
    fl_sampling_params sampling;
    const char *const *stop; /* stop strings (copied) */
    int n_stop;
    int ignore_eos;
    float ttft_slo, tpot_slo; /* seconds, this request's SLO (runtime); 0: the runtime's rule */
} fl_request_params;

fl_request_params fl_request_default_params(void);

typedef struct {
    int prefill_chunk;    /* most prompt tokens of one request per step */
} fl_generator_params;

fl_generator_params fl_generator_default_params(void);

typedef struct {
    int request;
    int32_t token;      /* the token sampled (an EOS finish carries the EOS token) */
    const char *text;   /* new text, valid until the next step */
    int text_len;
    fl_finish finish;   /* FL_FINISH_NONE while the request runs */
    /* Valid when finish is set: seconds on the runtime's clock from arrival to the first
     * token, and per later token; whether they met the request's SLO (1 without one). */
    double ttft, tpot;
    int slo_met;
} fl_gen_event;

typedef struct fl_generator fl_generator;

fl_generator *fl_generator_new(fl_context *ctx, const fl_generator_params *params);
void fl_generator_free(fl_generator *g);
/* Queues a request; returns its id, or -1. */
int fl_generator_add(fl_generator *g, const int32_t *prompt, int n_prompt,
                     const fl_request_params *params);
/* Runs one iteration: decode tokens of running requests and prefill chunks,
 * in one forward. Returns the number of events, or -1 on error. */
int fl_generator_step(fl_generator *g, const fl_gen_event **events);
/* Requests queued or running. */
int fl_generator_active(const fl_generator *g);

/* ------------------------------------------------------------------ LoRA */

typedef enum {
    FL_LORA_Q = 0, FL_LORA_K, FL_LORA_V, FL_LORA_O, FL_LORA_GATE, FL_LORA_UP, FL_LORA_DOWN,
    FL_LORA_N_TARGETS
} fl_lora_target;
#define FL_LORA_ALL_LINEARS ((1u << FL_LORA_N_TARGETS) - 1)

typedef struct {
    int rank;
    float alpha;       /* scale = alpha / rank, applied at run time, never folded into B */
    unsigned targets;  /* bit (1u << fl_lora_target) per target */
    float dropout;     /* on the LoRA input while training, 0 = off */
    uint64_t seed;     /* A's initialisation and the dropout masks */
} fl_lora_params;

fl_lora_params fl_lora_default_params(void); /* rank 8, alpha 16, targets q|v, no dropout */
/* Parses "q,v" / "all" into a target mask; -1 (with the bad name in the error) otherwise. */
int fl_lora_parse_targets(const char *list, unsigned *targets);
const char *fl_lora_target_name(fl_lora_target t); /* "q_proj", ..., "down_proj" */

/* A new adapter initialised as PEFT does: A kaiming-uniform (bound 1/sqrt(in)), B zero. */
fl_adapter *fl_adapter_new(const fl_model *model, const fl_lora_params *params);
/* Loads a PEFT adapter folder (adapter_config.json, adapter_model.safetensors), checking
 * that its targets, rank and shapes fit the model. */
fl_adapter *fl_adapter_load(const fl_model *model, const char *dir);
/* Writes dir/adapter_config.json and dir/adapter_model.safetensors atomically (PEFT names). */
int fl_adapter_save(const fl_adapter *a, const char *dir, const char *base_model_name);
void fl_adapter_free(fl_adapter *a);
const fl_lora_params *fl_adapter_params(const fl_adapter *a);
size_t fl_adapter_n_params(const fl_adapter *a);

/* ------------------------------------------------- the training graph plan */

/* Per-token, per-layer tensors of a decoder layer's forward. */
typedef enum {
    FL_ACT_X_IN,     /* [dim] residual entering the layer */
    FL_ACT_RMS1,     /* [1] 1/rms of the attention norm */
    FL_ACT_XN1,      /* [dim] normed input of q/k/v */
    FL_ACT_Q_PRE,    /* [q_dim] q before RoPE */
    FL_ACT_K_PRE,    /* [kv_dim] k before RoPE */
    FL_ACT_Q,        /* [q_dim] q after RoPE */
    FL_ACT_K,        /* [kv_dim] k after RoPE (in the KV pool) */
    FL_ACT_V,        /* [kv_dim] (in the KV pool) */
    FL_ACT_PROBS,    /* [n_heads * seq] attention probabilities, as eager attention keeps them */
    FL_ACT_ATT,      /* [q_dim] attention output */
    FL_ACT_LSE,      /* [n_heads] log-sum-exp of the scores */
    FL_ACT_O_OUT,    /* [dim] o_proj output */
    FL_ACT_X_MID,    /* [dim] residual after attention */
    FL_ACT_RMS2,     /* [1] */
    FL_ACT_XN2,      /* [dim] normed input of gate/up */
    FL_ACT_GATE,     /* [hidden] */
    FL_ACT_UP,       /* [hidden] */
    FL_ACT_H,        /* [hidden] silu(gate) * up */
    FL_ACT_DOWN_OUT, /* [dim] */
    FL_ACT_U_Q,      /* [rank] LoRA intermediates x @ A^T, one per target, in target order */
    FL_ACT_U_K, FL_ACT_U_V, FL_ACT_U_O, FL_ACT_U_GATE, FL_ACT_U_UP, FL_ACT_U_DOWN,
    FL_ACT_N
} fl_activation;

typedef struct {
    unsigned targets;   /* LoRA targets (fl_lora_target bits) */
    int rank;
    int remat_q;        /* recompute Q in backward instead of keeping it */
    int remat_gate_up;  /* recompute gate/up in backward instead of keeping them */
} fl_plan_params;

typedef struct {
    int kept[FL_ACT_N];        /* kept in the training arena (K and V live in the KV pool) */
    int in_pool[FL_ACT_N];     /* kept in the KV pool */
    int produced[FL_ACT_N];    /* made by the forward (what keep-everything keeps) */
    size_t floats[FL_ACT_N];   /* floats per token and layer (PROBS: for seq_len) */
    size_t offset[FL_ACT_N];   /* offset of a kept tensor in a token's arena record */
    size_t arena_floats;       /* kept floats per token and layer */
    size_t pool_floats;        /* K and V floats per token and layer */
    size_t keep_all_floats;    /* everything produced, per token and layer */
    size_t workspace_floats;   /* per token: dK/dV accumulators of every layer + the final-hidden gradient */
    int n_layers;
} fl_plan;

fl_plan_params fl_plan_default_params(void);
/* Derives the plan for a model shape: which tensors each op's backward needs given
 * the LoRA targets, resolved through cheap recomputation rules. seq_len only sizes
 * PROBS in the keep-everything figure. */
int fl_plan_make(const fl_config *cfg, const fl_plan_params *params, int seq_len, fl_plan *plan);
const char *fl_activation_name(fl_activation a);
/* Bytes of the training arena for a sample of n tokens (saved activations + workspace). */
size_t fl_plan_arena_bytes(const fl_plan *plan, int n);

/* -------------------------------------------------------------- datasets */

typedef struct {
    int max_len;       /* tokens per sample; longer texts are split, chat/prompt samples cut */
    int add_bos;       /* -1: as the tokenizer says */
} fl_dataset_params;

fl_dataset_params fl_dataset_default_params(void);

typedef struct {
    const int32_t *tokens;  /* [n] */
    const int32_t *labels;  /* [n]: the token to predict after position i, or -1 (no loss) */
    int n;
} fl_sample;

typedef struct fl_dataset fl_dataset;

/* Plain text (split into samples of max_len) or JSONL (.jsonl) with per line either
 * "text", or "prompt" + "completion" (loss on the completion), or OpenAI chat
 * "messages" (loss on assistant turns). Errors name the file and line. */
fl_dataset *fl_dataset_load(const char *path, const fl_tokenizer *tok,
                            const fl_dataset_params *params);
void fl_dataset_free(fl_dataset *ds);
int fl_dataset_count(const fl_dataset *ds);
const fl_sample *fl_dataset_get(const fl_dataset *ds, int i);
/* order[count]: the sample order of an epoch, a seeded shuffle (same seed and epoch, same order). */
void fl_dataset_order(const fl_dataset *ds, uint64_t seed, int epoch, int *order);

/* ------------------------------------------------------ training samples
 * A finetuning sample runs token by token: its forward in chunks, each inside any
 * fl_forward batch (tokens of its sequence are recognised as training tokens), and
 * its backward in reverse chunks. Gradients add up in the adapter. */

typedef struct {
    int remat_q;          /* recompute Q in backward instead of keeping it */
    int remat_gate_up;    /* recompute gate/up in backward */
    uint64_t dropout_step; /* varies the LoRA dropout masks between optimizer steps */
} fl_train_params;

fl_train_params fl_train_default_params(void);

typedef struct fl_train_sample fl_train_sample;

/* Starts a sample: a KV sequence and the arena the plan sizes. The sample's tokens
 * and labels are copied. */
fl_train_sample *fl_train_begin(fl_context *ctx, fl_adapter *adapter, const fl_sample *sample,
                                const fl_train_params *params);
/* Frees the arena and returns the KV pages (any time, e.g. to cancel). */
void fl_train_end(fl_context *ctx, fl_train_sample *t);
int fl_train_seq(const fl_train_sample *t);           /* its KV sequence */
int fl_train_length(const fl_train_sample *t);        /* tokens */
int fl_train_forwarded(const fl_train_sample *t);     /* positions through the forward */
int fl_train_backward_left(const fl_train_sample *t); /* positions still to go backward */
const int32_t *fl_train_tokens(const fl_train_sample *t);
/* Runs the next up to max_tokens positions forward, alone in one fl_forward. */
int fl_train_forward(fl_context *ctx, fl_train_sample *t, int max_tokens);
/* Runs the last up to max_tokens positions not yet done backward, through every layer;
 * the forward must be complete. Returns the positions done, or -1. */
int fl_train_backward(fl_context *ctx, fl_train_sample *t, int max_tokens);
/* Mean cross-entropy over the sample's label tokens (complete once forwarded). */
double fl_train_loss(const fl_train_sample *t);
size_t fl_train_arena_bytes(const fl_train_sample *t);
/* Test hook: overwrite every forward scratch buffer with NaN after each fl_forward,
 * so a backward that read anything the plan did not keep would turn NaN. */
void fl_context_poison_scratch(fl_context *ctx, int on);

/* ------------------------------------------------------------ optimizers */

typedef enum { FL_OPT_ADAMW = 0, FL_OPT_SGD = 1 } fl_optimizer_kind;
typedef enum { FL_SCHEDULE_CONSTANT = 0, FL_SCHEDULE_COSINE = 1 } fl_schedule;

typedef struct {
    fl_optimizer_kind kind;
    float lr;
    float beta1, beta2, eps, weight_decay; /* AdamW (decoupled weight decay) */
    float momentum;                        /* SGD */
    float clip_norm;                       /* 0: no clipping */
    int warmup_steps;                      /* linear from 0 */
    int total_steps;                       /* for the cosine schedule */
    fl_schedule schedule;
    float min_lr_ratio;                    /* cosine floor as a fraction of lr */
} fl_optim_params;

fl_optim_params fl_optim_default_params(void); /* AdamW lr 2e-4, betas .9/.999, eps 1e-8, wd 0 */

typedef struct fl_optimizer fl_optimizer;

fl_optimizer *fl_optimizer_new(size_t n_params, const fl_optim_params *params);
void fl_optimizer_free(fl_optimizer *opt);
/* One update: grads hold the sum over n_accumulated samples (their mean is used), are
 * clipped to clip_norm, applied to params, then zeroed. Returns the gradient norm
 * before clipping, or -1 when it is not finite (params untouched). */
float fl_optimizer_step(fl_optimizer *opt, float *params, float *grads, int n_accumulated);
float fl_optimizer_lr(const fl_optimizer *opt); /* the rate the next step uses */
int fl_optimizer_steps(const fl_optimizer *opt);
/* State for checkpoints: step count, then the moment buffers. */
int fl_optimizer_save(const fl_optimizer *opt, const char *path);
int fl_optimizer_load(fl_optimizer *opt, const char *path);

/* ----------------------------------------------------------- finetuning jobs
 * A job trains one adapter on a dataset, token by token: each fl_finetune_step runs
 * up to a budget of forward or backward positions of its current sample, steps the
 * optimizer every grad_accum samples, and checkpoints every checkpoint_every steps. */

typedef struct {
    const char *data;         /* dataset file (see fl_dataset_load) */
    const char *out;          /* output folder: adapter, checkpoints */
    const char *base_model_name; /* recorded in adapter_config.json */
    fl_lora_params lora;
    fl_optim_params optim;
    fl_dataset_params dataset;
    fl_train_params train;    /* remat choices (dropout_step is the job's) */
    int epochs;
    int grad_accum;           /* samples per optimizer step (their mean) */
    int chunk;                /* most positions per forward or backward piece */
    uint64_t seed;            /* shuffling, adapter init */
    int checkpoint_every;     /* optimizer steps; 0: only at the end */
    int max_steps;            /* 0: every epoch to the end */
    int resume;               /* continue from out/checkpoint.json when present */
} fl_finetune_params;

fl_finetune_params fl_finetune_default_params(void);

typedef struct {
    int step, total_steps, epoch, epochs;
    int samples_done;          /* samples through forward and backward */
    double loss;               /* mean loss of the last optimizer step's samples */
    float lr, grad_norm;
    long long tokens;          /* forward positions of finetuning, in total */
    int done;
} fl_finetune_progress;

typedef struct fl_finetune fl_finetune;

/* Loads the dataset (a bad line fails here, naming file and line), makes the adapter
 * (or restores it, the optimizer and the position from the last checkpoint). */
fl_finetune *fl_finetune_new(fl_context *ctx, const fl_finetune_params *params);
void fl_finetune_free(fl_finetune *job);
/* Runs up to max_tokens positions. Returns 1 while work remains, 0 when done (the
 * final adapter written to out), -1 on error (a NaN/inf loss or gradient stops the
 * job; the last checkpoint stays as it was). */
int fl_finetune_step(fl_finetune *job, int max_tokens);
void fl_finetune_get_progress(const fl_finetune *job, fl_finetune_progress *p);
fl_adapter *fl_finetune_adapter(fl_finetune *job);
/* Writes a checkpoint now (adapter, optimizer, position), atomically. */
int fl_finetune_checkpoint(fl_finetune *job);

/* Mean loss of samples [first, first+count) of a dataset with an adapter (or none). */
double fl_evaluate(fl_context *ctx, fl_adapter *adapter, const fl_dataset *ds, int first,
                   int count);

/* ---------------------------------------------------------------- runtime
 * Co-serving: inference requests and finetuning jobs share every iteration. Before
 * each one the runtime fills the scheduling state (fl_sched.h), asks the policy (a
 * LuaJIT file; none: the built-in first-come-first-served plan) for a plan, checks it
 * (an invalid plan or a failing policy falls back to the built-in plan), and runs it as
 * one fused forward plus the planned backward chunks.
 * KV pages: a request is admitted when the pool can hold its prompt and first token,
 * and takes a page at a time as it decodes; when a decode needs a page and none is
 * free, the running request admitted last is preempted: its pages return and it waits
 * again, to recompute its prompt and the tokens it generated when readmitted, then go
 * on exactly where it stopped (no event twice). A finetuning sample reserves its whole
 * length when it begins. */

typedef struct {
    const char *policy;        /* policy file, or NULL for the built-in plan */
    const char *policy_options; /* Lua source of a table the policy gets as ctx.options */
    float ttft_slo, tpot_slo;  /* seconds; 0: no rule */
    int prefill_chunk;         /* the built-in plan's most prompt tokens per request per iteration */
    double policy_time_budget; /* seconds per policy call */
    size_t policy_mem_limit;   /* bytes of the policy's Lua state */
    int policy_max_failures;   /* consecutive failures before it is disabled */
} fl_runtime_params;

fl_runtime_params fl_runtime_default_params(void);

typedef struct {
    long long iterations;
    long long policy_calls, policy_failures, fallback_iterations;
    int policy_disabled;
    const char *policy_error;   /* the last failure with its traceback ("" if none) */
    double policy_seconds;      /* total time in policy calls */
    double busy_seconds;        /* total time in iterations */
    long long requests_done, requests_slo_met; /* finished requests (cancelled ones not) */
    long long requests_cancelled;
    long long preemptions;      /* requests preempted for KV pages (and recomputed) */
    long long ft_forward_tokens, ft_backward_tokens;
    int reloads;
} fl_runtime_stats;

typedef struct fl_runtime fl_runtime;

fl_runtime *fl_runtime_new(fl_context *ctx, const fl_runtime_params *params);
void fl_runtime_free(fl_runtime *rt);
/* Queues a request; its id, or -1. */
int fl_runtime_submit(fl_runtime *rt, const int32_t *prompt, int n_prompt,
                      const fl_request_params *params);
/* Adds a finetuning job, which the runtime then owns; its id, or -1. */
int fl_runtime_add_job(fl_runtime *rt, fl_finetune *job);
/* One iteration. Returns the number of events (see fl_generator_step), or -1. */
int fl_runtime_step(fl_runtime *rt, const fl_gen_event **events);
/* Requests queued or running plus jobs not finished. */
int fl_runtime_active(const fl_runtime *rt);
/* Loads a new policy file: it must load and give a valid plan on a copy of the live
 * state; then it replaces the current one, receiving its export_state(). On any
 * failure the current policy stays and -1 is returned with the reason. */
int fl_runtime_reload(fl_runtime *rt, const char *path);
/* Reloads the policy file when it has changed: its modification time moved and, once it
 * has stayed put for debounce seconds, its content hash differs; or when SIGHUP arrived
 * (see fl_runtime_watch_sighup). Call between iterations. 1 reloaded, 0 nothing to do,
 * -1 the reload failed (the current policy stays; the error says why). */
int fl_runtime_poll_reload(fl_runtime *rt, double debounce);
/* Installs a SIGHUP handler that asks every runtime to reload at its next poll. */
void fl_runtime_watch_sighup(void);
void fl_runtime_get_stats(const fl_runtime *rt, fl_runtime_stats *stats);
/* A job's error when it failed ("" while fine), by job id. */
const char *fl_runtime_job_error(const fl_runtime *rt, int job);
/* 1 when the job has finished or failed (or was cancelled), 0 while it runs, -1 for an
 * unknown id. */
int fl_runtime_job_done(const fl_runtime *rt, int job);
/* Ends a queued or running request at once: its KV pages and sequence return, it emits
 * no further event and counts in requests_cancelled, not in the SLO figures. 0, or -1
 * when no such request is queued or running. */
int fl_runtime_cancel(fl_runtime *rt, int id);
/* Stops a finetuning job at once: its sample in flight is dropped (its pages return)
 * with the gradient gathered since the last optimizer step, so the adapter keeps the
 * weights of that step and stays usable; the job is done with the error "cancelled".
 * 0, or -1 for an unknown or already finished job. */
int fl_runtime_cancel_job(fl_runtime *rt, int job);

/* -------------------------------------------------------------------- sim
 * The simulated executor: the same scheduling state, policies and fallback, no math.
 * Iterations take the time a cost profile predicts, on a virtual clock, so policies
 * can be evaluated at 8B scale and 20 req/s on a laptop. Deterministic. */

typedef struct {
    char name[128];
    int analytic;              /* derived from FLOPs and bandwidth rather than measured */
    double fixed;              /* seconds per iteration */
    double per_token[4];       /* prefill, decode, finetuning forward, finetuning backward */
    double per_context;        /* seconds per context token a decode attends to */
    double per_backward_chunk; /* seconds per job running backward tokens; optional, 0 */
    int max_batch_tokens;
    int kv_pages;              /* of FL_KV_PAGE_TOKENS tokens */
    int max_seqs;
} fl_sim_profile;

/* Reads a profile JSON; errors name the file and field. */
int fl_sim_profile_load(const char *path, fl_sim_profile *profile);

typedef struct fl_sim fl_sim;

typedef struct {
    long long requests_done, requests_slo_met;
    double ttft_p50, ttft_p99, tpot_p50, tpot_p99;  /* seconds */
    long long ft_forward_tokens, ft_backward_tokens;
    double clock;               /* virtual seconds simulated */
    long long iterations, policy_failures;
} fl_sim_stats;

/* policy: a policy file, or NULL for the built-in plan; options: Lua source of a table
 * the policy gets as ctx.options, or NULL. A policy call may take up to a second of wall
 * time (the runtime's budget is milliseconds): the clock is virtual, so a loaded machine
 * does not make calls fail and runs differ. */
fl_sim *fl_sim_new(const fl_sim_profile *profile, const char *policy, const char *options,
                   float ttft_slo, float tpot_slo);
void fl_sim_free(fl_sim *sim);
/* A request arriving at a virtual time with its prompt and output lengths (output is
 * generated to the end, as FlexLLM's evaluation does). */
int fl_sim_submit(fl_sim *sim, double arrival, int prompt_len, int output_len);
/* A finetuning job over samples of the given lengths (copied), stepping every grad_accum. */
int fl_sim_add_job(fl_sim *sim, const int *sample_lens, int n_samples, int epochs,
                   int grad_accum);
/* Runs until every request is done and every job finished, or the clock passes until. */
int fl_sim_run(fl_sim *sim, double until);
void fl_sim_get_stats(const fl_sim *sim, fl_sim_stats *stats);

#ifdef __cplusplus
}
#endif
#endif
