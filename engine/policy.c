/* The policy host: loads a scheduling policy into its own LuaJIT state and calls it once
 * per iteration under a time budget and a memory cap (see policy.h).
 *
 * The Lua half of the host is the prelude below: it checks the FFI declarations against
 * the C sizes, loads the policy, calls its init and returns the functions C keeps by
 * registry reference. After that a call is one lua_pcall: no arguments, no tables. */
#include "policy.h"

#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fl_internal.h"

#define MIB (1024.0 * 1024.0)
/* Instructions between two looks at the clock: ~1 µs of interpreted code. */
#define HOOK_INSNS 1000
/* Loading, init(), export_state() and finalizers at close: one-off calls. */
#define ONE_OFF_BUDGET 1.0
/* Collect when the heap reaches 1.5x the live data (Lua's default is 2x): an allocation
 * past the cap fails without a collection first, so garbage must not pile up near it. */
#define GC_PAUSE 150

struct fl_policy {
    lua_State *L;
    fl_sched_state *state;
    fl_sched_plan *plan;
    fl_policy_params params;
    char *path;
    uint64_t hash;
    int schedule_ref, export_ref, serialise_ref, handler_ref;
    /* memory: the cap applies while policy code runs, never to the host's own pushes */
    size_t used;
    int capped;
    int refused;    /* an allocation was refused during the current call */
    /* time */
    double deadline; /* monotonic seconds */
    double budget;   /* of the current call, for the message */
    int overran;
    /* failures */
    int failures;
    int streak;        /* consecutive failures */
    int streak_before; /* streak before the last successful call */
    int last_ok;       /* the last call succeeded and no invalid plan was reported since */
    int disabled;
    double last_seconds;
    char error[4096];
};

/* The host's Lua half. Arguments: state and plan (lightuserdata), the C sizes of the ABI
 * structs, the policy's source and path, the saved state's and the options' sources (or nil). Returns
 * schedule, export_state (or false) and the serialiser, or nil and a message. */
