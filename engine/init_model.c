/* fl_init_model: a seeded random LLaMA in the Hugging Face layout (config.json,
 * model.safetensors in F32, tokenizer.json, tokenizer_config.json), so every
 * command can run without a download. The same seed gives byte-identical files.
 *
 * Choices: lm_head is a separate tensor (tie_word_embeddings false), so the
 * untied output path is exercised; weights are ~N(0, 0.02), with the residual
 * output projections (o_proj, down_proj) scaled by 1/sqrt(2 n_layers) as in
 * GPT-2; norms are 1. The tokenizer is byte-level BPE: the 256 bytes at ids
 * 0..255, up to 254 merges learned from English text (as many as vocab_size
 * leaves room for), then <|begin_of_text|> and <|end_of_text|>. */
#include "fl_internal.h"
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INIT_STD 0.02
#define CHUNK 65536 /* elements per PRNG stream: chunks fill in parallel, same bytes */

static const char *const BOS_TEXT = "<|begin_of_text|>";
static const char *const EOS_TEXT = "<|end_of_text|>";

/* LLaMA-3's pre-tokenizer split pattern. */
static const char *const SPLIT_REGEX =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* BPE merges in raw bytes, in rank order, learned offline by byte-level BPE
 * training (most frequent pair first, ties to the smaller bytes) on the ASCII
 * words of TinyStories text, split by the pattern above: " the", " little",
 * " friend" and other common words come out as single tokens. */
