# pointgate: API metering and billing gateway.
#
#   make            release build: bin/gateway, bin/billing, bin/devsim
#   make test       installs what is missing, builds with ASan+UBSan, runs every test
#   make run        the whole stack on this machine, with a demo account
#   make bench      the benchmark (wrk: upstream direct, nginx proxy_pass, gateway)
#   make bench-reports  the usage report over 10 million charges vs. a scan
#   make bench-ledger   the charges table before and after partitioning
#   make fuzz       libFuzzer harnesses (tests/fuzz), FUZZ_SECS (60) seconds each
#   make format     clang-format every C file;  make lint: cppcheck
#
# MODE=release|asan selects the build directory (build/MODE); `make` copies the
# release binaries to bin/.

MODE ?= release
O := build/$(MODE)

CC ?= cc
# The gateway serves HTTP itself (gateway/server.c); libmicrohttpd is left
# to billing's admin API and the device simulator, and not linked into it.
PKGS := libpq hiredis jansson libsodium libevent
MHD_PKG := libmicrohttpd
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) $(MHD_PKG) 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
MHD_LIBS := $(shell pkg-config --libs $(MHD_PKG) 2>/dev/null)
# libcurl: bin/billing's webhook deliveries only (billing/whdeliver.c).
CURL_LIBS := $(shell pkg-config --libs libcurl 2>/dev/null || echo -lcurl)
# zlib: the ledger archives (billing/archive.c): bin/billing, and the
# harnesses that link libbilling.a's admin API.
ZLIB_LIBS := $(shell pkg-config --libs zlib 2>/dev/null || echo -lz)

# The version both programs report (pointgate_build_info).
VERSION ?= dev
CFLAGS := -std=c11 -D_GNU_SOURCE -DPOINTGATE_VERSION=\"$(VERSION)\" -Wall -Wextra -Werror -Wshadow -Wpointer-arith \
          -Wstrict-prototypes -Wno-unused-parameter -g -I. -I$(O)/gen $(PKG_CFLAGS) $(EXTRA_CFLAGS)
LDLIBS := $(PKG_LIBS) -lpq -lhiredis -levent -lpthread -lm

ifeq ($(MODE),asan)
CFLAGS += -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
LDFLAGS += -fsanitize=address,undefined
else
CFLAGS += -O2
endif

