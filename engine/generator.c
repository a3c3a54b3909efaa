/* Batched generation without finetuning or a policy: a runtime that runs the built-in
 * first-come-first-served plan with the generator's prefill chunk. */
#include "fl_internal.h"

#include <stdlib.h>

struct fl_generator {
    fl_runtime *rt;
};

fl_generator_params fl_generator_default_params(void) {
    fl_generator_params p = {.prefill_chunk = 256};
    return p;
}

fl_generator *fl_generator_new(fl_context *ctx, const fl_generator_params *params) {
    fl_generator_params p = params ? *params : fl_generator_default_params();
    fl_runtime_params rp = fl_runtime_default_params();
    rp.prefill_chunk = p.prefill_chunk;
    fl_generator *g = fl_calloc(1, sizeof *g);
    if (!g) return NULL;
    if (!(g->rt = fl_runtime_new(ctx, &rp))) {
        free(g);
        return NULL;
    }
    return g;
}

void fl_generator_free(fl_generator *g) {
    if (!g) return;
    fl_runtime_free(g->rt);
    free(g);
}

int fl_generator_add(fl_generator *g, const int32_t *prompt, int n_prompt,
                     const fl_request_params *params) {
    return fl_runtime_submit(g->rt, prompt, n_prompt, params);
}

int fl_generator_step(fl_generator *g, const fl_gen_event **events) {
    return fl_runtime_step(g->rt, events);
}

int fl_generator_active(const fl_generator *g) { return fl_runtime_active(g->rt); }
