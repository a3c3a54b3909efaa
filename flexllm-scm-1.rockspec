rockspec_format = "3.0"
package = "flexllm"
version = "scm-1"
source = {
   url = "git+file:///dev/null",  -- installed from a checkout with `luarocks make`
}
description = {
   summary = "Co-serving LLM inference and LoRA finetuning on one model, scheduled by Lua policies",
   detailed = [[
A C engine (CPU with OpenBLAS; CUDA when available) that runs inference and LoRA
finetuning tokens in the same batches, driven from LuaJIT. Install from a checkout:
  luarocks make --tree T --deps-mode=none LUA_INCDIR=/usr/include/luajit-2.1 flexllm-scm-1.rockspec
]],
   license = "MIT",
}
dependencies = {
   "lua >= 5.1",
}
build = {
   type = "make",
   build_target = "module",
   build_variables = {
      LUA_INCDIR = "$(LUA_INCDIR)",
   },
   install_target = "install",
   install_variables = {
      INST_LUADIR = "$(LUADIR)",
      INST_LIBDIR = "$(LIBDIR)",
      INST_BINDIR = "$(BINDIR)",
   },
}
