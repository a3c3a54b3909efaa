/* safetensors reading and writing. A file is an 8-byte little-endian header
 * length N, N bytes of JSON header, then the data area that the header's
 * data_offsets index. Files are mmapped, and every header entry is checked
 * (dtype, shape against byte size, bounds, overlaps) before a pointer into the
 * data is handed out, so a bad file fails with a message instead of a crash. */
#include "safetensors.h"
#include "fl_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (100u << 20)
#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"
/* JSON numbers are doubles: integers above 2^53 are not exact. */
#define ST_MAX_JSON_INT 9007199254740992.0

typedef struct {
    char *path;
    void *map;
    size_t size;
    char *names; /* this file's tensor names, back to back */
    cJSON *meta; /* its __metadata__ object (all values strings), or NULL */
} st_file;

struct fl_st_set {
    char *source;
    st_file *files;
    int n_files;
    fl_st_tensor *tensors; /* sorted by name for bsearch */
    int n, cap;
};

static const struct {
    const char *name;
    fl_dtype dtype;
    size_t size;
} st_dtypes[] = {{"F32", FL_DTYPE_F32, 4}, {"F16", FL_DTYPE_F16, 2}, {"BF16", FL_DTYPE_BF16, 2}};

/* Valid safetensors dtypes this engine does not read. */
static const char *const st_other_dtypes[] = {
    "F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"};

static size_t dtype_size(fl_dtype d) {
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (st_dtypes[i].dtype == d) return st_dtypes[i].size;
    return 0;
}

static const char *dtype_name(fl_dtype d) {
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (st_dtypes[i].dtype == d) return st_dtypes[i].name;
    return "?";
}

void fl_st_shape_str(const int64_t *shape, int ndim, const char *sep, char *out, size_t cap) {
    size_t n = (size_t)snprintf(out, cap, "[");
    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, "%s%lld", i ? sep : "", (long long)shape[i]);
    if (n < cap) snprintf(out + n, cap - n, "]");
}

static int is_json_uint(const cJSON *v) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    return isfinite(d) && d >= 0 && d <= ST_MAX_JSON_INT && d == floor(d);
}

/* numel of a shape, or -1 when it overflows int64. */
static int64_t shape_numel(const int64_t *shape, int ndim) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return -1;
        if (shape[i] != 0 && n > INT64_MAX / shape[i]) return -1;
        n *= shape[i];
    }
    return n;
}

/* ------------------------------------------------------------- reading */

static int parse_dtype(const char *file, const char *name, const cJSON *v, fl_dtype *out,
                       size_t *size) {
    if (!cJSON_IsString(v))
        return fl_error("%s: tensor '%s': field 'dtype' missing or not a string", file, name);
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (!strcmp(v->valuestring, st_dtypes[i].name)) {
            *out = st_dtypes[i].dtype;
            *size = st_dtypes[i].size;
            return 0;
        }
    for (size_t i = 0; i < sizeof st_other_dtypes / sizeof st_other_dtypes[0]; i++)
        if (!strcmp(v->valuestring, st_other_dtypes[i]))
            return fl_error("%s: tensor '%s': unsupported dtype '%s' (supported: F32, F16, BF16)",
                            file, name, v->valuestring);
    return fl_error("%s: tensor '%s': unknown dtype '%s'", file, name, v->valuestring);
}

static int parse_shape(const char *file, const char *name, const cJSON *v, fl_st_tensor *t) {
    if (!cJSON_IsArray(v))
        return fl_error("%s: tensor '%s': field 'shape' missing or not a list", file, name);
    int ndim = cJSON_GetArraySize(v);
    if (ndim > FL_ST_MAX_DIMS)
        return fl_error("%s: tensor '%s': shape has %d dimensions, at most %d are supported", file,
                        name, ndim, FL_ST_MAX_DIMS);
    const cJSON *d;
    t->ndim = 0;
    cJSON_ArrayForEach(d, v) {
        if (!is_json_uint(d))
            return fl_error("%s: tensor '%s': shape entries must be non-negative integers", file,
                            name);
        t->shape[t->ndim++] = (int64_t)d->valuedouble;
    }
    t->numel = shape_numel(t->shape, t->ndim);
    if (t->numel < 0) return fl_error("%s: tensor '%s': shape overflows", file, name);
    return 0;
}

