/* Tokenizer tests: llama.cpp's LLaMA-3 vectors, Qwen2 round trips and hand-checked
 * ids, stories260K against llama2.c's own encoder, streaming decode, broken files. */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

#include "flexllm.h"
#include "fl_internal.h"
#include "tap.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Encodes into a malloc'd array sized by a first counting call. */
static int32_t *encode(const fl_tokenizer *tok, const char *s, size_t n, int bos, int special, int *count) {
    int need = fl_tokenize(tok, s, n, bos, special, NULL, 0);
    if (need == INT32_MIN) {
        *count = -1;
        return NULL;
    }
    need = need < 0 ? -need : need;
    int32_t *ids = malloc(sizeof *ids * (size_t)(need + 1));
    *count = fl_tokenize(tok, s, n, bos, special, ids, need);
    return ids;
}

static char *decode(const fl_tokenizer *tok, const int32_t *ids, int n, int skip, int *len) {
    int need = fl_detokenize(tok, ids, n, skip, NULL, 0);
    need = need == INT32_MIN ? 0 : need < 0 ? -need : need;
    char *out = malloc((size_t)need + 1);
    *len = fl_detokenize(tok, ids, n, skip, out, need);
    out[*len > 0 ? *len : 0] = 0;
    return out;
}

static int same_ids(const int32_t *a, int na, const int32_t *b, int nb) {
    return na == nb && (na == 0 || memcmp(a, b, sizeof *a * (size_t)na) == 0);
}

static void ids_str(char *out, size_t cap, const int32_t *ids, int n) {
    size_t w = 0;
    out[0] = 0;
    for (int i = 0; i < n && w + 16 < cap; i++) w += (size_t)snprintf(out + w, cap - w, " %d", ids[i]);
}

/* decode(encode(s)) == want, byte for byte. */
static int round_trips(const fl_tokenizer *tok, const char *s, size_t n, const char *want, size_t want_n) {
    int count, len;
    int32_t *ids = encode(tok, s, n, 0, 0, &count);
    char *back = decode(tok, ids, count, 1, &len);
    int ok = count >= 0 && len == (int)want_n && memcmp(back, want, want_n) == 0;
    free(ids);
    free(back);
    return ok;
}

static int32_t id_of(const fl_tokenizer *tok, const char *s) { return fl_tokenizer_token_id(tok, s); }

/* s with newlines shown as \n, for a one-line test description. */
static const char *one_line(const char *s) {
    static char buf[256];
    size_t w = 0;
    for (; *s && w + 3 < sizeof buf; s++) {
        if (*s == '\n') buf[w++] = '\\', buf[w++] = 'n';
        else buf[w++] = *s;
    }
    buf[w] = 0;
    return buf;
}

/* Encodes s and compares with the expected ids; says what came out when not. */
static void check_ids(const fl_tokenizer *tok, const char *name, const char *s, int special, const int32_t *want, int n) {
    int count;
    int32_t *ids = encode(tok, s, strlen(s), 0, special, &count);
    int ok = n > 0 && want[0] >= 0 && same_ids(ids, count, want, n);
    if (!tap_ok(ok, "%s: \"%s\" encodes to the vocab's ids", name, one_line(s))) {
        char got[512], exp[512];
        ids_str(got, sizeof got, ids, count);
        ids_str(exp, sizeof exp, want, n);
        tap_diag("expected%s, got%s", exp, got);
    }
    free(ids);
}

static void report_throughput(const fl_tokenizer *tok, const char *name) {
    const char *path = tap_shared("data/tinyshakespeare.txt");
    size_t n;
    char *text = path ? fl_read_file(path, &n) : NULL;
    if (!text) return;
    int count;
    double t0 = now_s();
    int32_t *ids = encode(tok, text, n, 0, 0, &count);
    double dt = now_s() - t0;
    tap_diag("%s: encoded tinyshakespeare (%.2f MB) to %d tokens at %.1f MB/s", name, (double)n / 1e6, count,
             (double)n / 1e6 / (dt / 2)); /* encode() runs fl_tokenize twice */
    free(ids);
    free(text);
}

/* ----------------------------------------------------------- streaming */

static int valid_utf8(const char *s, int n) {
    utf8proc_int32_t cp;
    for (int i = 0, k; i < n; i += k)
        if ((k = (int)utf8proc_iterate((const utf8proc_uint8_t *)s + i, n - i, &cp)) <= 0) return 0;
    return 1;
}