static const char *const MERGES[][2] = {
    {"h", "e"}, {" ", "t"}, {" ", "a"}, {" ", "s"}, {" ", "w"}, {" t", "he"}, {"n", "d"},
    {"e", "d"}, {"i", "n"}, {" a", "nd"}, {" w", "a"}, {" ", "b"}, {" t", "o"}, {"r", "e"},
    {"o", "u"}, {" ", "h"}, {"i", "t"}, {" ", "f"}, {"e", "r"}, {"\n", "\n"}, {" wa", "s"},
    {" ", "c"}, {" ", "l"}, {" ", "he"}, {" ", "p"}, {"in", "g"}, {" ", "d"}, {" ", "m"},
    {" ", "o"}, {"a", "r"}, {" ", "g"}, {".", "\n\n"}, {"i", "s"}, {"a", "y"}, {"i", "d"},
    {"o", "m"}, {"l", "l"}, {"a", "t"}, {"e", "n"}, {" s", "a"}, {"n", "e"}, {"T", "he"},
    {"i", "m"}, {"l", "e"}, {" t", "h"}, {"a", "n"}, {" h", "a"}, {"o", "r"}, {" ", "it"},
    {"e", "t"}, {"v", "er"}, {"l", "d"}, {" ", "in"}, {" ", "S"}, {"o", "n"}, {" ", "e"},
    {"c", "e"}, {" b", "e"}, {" he", "r"}, {" ", "H"}, {"i", "r"}, {" ", "\""}, {" ", "u"},
    {" ", "n"}, {" sa", "id"}, {"r", "i"}, {"c", "k"}, {"o", "w"}, {" ", "The"}, {" s", "he"},
    {" s", "o"}, {"s", "t"}, {" H", "e"}, {" ", "y"}, {"o", "t"}, {" o", "f"}, {" s", "t"},
    {"i", "l"}, {"k", "e"}, {"u", "t"}, {"k", "ed"}, {"a", "m"}, {"o", "o"}, {" ", "I"},
    {"p", "p"}, {" ", "r"}, {" S", "he"}, {"ver", "y"}, {"v", "e"}, {" th", "at"}, {"i", "g"},
    {" h", "is"}, {" u", "p"}, {"it", "h"}, {" d", "ay"}, {" p", "l"}, {" w", "ith"}, {" y", "ou"},
    {"ou", "ld"}, {"e", "l"}, {"it", "t"}, {"en", "t"}, {"t", "ed"}, {" ha", "d"}, {"a", "d"},
    {"ou", "nd"}, {" ", "J"}, {"a", "l"}, {" w", "e"}, {"he", "r"}, {"\"", "\n\n"}, {" pl", "ay"},
    {" s", "m"}, {"'", "s"}, {"itt", "le"}, {" the", "y"}, {"e", "nd"}, {" the", "re"},
    {"a", "ck"}, {"im", "e"}, {" s", "h"}, {" t", "ime"}, {" ", "ne"}, {" f", "or"}, {" ", "re"},
    {"u", "n"}, {"l", "y"}, {"ou", "t"}, {" l", "ittle"}, {"c", "h"}, {" ha", "pp"}, {" w", "h"},
    {"h", "t"}, {"om", "e"}, {"s", "e"}, {" f", "ri"}, {" a", "s"}, {"m", "y"}, {"u", "m"},
    {" fri", "end"}, {" ", "very"}, {"a", "ll"}, {" ", "k"}, {"O", "n"}, {"v", "ed"}, {" ", "T"},
    {"On", "ce"}, {"t", "er"}, {"u", "g"}, {"i", "ll"}, {" o", "n"}, {" a", "n"}, {"ir", "l"},
    {"e", "s"}, {" g", "irl"}, {" e", "x"}, {"'", "t"}, {" l", "i"}, {" b", "o"}, {"e", "c"},
    {" we", "re"}, {"O", "ne"}, {" l", "oo"}, {" wa", "n"}, {" happ", "y"}, {" b", "ut"},
    {"o", "re"}, {" b", "ig"}, {"a", "ke"}, {" s", "p"}, {"f", "u"}, {" ", "B"}, {" sa", "w"},
    {" c", "ould"}, {" up", "on"}, {"id", "e"}, {"ar", "d"}, {"h", "ing"}, {"il", "ed"},
    {"i", "c"}, {"r", "ound"}, {" ", "out"}, {"o", "ne"}, {"r", "a"}, {" h", "im"}, {"r", "y"},
    {" m", "om"}, {" sm", "iled"}, {" ", "A"}, {"he", "n"}, {"w", "ay"}, {" I", "t"}, {"u", "r"},
    {"fu", "l"}, {" The", "y"}, {" wan", "ted"}, {" w", "ent"}, {" n", "ot"}, {" he", "l"},
    {"a", "in"}, {"e", "ar"}, {"i", "nd"}, {" a", "ll"}, {" ", "M"}, {"a", "re"}, {" friend", "s"},
    {" T", "im"}, {" to", "o"}, {"am", "e"}, {" l", "o"}, {" hel", "p"}, {" g", "o"}, {"om", "et"},
    {".", "\"\n\n"}, {"g", "ht"}, {" a", "t"}, {" ", "L"}, {" d", "o"}, {" as", "ked"},
    {" a", "round"}, {"il", "y"}, {" s", "omet"}, {"re", "e"}, {" loo", "ked"}, {" ", "j"},
    {" s", "e"}, {" somet", "hing"}, {"he", "d"}, {" c", "l"}, {"am", "ed"}, {"d", "d"},
    {" w", "or"}, {"ar", "k"}, {"oo", "d"}, {"r", "o"}, {" c", "an"}, {" ", "E"}, {"k", "ing"},
    {" ex", "c"}, {" w", "ould"}, {"a", "b"}, {"u", "re"}, {"r", "om"}, {" b", "ack"}, {" a", "g"},
    {" bo", "y"}, {" f", "a"}, {" n", "amed"}, {"g", "et"}, {" exc", "it"}, {" o", "ld"},
    {" st", "ar"}, {"s", "s"}, {" a", "l"},
};
#define N_MERGES ((int)(sizeof MERGES / sizeof MERGES[0]))

fl_init_model_params fl_init_model_default_params(void) {
    fl_init_model_params p;
    p.seed = 42;
    p.dim = 256;
    p.hidden_dim = 688; /* about 8/3 dim, a multiple of 16 */
    p.n_layers = 4;
    p.n_heads = 8;
    p.n_kv_heads = 4;
    p.vocab_size = 512;
    p.max_seq_len = 1024;
    return p;
}

