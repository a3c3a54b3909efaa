/* Finetuning jobs: samples in a seeded order, each run token by token (forward
 * chunks, then backward chunks), gradient accumulation, optimizer steps, and
 * checkpoints that a restarted job continues from, bit for bit. */
#include "train.h"
#include "fl_internal.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct fl_finetune {
    fl_context *ctx;
    fl_finetune_params p;
    char *data, *out, *base_name;  /* owned copies of the params' strings */
    fl_dataset *ds;
    fl_adapter *adapter;
    fl_optimizer *opt;
    int *order;                    /* [count] this epoch's sample order */
    int count;
    fl_train_sample *cur;
    int epoch, epoch_pos;          /* next sample: order[epoch_pos] of epoch */
    int in_accum;                  /* samples in the gradient since the last step */
    double accum_loss;
    fl_finetune_progress prog;
    int last_checkpoint;           /* step of the last checkpoint, -1 none */
};

fl_finetune_params fl_finetune_default_params(void) {
    fl_finetune_params p = {.lora = fl_lora_default_params(), .optim = fl_optim_default_params(),
                            .dataset = fl_dataset_default_params(),
                            .train = fl_train_default_params(), .epochs = 1, .grad_accum = 1,
                            .chunk = 128, .checkpoint_every = 0};
    return p;
}


static char *dup_or_null(const char *s) { return s ? fl_strdup(s) : NULL; }

/* ------------------------------------------------------------ checkpoints */

static int write_state(const fl_finetune *j, const char *path) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "step", j->prog.step);
    cJSON_AddNumberToObject(o, "epoch", j->epoch);
    cJSON_AddNumberToObject(o, "epoch_pos", j->epoch_pos);
    cJSON_AddNumberToObject(o, "samples_done", j->prog.samples_done);
    cJSON_AddNumberToObject(o, "tokens", (double)j->prog.tokens);
    cJSON_AddNumberToObject(o, "loss", j->prog.loss);
    cJSON_AddNumberToObject(o, "seed", (double)j->p.seed);
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    int rc = text ? fl_write_file_atomic(path, text, strlen(text)) : fl_error("out of memory");
    free(text);
    return rc;
}

/* Removes checkpoint-N folders other than keep (files inside, then the folder). */
static void remove_old_checkpoints(const char *out, const char *keep) {
    DIR *d = opendir(out);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "checkpoint-", 11) != 0 || strcmp(e->d_name, keep) == 0) continue;
        char dir[4096], f[4200];
        snprintf(dir, sizeof dir, "%s/%s", out, e->d_name);
        const char *files[] = {"adapter_config.json", "adapter_model.safetensors",
                               "optimizer.safetensors", "state.json"};
        for (int i = 0; i < 4; i++) {
            snprintf(f, sizeof f, "%s/%s", dir, files[i]);
            unlink(f);
        }
        rmdir(dir);
    }
    closedir(d);
}

int fl_finetune_checkpoint(fl_finetune *j) {
    if (j->cur || j->in_accum)
        return fl_error("finetuning: a checkpoint is taken between optimizer steps only");
    char name[64], dir[4096], path[4200];
    snprintf(name, sizeof name, "checkpoint-%d", j->prog.step);
    snprintf(dir, sizeof dir, "%s/%s", j->out, name);
    if (fl_adapter_save(j->adapter, dir, j->base_name ? j->base_name : "") != 0) return -1;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    if (fl_optimizer_save(j->opt, path) != 0) return -1;
    snprintf(path, sizeof path, "%s/state.json", dir);
    if (write_state(j, path) != 0) return -1;
    /* The pointer file is replaced atomically: a crash leaves the old or the new one. */
    char text[256];
    int n = snprintf(text, sizeof text, "{\"dir\": \"%s\", \"step\": %d}\n", name, j->prog.step);
    snprintf(path, sizeof path, "%s/checkpoint.json", j->out);
    if (fl_write_file_atomic(path, text, (size_t)n) != 0) return -1;
    remove_old_checkpoints(j->out, name);
    j->last_checkpoint = j->prog.step;
    return 0;
}

static int json_number(const cJSON *o, const char *k, const char *path, double *v) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(x)) return fl_error("%s: field '%s' missing or not a number", path, k);
    *v = x->valuedouble;
    return 0;
}

