/* fl_model_load on broken model folders: each failure names the file and what is
 * wrong, and nothing crashes (this test also runs under ASan+UBSan). */
#include "flexllm.h"
#include "safetensors.h"
#include "tap.h"

#include <unistd.h>

static char base[4096];

/* A fresh copy of the good model in base/NAME. */
static const char *fresh(const char *name) {
    static char dir[4200];
    snprintf(dir, sizeof dir, "%s/%s", base, name);
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s/good' '%s'", dir, base, dir);
    return system(cmd) == 0 ? dir : NULL;
}

static void load_fails(const char *dir, const char *want1, const char *want2, const char *label) {
    fl_model *m = fl_model_load(dir, NULL);
    const char *e = fl_last_error();
    tap_ok(!m && strstr(e, want1) && (!want2 || strstr(e, want2)), "%s: \"%s\"", label, e);
    fl_model_free(m);
}

/* Rewrites dir/model.safetensors without the tensor named `drop`. */
static int drop_tensor(const char *dir, const char *drop) {
    const char *file = tap_path(dir, "model.safetensors");
    fl_st_set *st = fl_st_open(file);
    if (!st) return -1;
    int n = fl_st_count(st), k = 0;
    fl_st_tensor *keep = malloc(sizeof *keep * n);
    for (int i = 0; i < n; i++)
        if (strcmp(fl_st_at(st, i)->name, drop) != 0) keep[k++] = *fl_st_at(st, i);
    char tmp[4300];
    snprintf(tmp, sizeof tmp, "%s.new", file);
    int rc = fl_st_write(tmp, keep, k, NULL, NULL, 0);
    free(keep);
    fl_st_close(st);
    return rc == 0 ? rename(tmp, file) : -1;
}

int main(void) {
    const char *tmp = tap_tmpdir("test_model_load");
    snprintf(base, sizeof base, "%s", tmp);
    fl_init_model_params ip = fl_init_model_default_params();
    ip.dim = 32, ip.hidden_dim = 64, ip.n_layers = 2, ip.n_heads = 4, ip.n_kv_heads = 2;
    if (!tap_ok(fl_init_model(tap_path(base, "good"), &ip) == 0, "init-model writes a model")) {
        return tap_done();
    }
    fl_model *m = fl_model_load(tap_path(base, "good"), NULL);
    tap_ok(m != NULL, "the untouched model loads");
    fl_model_free(m);

    const char *d = fresh("no_config");
    remove(tap_path(d, "config.json"));
    load_fails(d, tap_path(d, "config.json"), "cannot open", "missing config.json");

    d = fresh("bad_config");
    tap_write_text(tap_path(d, "config.json"), "{\"model_type\": \"llama\", \"hidden_size\": ");
    load_fails(d, tap_path(d, "config.json"), "invalid JSON", "malformed config.json");

    d = fresh("gpt2");
    tap_write_text(tap_path(d, "config.json"), "{\"architectures\": [\"GPT2LMHeadModel\"]}");
    load_fails(d, tap_path(d, "config.json"), "unsupported architecture 'GPT2LMHeadModel'",
               "unknown architecture");

    d = fresh("no_tokenizer");
    remove(tap_path(d, "tokenizer.json"));
    load_fails(d, tap_path(d, "tokenizer.json"), NULL, "missing tokenizer.json");

    d = fresh("bad_tokenizer");
    tap_write_text(tap_path(d, "tokenizer.json"), "{\"model\": {\"type\": \"BPE\", \"vocab\": [1, 2]}}");
    load_fails(d, tap_path(d, "tokenizer.json"), "vocab", "broken tokenizer.json");

    d = fresh("missing_tensor");
    tap_ok(drop_tensor(d, "model.layers.1.mlp.up_proj.weight") == 0, "rewrote a model without one tensor");
    load_fails(d, "tensor 'model.layers.1.mlp.up_proj.weight' missing", "model.safetensors",
               "missing tensor");

    d = fresh("wrong_shape");
    char cfg[8192];
    FILE *f = fopen(tap_path(d, "config.json"), "rb");
    size_t n = fread(cfg, 1, sizeof cfg - 1, f);
    fclose(f);
    cfg[n] = 0;
    char *at = strstr(cfg, "\"intermediate_size\"");
    if (at) at += strcspn(at, "0123456789");
    if (tap_ok(at && strncmp(at, "64", 2) == 0, "config.json states intermediate_size 64")) {
        memcpy(at, "96", 2);
        tap_write_text(tap_path(d, "config.json"), cfg);
        load_fails(d, "'model.layers.0.mlp.gate_proj.weight' has shape [64, 32], expected [96, 32]",
                   "model.safetensors", "a shape that disagrees with config.json");
    }

    d = fresh("truncated");
    if (truncate(tap_path(d, "model.safetensors"), 4000) == 0)
        load_fails(d, tap_path(d, "model.safetensors"), NULL, "truncated safetensors");
    return tap_done();
}