static int check_params(const fl_init_model_params *p) {
    if (p->dim <= 0 || p->hidden_dim <= 0 || p->n_layers <= 0 || p->n_heads <= 0 ||
        p->n_kv_heads <= 0 || p->vocab_size <= 0 || p->max_seq_len <= 0)
        return fl_error("dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size "
                        "and max_seq_len must be positive");
    if (p->dim % p->n_heads != 0)
        return fl_error("dim %d is not divisible by n_heads %d", p->dim, p->n_heads);
    if ((p->dim / p->n_heads) % 2 != 0)
        return fl_error("head_dim %d must be even for rotary embeddings",
                        p->dim / p->n_heads);
    if (p->n_heads % p->n_kv_heads != 0)
        return fl_error("n_heads %d is not divisible by n_kv_heads %d", p->n_heads,
                        p->n_kv_heads);
    if (p->vocab_size < 258)
        return fl_error("vocab_size %d is below 258 (256 bytes + BOS + EOS)",
                        p->vocab_size);
    return 0;
}

/* Writes a cJSON tree (then freed) to dir/name atomically. */
static int write_json(const char *dir, const char *name, cJSON *root) {
    char path[4096];
    char *text = root ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!text) return fl_error("%s/%s: out of memory building JSON", dir, name);
    int rc = fl_path_join(path, sizeof path, dir, name);
    if (!rc) rc = fl_write_file_atomic(path, text, strlen(text));
    free(text);
    return rc;
}

/* ---------------------------------------------------------------- config */

static int n_merges_for(const fl_init_model_params *p) {
    int room = p->vocab_size - 258;
    return room < N_MERGES ? room : N_MERGES;
}

static int write_config(const char *dir, const fl_init_model_params *p) {
    int bos = 256 + n_merges_for(p);
    cJSON *c = cJSON_CreateObject();
    cJSON *archs = cJSON_AddArrayToObject(c, "architectures");
    cJSON_AddItemToArray(archs, cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddStringToObject(c, "model_type", "llama");
    cJSON_AddNumberToObject(c, "hidden_size", p->dim);
    cJSON_AddNumberToObject(c, "intermediate_size", p->hidden_dim);
    cJSON_AddNumberToObject(c, "num_hidden_layers", p->n_layers);
    cJSON_AddNumberToObject(c, "num_attention_heads", p->n_heads);
    cJSON_AddNumberToObject(c, "num_key_value_heads", p->n_kv_heads);
    cJSON_AddNumberToObject(c, "head_dim", p->dim / p->n_heads);
    cJSON_AddNumberToObject(c, "vocab_size", p->vocab_size);
    cJSON_AddNumberToObject(c, "max_position_embeddings", p->max_seq_len);
    cJSON_AddNumberToObject(c, "rms_norm_eps", 1e-5);
    cJSON_AddNumberToObject(c, "rope_theta", 10000.0);
    cJSON_AddNullToObject(c, "rope_scaling");
    cJSON_AddFalseToObject(c, "tie_word_embeddings");
    cJSON_AddFalseToObject(c, "attention_bias");
    cJSON_AddFalseToObject(c, "mlp_bias");
    cJSON_AddStringToObject(c, "hidden_act", "silu");
    cJSON_AddNumberToObject(c, "initializer_range", INIT_STD);
    cJSON_AddNumberToObject(c, "bos_token_id", bos);
    cJSON_AddNumberToObject(c, "eos_token_id", bos + 1);
    cJSON_AddStringToObject(c, "torch_dtype", "float32");
    cJSON_AddNumberToObject(c, "flexllm_init_seed", p->seed);
    return write_json(dir, "config.json", c);
}

/* ------------------------------------------------------------- tokenizer */

/* A raw byte string in the byte-level alphabet. */
static void to_symbols(const char *raw, char *out, size_t cap) {
    size_t n = 0;
    for (const unsigned char *s = (const unsigned char *)raw; *s; s++) {
        char sym[4];
        size_t k = (size_t)fl_byte_level_char(*s, sym);
        if (n + k + 1 > cap) break;
        memcpy(out + n, sym, k);
        n += k;
    }
    out[n] = 0;
}

static cJSON *added_token(int id, const char *text) {
    cJSON *t = cJSON_CreateObject();
    cJSON_AddNumberToObject(t, "id", id);
    cJSON_AddStringToObject(t, "content", text);
    cJSON_AddFalseToObject(t, "single_word");
    cJSON_AddFalseToObject(t, "lstrip");
    cJSON_AddFalseToObject(t, "rstrip");
    cJSON_AddFalseToObject(t, "normalized");
    cJSON_AddTrueToObject(t, "special");
    return t;
}

static cJSON *byte_level(int add_prefix_space, int trim_offsets, int use_regex) {
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "type", "ByteLevel");
    cJSON_AddBoolToObject(b, "add_prefix_space", add_prefix_space);
    cJSON_AddBoolToObject(b, "trim_offsets", trim_offsets);
    cJSON_AddBoolToObject(b, "use_regex", use_regex);
    return b;
}

