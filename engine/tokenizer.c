/* Hugging Face tokenizer.json loading (BPE models: byte-level like LLaMA-3 and
 * Qwen2, SentencePiece-style with byte fallback like LLaMA-2), BOS/EOS from the
 * model folder, and streaming UTF-8 decoding. Encoding is in tokenizer_encode.c. */
#include "tokenizer.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_TEXT UINT32_MAX
#define MAX_VOCAB (1 << 24)
#define MAX_MERGED (1 << 16) /* bytes of a merged token */

/* ------------------------------------------------------------ hash tables */

static uint32_t hash_str(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
    return (uint32_t)(h ^ (h >> 32));
}

static uint32_t hash_pair(uint64_t key) {
    return (uint32_t)((key * 0x9e3779b97f4a7c15ull) >> 32);
}

static uint32_t table_size(size_t n) {
    uint32_t cap = 16;
    while (cap < n + n / 2 + 1) cap *= 2; /* load factor at most 2/3 */
    return cap;
}

static int text_equal(const fl_tokenizer *t, int32_t id, const char *s, size_t n) {
    return (size_t)t->text_len[id] == n && memcmp(t->arena + t->text_off[id], s, n) == 0;
}

int32_t fl_tok_lookup(const fl_tokenizer *t, const char *s, size_t n) {
    uint32_t h = hash_str(s, n);
    for (uint32_t i = h & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        const tok_str_slot *e = &t->vocab[i];
        if (e->id < 0) return -1;
        if (e->hash == h && text_equal(t, e->id, s, n)) return e->id;
    }
}

/* Maps the text of id to id, unless that text already names a token. */
static void vocab_insert(fl_tokenizer *t, int32_t id) {
    const char *s = t->arena + t->text_off[id];
    size_t n = (size_t)t->text_len[id];
    uint32_t h = hash_str(s, n);
    for (uint32_t i = h & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        tok_str_slot *e = &t->vocab[i];
        if (e->id < 0) {
            e->hash = h;
            e->id = id;
            return;
        }
        if (e->hash == h && text_equal(t, e->id, s, n)) return;
    }
}

int32_t fl_tok_merge(const fl_tokenizer *t, int32_t left, int32_t right, int32_t *merged) {
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint32_t i = hash_pair(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const tok_pair_slot *e = &t->merges[i];
        if (e->key == UINT64_MAX) return -1;
        if (e->key == key) {
            *merged = e->id;
            return e->rank;
        }
    }
}

/* Records a merge; the first (best ranked) of duplicate merges wins. */
static void merge_insert(fl_tokenizer *t, int32_t left, int32_t right, int32_t rank, int32_t merged) {
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint32_t i = hash_pair(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        tok_pair_slot *e = &t->merges[i];
        if (e->key == key) return;
        if (e->key == UINT64_MAX) {
            e->key = key;
            e->rank = rank;
            e->id = merged;
            return;
        }
    }
}

/* ------------------------------------------------------------------ UTF-8 */

int fl_tok_utf8_seq(const uint8_t *s, size_t n) {
    uint8_t c = s[0], lo = 0x80, hi = 0xbf;
    int need;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        need = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
        need = 2;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f; /* no surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 3;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f; /* nothing above U+10FFFF */
    } else {
        return -1;
    }
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n) return 0;
        uint8_t b = s[i];
        if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xbf)) return -i;
    }
    return need + 1;
}

