/* Encoding: added tokens are split out of the raw text first; every segment
 * between them is normalized, split by the pre-tokenizer's regexes, mapped to
 * the byte alphabet (byte-level models) and merged by BPE in merge-rank order. */
#include "tokenizer.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

typedef struct {
    char *p;
    size_t len, cap;
} bytes;

typedef struct {
    size_t off, len;
} span;

/* BPE symbol in a doubly linked list (id -1: absorbed by its left neighbour). */
typedef struct {
    int32_t id, prev, next;
} sym;

/* A candidate merge of the symbol at pos with its right neighbour, valid while
 * both still hold left and right. */
typedef struct {
    int32_t rank, pos, left, right, merged;
} cand;

/* Scratch space for one fl_tokenize call (tokenizers are shared between threads). */
typedef struct {
    int32_t *ids;
    int cap, n; /* n counts past cap */
    bytes norm[2], mapped;
    span *pieces[2];
    size_t n_pieces[2], pieces_cap[2];
    sym *syms;
    size_t syms_cap;
    cand *heap;
    size_t n_heap, heap_cap;
    pcre2_match_data *md;
} work;

static int grow(void *pp, size_t *cap, size_t need, size_t elem) {
    void **p = pp;
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *np = realloc(*p, c * elem);
    if (!np) return fl_error("tokenize: out of memory (%zu bytes)", c * elem);
    *p = np;
    *cap = c;
    return 0;
}

static int append(bytes *b, const char *s, size_t n) {
    if (grow(&b->p, &b->cap, b->len + n + 1, 1)) return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

static void emit(work *w, int32_t id) {
    if (w->n < w->cap) w->ids[w->n] = id;
    w->n++;
}

/* ---------------------------------------------------------- normalization */

/* Unicode normalization of each valid UTF-8 run; invalid bytes pass through. */
static int unicode_normalize(bytes *o, const char *s, size_t n, utf8proc_option_t opts) {
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        int ascii = 1, len = 0;
        while (j < n && (len = fl_tok_utf8_seq((const uint8_t *)s + j, n - j)) > 0) {
            ascii &= len == 1;
            j += (size_t)len;
        }
        if (ascii) { /* ASCII is in every normal form */
            if (append(o, s + i, j - i)) return -1;
        } else {
            utf8proc_uint8_t *d;
            utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(j - i), &d, opts);
            if (m < 0) return fl_error("tokenize: Unicode normalization failed: %s", utf8proc_errmsg(m));
            int rc = append(o, (const char *)d, (size_t)m);
            free(d);
            if (rc) return -1;
        }
        if (j < n) { /* an invalid part, or an incomplete sequence at the end */
            size_t bad = len < 0 ? (size_t)-len : n - j;
            if (append(o, s + j, bad)) return -1;
            j += bad;
        }
        i = j;
    }
    return 0;
}

static int replace_all(bytes *o, const char *s, size_t n, const char *from, const char *to) {
    size_t fl = strlen(from), tl = strlen(to), i = 0;
    while (i < n) {
        const char *hit = fl <= n - i ? memmem(s + i, n - i, from, fl) : NULL;
        size_t keep = hit ? (size_t)(hit - (s + i)) : n - i;
        if (append(o, s + i, keep) || (hit && append(o, to, tl))) return -1;
        i += keep + (hit ? fl : 0);
    }
    return 0;
}

