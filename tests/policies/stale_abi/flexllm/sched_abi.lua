-- A stand-in for an out-of-date build/lua/flexllm/sched_abi.lua: fl_sched_state has the
-- wrong size. test_policy puts this directory first on LUA_PATH.
local ffi = require "ffi"
ffi.cdef [[ typedef struct { int32_t stale; } fl_sched_state; ]]
return { names = { "fl_sched_state" } }
