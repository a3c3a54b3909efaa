# `make fuzz`: libFuzzer over the HTTP parser path (ASan+UBSan) and the server's JSON
# request path (an embedded LuaJIT, guided by the Lua lines each input reaches), each
# for FUZZ_SECONDS, starting from the corpus in tests/fuzz/corpus. Not part of `make test`.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZERS := build/fuzz/fuzz_http build/fuzz/fuzz_request

build/fuzz/fuzz_http: tests/fuzz/fuzz_http.c engine/http/http_conn.c engine/http/http_conn.h
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Iengine/http \
	  $< engine/http/http_conn.c -lhttp_parser -o $@

# -rdynamic: flexllm/core.so takes the lua_* symbols from this executable.
build/fuzz/fuzz_request: tests/fuzz/fuzz_request.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -g -O1 -fsanitize=fuzzer -I$(LUA_INCDIR) $< -rdynamic -lluajit-5.1 -o $@

.PHONY: fuzz
fuzz: deps
	@scripts/install-deps.sh clang libclang-rt-14-dev
	@$(MAKE) --no-print-directory all $(FUZZERS)
	@FUZZ_SECONDS=$(FUZZ_SECONDS) tests/fuzz/run