/* Restores the adapter, optimizer and position of out/checkpoint.json; 1 if there is
 * none, 0 when restored, -1 on error. */
static int restore(fl_finetune *j) {
    char path[4400], dir[4200];
    snprintf(path, sizeof path, "%s/checkpoint.json", j->out);
    if (!fl_file_exists(path)) return 1;
    char *text = fl_read_file(path, NULL);
    if (!text) return -1;
    cJSON *o = cJSON_Parse(text);
    free(text);
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(o, "dir");
    if (!cJSON_IsString(d) || strchr(d->valuestring, '/')) {
        cJSON_Delete(o);
        return fl_error("%s: field 'dir' missing or not a checkpoint folder name", path);
    }
    snprintf(dir, sizeof dir, "%s/%s", j->out, d->valuestring);
    cJSON_Delete(o);
    fl_adapter *a = fl_adapter_load(j->ctx->model, dir);
    if (!a) return -1;
    if (a->p.rank != j->p.lora.rank || a->p.targets != j->p.lora.targets) {
        fl_adapter_free(a);
        return fl_error("%s: the checkpoint's adapter (rank %d) does not match this job's "
                        "LoRA settings (rank %d, targets)", dir, a->p.rank, j->p.lora.rank);
    }
    a->p.seed = j->p.lora.seed; /* the dropout masks depend on it */
    a->p.dropout = j->p.lora.dropout;
    fl_adapter_free(j->adapter);
    j->adapter = a;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    if (fl_optimizer_load(j->opt, path) != 0) return -1;
    snprintf(path, sizeof path, "%s/state.json", dir);
    if (!(text = fl_read_file(path, NULL))) return -1;
    o = cJSON_Parse(text);
    free(text);
    double step = 0, epoch = 0, pos = 0, done = 0, tokens = 0, loss = 0;
    int rc = !o ? fl_error("%s: invalid JSON", path)
                : (json_number(o, "step", path, &step) || json_number(o, "epoch", path, &epoch) ||
                   json_number(o, "epoch_pos", path, &pos) ||
                   json_number(o, "samples_done", path, &done) ||
                   json_number(o, "tokens", path, &tokens) || json_number(o, "loss", path, &loss));
    cJSON_Delete(o);
    if (rc) return -1;
    if (pos < 0 || pos > j->count || epoch < 0)
        return fl_error("%s: position %g of epoch %g does not fit the dataset (%d samples)", path,
                        pos, epoch, j->count);
    j->prog.step = (int)step;
    j->epoch = (int)epoch;
    j->epoch_pos = (int)pos;
    j->prog.samples_done = (int)done;
    j->prog.tokens = (long long)tokens;
    j->prog.loss = loss;
    j->last_checkpoint = j->prog.step;
    fl_dataset_order(j->ds, j->p.seed, j->epoch, j->order);
    return 0;
}

/* ------------------------------------------------------------------ the job */

fl_finetune *fl_finetune_new(fl_context *ctx, const fl_finetune_params *params) {
    fl_finetune *j = fl_calloc(1, sizeof *j);
    if (!j) return NULL;
    j->ctx = ctx;
    j->p = *params;
    j->last_checkpoint = -1;
    j->data = dup_or_null(params->data);
    j->out = dup_or_null(params->out);
    j->base_name = dup_or_null(params->base_model_name);
    if (!j->data || !j->out) {
        fl_error("finetuning: the data file and the output folder are required");
        goto fail;
    }
    if (j->p.epochs < 1 || j->p.grad_accum < 1 || j->p.chunk < 1 || j->p.max_steps < 0 ||
        j->p.checkpoint_every < 0) {
        fl_error("finetuning: epochs (%d), grad_accum (%d) and chunk (%d) must be positive, "
                 "max_steps and checkpoint_every non-negative",
                 j->p.epochs, j->p.grad_accum, j->p.chunk);
        goto fail;
    }
    if (!(j->ds = fl_dataset_load(j->data, ctx->model->tok, &j->p.dataset))) goto fail;
    j->count = fl_dataset_count(j->ds);
    if (!(j->order = fl_malloc(sizeof(int) * (size_t)j->count))) goto fail;
    fl_dataset_order(j->ds, j->p.seed, 0, j->order);
    int per_epoch = (j->count + j->p.grad_accum - 1) / j->p.grad_accum;
    j->prog.total_steps = per_epoch * j->p.epochs;
    if (j->p.max_steps && j->p.max_steps < j->prog.total_steps)
        j->prog.total_steps = j->p.max_steps;
    j->prog.epochs = j->p.epochs;
    if (j->p.optim.total_steps == 0) j->p.optim.total_steps = j->prog.total_steps;
    j->p.lora.seed = j->p.lora.seed ? j->p.lora.seed : j->p.seed;
    if (!(j->adapter = fl_adapter_new(ctx->model, &j->p.lora))) goto fail;
    if (!(j->opt = fl_optimizer_new(j->adapter->n_params, &j->p.optim))) goto fail;
    if (j->p.resume && restore(j) < 0) goto fail;
    j->p.train.dropout_step = (uint64_t)j->prog.step;
    j->prog.lr = fl_optimizer_lr(j->opt);
    return j;
fail:
    fl_finetune_free(j);
    return NULL;
}