LUA := $(wildcard billing/*.lua)
LUA_PRELUDE := common/prelude.lua
# Two libraries, one per layer: libcommon.a is what both planes share
# (common/: logging, environment, key hashing, Redis key names and the
# embedded scripts, REDIS_URL, metrics primitives, calendar dates);
# libbilling.a the points domain and control plane (billing/). bin/gateway
# links libcommon.a only: the data plane never reaches into billing/.
COMMON_SRC := $(wildcard common/*.c)
BILLING_SRC := $(filter-out billing/main.c,$(wildcard billing/*.c))
LIB_SRC := $(BILLING_SRC) $(COMMON_SRC)
GW_SRC := $(wildcard gateway/*.c)
SIM_SRC := $(wildcard tests/sim/*.c)
UNIT_SRC := $(wildcard tests/unit/test_*.c)

SQL := $(sort $(wildcard schema/*.sql))
COMMON_OBJ := $(COMMON_SRC:%.c=$(O)/%.o) $(O)/gen/hotlua.o
BILLING_OBJ := $(BILLING_SRC:%.c=$(O)/%.o) $(O)/gen/migrations.o
GW_OBJ := $(GW_SRC:%.c=$(O)/%.o)
SIM_OBJ := $(SIM_SRC:%.c=$(O)/%.o)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(O)/bin/%)

BINS := $(O)/bin/billing $(if $(GW_SRC),$(O)/bin/gateway) $(if $(SIM_SRC),$(O)/bin/devsim)
# Test tools that are not tests themselves: the differential test's driver.
TOOL_BIN := $(O)/bin/frame_dump

.PHONY: all build test run bench bench-reports bench-ledger format lint clean deps fuzz fuzz-build FORCE
all: build
ifeq ($(MODE),release)
	@mkdir -p bin && cp --remove-destination $(BINS) bin/
endif

build: $(BINS) $(UNIT_BIN) $(TOOL_BIN)

# V=1 shows the full command lines.
Q := $(if $(V),,@)

$(O)/%.o: %.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

# The Lua scripts are embedded as C strings so a binary is self-contained.
$(O)/gen/hotlua.c: $(LUA) $(LUA_PRELUDE) scripts/embed-lua.sh
	@mkdir -p $(dir $@)
	$(Q)scripts/embed-lua.sh $(LUA_PRELUDE) $(LUA) > $@

# The list of migrations as a file that changes only when the list does, so
# that removing or renaming a schema/*.sql regenerates migrations.c too (a
# prerequisite that is gone triggers nothing by itself).
$(O)/gen/sql.list: FORCE
	@mkdir -p $(dir $@)
	@echo '$(SQL)' | cmp -s - $@ || echo '$(SQL)' > $@

$(O)/gen/migrations.c: $(SQL) $(O)/gen/sql.list scripts/embed-sql.sh
	@mkdir -p $(dir $@)
	$(Q)scripts/embed-sql.sh $(SQL) > $@

$(O)/gen/%.o: $(O)/gen/%.c
	$(Q)$(CC) $(CFLAGS) -c $< -o $@

# Made afresh (rm first): `ar rcs` only adds and replaces, so a member whose
# source moved away (billing/redisurl.c became common/redisurl.c) would stay
# in the old archive and be linked ahead of its new home.
$(O)/libcommon.a: $(COMMON_OBJ)
	$(Q)rm -f $@ && ar rcs $@ $^

$(O)/libbilling.a: $(BILLING_OBJ)
	$(Q)rm -f $@ && ar rcs $@ $^

$(O)/bin/billing: $(O)/billing/main.o $(O)/libbilling.a $(O)/libcommon.a
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ $(MHD_LIBS) $(CURL_LIBS) $(ZLIB_LIBS) $(LDLIBS) -o $@

$(O)/bin/gateway: $(GW_OBJ) $(O)/libcommon.a
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(O)/bin/devsim: $(SIM_OBJ) $(O)/libbilling.a $(O)/libcommon.a
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ $(MHD_LIBS) $(LDLIBS) -o $@

$(O)/bin/test_%: $(O)/tests/unit/test_%.o $(O)/libbilling.a $(O)/libcommon.a
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ $(MHD_LIBS) $(LDLIBS) -o $@

# Unit tests of gateway modules link the module's object too.
$(O)/bin/test_http1: $(O)/gateway/http1.o
$(O)/bin/test_http1req: $(O)/gateway/http1req.o $(O)/gateway/http1.o
# forward.o logs through libcommon.a, so the library goes after it.
$(O)/bin/test_forward: $(O)/tests/unit/test_forward.o $(O)/gateway/forward.o \
		$(O)/gateway/proxy.o $(O)/gateway/proxy_msg.o $(O)/gateway/http1.o $(O)/libcommon.a
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@
$(O)/bin/test_routes: $(O)/gateway/routes.o
# idem.o alone: the test stubs the proxy and forward functions it calls.
$(O)/bin/test_idem: $(O)/gateway/idem.o
# The lease core is pure: its test needs nothing else.
$(O)/bin/test_leasecore: $(O)/gateway/leasecore.o
# lease.c with its fault-injection hook (LEASE_TESTING), in its unit test only.
$(O)/tests/unit/lease_testing.o: gateway/lease.c
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(CFLAGS) -DLEASE_TESTING -MMD -MP -c $< -o $@
$(O)/bin/test_lease: $(O)/tests/unit/test_lease.o $(O)/tests/unit/lease_testing.o \
		$(O)/gateway/leasecore.o $(O)/libcommon.a
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# buf.c with its allocation-failure hook (BUF_TESTING), in its unit test only.
$(O)/tests/unit/buf_testing.o: common/buf.c
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(CFLAGS) -DBUF_TESTING -MMD -MP -c $< -o $@
$(O)/bin/test_buf: $(O)/tests/unit/test_buf.o $(O)/tests/unit/buf_testing.o
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ -o $@

# The gateway's request framing as a filter (tests/e2e/test_differential.py).
$(O)/bin/frame_dump: $(O)/tests/fuzz/frame_dump.o $(O)/gateway/http1req.o $(O)/gateway/http1.o
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ -o $@

# ---- fuzzing: libFuzzer harnesses (tests/fuzz/fuzz_*.c), built with clang
# into build/fuzz apart from the gcc builds (so plain `make` never pays for
# them), every object with ASan+UBSan and coverage instrumentation.
FUZZ_CC ?= clang
FZ := build/fuzz
FUZZ_SECS ?= 60
FUZZ_TEST_SECS ?= 8
# -D switches for properties a harness cannot assert until a fix named
# next to them is merged (none now: FUZZ_ROUTES_ALLOW_CTL went with item 7's).
FUZZ_DEFS ?=
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=all
FUZZ_CFLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -g -O1 \
               -fno-omit-frame-pointer -fsanitize=fuzzer-no-link $(FUZZ_SAN) -I. -I$(FZ)/gen \
               $(PKG_CFLAGS) $(FUZZ_DEFS)
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BIN := $(FUZZ_SRC:tests/fuzz/%.c=$(FZ)/bin/%)
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FZ)/%.o) $(FZ)/gen/hotlua.o $(FZ)/gen/migrations.o

# The flags as a file that changes only when they do: changing FUZZ_DEFS
# (say, dropping a switch above) rebuilds the harnesses.
$(FZ)/flags: FORCE
	@mkdir -p $(FZ)
	@echo '$(FUZZ_CFLAGS)' | cmp -s - $@ || echo '$(FUZZ_CFLAGS)' > $@

$(FZ)/%.o: %.c $(FZ)/flags
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  FUZZCC  $<")
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -MMD -MP -c $< -o $@

$(FZ)/gen/hotlua.c: $(LUA) $(LUA_PRELUDE) scripts/embed-lua.sh
	@mkdir -p $(dir $@)
	$(Q)scripts/embed-lua.sh $(LUA_PRELUDE) $(LUA) > $@

$(FZ)/gen/migrations.c: $(SQL) scripts/embed-sql.sh
	@mkdir -p $(dir $@)
	$(Q)scripts/embed-sql.sh $(SQL) > $@

$(FZ)/gen/%.o: $(FZ)/gen/%.c $(FZ)/flags
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

$(FZ)/libbilling.a: $(FUZZ_LIB_OBJ)
	$(Q)ar rcs $@ $^

$(FZ)/bin/fuzz_%: $(FZ)/tests/fuzz/fuzz_%.o
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  FUZZLD  $@")
	$(Q)$(FUZZ_CC) -fsanitize=fuzzer $(FUZZ_SAN) $^ $(MHD_LIBS) $(ZLIB_LIBS) $(LDLIBS) -o $@

$(FZ)/bin/fuzz_http1req: $(FZ)/gateway/http1req.o $(FZ)/gateway/http1.o
$(FZ)/bin/fuzz_chunked: $(FZ)/gateway/http1.o
$(FZ)/bin/fuzz_http1resp: $(FZ)/gateway/http1.o
$(FZ)/bin/fuzz_routes: $(FZ)/gateway/routes.o $(FZ)/gateway/http1.o
$(FZ)/bin/fuzz_routesfile: $(FZ)/gateway/routes.o
$(FZ)/bin/fuzz_admin: $(FZ)/libbilling.a
$(FZ)/bin/fuzz_settle: $(FZ)/libbilling.a

fuzz-build: $(FUZZ_BIN)
.SECONDARY: $(FUZZ_SRC:%.c=$(FZ)/%.o)

# Each harness for FUZZ_SECS seconds from its seed corpus; crash inputs are
# kept under tests/fuzz/crashes/<harness>/; non-zero exit on any crash.
fuzz: deps
	@$(MAKE) --no-print-directory fuzz-build
	@python3 tests/fuzz/fuzzrun.py --bin $(FZ)/bin --secs $(FUZZ_SECS)

deps:
	@scripts/deps.sh

test: deps
	@$(MAKE) --no-print-directory MODE=asan build
	@$(MAKE) --no-print-directory fuzz-build
	@python3 tests/run.py --bin build/asan/bin --fuzz-bin $(FZ)/bin --fuzz-secs $(FUZZ_TEST_SECS)

run: deps
	@$(MAKE) --no-print-directory all
	@scripts/run.sh

bench: deps
	@$(MAKE) --no-print-directory all
	@scripts/bench.sh

bench-reports: deps
	@$(MAKE) --no-print-directory all
	@scripts/bench-reports.sh

bench-ledger: deps
	@$(MAKE) --no-print-directory all
	@scripts/bench-ledger.sh

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

lint:
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
	    --inline-suppr --suppress=missingIncludeSystem -I. $$(git ls-files '*.c')

clean:
	rm -rf build bin

-include $(shell find build -name '*.d' 2>/dev/null)