static cJSON *pre_tokenizer(void) {
    cJSON *seq = cJSON_CreateObject();
    cJSON_AddStringToObject(seq, "type", "Sequence");
    cJSON *list = cJSON_AddArrayToObject(seq, "pretokenizers");
    cJSON *split = cJSON_CreateObject();
    cJSON_AddStringToObject(split, "type", "Split");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(split, "pattern"), "Regex", SPLIT_REGEX);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddFalseToObject(split, "invert");
    cJSON_AddItemToArray(list, split);
    cJSON_AddItemToArray(list, byte_level(0, 1, 0));
    return seq;
}

static cJSON *template_piece(const char *kind, const char *id, int type_id) {
    cJSON *piece = cJSON_CreateObject();
    cJSON *body = cJSON_AddObjectToObject(piece, kind);
    cJSON_AddStringToObject(body, "id", id);
    cJSON_AddNumberToObject(body, "type_id", type_id);
    return piece;
}

/* ByteLevel, then a template that puts BOS before each sequence (as LLaMA-3.1's). */
static cJSON *post_processor(int bos) {
    cJSON *tp = cJSON_CreateObject();
    cJSON_AddStringToObject(tp, "type", "TemplateProcessing");
    cJSON *single = cJSON_AddArrayToObject(tp, "single");
    cJSON_AddItemToArray(single, template_piece("SpecialToken", BOS_TEXT, 0));
    cJSON_AddItemToArray(single, template_piece("Sequence", "A", 0));
    cJSON *pair = cJSON_AddArrayToObject(tp, "pair");
    cJSON_AddItemToArray(pair, template_piece("SpecialToken", BOS_TEXT, 0));
    cJSON_AddItemToArray(pair, template_piece("Sequence", "A", 0));
    cJSON_AddItemToArray(pair, template_piece("SpecialToken", BOS_TEXT, 1));
    cJSON_AddItemToArray(pair, template_piece("Sequence", "B", 1));
    cJSON *special = cJSON_AddObjectToObject(cJSON_AddObjectToObject(tp, "special_tokens"), BOS_TEXT);
    cJSON_AddStringToObject(special, "id", BOS_TEXT);
    cJSON_AddItemToArray(cJSON_AddArrayToObject(special, "ids"), cJSON_CreateNumber(bos));
    cJSON_AddItemToArray(cJSON_AddArrayToObject(special, "tokens"), cJSON_CreateString(BOS_TEXT));

    cJSON *seq = cJSON_CreateObject();
    cJSON_AddStringToObject(seq, "type", "Sequence");
    cJSON *list = cJSON_AddArrayToObject(seq, "processors");
    cJSON_AddItemToArray(list, byte_level(1, 0, 1));
    cJSON_AddItemToArray(list, tp);
    return seq;
}

static cJSON *bpe_model(int n_merges) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "type", "BPE");
    cJSON_AddNullToObject(m, "dropout");
    cJSON_AddNullToObject(m, "unk_token");
    cJSON_AddNullToObject(m, "continuing_subword_prefix");
    cJSON_AddNullToObject(m, "end_of_word_suffix");
    cJSON_AddFalseToObject(m, "fuse_unk");
    cJSON_AddFalseToObject(m, "byte_fallback");
    cJSON_AddFalseToObject(m, "ignore_merges");
    cJSON *vocab = cJSON_AddObjectToObject(m, "vocab");
    char a[64], b[64], ab[160];
    for (int i = 0; i < 256; i++) {
        char sym[4];
        sym[fl_byte_level_char(i, sym)] = 0;
        cJSON_AddNumberToObject(vocab, sym, i);
    }
    cJSON *merges = cJSON_AddArrayToObject(m, "merges");
    for (int i = 0; i < n_merges; i++) {
        to_symbols(MERGES[i][0], a, sizeof a);
        to_symbols(MERGES[i][1], b, sizeof b);
        snprintf(ab, sizeof ab, "%s%s", a, b);
        cJSON_AddNumberToObject(vocab, ab, 256 + i);
        snprintf(ab, sizeof ab, "%s %s", a, b);
        cJSON_AddItemToArray(merges, cJSON_CreateString(ab));
    }
    return m;
}

