# The two commands of the README, over the CMake presets:
#   make demo   installs what is missing, builds and runs the gateway demo
#   make test   installs what is missing, builds and runs every test: the g++
#               release build (every test, the docs and packaging checks),
#               clang++ (every test built; the long memory, concurrency and
#               Redis ones are left to the other presets), ASan+UBSan, TSan,
#               1M runs of each libFuzzer target, and the format check
#   make test-aarch64  cross-builds the store's tests for AArch64 and runs
#               them under qemu-user on two CPU models: cortex-a53 (ARMv8.0,
#               the LDAXP/STLXP path) and max (LSE: the CASPAL path)
# CI=true (as CI sets it) turns warnings into errors.

ifneq ($(filter true 1 yes,$(CI)),)
export RATEKEEPER_WERROR := ON
else
export RATEKEEPER_WERROR ?= OFF
endif

PRESETS := release clang asan tsan fuzz
FORMAT_FILES = $(shell find include tests examples benchmarks \( -name '*.hpp' -o -name '*.cpp' \) 2>/dev/null)

.PHONY: demo demo-redis plot-pacing test bench deps deps-test deps-bench format format-check \
        test-aarch64 deps-aarch64 \
        $(addprefix test-,$(PRESETS))

demo: deps
	cmake --preset release
	cmake --build --preset release --target gateway_demo
	./build/release/examples/gateway_demo

# The demo's paced and unpaced month drawn to docs/pacing.svg (gnuplot).
plot-pacing: deps
	cmake --preset release
	cmake --build --preset release --target gateway_demo
	sh scripts/plot-pacing.sh ./build/release/examples/gateway_demo docs/pacing.svg

# Two demo instances sharing limits and budgets in a redis-server of their
# own (or: gateway_demo --redis host:port against yours).
demo-redis: deps
	cmake --preset release
	cmake --build --preset release --target gateway_demo
	sh scripts/demo-redis.sh ./build/release/examples/gateway_demo

test: deps-test format-check $(addprefix test-,$(PRESETS))
	@echo "ratekeeper: all presets passed: $(PRESETS)"

$(addprefix test-,$(PRESETS)): test-%: deps-test
	cmake --preset $*
	cmake --build --preset $*
	ctest --preset $*

# The store's tests for AArch64, under qemu-user, on a CPU without LSE and
# one with it; each run checks that Atomic16 took the path that CPU implies.
# Scaled down (qemu is ~10x slower); a few minutes in all.
AARCH64_TESTS := atomic16_test sharded_test grow_test flood_test limiter_test clock_test \
                 concurrency_test
test-aarch64: deps-aarch64
	cmake --preset aarch64
	cmake --build --preset aarch64 --target $(AARCH64_TESTS)
	set -e; cd build/aarch64/tests; \
	for cpu in cortex-a53:ldaxp max:caspal; do \
	  echo "== qemu-aarch64 -cpu $${cpu%%:*}"; \
	  for t in $(AARCH64_TESTS); do \
	    QEMU_CPU=$${cpu%%:*} RK_EXPECT_ATOMIC16_PATH=$${cpu#*:} \
	    RATEKEEPER_TEST_SCALE=0.2 timeout 600 qemu-aarch64-static ./$$t; \
	  done; \
	done
	@echo "ratekeeper: aarch64 tests passed under qemu (cortex-a53, max)"

# Benchmarks: ratekeeper_bench into build/bench/results.{json,md}, bench.png;
# then the HTTP gateway over loopback (requests/s, p50/p99 with 8 keep-alive
# clients, SSE chunk latency) into build/bench/gateway.md, appended to
# results.md.
bench: deps-bench
	cmake --preset bench -DRATEKEEPER_BUILD_EXAMPLES=ON
	cmake --build --preset bench --target ratekeeper_bench http_gateway_bench
	./build/bench/benchmarks/ratekeeper_bench \
	  --benchmark_out=build/bench/results.json --benchmark_out_format=json
	python3 scripts/bench_report.py build/bench/results.json build/bench
	gnuplot -e "dir='build/bench'" scripts/bench_plot.gp
	./build/bench/examples/http_gateway_bench --md build/bench/gateway.md
	printf '\n' >> build/bench/results.md
	cat build/bench/gateway.md >> build/bench/results.md
	@echo "ratekeeper: build/bench/results.md and build/bench/bench.png"

deps:
	@scripts/install-deps.sh

deps-test:
	@scripts/install-deps.sh --test

deps-bench:
	@scripts/install-deps.sh --bench

deps-aarch64:
	@scripts/install-deps.sh --aarch64

format:
	clang-format-14 -i $(FORMAT_FILES)

format-check: deps-test
	clang-format-14 --dry-run --Werror $(FORMAT_FILES)