static int utf8_put(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* GPT-2's byte alphabet: printable bytes stand for themselves, the other 68
 * move to U+0100.. in byte order, so every byte is a visible character. */
static uint32_t byte_cp(int b) {
    int printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
    if (printable) return (uint32_t)b;
    int shifted = 0;
    for (int i = 0; i < b; i++)
        shifted += !((i >= 0x21 && i <= 0x7e) || (i >= 0xa1 && i <= 0xac) || i >= 0xae);
    return 0x100u + (uint32_t)shifted;
}

int fl_byte_level_char(int b, char *out) { return utf8_put(byte_cp(b), out); }

/* --------------------------------------------------------------- loading */

typedef struct {
    const char *path;
    int byte_level;        /* ByteLevel decoder */
    int byte_fallback;     /* ByteFallback decoder */
    char *from, *to;       /* Replace decoder */
} dec_spec;

static const char *json_str(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const char *json_type(const cJSON *obj) {
    const char *s = json_str(obj, "type");
    return s ? s : "(none)";
}

/* A token id from a JSON number (*id -1 and -1 returned when it is none). */
static int json_id(const cJSON *v, int32_t *id) {
    *id = -1;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= MAX_VOCAB ||
        v->valuedouble != (double)(int32_t)v->valuedouble)
        return -1;
    *id = (int32_t)v->valuedouble;
    return 0;
}

static void set_text(fl_tokenizer *t, int32_t id, const char *s, uint8_t attr) {
    if (t->text_off[id] == NO_TEXT) {
        size_t n = strlen(s);
        t->text_off[id] = (uint32_t)t->arena_len;
        t->text_len[id] = (int32_t)n;
        memcpy(t->arena + t->arena_len, s, n + 1);
        t->arena_len += n + 1;
    }
    t->attr[id] |= attr;
}

/* Sizes the id space and the string arena from the vocab and added tokens. */
static int size_tables(fl_tokenizer *t, const cJSON *vocab, const cJSON *added, const char *path) {
    int32_t max_id = -1, id;
    size_t bytes = 0, count = 0;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        if (json_id(e, &id)) return fl_error("%s: model.vocab['%.64s'] is not a token id", path, e->string);
        if (id > max_id) max_id = id;
        bytes += strlen(e->string) + 1;
        count++;
    }
    int i = 0;
    for (const cJSON *a = added ? added->child : NULL; a; a = a->next, i++) {
        const char *content = json_str(a, "content");
        if (!content) return fl_error("%s: added_tokens[%d].content missing", path, i);
        if (json_id(cJSON_GetObjectItemCaseSensitive(a, "id"), &id))
            return fl_error("%s: added_tokens[%d].id is not a token id", path, i);
        if (id > max_id) max_id = id;
        bytes += strlen(content) + 1;
        count++;
    }
    if (max_id < 0) return fl_error("%s: model.vocab is empty", path);
    if (bytes >= NO_TEXT) return fl_error("%s: the vocabulary's strings are too large", path);
    t->n_vocab = max_id + 1;
    t->arena = fl_malloc(bytes);
    t->text_off = fl_malloc(sizeof *t->text_off * (size_t)t->n_vocab);
    t->text_len = fl_calloc((size_t)t->n_vocab, sizeof *t->text_len);
    t->attr = fl_calloc((size_t)t->n_vocab, 1);
    t->vocab_mask = table_size(count) - 1;
    t->vocab = fl_malloc(sizeof *t->vocab * ((size_t)t->vocab_mask + 1));
    if (!t->arena || !t->text_off || !t->text_len || !t->attr || !t->vocab) return -1;
    memset(t->text_off, 0xff, sizeof *t->text_off * (size_t)t->n_vocab);
    memset(t->vocab, 0xff, sizeof *t->vocab * ((size_t)t->vocab_mask + 1));
    return 0;
}

static void load_vocab(fl_tokenizer *t, const cJSON *vocab) {
    int32_t id;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        json_id(e, &id); /* validated by size_tables */
        set_text(t, id, e->string, TOK_MODEL);
        vocab_insert(t, id);
    }
}

static int cmp_added(const void *pa, const void *pb) {
    const tok_added *a = pa, *b = pb;
    uint8_t fa = (uint8_t)a->text[0], fb = (uint8_t)b->text[0];
    if (fa != fb) return fa < fb ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

/* Added tokens keep their own content (for matching and decoding) and are
 * grouped by first byte so that matching tries only plausible ones. */
static int load_added(fl_tokenizer *t, const cJSON *added, const char *path) {
    int n = cJSON_GetArraySize(added), k = 0;
    t->added = fl_calloc((size_t)n, sizeof *t->added);
    if (!t->added) return -1;
    for (const cJSON *a = added->child; a; a = a->next) {
        int32_t id;
        json_id(cJSON_GetObjectItemCaseSensitive(a, "id"), &id); /* validated by size_tables */
        const char *content = json_str(a, "content");
        if (!*content) return fl_error("%s: added token %d has empty content", path, id);
        int special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, "special"));
        set_text(t, id, content, (uint8_t)(TOK_ADDED | (special ? TOK_SPECIAL : 0)));
        if (!text_equal(t, id, content, strlen(content)))
            return fl_error("%s: added token %d '%.64s' differs from the vocab's '%.64s'", path, id,
                            content, t->arena + t->text_off[id]);
        vocab_insert(t, id);
        tok_added *e = &t->added[k++];
        e->id = id;
        e->text = t->arena + t->text_off[id];
        e->len = t->text_len[id];
        e->special = special;
        e->lstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, "lstrip"));
        e->rstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, "rstrip"));
    }
    t->n_added = k;
    qsort(t->added, (size_t)k, sizeof *t->added, cmp_added);
    for (int b = 0, i = 0; b <= 256; b++) {
        while (i < k && (uint8_t)t->added[i].text[0] < b) i++;
        t->added_start[b] = i;
    }
    return 0;
}

int32_t fl_tok_model_id(const fl_tokenizer *t, const char *s, size_t n) {
    int32_t id = fl_tok_lookup(t, s, n);
    return id >= 0 && (t->attr[id] & TOK_MODEL) ? id : -1;
}

