/* Finetuning datasets: plain text split into fixed-length samples, or JSONL with
 * "text", "prompt"/"completion" or OpenAI chat "messages" per line, tokenized once at
 * load into two arrays (tokens, labels) that every sample views into. */
#include "fl_internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fl_dataset {
    int32_t *tokens, *labels; /* every sample back to back */
    fl_sample *samples;
    int n_samples;
};

fl_dataset_params fl_dataset_default_params(void) {
    fl_dataset_params p = {.max_len = 256, .add_bos = -1};
    return p;
}

/* ------------------------------------------------------------- building */

/* The growing token/label arrays and sample starts while a file loads. */
typedef struct {
    const fl_tokenizer *tok;
    int32_t *tokens, *labels;
    size_t n, cap;
    size_t sample_start;  /* where the sample being built begins */
    size_t *starts;       /* start of each finished sample; starts[n_samples] is the end */
    int n_samples, cap_samples;
    int max_len, add_bos;
} builder;

static int reserve_tokens(builder *b, size_t extra) {
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + extra) cap *= 2;
    int32_t *t = realloc(b->tokens, cap * sizeof *t);
    if (t) b->tokens = t;
    int32_t *l = realloc(b->labels, cap * sizeof *l);
    if (l) b->labels = l;
    if (!t || !l) return fl_error("out of memory holding %zu tokens", cap);
    b->cap = cap;
    return 0;
}

/* Labels for the tokens [from, n) just appended to the current sample. loss marks them
 * as prediction targets: the position before each one gets it as its label. */
static void push_labels(builder *b, size_t from, int loss) {
    for (size_t i = from; i < b->n; i++) {
        if (i > b->sample_start) b->labels[i - 1] = loss ? b->tokens[i] : -1;
        b->labels[i] = -1;
    }
}

static int push_id(builder *b, int32_t id, int loss) {
    if (reserve_tokens(b, 1)) return -1;
    b->tokens[b->n++] = id;
    push_labels(b, b->n - 1, loss);
    return 0;
}

/* Tokenizes len bytes straight into the arrays, growing them when the guess is short. */
static int push_text(builder *b, const char *text, size_t len, int add_bos, int parse_special,
                     int loss) {
    if (reserve_tokens(b, len + 8)) return -1;
    int n = fl_tokenize(b->tok, text, len, add_bos, parse_special, b->tokens + b->n,
                        (int)(b->cap - b->n < INT32_MAX ? b->cap - b->n : INT32_MAX));
    if (n == INT32_MIN) return -1;
    if (n < 0) {
        if (reserve_tokens(b, (size_t)-n)) return -1;
        n = fl_tokenize(b->tok, text, len, add_bos, parse_special, b->tokens + b->n, -n);
        if (n < 0) return -1;
    }
    size_t from = b->n;
    b->n += (size_t)n;
    push_labels(b, from, loss);
    return 0;
}

static int push_str(builder *b, const char *s, int parse_special, int loss) {
    return push_text(b, s, strlen(s), 0, parse_special, loss);
}

/* Closes the current sample at end; its last position has nothing to predict inside
 * the sample. */
static int end_sample(builder *b, size_t end) {
    if (b->n_samples + 1 >= b->cap_samples) {
        int cap = b->cap_samples ? 2 * b->cap_samples : 256;
        size_t *s = realloc(b->starts, (size_t)cap * sizeof *s);
        if (!s) return fl_error("out of memory holding %d samples", cap);
        b->starts = s;
        b->cap_samples = cap;
    }
    b->labels[end - 1] = -1;
    b->starts[b->n_samples++] = b->sample_start;
    b->starts[b->n_samples] = end;
    b->sample_start = end;
    return 0;
}

/* ---------------------------------------------------------- plain text */

/* The whole file is one token stream cut into max_len pieces. Special-token text in
 * the file stays text: a corpus mentioning "</s>" must not end documents there. */