void fl_finetune_free(fl_finetune *j) {
    if (!j) return;
    if (j->cur) fl_train_end(j->ctx, j->cur);
    fl_dataset_free(j->ds);
    fl_adapter_free(j->adapter);
    fl_optimizer_free(j->opt);
    free(j->order);
    free(j->data);
    free(j->out);
    free(j->base_name);
    free(j);
}

static int finish(fl_finetune *j) {
    if (fl_adapter_save(j->adapter, j->out, j->base_name ? j->base_name : "") != 0) return -1;
    if (j->last_checkpoint != j->prog.step && fl_finetune_checkpoint(j) != 0) return -1;
    j->prog.done = 1;
    return 0;
}

/* Where a stopped job can resume from, for its error message. */
static const char *resume_point(const fl_finetune *j, char *buf, size_t n) {
    if (j->last_checkpoint < 0) return "no checkpoint yet";
    snprintf(buf, n, "last checkpoint: step %d", j->last_checkpoint);
    return buf;
}

/* The optimizer step after grad_accum samples (or the last few of the run). */
static int optimizer_step(fl_finetune *j) {
    float norm = fl_optimizer_step(j->opt, j->adapter->params, j->adapter->grads, j->in_accum);
    fl_adapter_changed(j->adapter);
    char at[48];
    if (norm < 0)
        return fl_error("finetuning: the gradient is not finite at step %d; stopped (%s)",
                        j->prog.step + 1, resume_point(j, at, sizeof at));
    j->prog.step++;
    j->prog.grad_norm = norm;
    j->prog.loss = j->accum_loss / j->in_accum;
    j->prog.lr = fl_optimizer_lr(j->opt);
    j->in_accum = 0;
    j->accum_loss = 0;
    j->p.train.dropout_step = (uint64_t)j->prog.step;
    if (j->p.checkpoint_every && j->prog.step % j->p.checkpoint_every == 0 &&
        fl_finetune_checkpoint(j) != 0)
        return -1;
    return 0;
}

static int run_out(const fl_finetune *j) {
    return j->epoch >= j->p.epochs || (j->p.max_steps && j->prog.step >= j->p.max_steps);
}

fl_train_sample *fl_finetune_sample(fl_finetune *j, int *rc) {
    *rc = 0;
    if (j->prog.done) return NULL;
    if (j->cur) return j->cur;
    if (j->epoch_pos == j->count) {
        j->epoch++;
        j->epoch_pos = 0;
        fl_dataset_order(j->ds, j->p.seed, j->epoch, j->order);
    }
    if (run_out(j)) {
        *rc = finish(j);
        return NULL;
    }
    const fl_sample *s = fl_dataset_get(j->ds, j->order[j->epoch_pos]);
    if (!(j->cur = fl_train_begin(j->ctx, j->adapter, s, &j->p.train))) *rc = -1;
    return j->cur;
}

