/* What the forward-pass tests share: reading a reference run's token ids (a JSON array,
 * e.g. llama2.c's greedy ids for stories260K) and greedy argmax over logits. */
#ifndef FL_TEST_EXPECTED_IDS_H
#define FL_TEST_EXPECTED_IDS_H

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>

/* Up to cap ids from the JSON array in path; their count, or -1 if it cannot be read. */
static inline int read_expected(const char *path, int32_t *ids, int cap) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    char buf[16384]; /* room for 1024 ids of a 6-digit vocabulary and their separators */
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    cJSON *arr = cJSON_Parse(buf), *it;
    int count = 0;
    cJSON_ArrayForEach(it, arr) if (count < cap) ids[count++] = (int32_t)it->valueint;
    cJSON_Delete(arr);
    return count;
}

/* The first index of the largest value, as llama2.c's greedy sampler. */
static inline int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

#endif
