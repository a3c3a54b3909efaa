/* Errors, allocation, files, and half-precision conversion. */
#include "fl_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static _Thread_local char err_buf[2048];

const char *fl_last_error(void) { return err_buf; }

int fl_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return -1;
}

int fl_error_prefix(const char *fmt, ...) {
    char old[sizeof err_buf], pre[512];
    memcpy(old, err_buf, sizeof old);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    /* "pre: old", cut at the buffer's end (the beginning names the context) */
    size_t lp = strlen(pre), lo = strlen(old);
    if (lp > sizeof err_buf - 3) lp = sizeof err_buf - 3;
    if (lo > sizeof err_buf - 3 - lp) lo = sizeof err_buf - 3 - lp;
    memcpy(err_buf, pre, lp);
    memcpy(err_buf + lp, ": ", 2);
    memcpy(err_buf + lp + 2, old, lo);
    err_buf[lp + 2 + lo] = 0;
    return -1;
}

void *fl_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) fl_error("out of memory allocating %zu bytes", n);
    return p;
}

void *fl_calloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) fl_error("out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

const cJSON *fl_json_field(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNull(v) ? NULL : v;
}

void fl_json_describe(const cJSON *v, char *out, size_t cap) {
    char *s = cJSON_PrintUnformatted(v);
    if (s && strlen(s) > 60) memcpy(s + 57, "...", 4);
    snprintf(out, cap, "%s", s ? s : "?");
    free(s);
}

char *fl_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = fl_malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

char *fl_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fl_error("%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 65536 + 1 > cap) {
            cap = cap ? cap * 2 : 1 << 16;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                fl_error("%s: out of memory reading the file", path);
                return NULL;
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        fl_error("%s: read error", path);
        return NULL;
    }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

int fl_write_file_atomic(const char *path, const void *data, size_t len) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return fl_error("%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return fl_error("%s: cannot create: %s", tmp, strerror(errno));
    size_t put = fwrite(data, 1, len, f);
    int ok = put == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return fl_error("%s: write failed: %s", path, strerror(e));
    }
    return 0;
}

int fl_path_join(char *out, size_t cap, const char *dir, const char *name) {
    int n = snprintf(out, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) return fl_error("path too long: %s/%s", dir, name);
    return 0;
}

int fl_make_dirs(const char *dir) {
    char buf[4096];
    if (!*dir) return fl_error("empty folder name");
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf)
        return fl_error("%s: path too long", dir);
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != 0) continue;
        char c = *p;
        *p = 0;
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            return fl_error("%s: cannot create directory: %s", buf, strerror(errno));
        *p = c;
        if (!c) break;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return fl_error("%s: not a directory", dir);
    return 0;
}

int fl_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

float fl_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp - 15 + 127) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

float fl_bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t fl_f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fff + ((bits >> 16) & 1); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}
