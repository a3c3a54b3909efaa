-- Writes the Lua module that declares the scheduling ABI to LuaJIT's FFI, from the C
-- header: the block between FL_SCHED_ABI_BEGIN and FL_SCHED_ABI_END, unchanged.
-- usage: luajit scripts/gen-sched-abi.lua engine/include/fl_sched.h OUT.lua
local header, out = arg[1], arg[2]
local text = assert(io.open(header, "rb")):read("*a")
local abi = text:match("/%* FL_SCHED_ABI_BEGIN %*/\n(.-)/%* FL_SCHED_ABI_END %*/")
assert(abi, header .. ": no FL_SCHED_ABI_BEGIN / FL_SCHED_ABI_END block")
-- The structs the policy host checks the sizes of: every typedef name of the block.
local names = {}
for name in abi:gmatch("}%s*([%a_][%w_]*)%s*;") do names[#names + 1] = ("%q"):format(name) end
assert(#names > 0, header .. ": no typedef in the ABI block")
local f = assert(io.open(out .. ".tmp", "wb"))
f:write("-- Generated from ", header:match("[^/]+$"), " by scripts/gen-sched-abi.lua: do not edit.\n",
        "local ffi = require \"ffi\"\n",
        "if not pcall(ffi.typeof, \"fl_sched_state\") then\n",
        "  ffi.cdef[[\n", abi, "]]\nend\n",
        "return { names = { ", table.concat(names, ", "), " } }\n")
f:close()
assert(os.rename(out .. ".tmp", out))