static int load_plain(builder *b, const char *path, const char *text, size_t len) {
    if (push_text(b, text, len, b->add_bos, 0, 1)) return fl_error_prefix("%s", path);
    size_t total = b->n;
    for (size_t s = 0; s < total; s += (size_t)b->max_len) {
        size_t end = total - s > (size_t)b->max_len ? s + (size_t)b->max_len : total;
        if (end - s < 2) break; /* a lone token predicts nothing */
        if (end_sample(b, end)) return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- JSONL */

typedef enum { CHAT_CHATML, CHAT_LLAMA3, CHAT_LLAMA2 } chat_template;

/* The template the tokenizer's vocabulary was built for. */
static chat_template pick_template(const fl_tokenizer *tok) {
    if (fl_tokenizer_token_id(tok, "<|im_start|>") >= 0) return CHAT_CHATML;
    if (fl_tokenizer_token_id(tok, "<|start_header_id|>") >= 0) return CHAT_LLAMA3;
    return CHAT_LLAMA2;
}

/* Whether the tokenizer marks word starts itself (SentencePiece "▁" prepended to each
 * encoded text), so a separately encoded reply already begins with a space. */
static int marks_word_start(const fl_tokenizer *tok) {
    int32_t ids[8];
    if (fl_tokenize(tok, "a", 1, 0, 0, ids, 8) < 1) return 0;
    const char *s = fl_tokenizer_token_text(tok, ids[0]);
    return s && !strncmp(s, "\xe2\x96\x81", 3);
}

static const cJSON *string_field(const cJSON *obj, const char *key, const char *where) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) fl_error("%smissing field '%s'", where, key);
    else if (!cJSON_IsString(v)) fl_error("%sfield '%s' must be a string", where, key);
    return cJSON_IsString(v) ? v : NULL;
}

static int load_text_line(builder *b, const cJSON *obj) {
    const cJSON *text = string_field(obj, "text", "");
    if (!text) return -1;
    return push_text(b, text->valuestring, strlen(text->valuestring), b->add_bos, 0, 1);
}

/* [BOS] prompt completion [EOS], with loss on predicting the completion and EOS. */
static int load_completion_line(builder *b, const cJSON *obj) {
    const cJSON *prompt = string_field(obj, "prompt", "");
    const cJSON *completion = prompt ? string_field(obj, "completion", "") : NULL;
    if (!completion) return -1;
    int eos = fl_tokenizer_eos(b->tok);
    if (push_text(b, prompt->valuestring, strlen(prompt->valuestring), b->add_bos, 0, 0) ||
        push_str(b, completion->valuestring, 0, 1))
        return -1;
    return eos >= 0 ? push_id(b, eos, 1) : 0;
}

typedef struct {
    const char *role, *content;
} chat_message;

/* ChatML (Qwen2): <|im_start|>role\ncontent<|im_end|>\n per message. */
static int render_chatml(builder *b, const chat_message *m, int n) {
    for (int i = 0; i < n; i++) {
        int a = !strcmp(m[i].role, "assistant");
        char head[64];
        snprintf(head, sizeof head, "<|im_start|>%s\n", m[i].role);
        if (push_str(b, head, 1, 0) || push_str(b, m[i].content, 0, a) ||
            push_str(b, "<|im_end|>", 1, a) || push_str(b, "\n", 0, 0))
            return -1;
    }
    return 0;
}

/* LLaMA-3: <|begin_of_text|>, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>. */
static int render_llama3(builder *b, const chat_message *m, int n) {
    if (push_str(b, "<|begin_of_text|>", 1, 0)) return -1;
    for (int i = 0; i < n; i++) {
        int a = !strcmp(m[i].role, "assistant");
        char head[96];
        snprintf(head, sizeof head, "<|start_header_id|>%s<|end_header_id|>\n\n", m[i].role);
        if (push_str(b, head, 1, 0) || push_str(b, m[i].content, 0, a) ||
            push_str(b, "<|eot_id|>", 1, a))
            return -1;
    }
    return 0;
}

/* LLaMA-2 for tokenizers with neither ChatML nor LLaMA-3 tokens:
 * <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] assistant</s> per exchange. The
 * template has no special tokens besides BOS/EOS (ids), so every piece is plain text. */