static const char *MULTI = "Hello \xe4\xb8\x96\xe7\x95\x8c! \xf0\x9f\x99\x82\xf0\x9f\x8e\x89 na\xc3\xafve caf\xc3\xa9 "
                           "\xe2\x80\x94 ok\n\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x92\xbb";

/* Streams ids through fl_detok_piece: every piece must be whole UTF-8 and the
 * pieces must add up to fl_detokenize's output. Returns pieces that were empty. */
static int stream_check(const fl_tokenizer *tok, const char *name, const char *s) {
    int count, len, empty = 0, whole = 1;
    int32_t *ids = encode(tok, s, strlen(s), 0, 0, &count);
    char *full = decode(tok, ids, count, 1, &len);
    char cat[4096], piece[256];
    int w = 0;
    fl_detok_state st;
    fl_detok_init(&st, 1);
    for (int i = 0; i < count; i++) {
        int k = fl_detok_piece(tok, &st, ids[i], piece, sizeof piece);
        if (k < 0) break;
        whole &= valid_utf8(piece, k);
        empty += k == 0;
        memcpy(cat + w, piece, (size_t)k);
        w += k;
    }
    w += fl_detok_flush(tok, &st, cat + w, (int)sizeof cat - w);
    tap_ok(whole && w == len && !memcmp(cat, full, (size_t)w) && len == (int)strlen(s) && !memcmp(full, s, strlen(s)),
           "%s: streamed pieces are whole UTF-8 and add up to the text (%d tokens, %d empty pieces)", name, count,
           empty);
    free(ids);
    free(full);
    return empty;
}

/* Decoding edge cases on stories260K, whose <0xHH> tokens make any byte sequence. */
static void test_detok_edges(const fl_tokenizer *tok) {
    char out[64];
    int32_t e4 = 3 + 0xe4, b8 = 3 + 0xb8, x96 = 3 + 0x96, ff = 3 + 0xff;
    fl_detok_state st;
    fl_detok_init(&st, 0);
    int k1 = fl_detok_piece(tok, &st, e4, out, sizeof out), k2 = fl_detok_piece(tok, &st, b8, out, sizeof out);
    int small = fl_detok_piece(tok, &st, x96, out, 2);
    tap_ok(k1 == 0 && k2 == 0 && small == -3 && st.n_pending == 2, "detok: a partial character waits; cap too small gives -(needed) and keeps the state");
    int k3 = fl_detok_piece(tok, &st, x96, out, sizeof out);
    tap_ok(k3 == 3 && !memcmp(out, "\xe4\xb8\x96", 3), "detok: the character comes out once complete");
    int n = fl_detokenize(tok, (int32_t[]){e4, b8}, 2, 0, out, sizeof out);
    tap_ok(n == 3 && !memcmp(out, "\xef\xbf\xbd", 3), "detok: an incomplete character at the end becomes U+FFFD");
    n = fl_detokenize(tok, (int32_t[]){ff, id_of(tok, "a")}, 2, 0, out, sizeof out);
    tap_ok(n == 4 && !memcmp(out, "\xef\xbf\xbd" "a", 4), "detok: an impossible byte becomes U+FFFD at once");
    n = fl_detokenize(tok, (int32_t[]){e4, id_of(tok, "a")}, 2, 0, out, sizeof out);
    tap_ok(n == 4 && !memcmp(out, "\xef\xbf\xbd" "a", 4), "detok: a broken character becomes U+FFFD when the next byte shows it");
    n = fl_detokenize(tok, (int32_t[]){1, id_of(tok, "▁H"), id_of(tok, "i"), 2}, 4, 0, out, sizeof out);
    tap_ok(n == 10 && !memcmp(out, "<s> Hi</s>", 10), "detok: special tokens show unless skipped (got \"%.*s\")", n > 0 ? n : 0, out);
    n = fl_detokenize(tok, (int32_t[]){1, id_of(tok, "▁H"), id_of(tok, "i"), 2}, 4, 1, out, sizeof out);
    tap_ok(n == 2 && !memcmp(out, "Hi", 2), "detok: skip_special drops them and the first space goes (got \"%.*s\")", n > 0 ? n : 0, out);
    n = fl_detokenize(tok, (int32_t[]){id_of(tok, "▁H"), id_of(tok, "▁H")}, 2, 1, out, 2); /* "H H" */
    tap_ok(n == -3 && fl_detokenize(tok, (int32_t[]){id_of(tok, "▁H")}, 1, 1, NULL, 0) == -1,
           "detok: cap too small gives -(needed)");
    tap_ok(fl_detokenize(tok, (int32_t[]){512}, 1, 1, out, sizeof out) == INT32_MIN && strstr(fl_last_error(), "512"),
           "detok: an id outside the vocab is an error");
    int32_t ids[4];
    tap_ok(fl_tokenize(tok, "Hello world", 11, 1, 0, ids, 1) < -1, "tokenize: cap too small gives -(needed)");
}

