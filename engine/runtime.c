/* Batched generation: each step runs one forward holding a decode token of every
 * running request plus prefill chunks of others, first come first served.
 * A request is admitted once the KV pool can hold its prompt and max_tokens, so a
 * running request never runs out of pages. */
#include "model.h"
#include "fl_internal.h"

#include <stdlib.h>
#include <string.h>

typedef enum { REQ_QUEUED, REQ_RUNNING, REQ_DONE } req_state;

typedef struct {
    int id;
    req_state state;
    int seq;
    int32_t *prompt;
    int n_prompt, n_prefilled;
    int32_t last_token;     /* sampled, not yet fed back */
    int n_generated;
    int reserved_pages;
    fl_request_params p;
    char **stop;
    int max_stop_len;
    fl_sampler *sampler;
    fl_detok_state detok;
    char *text;             /* generated text, for stop-string matching */
    size_t text_len, text_cap, emitted;
} request;

struct fl_generator {
    fl_context *ctx;
    fl_generator_params p;
    request *reqs;
    int n_reqs, cap_reqs, next_id;
    int reserved_pages;
    /* per-step buffers */
    int32_t *tok, *seq, *pos;
    int8_t *want;
    const fl_adapter **adapter; /* [max_batch_tokens] */
    int *row_req;          /* request of each logits row */
    float *logits;         /* [max_batch_tokens, vocab] */
    fl_gen_event *events;
    int cap_events;
    char *event_text;      /* text of all events of a step */
    size_t event_text_len, event_text_cap;
};

fl_request_params fl_request_default_params(void) {
    fl_request_params p = {.max_tokens = 256, .sampling = fl_sampling_default_params()};
    return p;
}

fl_generator_params fl_generator_default_params(void) {
    fl_generator_params p = {.prefill_chunk = 256};
    return p;
}

fl_generator *fl_generator_new(fl_context *ctx, const fl_generator_params *params) {
    fl_generator_params p = params ? *params : fl_generator_default_params();
    if (p.prefill_chunk <= 0) {
        fl_error("generator: prefill_chunk %d must be positive", p.prefill_chunk);
        return NULL;
    }
    fl_generator *g = fl_calloc(1, sizeof *g);
    if (!g) return NULL;
    g->ctx = ctx;
    g->p = p;
    int T = ctx->params.max_batch_tokens;
    g->tok = fl_malloc(sizeof(int32_t) * T);
    g->seq = fl_malloc(sizeof(int32_t) * T);
    g->pos = fl_malloc(sizeof(int32_t) * T);
    g->want = fl_malloc((size_t)T);
    g->adapter = fl_malloc(sizeof(*g->adapter) * T);
    g->row_req = fl_malloc(sizeof(int) * T);
    g->logits = fl_malloc(sizeof(float) * (size_t)T * ctx->model->cfg.vocab_size);
    if (!g->tok || !g->seq || !g->pos || !g->want || !g->adapter || !g->row_req || !g->logits) {
        fl_generator_free(g);
        return NULL;
    }
    return g;
}

static void request_release(request *r) {
    free(r->prompt);
    for (int i = 0; i < r->p.n_stop; i++) free(r->stop[i]);
    free(r->stop);
    fl_sampler_free(r->sampler);
    free(r->text);
    memset(r, 0, sizeof *r);
}

void fl_generator_free(fl_generator *g) {
    if (!g) return;
    for (int i = 0; i < g->n_reqs; i++) {
        if (g->reqs[i].state == REQ_RUNNING) fl_seq_free(g->ctx, g->reqs[i].seq);
        request_release(&g->reqs[i]);
    }
    free(g->reqs);
    free(g->tok);
    free(g->seq);
    free(g->pos);
    free(g->want);
    free(g->adapter);
    free(g->row_req);
    free(g->logits);
    free(g->events);
    free(g->event_text);
    free(g);
}

static int pages_for(int tokens) { return (tokens + FL_KV_PAGE_TOKENS - 1) / FL_KV_PAGE_TOKENS; }