static int render_llama2(builder *b, const chat_message *m, int n) {
    int bos = fl_tokenizer_bos(b->tok), eos = fl_tokenizer_eos(b->tok);
    const char *reply_sep = marks_word_start(b->tok) ? "" : " ";
    const char *system = NULL;
    for (int i = 0; i < n; i++) {
        if (!strcmp(m[i].role, "system")) {
            if (i + 1 >= n || strcmp(m[i + 1].role, "user"))
                return fl_error("messages[%d]: a system message must be followed by a user "
                                "message in the LLaMA-2 template", i);
            system = m[i].content;
            continue;
        }
        int a = !strcmp(m[i].role, "assistant");
        size_t cap = strlen(m[i].content) + (system ? strlen(system) : 0) + 64;
        char *s = fl_malloc(cap);
        if (!s) return -1;
        if (a)
            snprintf(s, cap, "%s%s", reply_sep, m[i].content);
        else if (system)
            snprintf(s, cap, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system, m[i].content);
        else
            snprintf(s, cap, "[INST] %s [/INST]", m[i].content);
        system = NULL;
        int rc = 0;
        if (!a && bos >= 0) rc = push_id(b, bos, 0);
        if (!rc) rc = push_str(b, s, 0, a);
        if (!rc && a && eos >= 0) rc = push_id(b, eos, 1);
        free(s);
        if (rc) return -1;
    }
    return 0;
}

static int parse_message(const cJSON *item, int i, chat_message *m) {
    char where[48];
    snprintf(where, sizeof where, "messages[%d]: ", i);
    if (!cJSON_IsObject(item)) return fl_error("%smust be an object", where);
    const cJSON *role = string_field(item, "role", where);
    const cJSON *content = role ? string_field(item, "content", where) : NULL;
    if (!content) return -1;
    m->role = role->valuestring;
    m->content = content->valuestring;
    if (strcmp(m->role, "system") && strcmp(m->role, "user") && strcmp(m->role, "assistant"))
        return fl_error("%sunknown role '%.40s' (expected system, user or assistant)", where,
                        m->role);
    return 0;
}

/* OpenAI chat: template pieces are encoded with special tokens recognised, message
 * contents without, so text in a message cannot forge a turn boundary. Loss falls on
 * assistant contents and the end-of-turn token closing each. */
static int load_chat_line(builder *b, const cJSON *obj, chat_template tmpl) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(obj, "messages");
    if (!cJSON_IsArray(list)) return fl_error("field 'messages' must be an array");
    int n = cJSON_GetArraySize(list);
    if (n == 0) return fl_error("field 'messages' is empty");
    chat_message *m = fl_malloc((size_t)n * sizeof *m);
    if (!m) return -1;
    int rc = 0;
    const cJSON *item = list->child;
    for (int i = 0; i < n && !rc; i++, item = item->next) rc = parse_message(item, i, &m[i]);
    if (!rc) {
        if (tmpl == CHAT_CHATML) rc = render_chatml(b, m, n);
        else if (tmpl == CHAT_LLAMA3) rc = render_llama3(b, m, n);
        else rc = render_llama2(b, m, n);
    }
    free(m);
    return rc;
}

/* "text", "prompt"/"completion" or "messages": exactly one, named in the error otherwise. */
static int load_object(builder *b, const cJSON *obj, chat_template tmpl) {
    if (!cJSON_IsObject(obj)) return fl_error("expected a JSON object");
    int text = cJSON_HasObjectItem(obj, "text");
    int pc = cJSON_HasObjectItem(obj, "prompt") || cJSON_HasObjectItem(obj, "completion");
    int chat = cJSON_HasObjectItem(obj, "messages");
    if (text + pc + chat == 0)
        return fl_error("expected field 'text', 'prompt' and 'completion', or 'messages'");
    if (text + pc + chat > 1)
        return fl_error("fields %s and %s cannot be combined: use one shape per line",
                        text ? "'text'" : "'prompt'/'completion'",
                        chat ? "'messages'" : "'prompt'/'completion'");
    if (text) return load_text_line(b, obj);
    if (pc) return load_completion_line(b, obj);
    return load_chat_line(b, obj, tmpl);
}

/* Cuts a line's sample to max_len (a long chat or prompt loses its end rather than being
 * split: a piece without its beginning has no context) and requires something to learn
 * from in what is kept. */
