/* Shared by the CUDA tests: deterministic random inputs, device buffers that end the test
 * with a "not ok" line when CUDA fails, and the error metric. */
#ifndef FL_CUDA_TEST_H
#define FL_CUDA_TEST_H

#include "cuda/cuda_ops.h"
#include "kernels.h"
#include "tap.h"

#include <math.h>
#include <stdint.h>

/* Each test uses some of these. Inline: one that is not called is not emitted, so a test
 * without the CUDA library (mock_backend.c) can use the host ones. */
#define CT_FN static inline

/* Skips the whole program (exit 0) when there is no device to test on. */
CT_FN void ct_require_device(const char *what) {
    if (fl_cuda_device_count() > 0) return;
    tap_skip("%s: no CUDA device on this machine", what);
    exit(tap_done());
}

/* Stops the program at a failed CUDA call, naming it and fl_last_error(). */
CT_FN void ct_check(int rc, const char *what) {
    if (rc == 0) return;
    tap_ok(0, "%s: %s", what, fl_last_error());
    exit(tap_done());
}

static uint64_t ct_rng = 0x9e3779b97f4a7c15ULL;

CT_FN void ct_seed(uint64_t seed) { ct_rng = seed ? seed : 1; }

/* Uniform in [lo, hi) (xorshift64*). */
CT_FN float ct_uniform(float lo, float hi) {
    ct_rng ^= ct_rng >> 12;
    ct_rng ^= ct_rng << 25;
    ct_rng ^= ct_rng >> 27;
    uint32_t r = (uint32_t)((ct_rng * 0x2545F4914F6CDD1DULL) >> 40);
    return lo + (hi - lo) * ((float)r / 16777216.0f);
}

CT_FN int ct_below(int n) { /* uniform integer in [0, n) */
    int v = (int)ct_uniform(0.0f, (float)n);
    return v < n ? v : n - 1;
}

CT_FN float *ct_random(size_t n, float lo, float hi) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = ct_uniform(lo, hi);
    return p;
}

/* A device copy of host memory. */
CT_FN void *ct_upload(const void *host, size_t bytes) {
    void *d = fl_cuda_alloc(bytes, "test buffer");
    if (!d) ct_check(-1, "cudaMalloc");
    ct_check(fl_cuda_upload(d, host, bytes, NULL), "upload");
    ct_check(fl_cuda_sync(NULL), "upload"); /* in place before work on any stream uses it */
    return d;
}

CT_FN void *ct_alloc(size_t bytes) {
    void *d = fl_cuda_alloc(bytes, "test buffer");
    if (!d) ct_check(-1, "cudaMalloc");
    return d;
}

/* A host copy of device memory, in the stream's order (synchronises, so kernel faults
 * show here). */
CT_FN void *ct_download_on(const void *dev, size_t bytes, void *stream) {
    void *h = malloc(bytes ? bytes : 1);
    ct_check(fl_cuda_download(h, dev, bytes, stream), "download");
    return h;
}

CT_FN void *ct_download(const void *dev, size_t bytes) { return ct_download_on(dev, bytes, NULL); }

/* max |got - ref| / (1 + |ref|); infinite when either is NaN where the other is not. */
CT_FN double ct_diff(const float *got, const float *ref, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(got[i]) != isnan(ref[i])) return INFINITY;
        if (isnan(ref[i])) continue;
        double d = fabs((double)got[i] - ref[i]) / (1.0 + fabs(ref[i]));
        if (d > worst) worst = d;
    }
    return worst;
}

#endif
