# pointgate: API metering and billing gateway.
#
#   make            release build: bin/gateway, bin/billing, bin/devsim
#   make test       installs what is missing, builds with ASan+UBSan, runs every test
#   make run        the whole stack on this machine, with a demo account
#   make bench      the benchmark (wrk: upstream direct, nginx proxy_pass, gateway)
#   make bench-reports  the usage report over 10 million charges vs. a scan
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

CFLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wshadow -Wpointer-arith \
          -Wstrict-prototypes -Wno-unused-parameter -g -I. -I$(O)/gen $(PKG_CFLAGS) $(EXTRA_CFLAGS)
LDLIBS := $(PKG_LIBS) -lpq -lhiredis -levent -lpthread -lm

ifeq ($(MODE),asan)
CFLAGS += -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
LDFLAGS += -fsanitize=address,undefined
else
CFLAGS += -O2
endif

LUA := $(wildcard billing/*.lua)
LUA_PRELUDE := billing/lua/prelude.lua
LIB_SRC := $(filter-out billing/main.c,$(wildcard billing/*.c))
GW_SRC := $(wildcard gateway/*.c)
SIM_SRC := $(wildcard tests/sim/*.c)
UNIT_SRC := $(wildcard tests/unit/test_*.c)

SQL := $(sort $(wildcard schema/*.sql))
LIB_OBJ := $(LIB_SRC:%.c=$(O)/%.o) $(O)/gen/hotlua.o $(O)/gen/migrations.o
GW_OBJ := $(GW_SRC:%.c=$(O)/%.o)
SIM_OBJ := $(SIM_SRC:%.c=$(O)/%.o)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(O)/bin/%)

BINS := $(O)/bin/billing $(if $(GW_SRC),$(O)/bin/gateway) $(if $(SIM_SRC),$(O)/bin/devsim)

.PHONY: all build test run bench bench-reports format lint clean deps
all: build
ifeq ($(MODE),release)
	@mkdir -p bin && cp --remove-destination $(BINS) bin/
endif

build: $(BINS) $(UNIT_BIN)

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

$(O)/gen/migrations.c: $(SQL) scripts/embed-sql.sh
	@mkdir -p $(dir $@)
	$(Q)scripts/embed-sql.sh $(SQL) > $@

$(O)/gen/%.o: $(O)/gen/%.c
	$(Q)$(CC) $(CFLAGS) -c $< -o $@

$(O)/libbilling.a: $(LIB_OBJ)
	$(Q)ar rcs $@ $^

$(O)/bin/billing: $(O)/billing/main.o $(O)/libbilling.a
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ $(MHD_LIBS) $(LDLIBS) -o $@

$(O)/bin/gateway: $(GW_OBJ) $(O)/libbilling.a
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(O)/bin/devsim: $(SIM_OBJ) $(O)/libbilling.a
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ $(MHD_LIBS) $(LDLIBS) -o $@

$(O)/bin/test_%: $(O)/tests/unit/test_%.o $(O)/libbilling.a
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(LDFLAGS) $^ $(MHD_LIBS) $(LDLIBS) -o $@

# Unit tests of gateway modules link the module's object too.
$(O)/bin/test_http1: $(O)/gateway/http1.o
$(O)/bin/test_http1req: $(O)/gateway/http1req.o $(O)/gateway/http1.o
# forward.o logs through libbilling.a, so the library goes after it.
$(O)/bin/test_forward: $(O)/tests/unit/test_forward.o $(O)/gateway/forward.o \
		$(O)/gateway/proxy.o $(O)/gateway/http1.o $(O)/libbilling.a
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@
$(O)/bin/test_routes: $(O)/gateway/routes.o
# lease.c with its fault-injection hook (LEASE_TESTING), in its unit test only.
$(O)/tests/unit/lease_testing.o: gateway/lease.c
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(CFLAGS) -DLEASE_TESTING -MMD -MP -c $< -o $@
$(O)/bin/test_lease: $(O)/tests/unit/test_lease.o $(O)/tests/unit/lease_testing.o $(O)/libbilling.a
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

deps:
	@scripts/deps.sh

test: deps
	@$(MAKE) --no-print-directory MODE=asan build
	@python3 tests/run.py --bin build/asan/bin

run: deps
	@$(MAKE) --no-print-directory all
	@scripts/run.sh

bench: deps
	@$(MAKE) --no-print-directory all
	@scripts/bench.sh

bench-reports: deps
	@$(MAKE) --no-print-directory all
	@scripts/bench-reports.sh

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

lint:
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
	    --inline-suppr --suppress=missingIncludeSystem -I. $$(git ls-files '*.c')

clean:
	rm -rf build bin

-include $(shell find build -name '*.d' 2>/dev/null)