static int write_tokenizer(const char *dir, const fl_init_model_params *p) {
    int n_merges = n_merges_for(p), bos = 256 + n_merges;
    cJSON *t = cJSON_CreateObject();
    cJSON_AddStringToObject(t, "version", "1.0");
    cJSON_AddNullToObject(t, "truncation");
    cJSON_AddNullToObject(t, "padding");
    cJSON *added = cJSON_AddArrayToObject(t, "added_tokens");
    cJSON_AddItemToArray(added, added_token(bos, BOS_TEXT));
    cJSON_AddItemToArray(added, added_token(bos + 1, EOS_TEXT));
    cJSON_AddNullToObject(t, "normalizer");
    cJSON_AddItemToObject(t, "pre_tokenizer", pre_tokenizer());
    cJSON_AddItemToObject(t, "post_processor", post_processor(bos));
    cJSON_AddItemToObject(t, "decoder", byte_level(1, 1, 1));
    cJSON_AddItemToObject(t, "model", bpe_model(n_merges));
    if (write_json(dir, "tokenizer.json", t)) return -1;

    cJSON *c = cJSON_CreateObject();
    cJSON_AddTrueToObject(c, "add_bos_token");
    cJSON_AddFalseToObject(c, "add_eos_token");
    cJSON_AddStringToObject(c, "bos_token", BOS_TEXT);
    cJSON_AddStringToObject(c, "eos_token", EOS_TEXT);
    cJSON_AddNumberToObject(c, "model_max_length", p->max_seq_len);
    cJSON_AddStringToObject(c, "tokenizer_class", "PreTrainedTokenizerFast");
    cJSON_AddFalseToObject(c, "clean_up_tokenization_spaces");
    return write_json(dir, "tokenizer_config.json", c);
}

/* --------------------------------------------------------------- weights */

/* Near-normal values into x[n]: each is the sum of four 16-bit uniforms
 * (Irwin-Hall), centred and scaled to the given std. Integer sums and one
 * correctly rounded multiply make the bytes the same on every IEEE platform
 * (no libm in the path), at a small fraction of Box-Muller's cost. */
static void fill_normal(float *x, size_t n, double std, uint64_t state) {
    /* (k + 0.5) / 65536 has mean 1/2 and variance ~1/12: the sum of four is 2 +- 1/sqrt(3). */
    double scale = std * sqrt(3.0) / 65536.0;
    for (size_t i = 0; i < n; i++) {
        uint64_t r = fl_splitmix64(&state);
        int64_t s = (int64_t)(r & 0xffff) + (int64_t)(r >> 16 & 0xffff) +
                    (int64_t)(r >> 32 & 0xffff) + (int64_t)(r >> 48);
        x[i] = (float)((double)(s - 131070) * scale);
    }
}

/* Each CHUNK of a tensor has its own stream keyed by (seed, tensor, chunk),
 * so the bytes do not depend on the thread count. */
static void fill_tensor(float *x, size_t n, double std, uint64_t seed, int tensor) {
    long n_chunks = (long)((n + CHUNK - 1) / CHUNK);
#pragma omp parallel for schedule(static)
    for (long c = 0; c < n_chunks; c++) {
        uint64_t key = seed ^ ((uint64_t)(tensor + 1) << 40) ^ (uint64_t)c;
        uint64_t state = fl_splitmix64(&key);
        size_t begin = (size_t)c * CHUNK, len = n - begin < CHUNK ? n - begin : CHUNK;
        fill_normal(x + begin, len, std, state);
    }
}

typedef struct {
    fl_st_tensor *t;
    char (*names)[96];
    int n;
} tensor_list;