static void index_chars(fl_tokenizer *t) {
    char buf[8];
    for (uint32_t cp = 0; cp < TOK_DIRECT_CHARS; cp++)
        t->char_id[cp] = fl_tok_model_id(t, buf, (size_t)utf8_put(cp, buf));
    for (int b = 0; b < 256; b++) {
        snprintf(buf, sizeof buf, "<0x%02X>", b);
        t->byte_id[b] = fl_tok_model_id(t, buf, strlen(buf));
        t->byte_chr[b][0] = (char)fl_byte_level_char(b, t->byte_chr[b] + 1);
    }
}

/* One merge as its two halves: "a b" (split at the first space) or ["a", "b"]. */
static int merge_halves(const cJSON *m, const char **a, size_t *na, const char **b, size_t *nb) {
    if (cJSON_IsString(m)) {
        const char *sp = strchr(m->valuestring, ' ');
        if (!sp) return -1;
        *a = m->valuestring;
        *na = (size_t)(sp - m->valuestring);
        *b = sp + 1;
        *nb = strlen(sp + 1);
        return 0;
    }
    if (cJSON_GetArraySize(m) != 2 || !cJSON_IsString(m->child) || !cJSON_IsString(m->child->next))
        return -1;
    *a = m->child->valuestring;
    *na = strlen(*a);
    *b = m->child->next->valuestring;
    *nb = strlen(*b);
    return 0;
}

/* One merge: both halves and their concatenation must be model tokens. */
static int load_merge(fl_tokenizer *t, const cJSON *m, int rank, char *cat, const char *path) {
    const char *a, *b;
    size_t na, nb;
    if (merge_halves(m, &a, &na, &b, &nb) || na == 0 || nb == 0 || na + nb > MAX_MERGED)
        return fl_error("%s: merge %d is neither \"a b\" nor [\"a\", \"b\"]", path, rank);
    int32_t left = fl_tok_model_id(t, a, na), right = fl_tok_model_id(t, b, nb);
    if (left < 0 || right < 0) {
        const char *bad = left < 0 ? a : b;
        size_t n = left < 0 ? na : nb;
        return fl_error("%s: merge %d names unknown token '%.*s'", path, rank, (int)(n > 64 ? 64 : n), bad);
    }
    memcpy(cat, a, na);
    memcpy(cat + na, b, nb);
    int32_t merged = fl_tok_model_id(t, cat, na + nb);
    if (merged < 0)
        return fl_error("%s: merge %d makes '%.*s', which is not in the vocab", path, rank,
                        (int)(na + nb > 64 ? 64 : na + nb), cat);
    merge_insert(t, left, right, rank, merged);
    return 0;
}

static int load_merges(fl_tokenizer *t, const cJSON *merges, const char *path) {
    t->merge_mask = table_size((size_t)cJSON_GetArraySize(merges)) - 1;
    t->merges = fl_malloc(sizeof *t->merges * ((size_t)t->merge_mask + 1));
    char *cat = fl_malloc(MAX_MERGED);
    int rc = t->merges && cat ? 0 : -1, rank = 0;
    if (t->merges) memset(t->merges, 0xff, sizeof *t->merges * ((size_t)t->merge_mask + 1));
    for (const cJSON *m = merges->child; m && !rc; m = m->next) rc = load_merge(t, m, rank++, cat, path);
    free(cat);
    return rc;
}

static int load_model_flags(fl_tokenizer *t, const cJSON *model, const char *path) {
    t->byte_fallback = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback"));
    t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges"));
    t->fuse_unk = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "fuse_unk"));
    const char *prefix = json_str(model, "continuing_subword_prefix");
    const char *suffix = json_str(model, "end_of_word_suffix");
    if ((prefix && *prefix) || (suffix && *suffix))
        return fl_error("%s: model.continuing_subword_prefix / end_of_word_suffix are not supported", path);
    t->unk_id = -1;
    const char *unk = json_str(model, "unk_token");
    if (unk && (t->unk_id = fl_tok_lookup(t, unk, strlen(unk))) < 0)
        return fl_error("%s: model.unk_token '%.64s' is not in the vocab", path, unk);
    return 0;
}

/* ------------------------------------------- normalizer, pre-tokenizer, decoder */

static int add_norm(fl_tokenizer *t, tok_norm_kind kind, const char *from, const char *to, const char *path) {
    if (t->n_norms == TOK_MAX_NORMS) return fl_error("%s: more than %d normalizers", path, TOK_MAX_NORMS);
    tok_norm *n = &t->norms[t->n_norms++];
    n->kind = kind;
    if ((from && !(n->from = fl_strdup(from))) || (to && !(n->to = fl_strdup(to)))) return -1;
    return 0;
}

