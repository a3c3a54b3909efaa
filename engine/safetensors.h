/* safetensors: mmapped, validated reading (single file or sharded by
 * model.safetensors.index.json) and atomic writing. */
#ifndef FL_SAFETENSORS_H
#define FL_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef enum { FL_DTYPE_F32 = 0, FL_DTYPE_F16 = 1, FL_DTYPE_BF16 = 2 } fl_dtype;

#define FL_ST_MAX_DIMS 8

typedef struct {
    const char *name;
    fl_dtype dtype;
    int ndim;
    int64_t shape[FL_ST_MAX_DIMS];
    int64_t numel;
    const void *data;   /* inside the mmapped file */
    size_t nbytes;
    const char *file;   /* path of the file holding it */
} fl_st_tensor;

typedef struct fl_st_set fl_st_set;

/* Opens dir/model.safetensors, or every shard named by dir/model.safetensors.index.json,
 * or a single .safetensors file when path is one. Validates every header: JSON,
 * dtype, shape x dtype == byte size, offsets inside the data area, no overlaps,
 * every index entry present in its shard. NULL + fl_last_error naming the file. */
fl_st_set *fl_st_open(const char *path);
void fl_st_close(fl_st_set *set);

int fl_st_count(const fl_st_set *set);
const fl_st_tensor *fl_st_at(const fl_st_set *set, int i);
/* NULL when absent (no error set). */
const fl_st_tensor *fl_st_find(const fl_st_set *set, const char *name);
/* A value of the files' __metadata__, or NULL when no file has the key. */
const char *fl_st_metadata(const fl_st_set *set, const char *key);
/* Path used in messages: the index file when sharded, else the file. */
const char *fl_st_source(const fl_st_set *set);

/* A shape as "[d0<sep>d1...]" for messages. */
void fl_st_shape_str(const int64_t *shape, int ndim, const char *sep, char *out, size_t cap);

/* Converts a tensor's elements to float32 into dst[numel]. */
void fl_st_to_f32(const fl_st_tensor *t, float *dst);

/* Writes tensors (each with name, dtype, ndim, shape, data) to path atomically,
 * with optional string metadata pairs (keys[i] -> values[i]) in __metadata__. */
int fl_st_write(const char *path, const fl_st_tensor *tensors, int n,
                const char *const *meta_keys, const char *const *meta_values, int n_meta);

#endif