/* ------------------------------------------------------------ LLaMA-3 */

/* llama.cpp's vocab test files: each input is followed by "\n__ggml_vocab_test__\n";
 * the .out file has one line of ids per input. */
static void test_llama3_vectors(const fl_tokenizer *tok) {
    const char *inp_path = tap_shared("tokenizers/tests/llama-bpe.inp");
    const char *out_path = tap_shared("tokenizers/tests/llama-bpe.out");
    if (!inp_path || !out_path) {
        tap_skip("llama3 vectors: ../shared/tokenizers/tests/llama-bpe.{inp,out} not found");
        return;
    }
    char *inp = fl_read_file(inp_path, NULL), *out = fl_read_file(out_path, NULL);
    const char *sep = "\n__ggml_vocab_test__\n";
    char *p = inp, *line = out;
    int n = 0, pass = 0, trip = 0;
    for (char *end; (end = strstr(p, sep)); p = end + strlen(sep), n++) {
        char *eol = strchr(line, '\n');
        if (eol) *eol = 0;
        int32_t want[1024];
        int nw = 0;
        for (char *q = line, *e; nw < 1024; q = e) {
            long v = strtol(q, &e, 10);
            if (e == q) break;
            want[nw++] = (int32_t)v;
        }
        line = eol ? eol + 1 : line + strlen(line);
        int count;
        int32_t *ids = encode(tok, p, (size_t)(end - p), 0, 0, &count);
        if (same_ids(ids, count, want, nw)) {
            pass++;
        } else if (n - pass <= 3) {
            char got[1024], exp[1024], text[200];
            ids_str(got, sizeof got, ids, count);
            ids_str(exp, sizeof exp, want, nw);
            snprintf(text, sizeof text, "%.*s", (int)(end - p), p);
            tap_diag("case %d \"%s\": expected%s, got%s", n, one_line(text), exp, got);
        }
        trip += round_trips(tok, p, (size_t)(end - p), p, (size_t)(end - p));
        free(ids);
    }
    tap_ok(n > 40 && pass == n, "llama3: %d/%d llama.cpp llama-bpe vectors match", pass, n);
    tap_ok(n > 40 && trip == n, "llama3: decode(encode(x)) == x for %d/%d vectors", trip, n);
    free(inp);
    free(out);
}