/* Fills t from one header entry and checks its bytes lie inside the data area. */
static int parse_entry(const st_file *f, const cJSON *e, const char *data, size_t data_size,
                       fl_st_tensor *t, uint64_t *begin, uint64_t *end) {
    const char *name = t->name;
    if (!cJSON_IsObject(e))
        return fl_error("%s: tensor '%s': header entry must be an object", f->path, name);
    size_t esize = 0;
    if (parse_dtype(f->path, name, cJSON_GetObjectItemCaseSensitive(e, "dtype"), &t->dtype, &esize) ||
        parse_shape(f->path, name, cJSON_GetObjectItemCaseSensitive(e, "shape"), t))
        return -1;
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
        !is_json_uint(cJSON_GetArrayItem(off, 0)) || !is_json_uint(cJSON_GetArrayItem(off, 1)))
        return fl_error("%s: tensor '%s': field 'data_offsets' must be [begin, end] of "
                        "non-negative integers", f->path, name);
    *begin = (uint64_t)cJSON_GetArrayItem(off, 0)->valuedouble;
    *end = (uint64_t)cJSON_GetArrayItem(off, 1)->valuedouble;
    if (*begin > *end)
        return fl_error("%s: tensor '%s': data_offsets [%llu, %llu] end before they begin", f->path,
                        name, (unsigned long long)*begin, (unsigned long long)*end);
    if (*end > data_size)
        return fl_error("%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the "
                        "%zu-byte data area (file truncated?)", f->path, name,
                        (unsigned long long)*begin, (unsigned long long)*end, data_size);
    if (t->numel > (int64_t)(INT64_MAX / esize))
        return fl_error("%s: tensor '%s': shape overflows", f->path, name);
    uint64_t need = (uint64_t)t->numel * esize;
    if (need != *end - *begin) {
        char s[160];
        fl_st_shape_str(t->shape, t->ndim, ",", s, sizeof s);
        return fl_error("%s: tensor '%s': shape %s of %s needs %llu bytes but data_offsets give %llu",
                        f->path, name, s, dtype_name(t->dtype), (unsigned long long)need,
                        (unsigned long long)(*end - *begin));
    }
    t->data = data + *begin;
    t->nbytes = (size_t)need;
    t->file = f->path;
    return 0;
}

typedef struct {
    uint64_t begin, end;
    const char *name;
} st_span;

static int cmp_span(const void *a, const void *b) {
    const st_span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* Two tensors sharing bytes would alias; empty tensors own no bytes. */
static int check_overlaps(const char *path, st_span *spans, int n) {
    qsort(spans, (size_t)n, sizeof *spans, cmp_span);
    const st_span *prev = NULL;
    for (int i = 0; i < n; i++) {
        if (spans[i].begin == spans[i].end) continue;
        if (prev && spans[i].begin < prev->end)
            return fl_error("%s: tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap", path,
                            prev->name, (unsigned long long)prev->begin,
                            (unsigned long long)prev->end, spans[i].name,
                            (unsigned long long)spans[i].begin, (unsigned long long)spans[i].end);
        prev = &spans[i];
    }
    return 0;
}

static int check_metadata(const char *path, const cJSON *meta) {
    if (!cJSON_IsObject(meta)) return fl_error("%s: __metadata__ must be an object", path);
    const cJSON *m;
    cJSON_ArrayForEach(m, meta) {
        if (!cJSON_IsString(m))
            return fl_error("%s: __metadata__ entry '%s' must be a string", path, m->string);
    }
    return 0;
}

static int grow_tensors(fl_st_set *set, int more) {
    if (set->n + more <= set->cap) return 0;
    int cap = set->cap ? set->cap : 64;
    while (cap < set->n + more) cap *= 2;
    fl_st_tensor *t = realloc(set->tensors, (size_t)cap * sizeof *t);
    if (!t) return fl_error("out of memory for %d tensor entries", cap);
    set->tensors = t;
    set->cap = cap;
    return 0;
}

/* Adds the tensors of the parsed header root to set. */
static int add_header_tensors(fl_st_set *set, st_file *f, const cJSON *root, const char *data,
                              size_t data_size) {
    int count = 0;
    size_t names_len = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (!strcmp(e->string, "__metadata__")) {
            if (check_metadata(f->path, e)) return -1;
            if (!(f->meta = cJSON_Duplicate(e, 1))) return fl_error("out of memory");
            continue;
        }
        count++;
        names_len += strlen(e->string) + 1;
    }
    f->names = fl_malloc(names_len);
    st_span *spans = fl_malloc((size_t)count * sizeof *spans);
    int rc = (!f->names || !spans || grow_tensors(set, count)) ? -1 : 0;
    char *name = f->names;
    int k = 0;
    cJSON_ArrayForEach(e, root) {
        if (rc || !strcmp(e->string, "__metadata__")) continue;
        fl_st_tensor *t = &set->tensors[set->n + k];
        memset(t, 0, sizeof *t);
        size_t len = strlen(e->string) + 1;
        memcpy(name, e->string, len);
        t->name = name;
        name += len;
        spans[k].name = t->name;
        rc = parse_entry(f, e, data, data_size, t, &spans[k].begin, &spans[k].end);
        k++;
    }
    if (!rc) rc = check_overlaps(f->path, spans, count);
    if (!rc) set->n += count;
    free(spans);
    return rc;
}