static int parse_normalizer(fl_tokenizer *t, const cJSON *n, const char *path) {
    if (!n || cJSON_IsNull(n)) return 0;
    const char *type = json_type(n);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (!cJSON_IsArray(list)) return fl_error("%s: normalizer Sequence has no normalizers array", path);
        for (const cJSON *e = list->child; e; e = e->next)
            if (parse_normalizer(t, e, path)) return -1;
        return 0;
    }
    if (!strcmp(type, "NFC")) return add_norm(t, NORM_NFC, NULL, NULL, path);
    if (!strcmp(type, "NFD")) return add_norm(t, NORM_NFD, NULL, NULL, path);
    if (!strcmp(type, "NFKC")) return add_norm(t, NORM_NFKC, NULL, NULL, path);
    if (!strcmp(type, "NFKD")) return add_norm(t, NORM_NFKD, NULL, NULL, path);
    if (!strcmp(type, "Prepend")) {
        const char *s = json_str(n, "prepend");
        if (!s) return fl_error("%s: normalizer Prepend has no prepend string", path);
        return add_norm(t, NORM_PREPEND, NULL, s, path);
    }
    if (!strcmp(type, "Replace")) {
        const char *from = json_str(cJSON_GetObjectItemCaseSensitive(n, "pattern"), "String");
        const char *to = json_str(n, "content");
        if (!from || !*from || !to)
            return fl_error("%s: normalizer Replace needs pattern.String and content (regex patterns are not supported)", path);
        return add_norm(t, NORM_REPLACE, from, to, path);
    }
    return fl_error("%s: normalizer type '%s' is not supported", path, type);
}

static int add_split(fl_tokenizer *t, const char *pattern, int literal, const char *path) {
    if (t->n_splits == TOK_MAX_SPLITS) return fl_error("%s: more than %d pre-tokenizer splits", path, TOK_MAX_SPLITS);
    /* MATCH_INVALID_UTF: text that is not valid UTF-8 still splits (its bad
     * bytes never match); LITERAL does not allow UCP. */
    uint32_t opts = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    int err;
    PCRE2_SIZE at;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, opts, &err, &at, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return fl_error("%s: pre_tokenizer pattern does not compile at offset %zu: %s", path, (size_t)at, (char *)msg);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* without JIT, pcre2_match interprets */
    t->splits[t->n_splits++] = re;
    return 0;
}

#define GPT2_PATTERN "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

static int parse_pre_tokenizer(fl_tokenizer *t, const cJSON *p, const char *path) {
    if (!p || cJSON_IsNull(p)) return 0;
    const char *type = json_type(p);
    if (t->byte_level) return fl_error("%s: pre_tokenizer %s after ByteLevel is not supported", path, type);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
        if (!cJSON_IsArray(list)) return fl_error("%s: pre_tokenizer Sequence has no pretokenizers array", path);
        for (const cJSON *e = list->child; e; e = e->next)
            if (parse_pre_tokenizer(t, e, path)) return -1;
        return 0;
    }
    if (!strcmp(type, "Split")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const char *regex = json_str(pat, "Regex"), *literal = json_str(pat, "String");
        const char *behavior = json_str(p, "behavior");
        if (!regex && !literal) return fl_error("%s: pre_tokenizer Split has no pattern", path);
        if (!behavior || strcmp(behavior, "Isolated") || cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(p, "invert")))
            return fl_error("%s: pre_tokenizer Split supports only behavior Isolated without invert", path);
        return add_split(t, regex ? regex : literal, !regex, path);
    }
    if (!strcmp(type, "ByteLevel")) {
        /* A leading space is added to the whole segment, so only before any split. */
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(p, "add_prefix_space"))) {
            if (t->n_splits) return fl_error("%s: ByteLevel add_prefix_space after a Split is not supported", path);
            t->prefix_space = 1;
        }
        const cJSON *use_regex = cJSON_GetObjectItemCaseSensitive(p, "use_regex");
        if ((!use_regex || cJSON_IsTrue(use_regex)) && add_split(t, GPT2_PATTERN, 0, path)) return -1;
        t->byte_level = 1;
        return 0;
    }
    return fl_error("%s: pre_tokenizer type '%s' is not supported", path, type);
}