/* LLaMA-3.1's config.json lists three EOS ids: each one ends generation. */
static void test_llama31_eos(const char *tok_dir) {
    const char *cfg = tap_shared("models/configs/llama-3.1-8b/config.json");
    const char *dir = tap_tmpdir("tokenizer_llama31");
    if (!cfg || !dir) {
        tap_skip("llama3.1 EOS list: ../shared/models/configs/llama-3.1-8b not found");
        return;
    }
    char src[4200], dst[4200];
    size_t n;
    char *json = fl_read_file(cfg, &n);
    snprintf(dst, sizeof dst, "%s/config.json", dir);
    tap_write(dst, json, n);
    free(json);
    const char *names[] = {"tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; i < 2; i++) {
        snprintf(src, sizeof src, "%s/%s", tok_dir, names[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, names[i]);
        json = fl_read_file(src, &n);
        tap_write(dst, json, n);
        free(json);
    }
    fl_tokenizer *tok = fl_tokenizer_load_dir(dir);
    tap_ok(tok && fl_tokenizer_eos(tok) == 128001 && fl_tokenizer_is_eos(tok, 128001) &&
               fl_tokenizer_is_eos(tok, 128008) && fl_tokenizer_is_eos(tok, 128009) && fl_tokenizer_bos(tok) == 128000,
           "llama3.1: config.json's eos_token_id list [128001, 128008, 128009] are all EOS: %s",
           tok ? "ok" : fl_last_error());
    fl_tokenizer_free(tok);
}

static void test_llama3(void) {
    const char *path = tap_shared("tokenizers/llama3/tokenizer.json");
    if (!path) {
        tap_skip("llama3: ../shared/tokenizers/llama3 not found (set FLEXLLM_SHARED)");
        return;
    }
    double t0 = now_s();
    fl_tokenizer *tok = fl_tokenizer_load(path);
    double dt = now_s() - t0;
    if (!tap_ok(tok != NULL, "llama3: tokenizer.json loads: %s", tok ? "ok" : fl_last_error())) return;
    tap_diag("llama3: loaded %d tokens in %.0f ms", fl_tokenizer_n_vocab(tok), dt * 1e3);
    tap_ok(fl_tokenizer_n_vocab(tok) == 128256, "llama3: 128256 tokens");
    test_llama3_vectors(tok);

    /* \p{N}{1,3}: digits go in threes */
    check_ids(tok, "llama3", "12345", 0, (int32_t[]){id_of(tok, "123"), id_of(tok, "45")}, 2);
    check_ids(tok, "llama3", "<|begin_of_text|>Hello", 1, (int32_t[]){128000, id_of(tok, "Hello")}, 2);
    int count;
    int32_t *ids = encode(tok, "<|begin_of_text|>", 17, 0, 0, &count);
    tap_ok(count > 1 && ids[0] != 128000, "llama3: without parse_special a special token's text is plain text");
    free(ids);
    ids = encode(tok, "Hi", 2, 1, 0, &count);
    tap_ok(count == 2 && ids[0] == 128000, "llama3: add_bos prepends <|begin_of_text|>");
    free(ids);
    stream_check(tok, "llama3", MULTI);
    report_throughput(tok, "llama3");
    fl_tokenizer_free(tok);

    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    *strrchr(dir, '/') = 0;
    tok = fl_tokenizer_load_dir(dir);
    if (!tap_ok(tok != NULL, "llama3: load_dir: %s", tok ? "ok" : fl_last_error())) return;
    /* the shared copy's post-processor is ByteLevel and its tokenizer_config.json
     * has no add_bos_token, so BOS is the caller's to prepend */
    tap_ok(fl_tokenizer_bos(tok) == 128000 && fl_tokenizer_eos(tok) == 128001 && fl_tokenizer_add_bos(tok) == 0 &&
               fl_tokenizer_is_eos(tok, 128001) && !fl_tokenizer_is_eos(tok, 128000),
           "llama3: BOS 128000, EOS 128001, add_bos 0 (bos %d eos %d add_bos %d)", fl_tokenizer_bos(tok),
           fl_tokenizer_eos(tok), fl_tokenizer_add_bos(tok));
    tap_ok(fl_tokenizer_is_special(tok, 128001) && !fl_tokenizer_is_special(tok, 9906) &&
               !strcmp(fl_tokenizer_token_text(tok, 128001), "<|end_of_text|>") &&
               fl_tokenizer_token_text(tok, 128256) == NULL && fl_tokenizer_token_text(tok, -1) == NULL,
           "llama3: is_special and token_text");
    fl_tokenizer_free(tok);
    test_llama31_eos(dir);
}

/* --------------------------------------------------------------- Qwen2 */

static void test_qwen2_prompts(const fl_tokenizer *tok) {
    const char *path = tap_shared("data/sharegpt_prompts_500.json");
    if (!path) {
        tap_skip("qwen2 prompts: ../shared/data/sharegpt_prompts_500.json not found");
        return;
    }
    char *text = fl_read_file(path, NULL);
    cJSON *root = cJSON_Parse(text);
    int n = 0, pass = 0, not_nfc = 0;
    for (const cJSON *e = root ? root->child : NULL; e; e = e->next) {
        const cJSON *conv = cJSON_GetObjectItem(e, "conversations");
        const cJSON *value = cJSON_GetObjectItem(cJSON_GetArrayItem(conv, 0), "value");
        if (!cJSON_IsString(value)) continue;
        const char *p = value->valuestring;
        /* the tokenizer normalizes to NFC, so NFC is what comes back */
        char *nfc = (char *)utf8proc_NFC((const utf8proc_uint8_t *)p);
        not_nfc += strcmp(nfc, p) != 0;
        int ok = round_trips(tok, p, strlen(p), nfc, strlen(nfc));
        if (!ok && n - pass < 3) tap_diag("prompt %d does not round-trip: \"%.80s\"", n, p);
        pass += ok;
        n++;
        free(nfc);
    }
    tap_ok(n == 500 && pass == n, "qwen2: decode(encode(p)) == NFC(p) for %d/%d ShareGPT prompts (%d not NFC)", pass,
           n, not_nfc);
    cJSON_Delete(root);
    free(text);
}

static void test_qwen2(void) {
    const char *path = tap_shared("tokenizers/qwen2/tokenizer.json");
    if (!path) {
        tap_skip("qwen2: ../shared/tokenizers/qwen2 not found (set FLEXLLM_SHARED)");
        return;
    }
    double t0 = now_s();
    fl_tokenizer *tok = fl_tokenizer_load(path);
    double dt = now_s() - t0;
    if (!tap_ok(tok != NULL, "qwen2: tokenizer.json loads: %s", tok ? "ok" : fl_last_error())) return;
    tap_diag("qwen2: loaded %d tokens in %.0f ms", fl_tokenizer_n_vocab(tok), dt * 1e3);
    tap_ok(fl_tokenizer_n_vocab(tok) == 151669, "qwen2: 151669 tokens");

    /* "Hello" and "Ġworld" are single tokens (Ġ is the byte alphabet's space) */
    check_ids(tok, "qwen2", "Hello world", 0, (int32_t[]){id_of(tok, "Hello"), id_of(tok, "Ġworld")}, 2);
    /* \p{N}: Qwen2 splits digits one by one */
    check_ids(tok, "qwen2", "2024", 0, (int32_t[]){id_of(tok, "2"), id_of(tok, "0"), id_of(tok, "2"), id_of(tok, "4")}, 4);
    /* NFC: "e" + U+0301 becomes "é" before BPE */
    int na, nb;
    int32_t *a = encode(tok, "caf\xc3\xa9", 5, 0, 0, &na), *b = encode(tok, "cafe\xcc\x81", 6, 0, 0, &nb);
    tap_ok(na > 0 && same_ids(a, na, b, nb), "qwen2: NFD input encodes like its NFC form");
    free(a);
    free(b);
    check_ids(tok, "qwen2", "<|im_start|>user\nHi<|im_end|>", 1,
              (int32_t[]){151644, id_of(tok, "user"), id_of(tok, "Ċ"), id_of(tok, "Hi"), 151645}, 5);
    /* a non-special added token is matched even without parse_special */
    check_ids(tok, "qwen2", "<think>", 0, (int32_t[]){151667}, 1);
    test_qwen2_prompts(tok);
    stream_check(tok, "qwen2", MULTI);
    report_throughput(tok, "qwen2");
    fl_tokenizer_free(tok);

    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    *strrchr(dir, '/') = 0;
    tok = fl_tokenizer_load_dir(dir);
    if (!tap_ok(tok != NULL, "qwen2: load_dir: %s", tok ? "ok" : fl_last_error())) return;
    tap_ok(fl_tokenizer_bos(tok) == -1 && fl_tokenizer_eos(tok) == 151645 && fl_tokenizer_add_bos(tok) == 0 &&
               fl_tokenizer_is_eos(tok, 151645),
           "qwen2: no BOS, EOS <|im_end|>, add_bos 0 (bos %d eos %d add_bos %d)", fl_tokenizer_bos(tok),
           fl_tokenizer_eos(tok), fl_tokenizer_add_bos(tok));
    fl_tokenizer_free(tok);
}

/* ---------------------------------------------------------- stories260K */

/* llama2.c's tokenizer (tok512.bin) and its encode() from run.c. */
typedef struct {
    int n;
    char **vocab;
    float *scores;
    int *sorted; /* ids sorted by string */
} l2c_tok;

static l2c_tok *l2c_sort_ctx;

static int l2c_cmp(const void *a, const void *b) {
    return strcmp(l2c_sort_ctx->vocab[*(const int *)a], l2c_sort_ctx->vocab[*(const int *)b]);
}

static int l2c_load(l2c_tok *t, const char *path, int n) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    int max_len, len, ok = fread(&max_len, 4, 1, f) == 1;
    t->n = n;
    t->vocab = calloc((size_t)n, sizeof *t->vocab);
    t->scores = calloc((size_t)n, sizeof *t->scores);
    t->sorted = calloc((size_t)n, sizeof *t->sorted);
    for (int i = 0; i < n && ok; i++) {
        ok = fread(&t->scores[i], 4, 1, f) == 1 && fread(&len, 4, 1, f) == 1 && len >= 0 && len < 1024;
        t->vocab[i] = calloc((size_t)len + 1, 1);
        ok = ok && fread(t->vocab[i], 1, (size_t)len, f) == (size_t)len;
        t->sorted[i] = i;
    }
    fclose(f);
    l2c_sort_ctx = t;
    qsort(t->sorted, (size_t)n, sizeof *t->sorted, l2c_cmp);
    return ok ? 0 : -1;
}

