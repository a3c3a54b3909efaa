# flexllm: `make` builds the engine library and the Lua module; `make test`, `make demo`,
# `make bench` install what they need first (scripts/install-deps.sh).

CC         ?= cc
MULTIARCH  := $(shell $(CC) -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
BLAS_DIR   ?= /usr/lib/$(MULTIARCH)/openblas-openmp
BLAS_INC   ?= /usr/include/$(MULTIARCH)/openblas-openmp
LUA_INCDIR ?= /usr/include/luajit-2.1
LUAJIT     ?= luajit
NVCC       ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA       ?= $(if $(NVCC),1,0)
CUDA_HOME  ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_ARCH  ?= -gencode arch=compute_90,code=[sm_90,compute_90]
OPT        ?= -O3 -march=native

WARN    := -Wall -Wextra -Wno-unused-parameter -Wshadow -Wstrict-prototypes
CPPFLAGS_FL := -D_GNU_SOURCE -Iengine/include -Iengine -Ikernels -I$(BLAS_INC) -I$(LUA_INCDIR)
# fp-contract=fast: ISO C mode would otherwise forbid fusing a*b+c into an FMA.
CFLAGS_FL   := -std=c11 $(WARN) -fPIC -fopenmp -ffp-contract=fast -g $(CPPFLAGS_FL)
LIBS    := -L$(BLAS_DIR) -Wl,-rpath,$(BLAS_DIR) -lopenblas -lcjson -lpcre2-8 -lutf8proc -lluajit-5.1 -lm -fopenmp
SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer

ENGINE_SRC := $(filter-out engine/lua_%.c,$(wildcard engine/*.c)) $(wildcard kernels/cpu/*.c)
LUA_SRC    := $(wildcard engine/lua_*.c)
TEST_SRC   := $(wildcard tests/c/test_*.c)
CU_SRC     := $(wildcard kernels/cuda/*.cu)
CUTEST_SRC := $(wildcard tests/cuda/test_*.c)

OBJ      := $(ENGINE_SRC:%.c=build/obj/%.o)
ASAN_OBJ := $(ENGINE_SRC:%.c=build/asan/obj/%.o)
LUA_OBJ  := $(LUA_SRC:%.c=build/obj/%.o)
TESTS    := $(TEST_SRC:tests/c/%.c=build/tests/%)
ASAN_TESTS := $(TEST_SRC:tests/c/%.c=build/asan/tests/%)
CU_OBJ   := $(CU_SRC:%.cu=build/cuda/%.o)
CUTESTS  := $(CUTEST_SRC:tests/cuda/%.c=build/tests/cuda_%)
MOCK_TESTS := build/tests/test_cuda_mock build/asan/tests/test_cuda_mock

LIB    := build/libflexllm.a
MODULE := build/lib/flexllm/core.so
HTTP_MODULE := build/lib/flexllm/http.so
HTTP_SRC    := $(wildcard engine/http/*.c)
HTTP_OBJ    := $(HTTP_SRC:%.c=build/obj/%.o)
HTTP_CFLAGS := -std=c11 $(WARN) -fPIC -g -D_GNU_SOURCE -I$(LUA_INCDIR)
SCHED_ABI := build/lua/flexllm/sched_abi.lua
CULIB  := build/libflexllm_cuda.a

CUBENCH := build/bench/bench_cuda

ifeq ($(CUDA),1)
CUDA_TARGETS := $(CULIB) $(CUTESTS) $(CUBENCH)
# The engine reaches the CUDA library only through fl_cuda_backend, a weak reference in
# engine/model.c that pulls nothing out of an archive: programs that want the CUDA backend
# link the library whole, before libflexllm.a (whose symbols it uses).
CUDA_WHOLE := -Wl,--whole-archive $(CULIB) -Wl,--no-whole-archive
CUDA_LIBS  := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++
MODULE_CUDA := $(CULIB)
endif

.PHONY: all lib module tests cuda deps test demo bench install clean
all: $(LIB) $(MODULE) $(HTTP_MODULE) $(SCHED_ABI) $(CUDA_TARGETS)
lib: $(LIB)
module: $(MODULE) $(HTTP_MODULE) $(SCHED_ABI)

# The FFI declarations of the scheduling ABI, generated from its C header.
$(SCHED_ABI): engine/include/fl_sched.h scripts/gen-sched-abi.lua
	@mkdir -p $(dir $@)
	$(LUAJIT) scripts/gen-sched-abi.lua $< $@
tests: $(TESTS) $(ASAN_TESTS) $(MOCK_TESTS) $(CUDA_TARGETS)
cuda: $(CULIB) $(CUTESTS) $(CUBENCH)

build/obj/%.o: %.c $(wildcard engine/*.h engine/include/*.h kernels/*.h kernels/cpu/*.h kernels/cuda/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FL) $(OPT) -c $< -o $@

build/asan/obj/%.o: %.c $(wildcard engine/*.h engine/include/*.h kernels/*.h kernels/cpu/*.h kernels/cuda/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FL) -O1 $(SAN) -c $< -o $@

$(LIB): $(OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

build/asan/libflexllm.a: $(ASAN_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# The Lua module resolves lua_* from the host interpreter, so it links no Lua library:
# Debian's luajit has the VM built in, and a second copy in the same process (libluajit,
# pulled in by the policy host) must never be loaded next to it.
# nodelete: Lua unloads C modules at exit while OpenMP worker threads still run its code.
# With CUDA=1 it carries the CUDA backend (libcudart and libcublas load without a driver or
# device; the engine then picks the CPU).
$(MODULE): $(LUA_OBJ) $(LIB) $(MODULE_CUDA)
	@mkdir -p $(dir $@)
	$(CC) -shared -Wl,-z,nodelete -o $@ $(LUA_OBJ) $(CUDA_WHOLE) $(LIB) $(CUDA_LIBS) \
	  $(filter-out -lluajit-5.1,$(LIBS))

# The HTTP transport (flexllm.http): libev and http-parser, nothing of the engine.
build/obj/engine/http/%.o: engine/http/%.c $(wildcard engine/http/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(HTTP_CFLAGS) $(OPT) -c $< -o $@

# Like core.so, it links no Lua library.
$(HTTP_MODULE): $(HTTP_OBJ)
	@mkdir -p $(dir $@)
	$(CC) -shared -o $@ $^ -lev -lhttp_parser

build/tests/%: tests/c/%.c tests/c/tap.h tests/c/expected_ids.h $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FL) $(OPT) -Itests/c $< -o $@ $(LIB) $(LIBS)

build/asan/tests/%: tests/c/%.c tests/c/tap.h tests/c/expected_ids.h build/asan/libflexllm.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FL) -O1 $(SAN) -Itests/c $< -o $@ build/asan/libflexllm.a $(LIBS)

build/cuda/%.o: %.cu $(wildcard kernels/*.h kernels/cuda/*.h engine/*.h engine/include/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC -Iengine/include -Iengine -Ikernels -c $< -o $@

$(CULIB): $(CU_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

build/tests/cuda_%: tests/cuda/%.c tests/c/tap.h tests/c/expected_ids.h $(wildcard tests/cuda/*.h) $(CULIB) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FL) $(OPT) -Itests/c -I$(CUDA_HOME)/include $< -o $@ $(CUDA_WHOLE) $(LIB) \
	  $(CUDA_LIBS) $(LIBS)

# The engine's cuda path on a CPU stand-in for the backend (MOCK_TESTS): it needs no device,
# so it is built in every configuration, with and without ASan.
MOCK_DEPS := tests/cuda/mock_backend.c tests/c/tap.h $(wildcard tests/cuda/*.h kernels/cuda/*.h)
build/tests/test_cuda_mock: $(MOCK_DEPS) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FL) $(OPT) -Itests/c $< -o $@ $(LIB) $(LIBS)

build/asan/tests/test_cuda_mock: $(MOCK_DEPS) build/asan/libflexllm.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FL) -O1 $(SAN) -Itests/c $< -o $@ build/asan/libflexllm.a $(LIBS)

# GPU benchmarks (tests/bench/run_cuda runs it; it says why and exits 0 without a device).
$(CUBENCH): tests/bench/bench_cuda.c $(CULIB) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FL) $(OPT) -I$(CUDA_HOME)/include $< -o $@ $(CUDA_WHOLE) $(LIB) $(CUDA_LIBS) $(LIBS)

deps:
	@scripts/install-deps.sh

test: deps
	@$(MAKE) --no-print-directory all tests
	@tests/run

demo: deps
	@$(MAKE) --no-print-directory all
	@bin/flexllm demo

bench: deps
	@$(MAKE) --no-print-directory all
	@tests/bench/run

# LuaRocks (build type make) passes these; see flexllm-scm-1.rockspec.
INST_LUADIR ?= /usr/local/share/lua/5.1
INST_LIBDIR ?= /usr/local/lib/lua/5.1
INST_BINDIR ?= /usr/local/bin
install: $(MODULE) $(HTTP_MODULE) $(SCHED_ABI)
	mkdir -p $(INST_LUADIR)/flexllm/server $(INST_LUADIR)/flexllm/policies $(INST_LIBDIR)/flexllm $(INST_BINDIR)
	cp lua/flexllm/*.lua $(SCHED_ABI) $(INST_LUADIR)/flexllm/
	cp lua/flexllm/server/*.lua $(INST_LUADIR)/flexllm/server/
	cp policies/*.lua $(INST_LUADIR)/flexllm/policies/
	cp $(MODULE) $(INST_LIBDIR)/flexllm/core.so
	cp $(HTTP_MODULE) $(INST_LIBDIR)/flexllm/http.so
	cp bin/flexllm $(INST_BINDIR)/flexllm

clean:
	rm -rf build
include tests/fuzz/fuzz.mk