static int parse_decoder(fl_tokenizer *t, const cJSON *d, dec_spec *ds) {
    if (!d || cJSON_IsNull(d)) return 0;
    const char *type = json_type(d), *path = ds->path;
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(d, "decoders");
        if (!cJSON_IsArray(list)) return fl_error("%s: decoder Sequence has no decoders array", path);
        for (const cJSON *e = list->child; e; e = e->next)
            if (parse_decoder(t, e, ds)) return -1;
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) {
        ds->byte_level = 1;
        return 0;
    }
    if (!strcmp(type, "ByteFallback")) {
        ds->byte_fallback = 1;
        return 0;
    }
    if (!strcmp(type, "Fuse")) return 0; /* the stream is already fused */
    if (!strcmp(type, "Replace")) {
        const char *from = json_str(cJSON_GetObjectItemCaseSensitive(d, "pattern"), "String");
        const char *to = json_str(d, "content");
        if (!from || !*from || !to || ds->from) return fl_error("%s: decoder Replace: only one, with pattern.String, is supported", path);
        if (!(ds->from = fl_strdup(from)) || !(ds->to = fl_strdup(to))) return -1;
        return 0;
    }
    if (!strcmp(type, "Strip")) {
        const char *content = json_str(d, "content");
        const cJSON *start = cJSON_GetObjectItemCaseSensitive(d, "start"), *stop = cJSON_GetObjectItemCaseSensitive(d, "stop");
        if (!content || strcmp(content, " ") || !cJSON_IsNumber(start) || start->valueint < 0 || start->valueint > 8 ||
            (stop && (!cJSON_IsNumber(stop) || stop->valueint != 0)))
            return fl_error("%s: decoder Strip: only stripping up to 8 leading spaces is supported", path);
        t->strip_start = start->valueint;
        return 0;
    }
    return fl_error("%s: decoder type '%s' is not supported", path, type);
}

/* ------------------------------------------------------------ decode table */

/* The byte-level decoder's inverse alphabet: code point -> byte, or -1. */
static void byte_inverse(int16_t inv[0x144]) {
    for (int i = 0; i < 0x144; i++) inv[i] = -1;
    for (int b = 0; b < 256; b++) inv[byte_cp(b)] = (int16_t)b;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The byte of a "<0xHH>" token, or -1. */
static int fallback_byte(const char *s, int n) {
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') return -1;
    int hi = hex_digit(s[3]), lo = hex_digit(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

/* Byte-level text back to bytes; characters outside the alphabet stay as they are. */
static size_t decode_byte_level(const char *s, int n, const int16_t *inv, char *out) {
    size_t w = 0;
    for (int i = 0; i < n;) {
        int len = fl_tok_utf8_seq((const uint8_t *)s + i, (size_t)(n - i));
        if (len <= 0) len = 1;
        uint32_t cp = len == 2 ? ((uint32_t)(s[i] & 0x1f) << 6 | (uint32_t)(s[i + 1] & 0x3f)) : (uint8_t)s[i];
        if (len <= 2 && cp < 0x144 && inv[cp] >= 0) {
            out[w++] = (char)inv[cp];
        } else {
            memcpy(out + w, s + i, (size_t)len);
            w += (size_t)len;
        }
        i += len;
    }
    return w;
}

static size_t decode_replace(const char *s, int n, const dec_spec *ds, char *out) {
    size_t w = 0, fl = ds->from ? strlen(ds->from) : 0, tl = ds->to ? strlen(ds->to) : 0;
    for (int i = 0; i < n;) {
        if (fl && (size_t)(n - i) >= fl && !memcmp(s + i, ds->from, fl)) {
            memcpy(out + w, ds->to, tl);
            w += tl;
            i += (int)fl;
        } else {
            out[w++] = s[i++];
        }
    }
    return w;
}

/* Precomputes what each token decodes to: added tokens their content, byte-level
 * tokens their bytes, SentencePiece tokens with "▁" replaced and <0xHH> as bytes. */
static int build_decode_table(fl_tokenizer *t, const dec_spec *ds) {
    size_t grow = ds->to ? strlen(ds->to) : 1;
    t->dec = fl_malloc(t->arena_len * (grow > 1 ? grow : 1));
    t->dec_off = fl_malloc(sizeof *t->dec_off * (size_t)t->n_vocab);
    t->dec_len = fl_calloc((size_t)t->n_vocab, sizeof *t->dec_len);
    if (!t->dec || !t->dec_off || !t->dec_len) return -1;
    int16_t inv[0x144];
    byte_inverse(inv);
    size_t used = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        t->dec_off[id] = (uint32_t)used;
        if (t->text_off[id] == NO_TEXT) continue;
        const char *s = t->arena + t->text_off[id];
        int n = t->text_len[id], byte = ds->byte_fallback ? fallback_byte(s, n) : -1;
        char *out = t->dec + used;
        size_t w;
        if (t->attr[id] & TOK_ADDED) {
            memcpy(out, s, (size_t)n);
            w = (size_t)n;
        } else if (ds->byte_level) {
            w = decode_byte_level(s, n, inv, out);
        } else if (byte >= 0) {
            out[0] = (char)byte;
            w = 1;
        } else {
            w = decode_replace(s, n, ds, out);
        }
        t->dec_len[id] = (int32_t)w;
        used += w;
    }
    return 0;
}

/* ---------------------------------------------------------------- BOS/EOS */

static int32_t special_named(const fl_tokenizer *t, const char *const *names) {
    for (int i = 0; names[i]; i++) {
        int32_t id = fl_tok_lookup(t, names[i], strlen(names[i]));
        if (id >= 0 && (t->attr[id] & TOK_SPECIAL)) return id;
    }
    return -1;
}

static const cJSON *find_template(const cJSON *pp) {
    if (!pp) return NULL;
    const char *type = json_type(pp);
    if (!strcmp(type, "TemplateProcessing")) return pp;
    if (strcmp(type, "Sequence")) return NULL;
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(pp, "processors");
    for (const cJSON *e = cJSON_IsArray(list) ? list->child : NULL; e; e = e->next) {
        const cJSON *found = find_template(e);
        if (found) return found;
    }
    return NULL;
}

/* The special token a TemplateProcessing post-processor puts first, or -1. */
static int32_t template_bos(const fl_tokenizer *t, const cJSON *pp) {
    const cJSON *tpl = find_template(pp);
    const cJSON *single = tpl ? cJSON_GetObjectItemCaseSensitive(tpl, "single") : NULL;
    const cJSON *first = cJSON_IsArray(single) ? single->child : NULL;
    const char *name = json_str(cJSON_GetObjectItemCaseSensitive(first, "SpecialToken"), "id");
    if (!name) return -1;
    const cJSON *spec = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(tpl, "special_tokens"), name);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(spec, "ids");
    int32_t id;
    if (cJSON_IsArray(ids) && !json_id(ids->child, &id) && id < t->n_vocab) return id;
    return fl_tok_lookup(t, name, strlen(name));
}

static void add_eos(fl_tokenizer *t, int32_t id) {
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] == id) return;
    if (t->n_eos < FL_MAX_EOS) t->eos_ids[t->n_eos++] = id; /* more than FL_MAX_EOS: the first ones */
}