static void l2c_free(l2c_tok *t) {
    for (int i = 0; i < t->n; i++) free(t->vocab[i]);
    free(t->vocab);
    free(t->scores);
    free(t->sorted);
}

static int l2c_lookup(const l2c_tok *t, const char *s) {
    int lo = 0, hi = t->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(s, t->vocab[t->sorted[mid]]);
        if (c == 0) return t->sorted[mid];
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return -1;
}

/* run.c's encode with bos: BOS, a " " dummy prefix, one token per UTF-8
 * character (bytes + 3 when absent), then greedy merges by best vocab score. */
static int l2c_encode(const l2c_tok *t, const char *text, int32_t *tokens) {
    char buf[2100];
    int n = 0;
    tokens[n++] = 1;
    if (text[0]) tokens[n++] = l2c_lookup(t, " ");
    size_t len = 0;
    for (const char *c = text; *c; c++) {
        if ((*c & 0xc0) != 0x80) len = 0;
        buf[len++] = *c;
        buf[len] = 0;
        if ((c[1] & 0xc0) == 0x80 && len < 4) continue;
        int id = l2c_lookup(t, buf);
        if (id >= 0) {
            tokens[n++] = id;
        } else {
            for (size_t i = 0; i < len; i++) tokens[n++] = (unsigned char)buf[i] + 3;
        }
        len = 0;
    }
    for (;;) {
        float best = -1e10f;
        int best_id = -1, best_i = -1;
        for (int i = 0; i + 1 < n; i++) {
            snprintf(buf, sizeof buf, "%s%s", t->vocab[tokens[i]], t->vocab[tokens[i + 1]]);
            int id = l2c_lookup(t, buf);
            if (id >= 0 && t->scores[id] > best) {
                best = t->scores[id];
                best_id = id;
                best_i = i;
            }
        }
        if (best_i < 0) break;
        tokens[best_i] = best_id;
        memmove(tokens + best_i + 1, tokens + best_i + 2, sizeof *tokens * (size_t)(n - best_i - 2));
        n--;
    }
    return n;
}