static int map_file(st_file *f) {
    int fd = open(f->path, O_RDONLY);
    if (fd < 0) return fl_error("%s: cannot open: %s", f->path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fl_error("%s: cannot open: not a regular file", f->path);
    }
    if (st.st_size < 8) {
        close(fd);
        return fl_error("%s: file is %lld bytes, too short for a safetensors header", f->path,
                        (long long)st.st_size);
    }
    f->size = (size_t)st.st_size;
    void *map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED) return fl_error("%s: cannot mmap: %s", f->path, strerror(e));
    f->map = map;
    return 0;
}

/* Maps one file and adds its validated tensors to set. */
static int open_file(fl_st_set *set, st_file *f) {
    if (map_file(f)) return -1;
    const unsigned char *p = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | p[i];
    if (hlen > f->size - 8)
        return fl_error("%s: header length %llu exceeds the %zu bytes after it (file truncated?)",
                        f->path, (unsigned long long)hlen, f->size - 8);
    if (hlen > ST_MAX_HEADER)
        return fl_error("%s: header length %llu exceeds the %u-byte limit", f->path,
                        (unsigned long long)hlen, ST_MAX_HEADER);
    /* A NUL-terminated copy, so the parser cannot read past the header. */
    char *text = fl_malloc((size_t)hlen + 1);
    if (!text) return -1;
    memcpy(text, p + 8, (size_t)hlen);
    text[hlen] = 0;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 0);
    int rc = 0;
    if (!root) {
        rc = fl_error("%s: header is not valid JSON (near byte %zu of the header)", f->path,
                      end ? (size_t)(end - text) : 0);
    } else {
        size_t at = (size_t)(end - text);
        while (at < hlen && (text[at] == ' ' || text[at] == '\n' || text[at] == '\t' ||
                             text[at] == '\r'))
            at++;
        if (at != hlen)
            rc = fl_error("%s: header has data after its JSON (byte %zu of the header)", f->path, at);
        else if (!cJSON_IsObject(root))
            rc = fl_error("%s: header must be a JSON object", f->path);
        else
            rc = add_header_tensors(set, f, root, (const char *)p + 8 + hlen,
                                    f->size - 8 - (size_t)hlen);
    }
    cJSON_Delete(root);
    free(text);
    return rc;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const fl_st_tensor *)a)->name, ((const fl_st_tensor *)b)->name);
}

static int sort_and_check_unique(fl_st_set *set) {
    qsort(set->tensors, (size_t)set->n, sizeof *set->tensors, cmp_tensor_name);
    for (int i = 1; i < set->n; i++)
        if (!strcmp(set->tensors[i - 1].name, set->tensors[i].name)) {
            const char *a = set->tensors[i - 1].file, *b = set->tensors[i].file;
            if (a == b)
                return fl_error("%s: tensor '%s' appears twice", a, set->tensors[i].name);
            return fl_error("%s: tensor '%s' appears in both %s and %s", set->source,
                            set->tensors[i].name, a, b);
        }
    return 0;
}

