/* Helpers shared by the engine's translation units (not part of the public API). */
#ifndef FL_INTERNAL_H
#define FL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "flexllm.h"

/* Sets fl_last_error() from a printf format and returns -1. */
int fl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prefixes the current error with more context ("loading x: <old message>"). */
int fl_error_prefix(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* malloc/calloc that report the size that failed through fl_error. */
void *fl_malloc(size_t n);
void *fl_calloc(size_t count, size_t size);
/* A copy of s, reporting a failed allocation through fl_error. */
char *fl_strdup(const char *s);

/* config.json and adapter_config.json fields (cJSON values). */
struct cJSON;
/* obj[key], NULL when absent or null: HF's and PEFT's config classes read both as "not
 * given". */
const struct cJSON *fl_json_field(const struct cJSON *obj, const char *key);
/* The JSON text of a value for messages, cut to 60 characters ("?" if it cannot print). */
void fl_json_describe(const struct cJSON *v, char *out, size_t cap);

/* Reads a whole file into a NUL-terminated buffer (free() it). NULL + error on failure. */
char *fl_read_file(const char *path, size_t *len);
/* Writes data to path through path.tmp + rename, so readers never see half a file. */
int fl_write_file_atomic(const char *path, const void *data, size_t len);
/* dir + "/" + name into out; -1 if it does not fit. */
int fl_path_join(char *out, size_t cap, const char *dir, const char *name);
int fl_file_exists(const char *path);
/* mkdir -p: creates dir and its missing parents. */
int fl_make_dirs(const char *dir);

/* IEEE half and bfloat16 to float. */
float fl_f16_to_f32(uint16_t h);
float fl_bf16_to_f32(uint16_t b);
uint16_t fl_f32_to_bf16(float f);

/* GPT-2's byte-level alphabet (tokenizer.c): writes the UTF-8 of the character standing
 * for byte b (1 or 2 bytes, unterminated) and returns its length. */
int fl_byte_level_char(int b, char *out);

/* splitmix64: advances *state and returns the next output. The engine's seeded streams
 * (initial weights, LoRA A, dropout hashes, epoch orders) all draw from it. */
static inline uint64_t fl_splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

#endif