static const char prelude[] =
    "local state_p, plan_p, sizes, source, path, saved_src, options_src = ...\n"
    "local ffi = require 'ffi'\n"
    /* The time budget is a debug hook: compiled code skips it, and a policy may not drop it. */
    "jit.on = function() error('policies run with the JIT off: their time budget needs the interpreter', 2) end\n"
    "debug.sethook = function() error('the policy host owns the debug hook', 2) end\n"
    "local found, abi = pcall(require, 'flexllm.sched_abi')\n"
    "if not found then\n"
    "  return nil, path .. ': cannot load flexllm.sched_abi (make builds it into build/lua,'\n"
    "    .. ' which LUA_PATH must include): ' .. tostring(abi)\n"
    "end\n"
    "local declared = {}\n"
    "for _, name in ipairs(abi.names) do\n"
    "  declared[name] = true\n"
    "  local ok, lua_size = pcall(ffi.sizeof, name)\n"
    "  if not ok or lua_size ~= sizes[name] then\n"
    "    return nil, string.format('%s: flexllm.sched_abi does not match the engine: sizeof(%s)'\n"
    "      .. ' is %s in Lua and %s in C; rebuild with make', path, name,\n"
    "      tostring(ok and lua_size), tostring(sizes[name]))\n"
    "  end\n"
    "end\n"
    "for name in pairs(sizes) do\n"
    "  if not declared[name] then\n"
    "    return nil, path .. ': flexllm.sched_abi does not declare ' .. name .. '; rebuild with make'\n"
    "  end\n"
    "end\n"
    "local chunk, err = loadstring(source, '@' .. path)\n"
    "if not chunk then return nil, err end\n"
    "local policy = chunk()\n"
    "if type(policy) ~= 'table' then\n"
    "  return nil, path .. ': returns ' .. type(policy) .. ', not a table with a schedule function'\n"
    "end\n"
    "if type(policy.schedule) ~= 'function' then\n"
    "  return nil, path .. ': the table it returns has no schedule function'\n"
    "end\n"
    "for _, k in ipairs({ 'init', 'export_state' }) do\n"
    "  if policy[k] ~= nil and type(policy[k]) ~= 'function' then\n"
    "    return nil, path .. ': ' .. k .. ' is a ' .. type(policy[k]) .. ', not a function'\n"
    "  end\n"
    "end\n"
    "local function data(src, what)\n"
    "  if not src then return nil end\n"
    "  local f, e = loadstring('return ' .. src, '=' .. what)\n"
    "  if not f then error(path .. ': the ' .. what .. ' does not parse: ' .. e, 0) end\n"
    "  return setfenv(f, {})()\n"
    "end\n"
    "local ok_data, saved = pcall(data, saved_src, 'saved state')\n"
    "if not ok_data then return nil, saved end\n"
    "local ok_opts, options = pcall(data, options_src, 'options table')\n"
    "if not ok_opts then return nil, options end\n"
    "if policy.init then\n"
    "  policy.init({ state = ffi.cast('fl_sched_state *', state_p),\n"
    "                plan = ffi.cast('fl_sched_plan *', plan_p), saved = saved,\n"
    "                options = options })\n"
    "end\n"
    /* Plain data to Lua source; `keys` is the path to the value, for the message. */
    "local function dump(v, out, open, keys)\n"
    "  local t = type(v)\n"
    "  if t == 'number' then\n"
    "    out[#out + 1] = v ~= v and '0/0' or v == math.huge and '1/0'\n"
    "      or v == -math.huge and '-1/0' or string.format('%.17g', v)\n"
    "  elseif t == 'string' then\n"
    "    out[#out + 1] = string.format('%q', v)\n"
    "  elseif t == 'boolean' then\n"
    "    out[#out + 1] = tostring(v)\n"
    "  elseif t == 'table' and not open[v] then\n"
    "    open[v] = true\n"
    "    out[#out + 1] = '{'\n"
    "    for k, x in pairs(v) do\n"
    "      keys[#keys + 1] = k\n"
    "      out[#out + 1] = '['\n"
    "      dump(k, out, open, keys)\n"
    "      out[#out + 1] = ']='\n"
    "      dump(x, out, open, keys)\n"
    "      out[#out + 1] = ','\n"
    "      keys[#keys] = nil\n"
    "    end\n"
    "    out[#out + 1] = '}'\n"
    "    open[v] = nil\n"
    "  else\n"
    "    local where = {}\n"
    "    for i, k in ipairs(keys) do where[i] = '[' .. tostring(k) .. ']' end\n"
    "    error(string.format('export_state: the value at state%s is %s; only numbers, strings,'\n"
    "      .. ' booleans and tables without cycles can be saved', table.concat(where),\n"
    "      t == 'table' and 'a table that contains itself' or 'a ' .. t), 0)\n"
    "  end\n"
    "end\n"
    "local function serialise(export_state)\n"
    "  local v = export_state()\n"
    "  if v == nil then return nil end\n"
    "  if type(v) ~= 'table' then error('export_state returned a ' .. type(v) .. ', not a table', 0) end\n"
    "  local out = {}\n"
    "  dump(v, out, {}, {})\n"
    "  return table.concat(out)\n"
    "end\n"
    "return policy.schedule, policy.export_state or false, serialise\n";

/* Every struct of the ABI block: the prelude fails the load unless flexllm.sched_abi
 * declares exactly these, at these sizes. */
static const struct {
    const char *name;
    size_t size;
} abi_sizes[] = {
    {"fl_sched_request", sizeof(fl_sched_request)}, {"fl_sched_job", sizeof(fl_sched_job)},
    {"fl_cost_model", sizeof(fl_cost_model)},       {"fl_sched_state", sizeof(fl_sched_state)},
    {"fl_sched_item", sizeof(fl_sched_item)},       {"fl_sched_ft", sizeof(fl_sched_ft)},
    {"fl_sched_plan", sizeof(fl_sched_plan)},
};