static int add_file(fl_st_set *set, const char *path) {
    st_file *files = realloc(set->files, (size_t)(set->n_files + 1) * sizeof *files);
    if (!files) return fl_error("out of memory");
    set->files = files;
    st_file *f = &files[set->n_files];
    memset(f, 0, sizeof *f);
    f->path = fl_strdup(path);
    if (!f->path) return -1;
    set->n_files++;
    return open_file(set, f);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The weight_map's values, checked, sorted and without repeats. */
static int shard_names(const char *index, const cJSON *map, const char ***out, int *n_out) {
    int n = 0;
    const char **names = fl_malloc((size_t)cJSON_GetArraySize(map) * sizeof *names);
    if (!names) return -1;
    const cJSON *e;
    cJSON_ArrayForEach(e, map) {
        if (!cJSON_IsString(e) || !e->valuestring[0]) {
            free(names);
            return fl_error("%s: weight_map entry '%s' must be a shard file name", index, e->string);
        }
        /* Shards live beside the index: a path could point anywhere. */
        if (strchr(e->valuestring, '/') || !strcmp(e->valuestring, ".") ||
            !strcmp(e->valuestring, "..")) {
            free(names);
            return fl_error("%s: weight_map entry '%s': shard '%s' must be a plain file name", index,
                            e->string, e->valuestring);
        }
        names[n++] = e->valuestring;
    }
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    int u = 0;
    for (int i = 0; i < n; i++)
        if (u == 0 || strcmp(names[u - 1], names[i]) != 0) names[u++] = names[i];
    *out = names;
    *n_out = u;
    return 0;
}

/* Every tensor the index places in a shard must be in that shard. */
static int check_index_entries(fl_st_set *set, const char *dir, const cJSON *map) {
    char path[4096];
    const cJSON *e;
    cJSON_ArrayForEach(e, map) {
        if (fl_path_join(path, sizeof path, dir, e->valuestring)) return -1;
        const fl_st_tensor *t = fl_st_find(set, e->string);
        if (!t || strcmp(t->file, path) != 0)
            return fl_error("%s: index says '%s' is in shard '%s' but %s has no such tensor",
                            set->source, e->string, e->valuestring, e->valuestring);
    }
    return 0;
}

static int open_sharded(fl_st_set *set, const char *dir) {
    char *text = fl_read_file(set->source, NULL);
    if (!text) return -1;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    int rc = -1;
    const char **shards = NULL;
    int n_shards = 0;
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!root)
        fl_error("%s: invalid JSON near byte %zu", set->source, end ? (size_t)(end - text) : 0);
    else if (!cJSON_IsObject(map))
        fl_error("%s: field 'weight_map' missing or not an object", set->source);
    else if (!cJSON_GetArraySize(map))
        fl_error("%s: field 'weight_map' is empty", set->source);
    else if (!shard_names(set->source, map, &shards, &n_shards))
        rc = 0;
    char path[4096];
    for (int i = 0; i < n_shards && !rc; i++) {
        rc = fl_path_join(path, sizeof path, dir, shards[i]);
        if (!rc && (rc = add_file(set, path)))
            fl_error_prefix("%s: shard '%s'", set->source, shards[i]);
    }
    if (!rc) rc = sort_and_check_unique(set);
    if (!rc) rc = check_index_entries(set, dir, map);
    free(shards);
    cJSON_Delete(root);
    free(text);
    return rc;
}

fl_st_set *fl_st_open(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fl_error("%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    fl_st_set *set = fl_calloc(1, sizeof *set);
    if (!set) return NULL;
    char buf[4096];
    int rc;
    if (S_ISDIR(st.st_mode)) {
        rc = fl_path_join(buf, sizeof buf, path, ST_INDEX_NAME);
        if (!rc && fl_file_exists(buf)) {
            rc = (set->source = fl_strdup(buf)) ? open_sharded(set, path) : -1;
        } else if (!rc) {
            rc = fl_path_join(buf, sizeof buf, path, ST_SINGLE_NAME);
            if (!rc) rc = (set->source = fl_strdup(buf)) ? add_file(set, buf) : -1;
            if (!rc) rc = sort_and_check_unique(set);
        }
    } else {
        rc = (set->source = fl_strdup(path)) ? add_file(set, path) : -1;
        if (!rc) rc = sort_and_check_unique(set);
    }
    if (rc) {
        fl_st_close(set);
        return NULL;
    }
    return set;
}

void fl_st_close(fl_st_set *set) {
    if (!set) return;
    for (int i = 0; i < set->n_files; i++) {
        if (set->files[i].map) munmap(set->files[i].map, set->files[i].size);
        free(set->files[i].names);
        free(set->files[i].path);
        cJSON_Delete(set->files[i].meta);
    }
    free(set->files);
    free(set->tensors);
    free(set->source);
    free(set);
}

int fl_st_count(const fl_st_set *set) { return set->n; }

const char *fl_st_metadata(const fl_st_set *set, const char *key) {
    for (int i = 0; i < set->n_files; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(set->files[i].meta, key);
        if (cJSON_IsString(v)) return v->valuestring;
    }
    return NULL;
}

const fl_st_tensor *fl_st_at(const fl_st_set *set, int i) {
    return i >= 0 && i < set->n ? &set->tensors[i] : NULL;
}

const fl_st_tensor *fl_st_find(const fl_st_set *set, const char *name) {
    fl_st_tensor key;
    key.name = name;
    return bsearch(&key, set->tensors, (size_t)set->n, sizeof key, cmp_tensor_name);
}

const char *fl_st_source(const fl_st_set *set) { return set->source; }

void fl_st_to_f32(const fl_st_tensor *t, float *dst) {
    const unsigned char *src = t->data;
    size_t n = (size_t)t->numel;
    if (t->dtype == FL_DTYPE_F32) {
        if (n) memcpy(dst, src, n * sizeof(float));
        return;
    }
    /* memcpy per element: the data need not be 2-byte aligned. */
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        dst[i] = t->dtype == FL_DTYPE_F16 ? fl_f16_to_f32(h) : fl_bf16_to_f32(h);
    }
}

