/* The Lua module flexllm.core: models, tokenizers, contexts and generators as
 * userdata. Load functions return nil, message on failure (Lua's convention);
 * misuse (wrong argument types, a closed handle) raises an error. */
#include "flexllm.h"

#include <lauxlib.h>
#include <lua.h>
#include <signal.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MODEL_MT "flexllm.model"
#define TOK_MT "flexllm.tokenizer"
#define CTX_MT "flexllm.context"
#define GEN_MT "flexllm.generator"
#define ADAPTER_MT "flexllm.adapter"
#define JOB_MT "flexllm.finetune"
#define RT_MT "flexllm.runtime"

typedef struct {
    void *ptr;
    int owned; /* a tokenizer borrowed from a model is not freed by its userdata */
} handle;

/* A new handle whose environment table keeps `parent_idx` (if nonzero) alive. */
static handle *new_handle(lua_State *L, const char *mt, void *ptr, int owned, int parent_idx) {
    handle *h = lua_newuserdata(L, sizeof *h);
    h->ptr = ptr;
    h->owned = owned;
    luaL_getmetatable(L, mt);
    lua_setmetatable(L, -2);
    lua_createtable(L, 0, 1);
    if (parent_idx) {
        lua_pushvalue(L, parent_idx);
        lua_setfield(L, -2, "parent");
    }
    lua_setfenv(L, -2);
    return h;
}

static void *check(lua_State *L, int idx, const char *mt) {
    handle *h = luaL_checkudata(L, idx, mt);
    if (!h->ptr) luaL_error(L, "%s is closed", mt);
    return h->ptr;
}

static int fail(lua_State *L) {
    lua_pushnil(L);
    lua_pushstring(L, fl_last_error());
    return 2;
}

