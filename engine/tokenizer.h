/* Tokenizer internals shared by tokenizer.c (loading, BOS/EOS, decoding) and
 * tokenizer_encode.c (added tokens, normalization, pre-tokenization, BPE). */
#ifndef FL_TOKENIZER_H
#define FL_TOKENIZER_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "fl_internal.h"

/* Per-token attributes. */
enum { TOK_MODEL = 1, TOK_ADDED = 2, TOK_SPECIAL = 4 };

/* Vocabulary hash slot: the string is the token's text (id -1: empty). */
typedef struct {
    uint32_t hash;
    int32_t id;
} tok_str_slot;

/* Merge hash slot: (left << 32 | right) -> rank and merged id (key UINT64_MAX: empty). */
typedef struct {
    uint64_t key;
    int32_t rank, id;
} tok_pair_slot;

typedef struct {
    int32_t id;
    int len;
    const char *text; /* in the tokenizer's arena */
    int special, lstrip, rstrip;
} tok_added;

typedef enum { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD, NORM_PREPEND, NORM_REPLACE } tok_norm_kind;

typedef struct {
    tok_norm_kind kind;
    char *from, *to; /* Prepend: to; Replace: from -> to (NUL-terminated, owned) */
} tok_norm;

#define TOK_MAX_SPLITS 4
#define TOK_MAX_NORMS 8
#define TOK_DIRECT_CHARS 0x800 /* code points whose single-char token id is in a table */

struct fl_tokenizer {
    int n_vocab;           /* highest id + 1 over the model vocab and added tokens */
    char *arena;           /* every token string, NUL-terminated */
    size_t arena_len;
    uint32_t *text_off;    /* [n_vocab] offset in arena (UINT32_MAX: no token has this id) */
    int32_t *text_len;
    uint8_t *attr;         /* TOK_* bits */

    tok_str_slot *vocab;   /* string -> id over model and added tokens */
    uint32_t vocab_mask;
    tok_pair_slot *merges;
    uint32_t merge_mask;
    int32_t char_id[TOK_DIRECT_CHARS]; /* model id of each short single-char token, or -1 */
    int32_t byte_id[256];  /* <0xXX> byte-fallback ids, or -1 */
    char byte_chr[256][3]; /* byte -> its GPT-2 alphabet character: length, then UTF-8 */

    /* model.* flags */
    int byte_fallback, ignore_merges, fuse_unk;
    int32_t unk_id;

    /* normalizer, then pre-tokenizer: optional leading space, regex splits in
     * order, and the GPT-2 byte alphabet when a ByteLevel step is present */
    tok_norm norms[TOK_MAX_NORMS];
    int n_norms;
    pcre2_code *splits[TOK_MAX_SPLITS];
    int n_splits;
    int prefix_space;
    int byte_level;

    /* added tokens, grouped by first byte, longest first within a group */
    tok_added *added;
    int n_added;
    int added_start[257];

    /* decoder output of each token, and the leading spaces stripped from a sequence */
    char *dec;
    uint32_t *dec_off;
    int32_t *dec_len;
    int strip_start;

    int bos, eos, add_bos;
    int32_t eos_ids[FL_MAX_EOS];
    int n_eos;
};

/* Id of the token with exactly this text (model or added), or -1. */
int32_t fl_tok_lookup(const fl_tokenizer *t, const char *s, size_t n);
/* The same for model vocabulary tokens only (what BPE may produce), or -1. */
int32_t fl_tok_model_id(const fl_tokenizer *t, const char *s, size_t n);
/* Rank of merging (left, right) and the merged id in *merged, or -1. */
int32_t fl_tok_merge(const fl_tokenizer *t, int32_t left, int32_t right, int32_t *merged);
/* The UTF-8 sequence at s[0..n): its length when complete and valid, 0 when it
 * is a valid but incomplete prefix, or minus the length of its invalid part. */
int fl_tok_utf8_seq(const uint8_t *s, size_t n);

#endif