static void test_stories_vs_llama2c(const fl_tokenizer *tok, const char *text) {
    const char *bin = tap_shared("models/stories260K/tok512.bin");
    l2c_tok l2c;
    if (!bin || l2c_load(&l2c, bin, 512)) {
        tap_skip("stories260K: tok512.bin not found or unreadable");
        return;
    }
    int n = 0, pass = 0, trip = 0;
    int32_t want[4096];
    for (const char *p = text, *eol; *p; p = *eol ? eol + 1 : eol) {
        eol = strchr(p, '\n');
        if (!eol) eol = p + strlen(p);
        if (eol == p) continue;
        char line[2048];
        snprintf(line, sizeof line, "%.*s", (int)(eol - p), p);
        int nw = l2c_encode(&l2c, line, want), count;
        int32_t *ids = encode(tok, line, strlen(line), 1, 0, &count);
        if (same_ids(ids, count, want, nw)) {
            pass++;
        } else if (n - pass < 3) {
            char got[1024], exp[1024];
            ids_str(got, sizeof got, ids, count);
            ids_str(exp, sizeof exp, want, nw);
            tap_diag("line %d \"%.60s\": llama2.c%s, got%s", n, line, exp, got);
        }
        trip += round_trips(tok, line, strlen(line), line, strlen(line));
        free(ids);
        n++;
    }
    tap_ok(n > 1000 && pass == n, "stories260K: %d/%d TinyStories lines encode as llama2.c's run.c does", pass, n);
    tap_ok(n > 1000 && trip == n, "stories260K: decode(encode(line)) == line for %d/%d lines", trip, n);
    l2c_free(&l2c);
}