static int norm_step(bytes *o, const tok_norm *nm, const char *s, size_t n) {
    switch (nm->kind) {
    case NORM_NFC: return unicode_normalize(o, s, n, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    case NORM_NFD: return unicode_normalize(o, s, n, UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
    case NORM_NFKC: return unicode_normalize(o, s, n, UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
    case NORM_NFKD: return unicode_normalize(o, s, n, UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
    case NORM_PREPEND: return append(o, nm->to, strlen(nm->to)) || append(o, s, n) ? -1 : 0;
    case NORM_REPLACE: return replace_all(o, s, n, nm->from, nm->to);
    }
    return 0;
}

/* Runs the normalizers, then the ByteLevel leading space, alternating between
 * two buffers so that no step writes where it reads. */
static int normalize(const fl_tokenizer *t, work *w, const char **s, size_t *n) {
    int cur = 0;
    for (int i = 0; i < t->n_norms; i++) {
        if (t->norms[i].kind == NORM_PREPEND && *n == 0) continue; /* nothing to prepend to */
        bytes *o = &w->norm[cur];
        o->len = 0;
        if (norm_step(o, &t->norms[i], *s, *n)) return -1;
        *s = o->p;
        *n = o->len;
        cur ^= 1;
    }
    if (t->prefix_space && *n > 0 && **s != ' ') {
        bytes *o = &w->norm[cur];
        o->len = 0;
        if (append(o, " ", 1) || append(o, *s, *n)) return -1;
        *s = o->p;
        *n = o->len;
    }
    return 0;
}

/* ------------------------------------------------------- pre-tokenization */

static int add_piece(work *w, int k, size_t off, size_t len) {
    if (grow(&w->pieces[k], &w->pieces_cap[k], w->n_pieces[k] + 1, sizeof(span))) return -1;
    w->pieces[k][w->n_pieces[k]++] = (span){off, len};
    return 0;
}

/* 1: a match from offset at on (in w->md), 0: none, -1: error. */
static int regex_match(const pcre2_code *re, work *w, const char *s, size_t n, size_t at) {
    int rc = pcre2_match(re, (PCRE2_SPTR)s, n, at, 0, w->md, NULL);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) /* the interpreter keeps its stack on the heap */
        rc = pcre2_match(re, (PCRE2_SPTR)s, n, at, PCRE2_NO_JIT, w->md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH) return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        return fl_error("tokenize: pre-tokenizer regex failed: %s", (char *)msg);
    }
    return 1; /* rc 0 too: the ovector only lacks room for groups, and only the whole match is used */
}

/* Splits one piece of s into the regex's matches and the gaps between them
 * (HF's Split with behavior Isolated), appending them to pieces[k]. */
static int split_piece(const pcre2_code *re, work *w, const char *s, span p, int k) {
    const char *sub = s + p.off;
    size_t at = 0, last = 0;
    while (at < p.len) {
        int rc = regex_match(re, w, sub, p.len, at);
        if (rc < 0) return -1;
        if (rc == 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) { /* an empty match splits nothing: step over one character */
            at = ms + 1;
            while (at < p.len && ((uint8_t)sub[at] & 0xc0) == 0x80) at++;
            continue;
        }
        if (ms > last && add_piece(w, k, p.off + last, ms - last)) return -1;
        if (add_piece(w, k, p.off + ms, me - ms)) return -1;
        last = at = me;
    }
    if (last < p.len && add_piece(w, k, p.off + last, p.len - last)) return -1;
    return 0;
}

/* Applies each split regex in turn; returns which pieces list holds the result. */
static int pre_tokenize(const fl_tokenizer *t, work *w, const char *s, size_t n) {
    int k = 0;
    w->n_pieces[0] = 0;
    if (add_piece(w, 0, 0, n)) return -1;
    for (int r = 0; r < t->n_splits; r++) {
        w->n_pieces[k ^ 1] = 0;
        for (size_t i = 0; i < w->n_pieces[k]; i++)
            if (split_piece(t->splits[r], w, s, w->pieces[k][i], k ^ 1)) return -1;
        k ^= 1;
    }
    return k;
}

/* -------------------------------------------------------------------- BPE */

static int cand_less(const cand *a, const cand *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static int heap_push(work *w, cand c) {
    if (grow(&w->heap, &w->heap_cap, w->n_heap + 1, sizeof(cand))) return -1;
    size_t i = w->n_heap++;
    while (i > 0 && cand_less(&c, &w->heap[(i - 1) / 2])) {
        w->heap[i] = w->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->heap[i] = c;
    return 0;
}

static cand heap_pop(work *w) {
    cand top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && cand_less(&w->heap[c + 1], &w->heap[c])) c++;
        if (!cand_less(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

/* Queues the merge of symbol pos with its right neighbour, if there is one. */
static int try_pair(const fl_tokenizer *t, work *w, int32_t pos) {
    if (pos < 0) return 0;
    int32_t next = w->syms[pos].next;
    if (next < 0) return 0;
    int32_t merged, rank = fl_tok_merge(t, w->syms[pos].id, w->syms[next].id, &merged);
    if (rank < 0) return 0;
    return heap_push(w, (cand){rank, pos, w->syms[pos].id, w->syms[next].id, merged});
}

static int32_t char_token(const fl_tokenizer *t, const char *s, int len) {
    const uint8_t *u = (const uint8_t *)s;
    if (len == 1) return u[0] < 0x80 ? t->char_id[u[0]] : -1; /* a lone invalid byte is no character */
    if (len == 2) return t->char_id[(uint32_t)(u[0] & 0x1f) << 6 | (u[1] & 0x3f)];
    return fl_tok_model_id(t, s, (size_t)len);
}

static void push_sym(work *w, int *ns, int32_t id) {
    w->syms[*ns] = (sym){id, *ns - 1, -1};
    if (*ns > 0) w->syms[*ns - 1].next = *ns;
    (*ns)++;
}

/* The initial symbols: one per character, characters missing from the vocab
 * as their <0xHH> bytes (byte fallback) or as unk (fused when fuse_unk). */
static int initial_symbols(const fl_tokenizer *t, work *w, const char *s, size_t n) {
    if (grow(&w->syms, &w->syms_cap, n, sizeof(sym))) return -1;
    int ns = 0, last_unk = 0;
    for (size_t i = 0; i < n;) {
        int len = fl_tok_utf8_seq((const uint8_t *)s + i, n - i);
        if (len <= 0) len = 1;
        int32_t id = char_token(t, s + i, len);
        int bytes_ok = t->byte_fallback;
        for (int k = 0; k < len && id < 0 && bytes_ok; k++) bytes_ok = t->byte_id[(uint8_t)s[i + k]] >= 0;
        if (id >= 0) {
            push_sym(w, &ns, id);
        } else if (bytes_ok) {
            for (int k = 0; k < len; k++) push_sym(w, &ns, t->byte_id[(uint8_t)s[i + k]]);
        } else if (t->unk_id >= 0 && !(t->fuse_unk && last_unk)) {
            push_sym(w, &ns, t->unk_id);
        }
        last_unk = id < 0 && !bytes_ok;
        i += (size_t)len;
    }
    return ns;
}

/* BPE over one pre-token: repeatedly merges the adjacent pair of lowest rank
 * (leftmost on ties), with a heap so long pieces are not quadratic. */
static int bpe(const fl_tokenizer *t, work *w, const char *s, size_t n) {
    if (t->ignore_merges) { /* a pre-token that is itself a token is kept whole */
        int32_t id = fl_tok_model_id(t, s, n);
        if (id >= 0) {
            emit(w, id);
            return 0;
        }
    }
    int ns = initial_symbols(t, w, s, n);
    if (ns < 0) return -1;
    w->n_heap = 0;
    for (int32_t i = 0; i + 1 < ns; i++)
        if (try_pair(t, w, i)) return -1;
    while (w->n_heap) {
        cand c = heap_pop(w);
        sym *l = &w->syms[c.pos];
        if (l->id != c.left || l->next < 0 || w->syms[l->next].id != c.right) continue; /* stale */
        sym *r = &w->syms[l->next];
        l->id = c.merged;
        l->next = r->next;
        if (r->next >= 0) w->syms[r->next].prev = c.pos;
        r->id = -1;
        if (try_pair(t, w, l->prev) || try_pair(t, w, c.pos)) return -1;
    }
    for (int32_t i = 0; ns > 0 && i >= 0; i = w->syms[i].next) emit(w, w->syms[i].id);
    return 0;
}

/* ------------------------------------------------------------- segments */

static int encode_piece(const fl_tokenizer *t, work *w, const char *s, size_t n) {
    if (!t->byte_level) return bpe(t, w, s, n);
    bytes *m = &w->mapped;
    m->len = 0;
    if (grow(&m->p, &m->cap, 2 * n + 1, 1)) return -1;
    for (size_t i = 0; i < n; i++) {
        const char *c = t->byte_chr[(uint8_t)s[i]];
        memcpy(m->p + m->len, c + 1, (size_t)c[0]);
        m->len += (size_t)c[0];
    }
    return bpe(t, w, m->p, m->len);
}

/* Text between added tokens: normalize, pre-tokenize, BPE each piece. */
static int encode_segment(const fl_tokenizer *t, work *w, const char *s, size_t n) {
    if (n == 0) return 0;
    if (normalize(t, w, &s, &n)) return -1;
    int k = pre_tokenize(t, w, s, n);
    if (k < 0) return -1;
    for (size_t i = 0; i < w->n_pieces[k]; i++)
        if (encode_piece(t, w, s + w->pieces[k][i].off, w->pieces[k][i].len)) return -1;
    return 0;
}

/* The longest added token at s, or NULL; special ones only when parse_special. */
static const tok_added *match_added(const fl_tokenizer *t, const char *s, size_t n, int parse_special) {
    uint8_t b = (uint8_t)s[0];
    for (int i = t->added_start[b]; i < t->added_start[b + 1]; i++) {
        const tok_added *a = &t->added[i];
        if ((a->special && !parse_special) || (size_t)a->len > n) continue;
        if (!memcmp(s, a->text, (size_t)a->len)) return a;
    }
    return NULL;
}

static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Non-special added tokens are always matched, as in HF and llama.cpp; lstrip
 * and rstrip take ASCII whitespace next to the token with it. */
static int encode_text(const fl_tokenizer *t, work *w, const char *text, size_t len, int parse_special) {
    size_t seg = 0, i = 0;
    while (i < len) {
        const tok_added *a = t->n_added ? match_added(t, text + i, len - i, parse_special) : NULL;
        if (!a) {
            i++;
            continue;
        }
        size_t end = i;
        while (a->lstrip && end > seg && is_space(text[end - 1])) end--;
        if (encode_segment(t, w, text + seg, end - seg)) return -1;
        emit(w, a->id);
        i += (size_t)a->len;
        while (a->rstrip && i < len && is_space(text[i])) i++;
        seg = i;
    }
    return encode_segment(t, w, text + seg, len - seg);
}

int fl_tokenize(const fl_tokenizer *t, const char *text, size_t len, int add_bos, int parse_special, int32_t *ids,
                int cap) {
    if (!t || (!text && len) || cap < 0 || (!ids && cap)) {
        fl_error("fl_tokenize: invalid arguments");
        return INT32_MIN;
    }
    if (len > INT32_MAX / 2) {
        fl_error("fl_tokenize: text of %zu bytes is too long", len);
        return INT32_MIN;
    }
    work w = {.ids = ids, .cap = cap};
    int rc = 0;
    if (t->n_splits && !(w.md = pcre2_match_data_create(1, NULL))) rc = fl_error("tokenize: out of memory");
    if (!rc && add_bos && t->bos >= 0) emit(&w, t->bos);
    if (!rc && len) rc = encode_text(t, &w, text, len, parse_special);
    pcre2_match_data_free(w.md);
    free(w.norm[0].p);
    free(w.norm[1].p);
    free(w.mapped.p);
    free(w.pieces[0]);
    free(w.pieces[1]);
    free(w.syms);
    free(w.heap);
    if (rc) return INT32_MIN;
    return w.n <= cap ? w.n : -w.n;
}
