/* The policy host: one LuaJIT state per scheduling policy, called once per iteration.
 *
 * A policy file returns a table with schedule() (called with no arguments each iteration),
 * optional init(ctx) (called once at load; ctx = { state = fl_sched_state* cdata,
 * plan = fl_sched_plan* cdata, saved = the table the previous version exported, or nil })
 * and optional export_state() (returns plain data: numbers, strings, booleans, tables).
 * The pointers reach Lua once, at load; a call marshals nothing.
 *
 * Sandbox: the JIT is off in policy states so an instruction-count hook can enforce the
 * time budget; an allocator cap enforces the memory limit. Loading the file, init() and
 * export_state() run under a fixed one-second budget; a call of schedule() under
 * params.time_budget. Code inside C functions (string.rep, a long FFI call) is not
 * interrupted. Policies are trusted code with FFI access: the sandbox catches mistakes
 * (loops, leaks, errors), not malice. */
#ifndef FL_POLICY_H
#define FL_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include "fl_sched.h"

typedef struct fl_policy fl_policy;

typedef struct {
    size_t mem_limit;   /* bytes the policy's Lua state may hold (default 64 MiB) */
    double time_budget; /* seconds one schedule() call may take (default 0.002) */
    int max_failures;   /* consecutive failures before the policy is disabled (default 5) */
    const char *options; /* Lua source of a table of plain data, given as ctx.options (or NULL) */
} fl_policy_params;

fl_policy_params fl_policy_default_params(void);

/* Loads a policy file into a fresh Lua state bound to state and plan (pointers that stay
 * valid for the policy's life). saved: the export of the policy it replaces, or NULL.
 * NULL + fl_error (file:line of a syntax error, or what is missing) when it does not load.
 * The module flexllm.sched_abi must be on LUA_PATH. */
fl_policy *fl_policy_load(const char *path, fl_sched_state *state, fl_sched_plan *plan,
                          const fl_policy_params *params, const char *saved);
void fl_policy_free(fl_policy *pol);

/* One schedule() call: the plan is reset (n_items = n_ft = 0) then filled by the policy.
 * 0: the policy returned normally (the runtime still validates the plan);
 * -1: it raised, ran over its time budget, hit its memory limit, or is disabled; the
 * runtime uses its fallback plan. Failures are counted; max_failures in a row disable it. */
int fl_policy_schedule(fl_policy *pol);
/* The runtime found the plan of the last call invalid: a failure with this reason. */
void fl_policy_report_invalid(fl_policy *pol, const char *why);

const char *fl_policy_last_error(const fl_policy *pol); /* message and traceback, "" if none */
int fl_policy_failures(const fl_policy *pol);           /* in total */
int fl_policy_disabled(const fl_policy *pol);
double fl_policy_last_seconds(const fl_policy *pol);    /* duration of the last call */

/* The policy's export_state() serialised as the Lua source of a table, malloc'd; NULL +
 * fl_error when it has none, returned nil, or failed. */
char *fl_policy_export(fl_policy *pol);

uint64_t fl_policy_hash(const fl_policy *pol); /* FNV-1a of the file's bytes */
/* The same hash of a file as it is now (0 when it cannot be read). */
uint64_t fl_policy_hash_file(const char *path);

#endif