/* Optional integer / number / boolean fields of an options table at idx. */
static int opt_int(lua_State *L, int idx, const char *k, int def) {
    if (lua_isnoneornil(L, idx)) return def;
    lua_getfield(L, idx, k);
    int v = def;
    if (!lua_isnil(L, -1)) {
        if (!lua_isnumber(L, -1)) luaL_error(L, "option '%s' must be a number", k);
        v = (int)lua_tointeger(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

static double opt_num(lua_State *L, int idx, const char *k, double def) {
    if (lua_isnoneornil(L, idx)) return def;
    lua_getfield(L, idx, k);
    double v = def;
    if (!lua_isnil(L, -1)) {
        if (!lua_isnumber(L, -1)) luaL_error(L, "option '%s' must be a number", k);
        v = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

static const char *opt_str(lua_State *L, int idx, const char *k, const char *def) {
    if (lua_isnoneornil(L, idx)) return def;
    lua_getfield(L, idx, k);
    const char *v = lua_isnil(L, -1) ? def : lua_tostring(L, -1);
    if (!lua_isnil(L, -1) && !v) luaL_error(L, "option '%s' must be a string", k);
    lua_pop(L, 1); /* the string stays alive in the options table */
    return v;
}

static int opt_bool(lua_State *L, int idx, const char *k, int def) {
    if (lua_isnoneornil(L, idx)) return def;
    lua_getfield(L, idx, k);
    int v = lua_isnil(L, -1) ? def : lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* The index of an optional string field among names (NULL-terminated, the first the
 * default); any other value raises an error listing them. */
static int opt_choice(lua_State *L, int idx, const char *k, const char *const *names) {
    const char *v = opt_str(L, idx, k, names[0]);
    for (int i = 0; names[i]; i++)
        if (strcmp(names[i], v) == 0) return i;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 0; names[i]; i++) {
        lua_pushfstring(L, "%s\"%s\"", i == 0 ? "" : names[i + 1] ? ", " : " or ", names[i]);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    return luaL_error(L, "option '%s' must be %s, got \"%s\"", k, lua_tostring(L, -1), v);
}

static void check_opts(lua_State *L, int idx) {
    if (!lua_isnoneornil(L, idx)) luaL_checktype(L, idx, LUA_TTABLE);
}

/* A Lua array of token ids into a malloc'd int32 array. */
static int32_t *ids_from_table(lua_State *L, int idx, int *n) {
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = (int)lua_objlen(L, idx);
    for (int i = 0; i < *n; i++) { /* check before allocating: luaL_error does not return */
        lua_rawgeti(L, idx, i + 1);
        if (!lua_isnumber(L, -1)) luaL_error(L, "token list item %d is not a number", i + 1);
        lua_pop(L, 1);
    }
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(*n > 0 ? *n : 1));
    if (!ids) luaL_error(L, "out of memory");
    for (int i = 0; i < *n; i++) {
        lua_rawgeti(L, idx, i + 1);
        ids[i] = (int32_t)lua_tointeger(L, -1);
        lua_pop(L, 1);
    }
    return ids;
}

static void push_ids(lua_State *L, const int32_t *ids, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, ids[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

/* ------------------------------------------------------------------ model */

static int l_load_model(lua_State *L) {
    const char *dir = luaL_checkstring(L, 1);
    check_opts(L, 2);
    fl_model_params p = fl_model_default_params();
    p.n_threads = opt_int(L, 2, "threads", p.n_threads);
    static const char *const gemms[] = {"packed", "openblas", NULL}; /* fl_gemm */
    static const char *const devices[] = {"auto", "cpu", "cuda", NULL};
    static const char *const dtypes[] = {"auto", "bf16", "fp32", NULL}; /* fl_device_weights */
    p.gemm = (fl_gemm)opt_choice(L, 2, "gemm", gemms);
    p.device = (fl_device)opt_choice(L, 2, "device", devices);
    p.device_weights = (fl_device_weights)opt_choice(L, 2, "device_weights", dtypes);
    fl_model *m = fl_model_load(dir, &p);
    if (!m) return fail(L);
    new_handle(L, MODEL_MT, m, 1, 0);
    return 1;
}

static int l_model_gc(lua_State *L) {
    handle *h = luaL_checkudata(L, 1, MODEL_MT);
    if (h->ptr) fl_model_free(h->ptr);
    h->ptr = NULL;
    return 0;
}

static int l_model_config(lua_State *L) {
    const fl_config *c = fl_model_config(check(L, 1, MODEL_MT));
    lua_createtable(L, 0, 16);
#define SETI(k, v) (lua_pushinteger(L, v), lua_setfield(L, -2, k))
#define SETN(k, v) (lua_pushnumber(L, v), lua_setfield(L, -2, k))
    lua_pushstring(L, c->arch == FL_ARCH_QWEN2 ? "qwen2" : "llama");
    lua_setfield(L, -2, "arch");
    SETI("dim", c->dim);
    SETI("hidden_dim", c->hidden_dim);
    SETI("n_layers", c->n_layers);
    SETI("n_heads", c->n_heads);
    SETI("n_kv_heads", c->n_kv_heads);
    SETI("head_dim", c->head_dim);
    SETI("vocab_size", c->vocab_size);
    SETI("max_seq_len", c->max_seq_len);
    SETN("norm_eps", c->norm_eps);
    SETN("rope_theta", c->rope_theta);
    lua_pushboolean(L, c->tie_embeddings);
    lua_setfield(L, -2, "tie_embeddings");
#undef SETI
#undef SETN
    return 1;
}

/* model:device(): "cpu" or "cuda", and how it was chosen. */
static int l_model_device(lua_State *L) {
    const char *why;
    fl_device d = fl_model_device(check(L, 1, MODEL_MT), &why);
    lua_pushstring(L, d == FL_DEVICE_CUDA ? "cuda" : "cpu");
    lua_pushstring(L, why);
    return 2;
}

static int l_model_n_params(lua_State *L) {
    lua_pushnumber(L, (double)fl_model_n_params(check(L, 1, MODEL_MT)));
    return 1;
}

static int l_model_tokenizer(lua_State *L) {
    fl_model *m = check(L, 1, MODEL_MT);
    new_handle(L, TOK_MT, (void *)fl_model_tokenizer(m), 0, 1);
    return 1;
}

static int l_model_context(lua_State *L) {
    fl_model *m = check(L, 1, MODEL_MT);
    check_opts(L, 2);
    fl_context_params p = fl_context_default_params();
    p.kv_pages = opt_int(L, 2, "kv_pages", p.kv_pages);
    p.max_batch_tokens = opt_int(L, 2, "max_batch_tokens", p.max_batch_tokens);
    p.max_seqs = opt_int(L, 2, "max_seqs", p.max_seqs);
    fl_context *ctx = fl_context_new(m, &p);
    if (!ctx) return fail(L);
    new_handle(L, CTX_MT, ctx, 1, 1);
    return 1;
}

/* model:load_adapter(dir): a PEFT adapter for generation (kept alive by its users). */
static int l_model_load_adapter(lua_State *L) {
    fl_model *m = check(L, 1, MODEL_MT);
    fl_adapter *a = fl_adapter_load(m, luaL_checkstring(L, 2));
    if (!a) return fail(L);
    new_handle(L, ADAPTER_MT, a, 1, 1);
    return 1;
}

static int l_adapter_gc(lua_State *L) {
    handle *h = luaL_checkudata(L, 1, ADAPTER_MT);
    if (h->ptr && h->owned) fl_adapter_free(h->ptr);
    h->ptr = NULL;
    return 0;
}

static int l_adapter_save(lua_State *L) {
    const fl_adapter *a = check(L, 1, ADAPTER_MT);
    if (fl_adapter_save(a, luaL_checkstring(L, 2), luaL_optstring(L, 3, "")) != 0) return fail(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* adapter:info(): rank, alpha, dropout, targets (comma list), params, bytes. */
static int l_adapter_info(lua_State *L) {
    const fl_adapter *a = check(L, 1, ADAPTER_MT);
    const fl_lora_params *p = fl_adapter_params(a);
    lua_createtable(L, 0, 6);
    lua_pushinteger(L, p->rank);
    lua_setfield(L, -2, "rank");
    lua_pushnumber(L, p->alpha);
    lua_setfield(L, -2, "alpha");
    lua_pushnumber(L, p->dropout);
    lua_setfield(L, -2, "dropout");
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int t = 0, first = 1; t < FL_LORA_N_TARGETS; t++) {
        if (!(p->targets & (1u << t))) continue;
        if (!first) luaL_addchar(&b, ',');
        luaL_addstring(&b, fl_lora_target_name((fl_lora_target)t));
        first = 0;
    }
    luaL_pushresult(&b);
    lua_setfield(L, -2, "targets");
    lua_pushnumber(L, (double)fl_adapter_n_params(a));
    lua_setfield(L, -2, "params");
    lua_pushnumber(L, (double)fl_adapter_n_params(a) * sizeof(float)); /* resident weights */
    lua_setfield(L, -2, "bytes");
    return 1;
}

/* -------------------------------------------------------------- tokenizer */

static int l_load_tokenizer(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    size_t len = strlen(path);
    fl_tokenizer *t = len > 5 && strcmp(path + len - 5, ".json") == 0 ? fl_tokenizer_load(path)
                                                                        : fl_tokenizer_load_dir(path);
    if (!t) return fail(L);
    new_handle(L, TOK_MT, t, 1, 0);
    return 1;
}

static int l_tok_gc(lua_State *L) {
    handle *h = luaL_checkudata(L, 1, TOK_MT);
    if (h->ptr && h->owned) fl_tokenizer_free(h->ptr);
    h->ptr = NULL;
    return 0;
}

static int l_tok_encode(lua_State *L) {
    const fl_tokenizer *t = check(L, 1, TOK_MT);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    check_opts(L, 3);
    int bos = opt_bool(L, 3, "bos", fl_tokenizer_add_bos(t));
    int special = opt_bool(L, 3, "special", 1);
    int32_t small[256], *ids = small;
    int n = fl_tokenize(t, text, len, bos, special, ids, 256);
    if (n < 0 && n != INT32_MIN) {
        int need = -n;
        ids = malloc(sizeof(int32_t) * (size_t)need);
        if (!ids) return luaL_error(L, "out of memory");
        n = fl_tokenize(t, text, len, bos, special, ids, need);
    }
    if (n < 0) {
        if (ids != small) free(ids);
        return fail(L);
    }
    push_ids(L, ids, n);
    if (ids != small) free(ids);
    return 1;
}

static int l_tok_decode(lua_State *L) {
    const fl_tokenizer *t = check(L, 1, TOK_MT);
    int n;
    int32_t *ids = ids_from_table(L, 2, &n);
    check_opts(L, 3);
    int skip = opt_bool(L, 3, "skip_special", 0);
    char small[1024], *out = small;
    int got = fl_detokenize(t, ids, n, skip, out, sizeof small);
    if (got < 0) {
        int need = -got;
        out = malloc((size_t)need);
        if (!out) {
            free(ids);
            return luaL_error(L, "out of memory");
        }
        got = fl_detokenize(t, ids, n, skip, out, need);
    }
    lua_pushlstring(L, out, got > 0 ? (size_t)got : 0);
    if (out != small) free(out);
    free(ids);
    return 1;
}

static int l_tok_info(lua_State *L) {
    const fl_tokenizer *t = check(L, 1, TOK_MT);
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, fl_tokenizer_n_vocab(t));
    lua_setfield(L, -2, "n_vocab");
    lua_pushinteger(L, fl_tokenizer_bos(t));
    lua_setfield(L, -2, "bos");
    lua_pushinteger(L, fl_tokenizer_eos(t));
    lua_setfield(L, -2, "eos");
    lua_pushboolean(L, fl_tokenizer_add_bos(t));
    lua_setfield(L, -2, "add_bos");
    return 1;
}

static int l_tok_token_text(lua_State *L) {
    const char *s = fl_tokenizer_token_text(check(L, 1, TOK_MT), (int32_t)luaL_checkinteger(L, 2));
    if (s) lua_pushstring(L, s);
    else lua_pushnil(L);
    return 1;
}

/* ---------------------------------------------------------------- context */

static int l_ctx_gc(lua_State *L) {
    handle *h = luaL_checkudata(L, 1, CTX_MT);
    if (h->ptr) fl_context_free(h->ptr);
    h->ptr = NULL;
    return 0;
}

static int l_ctx_kv_pages(lua_State *L) {
    fl_context *ctx = check(L, 1, CTX_MT);
    lua_pushinteger(L, fl_kv_pages_free(ctx));
    lua_pushinteger(L, fl_kv_pages_total(ctx));
    return 2;
}

static int l_ctx_generator(lua_State *L) {
    fl_context *ctx = check(L, 1, CTX_MT);
    check_opts(L, 2);
    fl_generator_params p = fl_generator_default_params();
    p.prefill_chunk = opt_int(L, 2, "prefill_chunk", p.prefill_chunk);
    fl_generator *g = fl_generator_new(ctx, &p);
    if (!g) return fail(L);
    new_handle(L, GEN_MT, g, 1, 1);
    return 1;
}

/* ctx:evaluate(data, {adapter=, seq_len=}): the mean loss per label token of a dataset
 * file (the formats of finetuning), with an adapter or the base; nothing is trained. */
static int l_ctx_evaluate(lua_State *L) {
    fl_context *ctx = check(L, 1, CTX_MT);
    const char *path = luaL_checkstring(L, 2);
    check_opts(L, 3);
    fl_adapter *adapter = NULL;
    if (!lua_isnoneornil(L, 3)) {
        lua_getfield(L, 3, "adapter");
        if (!lua_isnil(L, -1)) adapter = check(L, -1, ADAPTER_MT);
        lua_pop(L, 1); /* the options table keeps it alive for the call */
    }
    fl_dataset_params dp = fl_dataset_default_params();
    dp.max_len = opt_int(L, 3, "seq_len", dp.max_len);
    fl_dataset *ds = fl_dataset_load(path, fl_model_tokenizer(fl_context_model(ctx)), &dp);
    if (!ds) return fail(L);
    int n = fl_dataset_count(ds);
    double loss = n > 0 ? fl_evaluate(ctx, adapter, ds, 0, n) : NAN;
    fl_dataset_free(ds);
    if (n == 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: no samples to evaluate", path);
        return 2;
    }
    if (loss != loss) return fail(L);
    lua_pushnumber(L, loss);
    lua_pushinteger(L, n);
    return 2;
}

/* ctx:logits(ids): runs ids as a fresh sequence, in chunks of max_batch_tokens, and
 * returns the logits of every position as a list of vocab-sized lists (scoring,
 * perplexity, checks against a reference implementation). */
static int l_ctx_logits(lua_State *L) {
    fl_context *ctx = check(L, 1, CTX_MT);
    int n;
    int32_t *ids = ids_from_table(L, 2, &n);
    int vocab = fl_model_config(fl_context_model(ctx))->vocab_size;
    int chunk = fl_context_max_batch_tokens(ctx);
    int32_t *seqs = malloc(sizeof(int32_t) * (size_t)chunk);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)chunk);
    int8_t *want = malloc((size_t)chunk);
    float *out = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * vocab);
    int seq = -1, ok = seqs && pos && want && out && (seq = fl_seq_new(ctx)) >= 0;
    for (int off = 0; ok && off < n; off += chunk) {
        int m = n - off < chunk ? n - off : chunk;
        for (int i = 0; i < m; i++) seqs[i] = seq, pos[i] = off + i, want[i] = 1;
        fl_batch b = {.n_tokens = m, .token = ids + off, .seq = seqs, .pos = pos, .logits = want};
        ok = fl_forward(ctx, &b, out + (size_t)off * vocab) == m;
    }
    if (seq >= 0) fl_seq_free(ctx, seq);
    free(ids);
    free(seqs);
    free(pos);
    free(want);
    if (!ok) {
        free(out);
        if (!out) return luaL_error(L, "out of memory");
        return fail(L);
    }
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, vocab, 0);
        for (int v = 0; v < vocab; v++) {
            lua_pushnumber(L, out[(size_t)i * vocab + v]);
            lua_rawseti(L, -2, v + 1);
        }
        lua_rawseti(L, -2, i + 1);
    }
    free(out);
    return 1;
}

/* -------------------------------------------------------------- generator */

static int l_gen_gc(lua_State *L) {
    handle *h = luaL_checkudata(L, 1, GEN_MT);
    if (h->ptr) fl_generator_free(h->ptr);
    h->ptr = NULL;
    return 0;
}

#define MAX_STOPS 16

/* A request's options at idx into p; stops holds the stop strings, which stay alive in
 * the options table for the call. */
static void request_options(lua_State *L, int idx, fl_request_params *p, const char **stops) {
    check_opts(L, idx);
    *p = fl_request_default_params();
    p->max_tokens = opt_int(L, idx, "max_tokens", p->max_tokens);
    p->sampling.temperature = (float)opt_num(L, idx, "temperature", p->sampling.temperature);
    p->sampling.top_k = opt_int(L, idx, "top_k", p->sampling.top_k);
    p->sampling.top_p = (float)opt_num(L, idx, "top_p", p->sampling.top_p);
    p->sampling.seed = (uint64_t)opt_num(L, idx, "seed", 0);
    p->ignore_eos = opt_bool(L, idx, "ignore_eos", 0);
    p->ttft_slo = (float)opt_num(L, idx, "ttft_slo", 0);
    p->tpot_slo = (float)opt_num(L, idx, "tpot_slo", 0);
    if (lua_isnoneornil(L, idx)) return;
    lua_getfield(L, idx, "adapter");
    if (!lua_isnil(L, -1)) p->adapter = check(L, -1, ADAPTER_MT);
    lua_pop(L, 1); /* the caller keeps the adapter alive while the request runs */
    lua_getfield(L, idx, "stop");
    if (lua_isstring(L, -1)) {
        stops[p->n_stop++] = lua_tostring(L, -1);
    } else if (lua_istable(L, -1)) {
        int k = (int)lua_objlen(L, -1);
        if (k > MAX_STOPS) luaL_error(L, "option 'stop' holds %d strings, at most %d", k, MAX_STOPS);
        for (int i = 1; i <= k; i++) {
            lua_rawgeti(L, -1, i);
            if (!lua_isstring(L, -1)) luaL_error(L, "option 'stop' item %d is not a string", i);
            stops[p->n_stop++] = lua_tostring(L, -1);
            lua_pop(L, 1);
        }
    } else if (!lua_isnil(L, -1)) {
        luaL_error(L, "option 'stop' must be a string or a list of strings");
    }
    lua_pop(L, 1);
    p->stop = stops;
}

/* Queues the ids at 2 with the options at 3 through submit; pushes the id or nil, error. */
static int submit_request(lua_State *L, void *target,
                          int (*submit)(void *, const int32_t *, int, const fl_request_params *)) {
    const char *stops[MAX_STOPS];
    fl_request_params p;
    request_options(L, 3, &p, stops);
    int n;
    int32_t *ids = ids_from_table(L, 2, &n);
    int id = submit(target, ids, n, &p);
    free(ids);
    if (id < 0) return fail(L);
    lua_pushinteger(L, id);
    return 1;
}

static int generator_submit(void *g, const int32_t *ids, int n, const fl_request_params *p) {
    return fl_generator_add(g, ids, n, p);
}

static int l_gen_add(lua_State *L) {
    return submit_request(L, check(L, 1, GEN_MT), generator_submit);
}

static const char *finish_name(fl_finish f) {
    switch (f) {
    case FL_FINISH_LENGTH: return "length";
    case FL_FINISH_EOS: return "stop"; /* OpenAI reports EOS as "stop" too */
    case FL_FINISH_STOP: return "stop";
    default: return NULL;
    }
}

/* Pushes a list of event tables: request, token, text, and at the end finish, eos, and
 * the request's measured ttft and tpot (seconds) and whether they met its SLO (slo_met). */
static int push_events(lua_State *L, const fl_gen_event *ev, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, 0, 4);
        lua_pushinteger(L, ev[i].request);
        lua_setfield(L, -2, "request");
        lua_pushinteger(L, ev[i].token);
        lua_setfield(L, -2, "token");
        lua_pushlstring(L, ev[i].text, (size_t)ev[i].text_len);
        lua_setfield(L, -2, "text");
        const char *fin = finish_name(ev[i].finish);
        if (fin) {
            lua_pushstring(L, fin);
            lua_setfield(L, -2, "finish");
            lua_pushboolean(L, ev[i].finish == FL_FINISH_EOS);
            lua_setfield(L, -2, "eos");
            lua_pushnumber(L, ev[i].ttft);
            lua_setfield(L, -2, "ttft");
            lua_pushnumber(L, ev[i].tpot);
            lua_setfield(L, -2, "tpot");
            lua_pushboolean(L, ev[i].slo_met);
            lua_setfield(L, -2, "slo_met");
        }
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int l_gen_step(lua_State *L) {
    const fl_gen_event *ev;
    int n = fl_generator_step(check(L, 1, GEN_MT), &ev);
    return n < 0 ? fail(L) : push_events(L, ev, n);
}

static int l_gen_active(lua_State *L) {
    lua_pushinteger(L, fl_generator_active(check(L, 1, GEN_MT)));
    return 1;
}

/* -------------------------------------------------------------- finetuning */

static void parse_optim(lua_State *L, int idx, fl_optim_params *o) {
    static const char *const kinds[] = {"adamw", "sgd", NULL};            /* fl_optimizer_kind */
    static const char *const schedules[] = {"constant", "cosine", NULL}; /* fl_schedule */
    o->kind = (fl_optimizer_kind)opt_choice(L, idx, "optimizer", kinds);
    o->schedule = (fl_schedule)opt_choice(L, idx, "schedule", schedules);
    o->lr = (float)opt_num(L, idx, "lr", o->lr);
    o->weight_decay = (float)opt_num(L, idx, "weight_decay", o->weight_decay);
    o->momentum = (float)opt_num(L, idx, "momentum", o->momentum);
    o->clip_norm = (float)opt_num(L, idx, "clip", o->clip_norm);
    o->warmup_steps = opt_int(L, idx, "warmup", o->warmup_steps);
    o->min_lr_ratio = (float)opt_num(L, idx, "min_lr_ratio", o->min_lr_ratio);
}

/* ctx:finetune{data=, out=, targets=, rank=, alpha=, dropout=, lr=, epochs=, seq_len=,
 * chunk=, grad_accum=, seed=, checkpoint_every=, max_steps=, resume=, ...} */
static int l_ctx_finetune(lua_State *L) {
    fl_context *ctx = check(L, 1, CTX_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    fl_finetune_params p = fl_finetune_default_params();
    p.data = opt_str(L, 2, "data", NULL);
    p.out = opt_str(L, 2, "out", NULL);
    p.base_model_name = opt_str(L, 2, "base_model", NULL);
    const char *targets = opt_str(L, 2, "targets", NULL);
    if (targets && fl_lora_parse_targets(targets, &p.lora.targets) != 0) return fail(L);
    p.lora.rank = opt_int(L, 2, "rank", p.lora.rank);
    p.lora.alpha = (float)opt_num(L, 2, "alpha", p.lora.alpha);
    p.lora.dropout = (float)opt_num(L, 2, "dropout", p.lora.dropout);
    parse_optim(L, 2, &p.optim);
    p.dataset.max_len = opt_int(L, 2, "seq_len", p.dataset.max_len);
    p.epochs = opt_int(L, 2, "epochs", p.epochs);
    p.grad_accum = opt_int(L, 2, "grad_accum", p.grad_accum);
    p.chunk = opt_int(L, 2, "chunk", p.chunk);
    p.seed = (uint64_t)opt_num(L, 2, "seed", 0);
    p.checkpoint_every = opt_int(L, 2, "checkpoint_every", p.checkpoint_every);
    p.max_steps = opt_int(L, 2, "max_steps", p.max_steps);
    p.resume = opt_bool(L, 2, "resume", 0);
    p.train.remat_q = opt_bool(L, 2, "remat_q", 0);
    p.train.remat_gate_up = opt_bool(L, 2, "remat_gate_up", 0);
    fl_finetune *job = fl_finetune_new(ctx, &p);
    if (!job) return fail(L);
    new_handle(L, JOB_MT, job, 1, 1);
    return 1;
}

static int l_job_gc(lua_State *L) {
    handle *h = luaL_checkudata(L, 1, JOB_MT);
    if (h->ptr && h->owned) fl_finetune_free(h->ptr);
    h->ptr = NULL;
    return 0;
}

/* job:step(max_tokens) -> true while running, false when done; nil, message on error. */
static int l_job_step(lua_State *L) {
    fl_finetune *job = check(L, 1, JOB_MT);
    if (!((handle *)lua_touserdata(L, 1))->owned)
        return luaL_error(L, "this finetuning job runs in a runtime: step the runtime instead");
    int rc = fl_finetune_step(job, (int)luaL_optinteger(L, 2, 128));
    if (rc < 0) return fail(L);
    lua_pushboolean(L, rc == 1);
    return 1;
}

static int l_job_progress(lua_State *L) {
    fl_finetune_progress p;
    fl_finetune_get_progress(check(L, 1, JOB_MT), &p);
    lua_createtable(L, 0, 10);
#define SETN(k, v) (lua_pushnumber(L, (double)(v)), lua_setfield(L, -2, k))
    SETN("step", p.step);
    SETN("total_steps", p.total_steps);
    SETN("epoch", p.epoch);
    SETN("epochs", p.epochs);
    SETN("samples", p.samples_done);
    SETN("loss", p.loss);
    SETN("lr", p.lr);
    SETN("grad_norm", p.grad_norm);
    SETN("tokens", p.tokens);
#undef SETN
    lua_pushboolean(L, p.done);
    lua_setfield(L, -2, "done");
    return 1;
}

/* job:adapter(): the adapter being trained (live weights), for generation. */
static int l_job_adapter(lua_State *L) {
    fl_finetune *job = check(L, 1, JOB_MT);
    new_handle(L, ADAPTER_MT, fl_finetune_adapter(job), 0, 1);
    return 1;
}

/* ---------------------------------------------------------------- runtime */

/* ctx:runtime{policy=, options=, ttft_slo=, tpot_slo=, prefill_chunk=, policy_time_budget=} */
static int l_ctx_runtime(lua_State *L) {
    fl_context *ctx = check(L, 1, CTX_MT);
    check_opts(L, 2);
    fl_runtime_params p = fl_runtime_default_params();
    p.policy = opt_str(L, 2, "policy", NULL);
    p.policy_options = opt_str(L, 2, "options", NULL);
    p.ttft_slo = (float)opt_num(L, 2, "ttft_slo", 0);
    p.tpot_slo = (float)opt_num(L, 2, "tpot_slo", 0);
    p.prefill_chunk = opt_int(L, 2, "prefill_chunk", p.prefill_chunk);
    p.policy_time_budget = opt_num(L, 2, "policy_time_budget", p.policy_time_budget);
    fl_runtime *rt = fl_runtime_new(ctx, &p);
    if (!rt) return fail(L);
    new_handle(L, RT_MT, rt, 1, 1);
    return 1;
}

static int l_rt_gc(lua_State *L) {
    handle *h = luaL_checkudata(L, 1, RT_MT);
    if (h->ptr) fl_runtime_free(h->ptr);
    h->ptr = NULL;
    return 0;
}

static int runtime_submit(void *rt, const int32_t *ids, int n, const fl_request_params *p) {
    return fl_runtime_submit(rt, ids, n, p);
}

static int l_rt_submit(lua_State *L) {
    return submit_request(L, check(L, 1, RT_MT), runtime_submit);
}

/* rt:add_job(job): the runtime takes the job over; the job's handle stays usable (for
 * progress) and keeps the runtime alive. */
static int l_rt_add_job(lua_State *L) {
    fl_runtime *rt = check(L, 1, RT_MT);
    handle *job = luaL_checkudata(L, 2, JOB_MT);
    if (!job->ptr || !job->owned) return luaL_error(L, "this finetuning job already runs elsewhere");
    int id = fl_runtime_add_job(rt, job->ptr);
    if (id < 0) return fail(L);
    job->owned = 0;
    lua_getfenv(L, 2);
    lua_pushvalue(L, 1);
    lua_setfield(L, -2, "runtime");
    lua_pop(L, 1);
    lua_pushinteger(L, id);
    return 1;
}

static int l_rt_step(lua_State *L) {
    const fl_gen_event *ev;
    int n = fl_runtime_step(check(L, 1, RT_MT), &ev);
    return n < 0 ? fail(L) : push_events(L, ev, n);
}

static int l_rt_active(lua_State *L) {
    lua_pushinteger(L, fl_runtime_active(check(L, 1, RT_MT)));
    return 1;
}

static int l_rt_reload(lua_State *L) {
    if (fl_runtime_reload(check(L, 1, RT_MT), luaL_checkstring(L, 2)) != 0) return fail(L);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_rt_poll_reload(lua_State *L) {
    int rc = fl_runtime_poll_reload(check(L, 1, RT_MT), luaL_optnumber(L, 2, 0.2));
    if (rc < 0) return fail(L);
    lua_pushboolean(L, rc == 1);
    return 1;
}

static int l_rt_stats(lua_State *L) {
    fl_runtime_stats s;
    fl_runtime_get_stats(check(L, 1, RT_MT), &s);
    lua_createtable(L, 0, 16);
#define SETN(k, v) (lua_pushnumber(L, (double)(v)), lua_setfield(L, -2, k))
    SETN("iterations", s.iterations);
    SETN("policy_calls", s.policy_calls);
    SETN("policy_failures", s.policy_failures);
    SETN("fallback_iterations", s.fallback_iterations);
    SETN("policy_seconds", s.policy_seconds);
    SETN("busy_seconds", s.busy_seconds);
    SETN("requests_done", s.requests_done);
    SETN("requests_slo_met", s.requests_slo_met);
    SETN("requests_cancelled", s.requests_cancelled);
    SETN("preemptions", s.preemptions);
    SETN("ft_forward_tokens", s.ft_forward_tokens);
    SETN("ft_backward_tokens", s.ft_backward_tokens);
    SETN("reloads", s.reloads);
#undef SETN
    lua_pushboolean(L, s.policy_disabled);
    lua_setfield(L, -2, "policy_disabled");
    lua_pushstring(L, s.policy_error);
    lua_setfield(L, -2, "policy_error");
    return 1;
}

static int l_rt_job_error(lua_State *L) {
    lua_pushstring(L, fl_runtime_job_error(check(L, 1, RT_MT), (int)luaL_checkinteger(L, 2)));
    return 1;
}

/* rt:job_done(id) -> true once the job finished, failed or was cancelled. */
static int l_rt_job_done(lua_State *L) {
    int rc = fl_runtime_job_done(check(L, 1, RT_MT), (int)luaL_checkinteger(L, 2));
    if (rc < 0) return fail(L);
    lua_pushboolean(L, rc);
    return 1;
}

/* rt:cancel(id) -> true, or nil, message when no such request is queued or running. */
static int l_rt_cancel(lua_State *L) {
    if (fl_runtime_cancel(check(L, 1, RT_MT), (int)luaL_checkinteger(L, 2)) != 0) return fail(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* rt:cancel_job(id) -> true, or nil, message for an unknown or finished job. */
static int l_rt_cancel_job(lua_State *L) {
    if (fl_runtime_cancel_job(check(L, 1, RT_MT), (int)luaL_checkinteger(L, 2)) != 0)
        return fail(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* ----------------------------------------------------------------- module */

static int l_init_model(lua_State *L) {
    const char *dir = luaL_checkstring(L, 1);
    check_opts(L, 2);
    fl_init_model_params p = fl_init_model_default_params();
    p.seed = opt_int(L, 2, "seed", p.seed);
    p.dim = opt_int(L, 2, "dim", p.dim);
    p.hidden_dim = opt_int(L, 2, "hidden_dim", p.hidden_dim);
    p.n_layers = opt_int(L, 2, "n_layers", p.n_layers);
    p.n_heads = opt_int(L, 2, "n_heads", p.n_heads);
    p.n_kv_heads = opt_int(L, 2, "n_kv_heads", p.n_kv_heads);
    p.vocab_size = opt_int(L, 2, "vocab_size", p.vocab_size);
    p.max_seq_len = opt_int(L, 2, "max_seq_len", p.max_seq_len);
    if (fl_init_model(dir, &p) != 0) return fail(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* core.memory_plan(config_json_path, {targets=, rank=, remat_q=, remat_gate_up=, seq=}):
 * the training plan as a table, for `flexllm memory-plan`. */
static int l_memory_plan(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    check_opts(L, 2);
    fl_config cfg;
    if (fl_config_load(path, &cfg) != 0) return fail(L);
    fl_plan_params pp = fl_plan_default_params();
    const char *targets = opt_str(L, 2, "targets", NULL);
    if (targets && fl_lora_parse_targets(targets, &pp.targets) != 0) return fail(L);
    pp.rank = opt_int(L, 2, "rank", pp.rank);
    pp.remat_q = opt_bool(L, 2, "remat_q", 0);
    pp.remat_gate_up = opt_bool(L, 2, "remat_gate_up", 0);
    int seq = opt_int(L, 2, "seq", cfg.max_seq_len);
    fl_plan plan;
    if (seq < 1) return luaL_error(L, "option 'seq' must be positive");
    if (fl_plan_make(&cfg, &pp, seq, &plan) != 0) return fail(L);
    lua_createtable(L, 0, 8);
    lua_createtable(L, FL_ACT_N, 0);
    for (int a = 0; a < FL_ACT_N; a++) {
        lua_createtable(L, 0, 5);
        lua_pushstring(L, fl_activation_name(a));
        lua_setfield(L, -2, "name");
        lua_pushnumber(L, (double)plan.floats[a]);
        lua_setfield(L, -2, "floats");
        lua_pushboolean(L, plan.kept[a]);
        lua_setfield(L, -2, "kept");
        lua_pushboolean(L, plan.in_pool[a]);
        lua_setfield(L, -2, "in_pool");
        lua_pushboolean(L, plan.produced[a]);
        lua_setfield(L, -2, "produced");
        lua_rawseti(L, -2, a + 1);
    }
    lua_setfield(L, -2, "tensors");
#define SETN(k, v) (lua_pushnumber(L, (double)(v)), lua_setfield(L, -2, k))
    SETN("arena_floats", plan.arena_floats);
    SETN("pool_floats", plan.pool_floats);
    SETN("keep_all_floats", plan.keep_all_floats);
    SETN("workspace_floats", plan.workspace_floats);
    SETN("n_layers", plan.n_layers);
    SETN("seq", seq);
    SETN("arena_bytes", fl_plan_arena_bytes(&plan, seq));
#undef SETN
    return 1;
}

/* Monotonic wall-clock seconds, for timing from Lua. */
static int l_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec * 1e-9);
    return 1;
}

/* SIGINT and SIGTERM only set a flag, which a server loop reads between iterations to
 * stop cleanly; a second one while the first is unread ends the process as usual. */
static volatile sig_atomic_t signal_seen;

static void on_stop_signal(int sig) {
    if (signal_seen) {
        signal(sig, SIG_DFL);
        raise(sig);
    }
    signal_seen = sig;
}

/* core.watch_signals(): install the handlers (no SA_RESTART: a blocking poll returns). */
static int l_watch_signals(lua_State *L) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0)
        return luaL_error(L, "watch_signals: sigaction failed");
    return 0;
}

/* core.signalled() -> the signal number once SIGINT or SIGTERM arrived, else false. */
static int l_signalled(lua_State *L) {
    if (signal_seen) lua_pushinteger(L, signal_seen);
    else lua_pushboolean(L, 0);
    return 1;
}

static void def_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
    luaL_newmetatable(L, name);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}

/* Handles are freed by the collector; a child keeps its parent alive through its
 * environment table, and Lua 5.1 finalizes in reverse order of creation. */
int luaopen_flexllm_core(lua_State *L) {
    static const luaL_Reg model_m[] = {{"config", l_model_config}, {"n_params", l_model_n_params},
                                       {"tokenizer", l_model_tokenizer}, {"context", l_model_context},
                                       {"load_adapter", l_model_load_adapter},
                                       {"device", l_model_device},
                                       {NULL, NULL}};
    static const luaL_Reg tok_m[] = {{"encode", l_tok_encode}, {"decode", l_tok_decode},
                                     {"info", l_tok_info}, {"token_text", l_tok_token_text},
                                     {NULL, NULL}};
    static const luaL_Reg ctx_m[] = {{"generator", l_ctx_generator}, {"kv_pages", l_ctx_kv_pages},
                                     {"logits", l_ctx_logits}, {"evaluate", l_ctx_evaluate},
                                     {"finetune", l_ctx_finetune},
                                     {"runtime", l_ctx_runtime},
                                     {NULL, NULL}};
    static const luaL_Reg gen_m[] = {{"add", l_gen_add}, {"step", l_gen_step},
                                     {"active", l_gen_active}, {NULL, NULL}};
    static const luaL_Reg funcs[] = {{"load_model", l_load_model},
                                     {"load_tokenizer", l_load_tokenizer},
                                     {"init_model", l_init_model}, {"now", l_now},
                                     {"memory_plan", l_memory_plan},
                                     {"watch_signals", l_watch_signals},
                                     {"signalled", l_signalled},
                                     {NULL, NULL}};
    def_class(L, MODEL_MT, model_m, l_model_gc);
    def_class(L, TOK_MT, tok_m, l_tok_gc);
    def_class(L, CTX_MT, ctx_m, l_ctx_gc);
    def_class(L, GEN_MT, gen_m, l_gen_gc);
    static const luaL_Reg adapter_m[] = {{"save", l_adapter_save}, {"info", l_adapter_info}, {NULL, NULL}};
    static const luaL_Reg job_m[] = {{"step", l_job_step}, {"progress", l_job_progress},
                                     {"adapter", l_job_adapter}, {NULL, NULL}};
    def_class(L, ADAPTER_MT, adapter_m, l_adapter_gc);
    def_class(L, JOB_MT, job_m, l_job_gc);
    static const luaL_Reg rt_m[] = {{"submit", l_rt_submit},       {"add_job", l_rt_add_job},
                                    {"step", l_rt_step},           {"active", l_rt_active},
                                    {"reload", l_rt_reload},       {"poll_reload", l_rt_poll_reload},
                                    {"stats", l_rt_stats},         {"job_error", l_rt_job_error},
                                    {"job_done", l_rt_job_done},   {"cancel", l_rt_cancel},
                                    {"cancel_job", l_rt_cancel_job},
                                    {NULL, NULL}};
    def_class(L, RT_MT, rt_m, l_rt_gc);
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    lua_pushstring(L, FL_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