fl_policy_params fl_policy_default_params(void) {
    return (fl_policy_params){.mem_limit = 64u << 20, .time_budget = 0.002, .max_failures = 5};
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t fnv1a(const char *bytes, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)bytes[i]) * 0x100000001b3ull;
    return h;
}

static fl_policy *policy_of(lua_State *L) {
    void *ud;
    lua_getallocf(L, &ud);
    return ud;
}

/* The state's allocator: refuses growth past the cap while policy code runs. */
static void *policy_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    fl_policy *pol = ud;
    if (nsize == 0) {
        free(ptr);
        pol->used -= osize;
        return NULL;
    }
    if (nsize > osize && pol->capped && pol->used - osize + nsize > pol->params.mem_limit) {
        pol->refused = 1;
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (p) pol->used = pol->used - osize + nsize;
    return p;
}

/* The count hook: raises once the call is past its deadline. */
static void policy_hook(lua_State *L, lua_Debug *ar) {
    fl_policy *pol = policy_of(L);
    if (now_seconds() < pol->deadline) return;
    pol->overran = 1;
    /* From now on every instruction raises, so a pcall inside the policy cannot swallow it. */
    lua_sethook(L, policy_hook, LUA_MASKCOUNT, 1);
    luaL_error(L, "policy ran over its time budget of %g ms", pol->budget * 1e3);
}

/* The message handler: the error as a string, with a traceback. */
static int policy_traceback(lua_State *L) {
    /* Lifted so the message can be built when the error was the cap itself. */
    policy_of(L)->capped = 0;
    const char *msg = lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER
                          ? lua_tostring(L, 1)
                          : lua_pushfstring(L, "(error object is a %s)", luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* Arms the deadline and the cap for policy code. */
static void begin_policy_code(fl_policy *pol, double budget) {
    pol->budget = budget;
    pol->deadline = now_seconds() + budget;
    pol->overran = pol->refused = 0;
    pol->capped = 1;
}

static void end_policy_code(fl_policy *pol) {
    pol->capped = 0;
    if (pol->overran) lua_sethook(pol->L, policy_hook, LUA_MASKCOUNT, HOOK_INSNS);
}

/* Moves the error at the top of the stack into pol->error. */
static void keep_error(fl_policy *pol) {
    const char *msg = lua_type(pol->L, -1) == LUA_TSTRING ? lua_tostring(pol->L, -1) : "(no message)";
    if (pol->refused)
        snprintf(pol->error, sizeof pol->error, "policy exceeded its memory limit of %g MiB: %s",
                 (double)pol->params.mem_limit / MIB, msg);
    else
        snprintf(pol->error, sizeof pol->error, "%s", msg);
    lua_pop(pol->L, 1);
}

static int collect_garbage(lua_State *L) {
    lua_gc(L, LUA_GCCOLLECT, 0);
    return 0;
}

/* Calls the function below the nargs arguments on the stack as policy code. 0, or -1 with
 * pol->error set and the stack as before the function was pushed. */
static int policy_pcall(fl_policy *pol, int nargs, int nresults, double budget) {
    lua_State *L = pol->L;
    int base = lua_gettop(L) - nargs;
    lua_rawgeti(L, LUA_REGISTRYINDEX, pol->handler_ref);
    lua_insert(L, base);
    begin_policy_code(pol, budget);
    int status = lua_pcall(L, nargs, nresults, base);
    end_policy_code(pol);
    lua_remove(L, base);
    if (status == 0) return 0;
    keep_error(pol);
    if (pol->refused) {
        /* Garbage left by the failed call would refuse the next one's allocations. Protected:
         * finalizers run and may raise. */
        pol->deadline = now_seconds() + budget;
        if (lua_cpcall(L, collect_garbage, NULL) != 0) lua_pop(L, 1);
        end_policy_code(pol);
    }
    return -1;
}

typedef struct {
    fl_policy *pol;
    const char *source;
    size_t len;
    const char *saved;
    int raised; /* the error came from policy code, not from a check of the prelude */
} load_args;

static void push_abi_sizes(lua_State *L) {
    int n = (int)(sizeof abi_sizes / sizeof abi_sizes[0]);
    lua_createtable(L, 0, n);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, (lua_Integer)abi_sizes[i].size);
        lua_setfield(L, -2, abi_sizes[i].name);
    }
}