static int finish_line_sample(builder *b) {
    size_t n = b->n - b->sample_start;
    size_t end = b->sample_start + (n > (size_t)b->max_len ? (size_t)b->max_len : n);
    if (n == 0) return fl_error("no tokens to learn from");
    b->n = end;
    b->labels[end - 1] = -1;
    for (size_t i = b->sample_start; i < end; i++)
        if (b->labels[i] >= 0) return end_sample(b, end);
    if (n > (size_t)b->max_len)
        return fl_error("no tokens to learn from within max_len %d (the sample has %zu tokens)",
                        b->max_len, n);
    return fl_error("no tokens to learn from");
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

static int load_line(builder *b, const char *line, size_t len, chat_template tmpl) {
    const char *end = NULL;
    cJSON *obj = cJSON_ParseWithLengthOpts(line, len, &end, 0);
    if (!obj) {
        size_t col = end && end >= line ? (size_t)(end - line) + 1 : 1;
        return fl_error("invalid JSON near column %zu", col);
    }
    int rc;
    if (end && !is_blank(end, len - (size_t)(end - line)))
        rc = fl_error("unexpected text after the JSON value at column %zu",
                      (size_t)(end - line) + 1);
    else
        rc = load_object(b, obj, tmpl);
    cJSON_Delete(obj);
    return rc ? rc : finish_line_sample(b);
}

static int load_jsonl(builder *b, const char *path, const char *text, size_t len) {
    chat_template tmpl = pick_template(b->tok);
    size_t pos = 0;
    for (int lineno = 1; pos < len; lineno++) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
        if (!is_blank(text + pos, n) && load_line(b, text + pos, n, tmpl))
            return fl_error_prefix("%s:%d", path, lineno);
        pos += n + 1;
    }
    return 0;
}

/* --------------------------------------------------------------- loading */

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

/* Moves the builder's arrays into a dataset whose samples point into them. */
static fl_dataset *finish(builder *b) {
    fl_dataset *ds = fl_calloc(1, sizeof *ds);
    fl_sample *samples = fl_malloc((size_t)b->n_samples * sizeof *samples);
    if (!ds || !samples) {
        free(ds);
        free(samples);
        return NULL;
    }
    ds->tokens = b->tokens;
    ds->labels = b->labels;
    ds->samples = samples;
    ds->n_samples = b->n_samples;
    for (int i = 0; i < b->n_samples; i++) {
        samples[i].tokens = b->tokens + b->starts[i];
        samples[i].labels = b->labels + b->starts[i];
        samples[i].n = (int)(b->starts[i + 1] - b->starts[i]);
    }
    free(b->starts);
    return ds;
}

fl_dataset *fl_dataset_load(const char *path, const fl_tokenizer *tok,
                            const fl_dataset_params *params) {
    fl_dataset_params p = params ? *params : fl_dataset_default_params();
    if (!path || !tok) {
        fl_error("fl_dataset_load: path and tokenizer are required");
        return NULL;
    }
    if (p.max_len < 2) {
        fl_error("%s: max_len %d must be at least 2", path, p.max_len);
        return NULL;
    }
    size_t len;
    char *text = fl_read_file(path, &len);
    if (!text) return NULL;
    builder b = {.tok = tok, .max_len = p.max_len,
                 .add_bos = p.add_bos < 0 ? fl_tokenizer_add_bos(tok) : p.add_bos != 0};
    int rc = is_blank(text, len) ? fl_error("%s: empty file", path)
             : ends_with(path, ".jsonl") ? load_jsonl(&b, path, text, len)
                                         : load_plain(&b, path, text, len);
    if (!rc && b.n_samples == 0) rc = fl_error("%s: no samples (too few tokens)", path);
    free(text);
    fl_dataset *ds = rc ? NULL : finish(&b);
    if (!ds) {
        free(b.tokens);
        free(b.labels);
        free(b.starts);
    }
    return ds;
}

void fl_dataset_free(fl_dataset *ds) {
    if (!ds) return;
    free(ds->tokens);
    free(ds->labels);
    free(ds->samples);
    free(ds);
}

int fl_dataset_count(const fl_dataset *ds) { return ds ? ds->n_samples : 0; }

const fl_sample *fl_dataset_get(const fl_dataset *ds, int i) {
    if (!ds || i < 0 || i >= ds->n_samples) {
        fl_error("dataset sample %d out of range", i);
        return NULL;
    }
    return &ds->samples[i];
}

/* --------------------------------------------------------------- order */

/* Fisher-Yates with our own generator, so an epoch's order is the same everywhere.
 * The modulo's bias is below count / 2^64: negligible. */
void fl_dataset_order(const fl_dataset *ds, uint64_t seed, int epoch, int *order) {
    int n = fl_dataset_count(ds);
    uint64_t mix = seed;
    uint64_t state = fl_splitmix64(&mix) ^ (uint64_t)(int64_t)epoch * 0xD1B54A32D192ED03ULL;
    for (int i = 0; i < n; i++) order[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(fl_splitmix64(&state) % (uint64_t)(i + 1));
        int t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}