int fl_generator_add(fl_generator *g, const int32_t *prompt, int n_prompt,
                     const fl_request_params *params) {
    fl_request_params p = params ? *params : fl_request_default_params();
    const fl_config *c = &g->ctx->model->cfg;
    if (n_prompt <= 0) return fl_error("request: the prompt has no tokens");
    if (p.max_tokens <= 0) return fl_error("request: max_tokens %d must be positive", p.max_tokens);
    if (n_prompt + p.max_tokens > c->max_seq_len)
        return fl_error("request: prompt (%d tokens) + max_tokens (%d) exceeds the model's "
                        "context of %d",
                        n_prompt, p.max_tokens, c->max_seq_len);
    if (pages_for(n_prompt + p.max_tokens) > g->ctx->n_pages)
        return fl_error("request: needs %d KV pages, the pool has %d",
                        pages_for(n_prompt + p.max_tokens), g->ctx->n_pages);
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= c->vocab_size)
            return fl_error("request: prompt token %d is id %d, outside the vocabulary [0, %d)",
                            i, prompt[i], c->vocab_size);
    if (g->n_reqs == g->cap_reqs) {
        int cap = g->cap_reqs ? g->cap_reqs * 2 : 16;
        request *nr = realloc(g->reqs, sizeof(request) * (size_t)cap);
        if (!nr) return fl_error("out of memory queueing a request");
        g->reqs = nr;
        g->cap_reqs = cap;
    }
    request *r = &g->reqs[g->n_reqs];
    memset(r, 0, sizeof *r);
    r->p = p;
    r->p.n_stop = 0;
    r->sampler = fl_sampler_new(&p.sampling, c->vocab_size);
    r->prompt = fl_malloc(sizeof(int32_t) * (size_t)n_prompt);
    r->stop = fl_calloc((size_t)(p.n_stop > 0 ? p.n_stop : 1), sizeof(char *));
    if (!r->sampler || !r->prompt || !r->stop) {
        request_release(r);
        return -1;
    }
    for (int i = 0; i < p.n_stop; i++) {
        if (!p.stop[i] || !p.stop[i][0]) continue; /* an empty stop string never matches */
        if (!(r->stop[r->p.n_stop] = strdup(p.stop[i]))) {
            request_release(r);
            return fl_error("out of memory copying stop strings");
        }
        int len = (int)strlen(p.stop[i]);
        if (len > r->max_stop_len) r->max_stop_len = len;
        r->p.n_stop++;
    }
    r->p.stop = NULL;
    memcpy(r->prompt, prompt, sizeof(int32_t) * (size_t)n_prompt);
    r->n_prompt = n_prompt;
    r->id = g->next_id++;
    r->state = REQ_QUEUED;
    fl_detok_init(&r->detok, 1);
    g->n_reqs++;
    return r->id;
}

int fl_generator_active(const fl_generator *g) {
    int n = 0;
    for (int i = 0; i < g->n_reqs; i++) n += g->reqs[i].state != REQ_DONE;
    return n;
}

static int admit(fl_generator *g, request *r) {
    int need = pages_for(r->n_prompt + r->p.max_tokens);
    if (g->ctx->n_pages - g->reserved_pages < need) return 0;
    int seq = fl_seq_new(g->ctx);
    if (seq < 0) return 0;
    r->seq = seq;
    r->reserved_pages = need;
    g->reserved_pages += need;
    r->state = REQ_RUNNING;
    return 1;
}

static void push(fl_generator *g, int *n, const request *r, int32_t tok, int pos, int want) {
    g->tok[*n] = tok;
    g->adapter[*n] = r->p.adapter;
    int seq = r->seq;
    g->seq[*n] = seq;
    g->pos[*n] = pos;
    g->want[*n] = (int8_t)want;
    (*n)++;
}

/* Fills the batch: decode tokens first, then prefill chunks in arrival order. */
static int build_batch(fl_generator *g, int *n_rows) {
    int T = g->ctx->params.max_batch_tokens, n = 0, rows = 0;
    for (int i = 0; i < g->n_reqs && n < T; i++) {
        request *r = &g->reqs[i];
        if (r->state != REQ_RUNNING || r->n_prefilled < r->n_prompt) continue;
        push(g, &n, r, r->last_token, r->n_prompt + r->n_generated - 1, 1);
        g->row_req[rows++] = i;
    }
    for (int i = 0; i < g->n_reqs && n < T; i++) {
        request *r = &g->reqs[i];
        if (r->state == REQ_DONE) continue;
        if (r->state == REQ_QUEUED && !admit(g, r)) break; /* keep arrival order */
        if (r->n_prefilled >= r->n_prompt) continue;
        int chunk = r->n_prompt - r->n_prefilled;
        if (chunk > g->p.prefill_chunk) chunk = g->p.prefill_chunk;
        if (chunk > T - n) chunk = T - n;
        for (int j = 0; j < chunk; j++) {
            int p = r->n_prefilled + j;
            int last = p == r->n_prompt - 1;
            push(g, &n, r, r->prompt[p], p, last);
            if (last) g->row_req[rows++] = i;
        }
        r->n_prefilled += chunk;
    }
    *n_rows = rows;
    return n;
}