/* From tokenizer.json alone: BOS is what the post-processor prepends, else a
 * special token with a usual BOS name; EOS a special token with a usual EOS name. */
static void default_bos_eos(fl_tokenizer *t, const cJSON *root) {
    static const char *const bos_names[] = {"<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", NULL};
    static const char *const eos_names[] = {"</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", NULL};
    int32_t tpl = template_bos(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"));
    t->add_bos = tpl >= 0;
    t->bos = tpl >= 0 ? tpl : special_named(t, bos_names);
    t->eos = special_named(t, eos_names);
    if (t->eos >= 0) add_eos(t, t->eos);
}

/* ---------------------------------------------------------------- loading */

static int build(fl_tokenizer *t, const cJSON *root, const char *path) {
    if (!cJSON_IsObject(root)) return fl_error("%s: the top level is not a JSON object", path);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!model) return fl_error("%s: model missing", path);
    if (!cJSON_IsObject(model)) return fl_error("%s: model is not an object", path);
    const char *type = json_str(model, "type");
    if (type && strcmp(type, "BPE")) return fl_error("%s: model type '%s' is not supported (only BPE)", path, type);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (!vocab) return fl_error("%s: model.vocab missing", path);
    if (!cJSON_IsObject(vocab)) return fl_error("%s: model.vocab is not an object", path);
    if (!merges) return fl_error("%s: model.merges missing", path);
    if (!cJSON_IsArray(merges)) return fl_error("%s: model.merges is not an array", path);
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added)) return fl_error("%s: added_tokens is not an array", path);
    if (!cJSON_IsArray(added)) added = NULL;

    dec_spec ds = {.path = path};
    int rc = size_tables(t, vocab, added, path);
    if (!rc) {
        load_vocab(t, vocab);
        rc = added ? load_added(t, added, path) : 0;
    }
    if (!rc) {
        index_chars(t);
        rc = load_merges(t, merges, path);
    }
    if (!rc) rc = load_model_flags(t, model, path);
    if (!rc) rc = parse_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), path);
    if (!rc) rc = parse_pre_tokenizer(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), path);
    if (!rc) rc = parse_decoder(t, cJSON_GetObjectItemCaseSensitive(root, "decoder"), &ds);
    if (!rc) rc = build_decode_table(t, &ds);
    if (!rc) default_bos_eos(t, root);
    free(ds.from);
    free(ds.to);
    return rc;
}

static cJSON *parse_json_file(const char *path) {
    size_t len;
    char *buf = fl_read_file(path, &len);
    if (!buf) return NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(buf, len, &end, 0);
    if (!root) {
        size_t at = end ? (size_t)(end - buf) : 0;
        fl_error("%s: invalid JSON near byte %zu%s", path, at, at + 1 >= len ? " (the file ends early)" : "");
    }
    free(buf);
    return root;
}

fl_tokenizer *fl_tokenizer_load(const char *path) {
    cJSON *root = parse_json_file(path);
    if (!root) return NULL;
    fl_tokenizer *t = fl_calloc(1, sizeof *t);
    if (t && build(t, root, path)) {
        fl_tokenizer_free(t);
        t = NULL;
    }
    cJSON_Delete(root);
    return t;
}