/* ------------------------------------------------------------- writing */

/* The header JSON, unpadded; NULL + error on bad input. */
static char *build_header(const fl_st_tensor *tensors, int n, const char *const *meta_keys,
                          const char *const *meta_values, int n_meta) {
    cJSON *root = cJSON_CreateObject();
    if (!root) {
        fl_error("out of memory building a safetensors header");
        return NULL;
    }
    int ok = 1;
    if (n_meta > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        for (int i = 0; ok && i < n_meta; i++)
            ok = meta && cJSON_AddStringToObject(meta, meta_keys[i], meta_values[i]);
    }
    uint64_t off = 0;
    for (int i = 0; ok && i < n; i++) {
        const fl_st_tensor *t = &tensors[i];
        int64_t numel = shape_numel(t->shape, t->ndim);
        size_t esize = dtype_size(t->dtype);
        if (!esize || t->ndim < 0 || t->ndim > FL_ST_MAX_DIMS || numel < 0 ||
            !strcmp(t->name, "__metadata__")) {
            cJSON_Delete(root);
            fl_error("tensor '%s': bad dtype, shape or name", t->name);
            return NULL;
        }
        uint64_t nbytes = (uint64_t)numel * esize;
        cJSON *e = cJSON_AddObjectToObject(root, t->name);
        cJSON *shape = cJSON_AddArrayToObject(e, "shape");
        cJSON *offs = cJSON_AddArrayToObject(e, "data_offsets");
        ok = e && shape && offs && cJSON_AddStringToObject(e, "dtype", dtype_name(t->dtype));
        for (int d = 0; ok && d < t->ndim; d++)
            ok = cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
        ok = ok && cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off)) &&
             cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + nbytes)));
        off += nbytes;
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!text) fl_error("out of memory building a safetensors header");
    return text;
}

static int check_unique_names(const fl_st_tensor *tensors, int n) {
    const char **names = fl_malloc((size_t)n * sizeof *names);
    if (!names) return -1;
    for (int i = 0; i < n; i++) names[i] = tensors[i].name;
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    int rc = 0;
    for (int i = 1; i < n && !rc; i++)
        if (!strcmp(names[i - 1], names[i]))
            rc = fl_error("tensor '%s' given twice", names[i]);
    free(names);
    return rc;
}

/* Streams header and data into a temporary file, then renames it over path,
 * so a reader never sees half a file and the data is never copied whole. */
static int write_stream(const char *path, const char *header, size_t hlen, size_t padded,
                        const fl_st_tensor *tensors, int n) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return fl_error("%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return fl_error("%s: cannot create: %s", tmp, strerror(errno));
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    int ok = fwrite(len8, 1, 8, f) == 8 && fwrite(header, 1, hlen, f) == hlen;
    for (size_t i = hlen; ok && i < padded; i++) ok = fputc(' ', f) != EOF;
    for (int i = 0; ok && i < n; i++) {
        size_t nbytes = (size_t)shape_numel(tensors[i].shape, tensors[i].ndim) *
                        dtype_size(tensors[i].dtype);
        ok = nbytes == 0 || fwrite(tensors[i].data, 1, nbytes, f) == nbytes;
    }
    ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
    int e = errno;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        if (ok) e = errno;
        unlink(tmp);
        return fl_error("%s: write failed: %s", path, strerror(e));
    }
    return 0;
}

int fl_st_write(const char *path, const fl_st_tensor *tensors, int n,
                const char *const *meta_keys, const char *const *meta_values, int n_meta) {
    if (n < 0) return fl_error("%s: negative tensor count %d", path, n);
    if (check_unique_names(tensors, n)) return fl_error_prefix("%s", path);
    char *header = build_header(tensors, n, meta_keys, meta_values, n_meta);
    if (!header) return fl_error_prefix("%s", path);
    size_t hlen = strlen(header);
    /* Pad with spaces so the data area starts 8-byte aligned, as HF does. */
    size_t padded = (hlen + 7) & ~(size_t)7;
    int rc = write_stream(path, header, hlen, padded, tensors, n);
    free(header);
    return rc;
}