static int append_text(char **buf, size_t *len, size_t *cap, const char *s, size_t n) {
    if (*len + n + 1 > *cap) {
        size_t nc = *cap ? *cap : 256;
        while (nc < *len + n + 1) nc *= 2;
        char *nb = realloc(*buf, nc);
        if (!nb) return fl_error("out of memory holding generated text");
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = 0;
    return 0;
}

/* Earliest occurrence of any stop string at or after from, or -1. */
static long find_stop(const request *r, size_t from) {
    long best = -1;
    for (int i = 0; i < r->p.n_stop; i++) {
        const char *hit = strstr(r->text + from, r->stop[i]);
        if (hit && (best < 0 || hit - r->text < best)) best = hit - r->text;
    }
    return best;
}

/* Bytes at the end of the text that could begin a stop string: held back until known. */
static size_t held_back(const request *r) {
    size_t hold = 0;
    for (int i = 0; i < r->p.n_stop; i++) {
        size_t sl = strlen(r->stop[i]);
        for (size_t k = sl - 1; k > hold; k--)
            if (k <= r->text_len && memcmp(r->text + r->text_len - k, r->stop[i], k) == 0) {
                hold = k;
                break;
            }
    }
    return hold;
}

static int add_event(fl_generator *g, int *n_ev, request *r, int32_t tok, size_t emit_to,
                     fl_finish fin) {
    if (*n_ev == g->cap_events) {
        int cap = g->cap_events ? g->cap_events * 2 : 64;
        fl_gen_event *ne = realloc(g->events, sizeof(fl_gen_event) * (size_t)cap);
        if (!ne) return fl_error("out of memory recording events");
        g->events = ne;
        g->cap_events = cap;
    }
    size_t off = g->event_text_len;
    if (emit_to > r->emitted &&
        append_text(&g->event_text, &g->event_text_len, &g->event_text_cap, r->text + r->emitted,
                    emit_to - r->emitted) != 0)
        return -1;
    fl_gen_event *e = &g->events[(*n_ev)++];
    e->request = r->id;
    e->token = tok;
    e->text = (const char *)(uintptr_t)off; /* resolved to a pointer once the step is done */
    e->text_len = (int)(g->event_text_len - off);
    e->finish = fin;
    if (emit_to > r->emitted) r->emitted = emit_to;
    return 0;
}

static void finish(fl_generator *g, request *r) {
    fl_seq_free(g->ctx, r->seq);
    g->reserved_pages -= r->reserved_pages;
    r->state = REQ_DONE;
}

/* Takes one sampled token: EOS, stop strings, max_tokens; emits its text. */
static int accept_token(fl_generator *g, int *n_ev, request *r, int32_t tok) {
    const fl_tokenizer *tk = g->ctx->model->tok;
    r->n_generated++;
    r->last_token = tok;
    if (!r->p.ignore_eos && fl_tokenizer_is_eos(tk, tok)) {
        char tail[16];
        int n = fl_detok_flush(tk, &r->detok, tail, sizeof tail);
        if (n > 0 && append_text(&r->text, &r->text_len, &r->text_cap, tail, (size_t)n) != 0)
            return -1;
        finish(g, r);
        return add_event(g, n_ev, r, tok, r->text_len, FL_FINISH_EOS);
    }
    char piece[256];
    int n = fl_detok_piece(tk, &r->detok, tok, piece, sizeof piece);
    if (n < 0) n = 0; /* a single token longer than 256 bytes is not a real vocabulary */
    size_t before = r->text_len;
    if (append_text(&r->text, &r->text_len, &r->text_cap, piece, (size_t)n) != 0) return -1;
    int at_limit = r->n_generated >= r->p.max_tokens;
    if (at_limit) {
        n = fl_detok_flush(tk, &r->detok, piece, sizeof piece);
        if (n > 0 && append_text(&r->text, &r->text_len, &r->text_cap, piece, (size_t)n) != 0)
            return -1;
    }
    if (r->p.n_stop > 0) {
        size_t from = before > (size_t)r->max_stop_len ? before - r->max_stop_len : 0;
        long hit = find_stop(r, from);
        if (hit >= 0) {
            r->text_len = (size_t)hit;
            finish(g, r);
            return add_event(g, n_ev, r, tok, r->text_len, FL_FINISH_STOP);
        }
    }
    if (at_limit) {
        finish(g, r);
        return add_event(g, n_ev, r, tok, r->text_len, FL_FINISH_LENGTH);
    }
    return add_event(g, n_ev, r, tok, r->text_len - held_back(r), FL_FINISH_NONE);
}

/* Drops finished requests; their last events were returned by the previous step. */
static void compact(fl_generator *g) {
    int kept = 0;
    for (int i = 0; i < g->n_reqs; i++) {
        if (g->reqs[i].state == REQ_DONE) request_release(&g->reqs[i]);
        else g->reqs[kept++] = g->reqs[i];
    }
    g->n_reqs = kept;
}

int fl_generator_step(fl_generator *g, const fl_gen_event **events) {
    int n_rows, n_ev = 0;
    compact(g);
    g->event_text_len = 0;
    *events = NULL;
    int n = build_batch(g, &n_rows);
    if (n == 0) return 0;
    fl_batch b = {.n_tokens = n, .token = g->tok, .seq = g->seq, .pos = g->pos, .logits = g->want,
                  .adapter = g->adapter};
    if (fl_forward(g->ctx, &b, g->logits) != n_rows) return fl_error_prefix("generator step");
    int vocab = g->ctx->model->cfg.vocab_size;
    for (int row = 0; row < n_rows; row++) {
        request *r = &g->reqs[g->row_req[row]];
        int32_t tok = fl_sampler_sample(r->sampler, g->logits + (size_t)row * vocab);
        if (accept_token(g, &n_ev, r, tok) != 0) return -1;
    }
    for (int i = 0; i < n_ev; i++)
        g->events[i].text = g->event_text + (uintptr_t)g->events[i].text;
    *events = g->events;
    return n_ev;
}