/* Appends a 1-D (cols == 0) or 2-D tensor named from fmt and layer. */
static int add_tensor(tensor_list *l, int layer, const char *fmt, int64_t rows, int64_t cols,
                      double std, uint64_t seed) {
    fl_st_tensor *t = &l->t[l->n];
    snprintf(l->names[l->n], sizeof l->names[0], fmt, layer);
    t->name = l->names[l->n];
    t->dtype = FL_DTYPE_F32;
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->numel = cols ? rows * cols : rows;
    t->nbytes = (size_t)t->numel * sizeof(float);
    float *x = fl_malloc(t->nbytes);
    if (!x) return -1;
    if (std > 0) {
        fill_tensor(x, (size_t)t->numel, std, seed, l->n);
    } else {
        for (int64_t i = 0; i < t->numel; i++) x[i] = 1.0f;
    }
    t->data = x;
    l->n++;
    return 0;
}

static int build_weights(tensor_list *l, const fl_init_model_params *p, uint64_t seed) {
    int64_t dim = p->dim, hidden = p->hidden_dim, hd = p->dim / p->n_heads;
    int64_t q_dim = p->n_heads * hd, kv_dim = p->n_kv_heads * hd;
    double out_std = INIT_STD / sqrt(2.0 * p->n_layers);
    int rc = add_tensor(l, 0, "model.embed_tokens.weight", p->vocab_size, dim, INIT_STD, seed);
    for (int i = 0; i < p->n_layers && !rc; i++) {
        rc = add_tensor(l, i, "model.layers.%d.input_layernorm.weight", dim, 0, 0, seed) ||
             add_tensor(l, i, "model.layers.%d.self_attn.q_proj.weight", q_dim, dim, INIT_STD, seed) ||
             add_tensor(l, i, "model.layers.%d.self_attn.k_proj.weight", kv_dim, dim, INIT_STD, seed) ||
             add_tensor(l, i, "model.layers.%d.self_attn.v_proj.weight", kv_dim, dim, INIT_STD, seed) ||
             add_tensor(l, i, "model.layers.%d.self_attn.o_proj.weight", dim, q_dim, out_std, seed) ||
             add_tensor(l, i, "model.layers.%d.post_attention_layernorm.weight", dim, 0, 0, seed) ||
             add_tensor(l, i, "model.layers.%d.mlp.gate_proj.weight", hidden, dim, INIT_STD, seed) ||
             add_tensor(l, i, "model.layers.%d.mlp.up_proj.weight", hidden, dim, INIT_STD, seed) ||
             add_tensor(l, i, "model.layers.%d.mlp.down_proj.weight", dim, hidden, out_std, seed);
    }
    if (!rc) rc = add_tensor(l, 0, "model.norm.weight", dim, 0, 0, seed);
    if (!rc) rc = add_tensor(l, 0, "lm_head.weight", p->vocab_size, dim, INIT_STD, seed);
    return rc;
}

static int write_weights(const char *dir, const fl_init_model_params *p) {
    int cap = 3 + 9 * p->n_layers;
    tensor_list l = {fl_calloc((size_t)cap, sizeof *l.t), fl_calloc((size_t)cap, sizeof *l.names), 0};
    char path[4096];
    int rc = (!l.t || !l.names) ? -1 : build_weights(&l, p, (uint64_t)(uint32_t)p->seed);
    if (!rc) rc = fl_path_join(path, sizeof path, dir, "model.safetensors");
    if (!rc) {
        const char *keys[] = {"format", "generator"};
        const char *values[] = {"pt", "flexllm init-model"};
        rc = fl_st_write(path, l.t, l.n, keys, values, 2);
    }
    for (int i = 0; i < l.n; i++) free((void *)l.t[i].data);
    free(l.t);
    free(l.names);
    return rc;
}

int fl_init_model(const char *dir, const fl_init_model_params *params) {
    fl_init_model_params p = params ? *params : fl_init_model_default_params();
    /* config.json last: a folder that has one holds a complete model. */
    if (check_params(&p) || fl_make_dirs(dir) || write_weights(dir, &p) || write_tokenizer(dir, &p) ||
        write_config(dir, &p))
        return fl_error_prefix("init-model %s", dir);
    return 0;
}