int fl_finetune_advance(fl_finetune *j, int forward_tokens) {
    fl_train_sample *t = j->cur;
    char at[48];
    j->prog.tokens += forward_tokens;
    if (forward_tokens > 0 && fl_train_forwarded(t) == fl_train_length(t) &&
        !isfinite(fl_train_loss(t)))
        return fl_error("finetuning: the loss is %g at step %d (sample %d of epoch %d); stopped "
                        "(%s)",
                        fl_train_loss(t), j->prog.step + 1, j->epoch_pos, j->epoch + 1,
                        resume_point(j, at, sizeof at));
    if (fl_train_forwarded(t) < fl_train_length(t) || fl_train_backward_left(t) > 0) return 0;
    j->accum_loss += fl_train_loss(t);
    fl_train_end(j->ctx, t);
    j->cur = NULL;
    j->epoch_pos++;
    j->in_accum++;
    j->prog.samples_done++;
    j->prog.epoch = j->epoch;
    int last = j->epoch_pos == j->count && j->epoch + 1 >= j->p.epochs;
    if (j->in_accum == j->p.grad_accum || last) return optimizer_step(j);
    return 0;
}

void fl_finetune_abandon(fl_finetune *j) {
    fl_train_end(j->ctx, j->cur);
    j->cur = NULL;
    memset(j->adapter->grads, 0, sizeof(float) * j->adapter->n_params);
    j->in_accum = 0;
    j->accum_loss = 0;
}

int fl_finetune_step(fl_finetune *j, int max_tokens) {
    while (max_tokens > 0) {
        int rc;
        fl_train_sample *t = fl_finetune_sample(j, &rc);
        if (!t) return rc < 0 ? -1 : 0;
        int chunk = max_tokens < j->p.chunk ? max_tokens : j->p.chunk, done, fwd = 0;
        if (fl_train_forwarded(t) < fl_train_length(t)) {
            if ((done = fwd = fl_train_forward(j->ctx, t, chunk)) <= 0) return -1;
        } else if ((done = fl_train_backward(j->ctx, t, chunk)) <= 0) {
            return -1;
        }
        max_tokens -= done;
        if (fl_finetune_advance(j, fwd) != 0) return -1;
    }
    return j->prog.done ? 0 : 1;
}

void fl_finetune_get_progress(const fl_finetune *j, fl_finetune_progress *p) { *p = j->prog; }
fl_adapter *fl_finetune_adapter(fl_finetune *j) { return j->adapter; }

/* ---------------------------------------------------------------- evaluation */

double fl_evaluate(fl_context *ctx, fl_adapter *adapter, const fl_dataset *ds, int first,
                   int count) {
    const fl_config *c = &ctx->model->cfg;
    int T = ctx->params.max_batch_tokens;
    float *logits = fl_malloc(sizeof(float) * (size_t)T * c->vocab_size);
    int32_t *seq = fl_malloc(sizeof(int32_t) * T), *pos = fl_malloc(sizeof(int32_t) * T);
    int8_t *want = fl_malloc((size_t)T);
    const fl_adapter **ad = fl_malloc(sizeof(*ad) * T);
    double sum = 0;
    long n_labels = 0;
    int ok = logits && seq && pos && want && ad;
    for (int i = first; ok && i < first + count && i < fl_dataset_count(ds); i++) {
        const fl_sample *s = fl_dataset_get(ds, i);
        int sq = fl_seq_new(ctx);
        ok = sq >= 0;
        for (int p0 = 0; ok && p0 < s->n; p0 += T) {
            int m = s->n - p0 < T ? s->n - p0 : T;
            for (int k = 0; k < m; k++) seq[k] = sq, pos[k] = p0 + k, want[k] = 1, ad[k] = adapter;
            fl_batch b = {.n_tokens = m, .token = s->tokens + p0, .seq = seq, .pos = pos,
                          .logits = want, .adapter = ad};
            ok = fl_forward(ctx, &b, logits) == m;
            if (ok) {
                sum += fl_cpu_cross_entropy(logits, s->labels + p0, m, c->vocab_size, 0.0f);
                for (int k = 0; k < m; k++) n_labels += s->labels[p0 + k] >= 0;
            }
        }
        if (sq >= 0) fl_seq_free(ctx, sq);
    }
    free(logits);
    free(seq);
    free(pos);
    free(want);
    free(ad);
    return ok && n_labels ? sum / n_labels : NAN;
}