/* A token given by name in tokenizer_config.json: a string, {"content": ...}, or
 * null (none). Returns 1 when the key is present, 0 when absent, -1 on error. */
static int config_token(const fl_tokenizer *t, const cJSON *cfg, const char *key, int32_t *id, const char *path) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (!v) return 0;
    if (cJSON_IsNull(v)) {
        *id = -1;
        return 1;
    }
    const char *name = cJSON_IsString(v) ? v->valuestring : json_str(v, "content");
    if (!name) return fl_error("%s: %s is neither a string nor an object with content", path, key);
    if ((*id = fl_tok_lookup(t, name, strlen(name))) < 0)
        return fl_error("%s: %s '%.64s' is not in the vocabulary", path, key, name);
    return 1;
}

/* tokenizer_config.json: bos_token, eos_token, add_bos_token. *bos_set tells
 * whether it named the BOS (config.json's bos_token_id then does not apply). */
static int load_tokenizer_config(fl_tokenizer *t, const char *path, int *bos_set, int *eos_set) {
    cJSON *cfg = parse_json_file(path);
    if (!cfg) return -1;
    int32_t bos, eos;
    int rc = 0, has_bos = config_token(t, cfg, "bos_token", &bos, path);
    int has_eos = has_bos < 0 ? -1 : config_token(t, cfg, "eos_token", &eos, path);
    if (has_bos < 0 || has_eos < 0) {
        rc = -1;
    } else {
        if (has_bos) t->bos = bos;
        if (has_eos && eos >= 0) {
            t->eos = eos;
            add_eos(t, eos);
        }
        *bos_set = has_bos;
        *eos_set = has_eos && eos >= 0;
        const cJSON *add = cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token");
        if (cJSON_IsBool(add)) t->add_bos = cJSON_IsTrue(add);
    }
    cJSON_Delete(cfg);
    return rc;
}

static int config_id(const fl_tokenizer *t, const cJSON *v, int32_t *id, const char *path, const char *key) {
    if (json_id(v, id) || *id >= t->n_vocab)
        return fl_error("%s: %s is not a token id of this vocabulary (%d tokens)", path, key, t->n_vocab);
    return 0;
}

/* config.json: bos_token_id (unless tokenizer_config named one), and every
 * eos_token_id (an int or a list) as an EOS. */
static int load_model_config(fl_tokenizer *t, const char *path, int bos_set, int eos_set) {
    cJSON *cfg = parse_json_file(path);
    if (!cfg) return -1;
    int rc = 0;
    int32_t id;
    const cJSON *bos = cJSON_GetObjectItemCaseSensitive(cfg, "bos_token_id");
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(cfg, "eos_token_id");
    if (!bos_set && bos && !cJSON_IsNull(bos)) {
        rc = config_id(t, bos, &id, path, "bos_token_id");
        if (!rc) t->bos = id;
    }
    const cJSON *list = cJSON_IsArray(eos) ? eos->child : eos && !cJSON_IsNull(eos) ? eos : NULL;
    for (const cJSON *e = list; e && !rc; e = cJSON_IsArray(eos) ? e->next : NULL) {
        rc = config_id(t, e, &id, path, "eos_token_id");
        if (rc) break;
        if (!eos_set) {
            t->eos = id;
            eos_set = 1;
        }
        add_eos(t, id);
    }
    cJSON_Delete(cfg);
    return rc;
}

fl_tokenizer *fl_tokenizer_load_dir(const char *dir) {
    char path[4096];
    if (fl_path_join(path, sizeof path, dir, "tokenizer.json")) return NULL;
    fl_tokenizer *t = fl_tokenizer_load(path);
    if (!t) return NULL;
    int bos_set = 0, eos_set = 0, rc = fl_path_join(path, sizeof path, dir, "tokenizer_config.json");
    if (!rc && fl_file_exists(path)) rc = load_tokenizer_config(t, path, &bos_set, &eos_set);
    if (!rc) rc = fl_path_join(path, sizeof path, dir, "config.json");
    if (!rc && fl_file_exists(path)) rc = load_model_config(t, path, bos_set, eos_set);
    if (rc) {
        fl_tokenizer_free(t);
        return NULL;
    }
    return t;
}

void fl_tokenizer_free(fl_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_norms; i++) {
        free(t->norms[i].from);
        free(t->norms[i].to);
    }
    for (int i = 0; i < t->n_splits; i++) pcre2_code_free(t->splits[i]);
    free(t->arena);
    free(t->text_off);
    free(t->text_len);
    free(t->attr);
    free(t->vocab);
    free(t->merges);
    free(t->added);
    free(t->dec);
    free(t->dec_off);
    free(t->dec_len);
    free(t);
}

/* -------------------------------------------------------------- accessors */

