/* libFuzzer target: the JSON request path of the server (routes, validation, generation)
 * in an embedded LuaJIT. tests/fuzz/request_target.lua builds a server on a tiny model
 * and returns the function that answers one input; a Lua error from it (a 500, an
 * answer that never completes) is a finding, reported and aborted on. Runs from the
 * repository root, which the target's package paths assume.
 *
 * The Lua code is not compiled with coverage instrumentation, so a line hook feeds
 * libFuzzer extra counters, one per (source, line) hashed into a table: the fuzzer is
 * guided by the Lua lines an input reaches. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define COV_SLOTS 65536
__attribute__((section("__libfuzzer_extra_counters"))) static uint8_t lua_lines[COV_SLOTS];

static lua_State *L;

static void on_line(lua_State *l, lua_Debug *ar) {
    if (!lua_getinfo(l, "S", ar)) return;
    uint32_t h = 2166136261u; /* FNV-1a over the chunk's name pointer and the line */
    uintptr_t src = (uintptr_t)ar->source;
    for (int i = 0; i < 8; i++) h = (h ^ (uint8_t)(src >> (8 * i))) * 16777619u;
    h = (h ^ (uint32_t)ar->currentline) * 16777619u;
    uint8_t *c = &lua_lines[h % COV_SLOTS];
    if (*c < 255) (*c)++;
}
static int target_ref;

static void init(void) {
    L = luaL_newstate();
    luaL_openlibs(L);
    if (luaL_dofile(L, "tests/fuzz/request_target.lua") != 0) {
        fprintf(stderr, "fuzz_request: %s\n", lua_tostring(L, -1));
        abort();
    }
    target_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_sethook(L, on_line, LUA_MASKLINE, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!L) init();
    lua_rawgeti(L, LUA_REGISTRYINDEX, target_ref);
    lua_pushlstring(L, (const char *)data, size);
    if (lua_pcall(L, 1, 0, 0) != 0) {
        fprintf(stderr, "fuzz_request: %s\n", lua_tostring(L, -1));
        abort();
    }
    return 0;
}