static void test_stories(void) {
    const char *dir = tap_shared("models/stories260K");
    if (!dir) {
        tap_skip("stories260K: ../shared/models/stories260K not found (set FLEXLLM_SHARED)");
        return;
    }
    fl_tokenizer *tok = fl_tokenizer_load_dir(dir);
    if (!tap_ok(tok != NULL, "stories260K: load_dir: %s", tok ? "ok" : fl_last_error())) return;
    tap_ok(fl_tokenizer_n_vocab(tok) == 512 && fl_tokenizer_bos(tok) == 1 && fl_tokenizer_eos(tok) == 2 &&
               fl_tokenizer_add_bos(tok) == 1 && fl_tokenizer_is_eos(tok, 2),
           "stories260K: 512 tokens, BOS 1, EOS 2, add_bos 1");
    /* byte fallback: "\n" is not in the vocab, so it is <0x0A> */
    check_ids(tok, "stories260K", "a\nb", 0, (int32_t[]){id_of(tok, "▁a"), 13, id_of(tok, "b")}, 3);
    check_ids(tok, "stories260K", "<s>Hi</s>", 1, (int32_t[]){1, id_of(tok, "▁H"), id_of(tok, "i"), 2}, 4);

    const char *path = tap_shared("data/tinystories_sample.txt");
    size_t n;
    char *text = path ? fl_read_file(path, &n) : NULL;
    if (!text) {
        tap_skip("stories260K: ../shared/data/tinystories_sample.txt not found");
    } else {
        /* no pre-tokenizer: the whole file is one BPE word of ~200K characters */
        double t0 = now_s();
        tap_ok(round_trips(tok, text, n, text, n), "stories260K: the whole sample (%zu bytes) round-trips", n);
        tap_diag("stories260K: whole sample encoded and decoded in %.0f ms", (now_s() - t0) * 1e3);
        test_stories_vs_llama2c(tok, text);
        free(text);
    }
    tap_ok(stream_check(tok, "stories260K", MULTI) > 0, "stories260K: some characters span several <0xHH> tokens");
    test_detok_edges(tok);
    fl_tokenizer_free(tok);
}

/* ------------------------------------------------------- made-up files */

/* Writes dir/name (its path into path) for a made-up file. */
static void put_file(const char *dir, const char *name, const char *json, char *path, size_t cap) {
    snprintf(path, cap, "%s/%s", dir, name);
    tap_write_text(path, json);
}

static fl_tokenizer *load_text(const char *dir, const char *name, const char *json, char *path, size_t cap) {
    put_file(dir, name, json, path, cap);
    return fl_tokenizer_load(path);
}

/* A hand-made BPE: merge order, not vocab order, decides ("b c" before "a b"). */
static void test_tiny(const char *dir) {
    const char *json =
        "{\"added_tokens\": [{\"id\": 7, \"content\": \"<x>\", \"special\": true, \"lstrip\": true},"
        "                  {\"id\": 8, \"content\": \"<y>\", \"special\": false, \"rstrip\": true}],"
        " \"model\": {\"type\": \"BPE\", \"unk_token\": \"?\", \"fuse_unk\": true,"
        "  \"vocab\": {\"a\": 0, \"b\": 1, \"c\": 2, \"ab\": 3, \"bc\": 4, \"abc\": 5, \" \": 6, \"?\": 9},"
        "  \"merges\": [\"b c\", \"a b\", \"a bc\"]}}";
    char path[4200];
    fl_tokenizer *tok = load_text(dir, "tiny.json", json, path, sizeof path);
    if (!tap_ok(tok != NULL, "tiny: loads: %s", tok ? "ok" : fl_last_error())) return;
    check_ids(tok, "tiny", "abc", 0, (int32_t[]){5}, 1);
    check_ids(tok, "tiny", "abab", 0, (int32_t[]){3, 3}, 2);
    check_ids(tok, "tiny", "cab", 0, (int32_t[]){2, 3}, 2);
    check_ids(tok, "tiny", "a <x> b", 1, (int32_t[]){0, 7, 6, 1}, 4);
    check_ids(tok, "tiny", "a <y> b", 0, (int32_t[]){0, 6, 8, 1}, 4);
    check_ids(tok, "tiny", "a<x>", 0, (int32_t[]){0, 9}, 2); /* "<x>" unparsed: unknown characters fuse into one unk */
    tap_ok(fl_tokenizer_bos(tok) == -1 && fl_tokenizer_eos(tok) == -1 && fl_tokenizer_add_bos(tok) == 0,
           "tiny: no BOS or EOS");
    fl_tokenizer_free(tok);
}