int fl_tokenizer_n_vocab(const fl_tokenizer *t) { return t->n_vocab; }
int fl_tokenizer_bos(const fl_tokenizer *t) { return t->bos; }
int fl_tokenizer_eos(const fl_tokenizer *t) { return t->eos; }
int fl_tokenizer_add_bos(const fl_tokenizer *t) { return t->add_bos; }

int fl_tokenizer_is_eos(const fl_tokenizer *t, int32_t id) {
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] == id) return 1;
    return 0;
}

int fl_tokenizer_is_special(const fl_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab && (t->attr[id] & TOK_SPECIAL);
}

const char *fl_tokenizer_token_text(const fl_tokenizer *t, int32_t id) {
    if (id < 0 || id >= t->n_vocab || t->text_off[id] == NO_TEXT) return NULL;
    return t->arena + t->text_off[id];
}

int32_t fl_tokenizer_token_id(const fl_tokenizer *t, const char *text) {
    return fl_tok_lookup(t, text, strlen(text));
}

/* --------------------------------------------------------------- decoding */

static void put_bytes(char *out, int cap, int *w, const uint8_t *s, int n) {
    for (int i = 0; i < n; i++, (*w)++)
        if (*w < cap) out[*w] = (char)s[i];
}

/* Runs bytes through the UTF-8 assembler: complete characters go out, a
 * maximal invalid part becomes U+FFFD, and an incomplete tail stays pending
 * (unless flushing). Writes what fits in cap and returns the full count. */
static int feed_utf8(fl_detok_state *st, const uint8_t *src, int n, int flush, char *out, int cap) {
    static const uint8_t fffd[3] = {0xef, 0xbf, 0xbd};
    uint8_t pend[8];
    int np = st->n_pending, total = np + n, i = 0, w = 0;
    memcpy(pend, st->pending, (size_t)np);
    while (i < total) {
        uint8_t c[4] = {0}; /* zeroed only to quiet -Wmaybe-uninitialized */
        int k = 0;
        for (; k < 4 && i + k < total; k++) c[k] = i + k < np ? pend[i + k] : src[i + k - np];
        int len = fl_tok_utf8_seq(c, (size_t)k);
        if (len == 0 && !flush) break;
        if (len > 0) {
            put_bytes(out, cap, &w, c, len);
            i += len;
        } else {
            put_bytes(out, cap, &w, fffd, 3);
            i += len < 0 ? -len : k;
        }
    }
    st->n_pending = total - i;
    for (int k = 0; k < st->n_pending; k++) st->pending[k] = i + k < np ? pend[i + k] : src[i + k - np];
    return w;
}

void fl_detok_init(fl_detok_state *st, int skip_special) {
    memset(st, 0, sizeof *st);
    st->skip_special = skip_special;
}

/* One token through the decoder: its bytes, minus the leading spaces the
 * decoder strips from the start of a sequence. */
static int detok_token(const fl_tokenizer *t, fl_detok_state *st, int32_t id, char *out, int cap) {
    if (id < 0 || id >= t->n_vocab) {
        fl_error("token id %d is outside the vocabulary (%d tokens)", (int)id, t->n_vocab);
        return INT32_MIN;
    }
    if (st->skip_special && (t->attr[id] & TOK_SPECIAL)) return 0;
    const uint8_t *s = (const uint8_t *)t->dec + t->dec_off[id];
    int n = t->dec_len[id];
    if (st->n_decoded++ == 0)
        for (int k = 0; k < t->strip_start && n > 0 && *s == ' '; k++) s++, n--;
    return feed_utf8(st, s, n, 0, out, cap);
}

int fl_detok_piece(const fl_tokenizer *t, fl_detok_state *st, int32_t id, char *out, int cap) {
    fl_detok_state next = *st;
    int w = detok_token(t, &next, id, out, cap);
    if (w > cap) return -w;
    if (w >= 0) *st = next;
    return w;
}

int fl_detok_flush(const fl_tokenizer *t, fl_detok_state *st, char *out, int cap) {
    (void)t;
    fl_detok_state next = *st;
    int w = feed_utf8(&next, NULL, 0, 1, out, cap);
    if (w > cap) return -w;
    *st = next;
    return w;
}

int fl_detokenize(const fl_tokenizer *t, const int32_t *ids, int n, int skip_special, char *out, int cap) {
    fl_detok_state st;
    fl_detok_init(&st, skip_special);
    int w = 0;
    for (int i = 0; i < n; i++) {
        int k = detok_token(t, &st, ids[i], w < cap ? out + w : NULL, w < cap ? cap - w : 0);
        if (k < 0) return k;
        w += k;
    }
    w += feed_utf8(&st, NULL, 0, 1, w < cap ? out + w : NULL, w < cap ? cap - w : 0);
    return w > cap ? -w : w;
}