/* Opens the state and runs the prelude (under lua_cpcall: every push is protected). */
static int load_protected(lua_State *L) {
    load_args *a = lua_touserdata(L, 1);
    fl_policy *pol = a->pol;
    luaL_openlibs(L);
    /* Compiled code skips debug hooks, and the hook is what enforces the time budget. */
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    lua_gc(L, LUA_GCSETPAUSE, GC_PAUSE);
    lua_pushcfunction(L, policy_traceback);
    lua_pushvalue(L, -1);
    pol->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    int handler = lua_gettop(L);
    if (luaL_loadbuffer(L, prelude, sizeof prelude - 1, "=flexllm policy host") != 0)
        return lua_error(L);
    lua_pushlightuserdata(L, pol->state);
    lua_pushlightuserdata(L, pol->plan);
    push_abi_sizes(L);
    lua_pushlstring(L, a->source, a->len);
    lua_pushstring(L, pol->path);
    if (a->saved)
        lua_pushstring(L, a->saved);
    else
        lua_pushnil(L);
    if (pol->params.options)
        lua_pushstring(L, pol->params.options);
    else
        lua_pushnil(L);
    if (lua_pcall(L, 7, 3, handler) != 0) {
        a->raised = 1;
        return lua_error(L);
    }
    if (lua_isnil(L, -3)) {
        lua_pushvalue(L, -2);
        return lua_error(L);
    }
    pol->serialise_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (lua_toboolean(L, -1))
        pol->export_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
        lua_pop(L, 1);
    pol->schedule_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Sets fl_error from a failed load's message: located errors already name their file. */
static void load_error(const fl_policy *pol, int raised) {
    size_t n = strlen(pol->path);
    if (raised && !(strncmp(pol->error, pol->path, n) == 0 && pol->error[n] == ':'))
        fl_error("%s: %s", pol->path, pol->error);
    else
        fl_error("%s", pol->error);
}

static int check_params(const char *path, const fl_policy_params *p) {
    if (p->mem_limit == 0 || !(p->time_budget > 0) || p->max_failures < 1)
        return fl_error("%s: policy params need mem_limit > 0, time_budget > 0 and max_failures >= 1",
                        path);
    return 0;
}

fl_policy *fl_policy_load(const char *path, fl_sched_state *state, fl_sched_plan *plan,
                          const fl_policy_params *params, const char *saved) {
    fl_policy_params p = params ? *params : fl_policy_default_params();
    if (check_params(path, &p) != 0) return NULL;
    size_t len;
    char *source = fl_read_file(path, &len);
    if (!source) return NULL;
    fl_policy *pol = malloc(sizeof *pol);
    char *path_copy = strdup(path);
    if (!pol || !path_copy) {
        fl_error("%s: out of memory loading the policy", path);
        free(pol);
        free(path_copy);
        free(source);
        return NULL;
    }
    *pol = (fl_policy){.state = state, .plan = plan, .params = p, .path = path_copy,
                       .hash = fnv1a(source, len), .schedule_ref = LUA_NOREF,
                       .export_ref = LUA_NOREF, .serialise_ref = LUA_NOREF,
                       .handler_ref = LUA_NOREF};
    pol->L = lua_newstate(policy_alloc, pol);
    if (!pol->L) {
        fl_error("%s: cannot create a Lua state for the policy", path);
        fl_policy_free(pol);
        free(source);
        return NULL;
    }
    lua_sethook(pol->L, policy_hook, LUA_MASKCOUNT, HOOK_INSNS);
    load_args a = {.pol = pol, .source = source, .len = len, .saved = saved};
    begin_policy_code(pol, ONE_OFF_BUDGET);
    int status = lua_cpcall(pol->L, load_protected, &a);
    end_policy_code(pol);
    free(source);
    if (status != 0) {
        keep_error(pol);
        load_error(pol, a.raised);
        fl_policy_free(pol);
        return NULL;
    }
    return pol;
}

void fl_policy_free(fl_policy *pol) {
    if (!pol) return;
    if (pol->L) {
        /* Closing runs the policy's finalizers: bounded like any one-off call. */
        pol->budget = ONE_OFF_BUDGET;
        pol->deadline = now_seconds() + ONE_OFF_BUDGET;
        lua_close(pol->L);
    }
    free(pol->path);
    free(pol);
}

/* Counts a failure whose message is in pol->error; disables the policy at max_failures. */
static void count_failure(fl_policy *pol) {
    pol->failures++;
    pol->last_ok = 0;
    if (++pol->streak < pol->params.max_failures || pol->disabled) return;
    pol->disabled = 1;
    char last[sizeof pol->error];
    memcpy(last, pol->error, sizeof last);
    /* The precision leaves room for the prefix: the tail of a long traceback is cut. */
    snprintf(pol->error, sizeof pol->error, "policy disabled after %d consecutive failures; the last: %.*s",
             pol->streak, (int)sizeof last - 128, last);
}

int fl_policy_schedule(fl_policy *pol) {
    pol->plan->n_items = 0;
    pol->plan->n_ft = 0;
    if (pol->disabled) {
        pol->last_seconds = 0;
        return -1;
    }
    double t0 = now_seconds();
    lua_rawgeti(pol->L, LUA_REGISTRYINDEX, pol->schedule_ref);
    int rc = policy_pcall(pol, 0, 0, pol->params.time_budget);
    pol->last_seconds = now_seconds() - t0;
    if (rc != 0) {
        count_failure(pol);
        return -1;
    }
    pol->streak_before = pol->streak;
    pol->streak = 0;
    pol->last_ok = 1;
    return 0;
}

void fl_policy_report_invalid(fl_policy *pol, const char *why) {
    /* The call it judges counted as a success: take back the reset of the streak. */
    if (pol->last_ok) pol->streak = pol->streak_before;
    snprintf(pol->error, sizeof pol->error, "invalid plan: %s", why);
    count_failure(pol);
}

char *fl_policy_export(fl_policy *pol) {
    if (pol->export_ref == LUA_NOREF) {
        fl_error("%s: the policy has no export_state", pol->path);
        return NULL;
    }
    lua_State *L = pol->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, pol->serialise_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, pol->export_ref);
    if (policy_pcall(pol, 1, 1, ONE_OFF_BUDGET) != 0) {
        fl_error("%s: %s", pol->path, pol->error);
        return NULL;
    }
    size_t n;
    const char *src = lua_tolstring(L, -1, &n);
    char *out = src ? fl_malloc(n + 1) : NULL;
    if (out) memcpy(out, src, n + 1);
    if (!src) fl_error("%s: export_state returned nil", pol->path);
    lua_pop(L, 1);
    return out;
}

const char *fl_policy_last_error(const fl_policy *pol) { return pol->error; }
int fl_policy_failures(const fl_policy *pol) { return pol->failures; }
int fl_policy_disabled(const fl_policy *pol) { return pol->disabled; }
double fl_policy_last_seconds(const fl_policy *pol) { return pol->last_seconds; }
uint64_t fl_policy_hash(const fl_policy *pol) { return pol->hash; }

uint64_t fl_policy_hash_file(const char *path) {
    size_t len;
    char *text = fl_read_file(path, &len);
    uint64_t h = text ? fnv1a(text, len) : 0;
    free(text);
    return h;
}