typedef struct {
    const char *name, *json, *want;
} broken_case;

static void test_broken(const char *dir) {
    static const broken_case cases[] = {
        {"not_json.json", "this is not JSON", "invalid JSON near byte 0"},
        {"truncated.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\"", "the file ends early"},
        {"no_model.json", "{\"added_tokens\": []}", "model missing"},
        {"wordpiece.json", "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}}", "model type 'WordPiece' is not supported"},
        {"vocab_array.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": [\"a\"], \"merges\": []}}", "model.vocab is not an object"},
        {"no_vocab.json", "{\"model\": {\"type\": \"BPE\", \"merges\": []}}", "model.vocab missing"},
        {"bad_id.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -3}, \"merges\": []}}", "model.vocab['a'] is not a token id"},
        {"bad_merge.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\", \"a c\"]}}",
         "merge 1 names unknown token 'c'"},
        {"merge_result.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [[\"a\", \"b\"]]}}",
         "merge 0 makes 'ab', which is not in the vocab"},
        {"lowercase.json", "{\"normalizer\": {\"type\": \"Lowercase\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
         "normalizer type 'Lowercase' is not supported"},
        {"bad_regex.json", "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a\"}, \"behavior\": \"Isolated\"},"
         " \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}", "pattern does not compile"},
    };
    char path[4200];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fl_tokenizer *tok = load_text(dir, cases[i].name, cases[i].json, path, sizeof path);
        const char *err = fl_last_error();
        tap_ok(!tok && strstr(err, path) && strstr(err, cases[i].want), "broken %s: \"%s\"", cases[i].name, err);
        fl_tokenizer_free(tok);
    }
    snprintf(path, sizeof path, "%s/missing.json", dir);
    tap_ok(!fl_tokenizer_load(path) && strstr(fl_last_error(), path), "broken: a missing file is named: \"%s\"", fl_last_error());

    /* a bad tokenizer_config.json fails load_dir and is the file named */
    put_file(dir, "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}", path, sizeof path);
    put_file(dir, "tokenizer_config.json", "{\"bos_token\": \"<nope>\"}", path, sizeof path);
    tap_ok(!fl_tokenizer_load_dir(dir) && strstr(fl_last_error(), path) && strstr(fl_last_error(), "<nope>"),
           "broken: load_dir names a tokenizer_config.json token that does not exist: \"%s\"", fl_last_error());
    put_file(dir, "tokenizer_config.json", "{\"bos_token\": {\"content\": \"a\"}, \"add_bos_token\": true}", path, sizeof path);
    put_file(dir, "config.json", "{\"eos_token_id\": [0, 7]}", path, sizeof path);
    tap_ok(!fl_tokenizer_load_dir(dir) && strstr(fl_last_error(), path) && strstr(fl_last_error(), "eos_token_id"),
           "broken: load_dir names a config.json EOS outside the vocab: \"%s\"", fl_last_error());
    put_file(dir, "config.json", "{\"bos_token_id\": 5, \"eos_token_id\": [0]}", path, sizeof path);
    fl_tokenizer *tok = fl_tokenizer_load_dir(dir);
    tap_ok(tok && fl_tokenizer_bos(tok) == 0 && fl_tokenizer_add_bos(tok) == 1 && fl_tokenizer_eos(tok) == 0,
           "load_dir: tokenizer_config's BOS wins over config.json's; EOS from config.json");
    fl_tokenizer_free(tok);
}

int main(void) {
    const char *dir = tap_tmpdir("tokenizer");
    if (dir) {
        test_tiny(dir);
        test_broken(dir);
    } else {
        tap_ok(0, "build/tmp/tokenizer can be created");
    }
    test_stories();
    test_llama3();
    test_qwen2();
    return tap_done();
}
