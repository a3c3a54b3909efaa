/* A tiny TAP producer for the C tests: tests/run counts the ok / not ok lines. */
#ifndef FL_TAP_H
#define FL_TAP_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int tap_count, tap_failed;

static void tap_vline(int ok, const char *directive, const char *fmt, va_list ap) {
    printf("%sok %d - ", ok ? "" : "not ", ++tap_count);
    vprintf(fmt, ap);
    if (directive) printf(" # %s", directive);
    printf("\n");
    fflush(stdout);
    if (!ok) tap_failed++;
}

/* Records one assertion; returns cond so a test can stop early. */
static int tap_ok(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3), unused));
static int tap_ok(int cond, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    tap_vline(cond, NULL, fmt, ap);
    va_end(ap);
    return cond;
}

static void tap_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2), unused));
static void tap_skip(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    tap_vline(1, "SKIP", fmt, ap);
    va_end(ap);
}

static void tap_diag(const char *fmt, ...) __attribute__((format(printf, 1, 2), unused));
static void tap_diag(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("# ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

static int tap_done(void) {
    printf("1..%d\n", tap_count);
    return tap_failed ? 1 : 0;
}

/* ../shared (or $FLEXLLM_SHARED) joined with rel, or NULL when absent. */
static const char *tap_shared(const char *rel) __attribute__((unused));
static const char *tap_shared(const char *rel) {
    static char buf[8][4096];
    static int next;
    const char *root = getenv("FLEXLLM_SHARED");
    if (!root || !*root) root = "../shared";
    char *out = buf[next++ % 8];
    snprintf(out, sizeof buf[0], "%s/%s", root, rel);
    struct stat st;
    return stat(out, &st) == 0 ? out : NULL;
}

/* dir/name in one of 8 rotating buffers, so that a few paths can be live at once (and
 * nest: tap_path(tap_path(a, b), c)). */
static const char *tap_path(const char *dir, const char *name) __attribute__((unused));
static const char *tap_path(const char *dir, const char *name) {
    static char buf[8][8400];
    static int next;
    char joined[sizeof buf[0]]; /* dir may be an earlier result, in buf */
    snprintf(joined, sizeof joined, "%s/%s", dir, name);
    char *out = buf[next++ % 8];
    memcpy(out, joined, sizeof joined);
    return out;
}

/* Writes len bytes to path; 0, or -1 after a diagnostic line. */
static int tap_write(const char *path, const void *data, size_t len) __attribute__((unused));
static int tap_write(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(data, 1, len, f) == len;
    if (f && fclose(f) != 0) ok = 0;
    if (!ok) tap_diag("cannot write %s", path);
    return ok ? 0 : -1;
}

static int tap_write_text(const char *path, const char *text) __attribute__((unused));
static int tap_write_text(const char *path, const char *text) {
    return tap_write(path, text, strlen(text));
}

/* A fresh scratch directory under build/tmp for this test. */
static const char *tap_tmpdir(const char *name) __attribute__((unused));
static const char *tap_tmpdir(const char *name) {
    static char dir[4096];
    snprintf(dir, sizeof dir, "build/tmp/%s", name);
    char cmd[8300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", dir, dir);
    if (system(cmd) != 0) return NULL;
    return dir;
}

#endif
