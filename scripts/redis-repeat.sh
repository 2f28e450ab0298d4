#!/usr/bin/env bash
# TESTPLAN T13b: the Redis test binaries run back to back N times, alone or
# beside `stress-ng --cpu 2`; prints one line per run and a total. A proof
# for a closing note, not a CI step (20 runs take about 20 minutes).
#
#   scripts/redis-repeat.sh [--stress] [PRESET] [N]    (default: release 20)
#
# Each run is redis_test, redis_accountant_test and concurrency_test
# "[redis]" of build/PRESET (build it first: cmake --build --preset PRESET).
# Failed runs keep their output in build/PRESET/redis-repeat/.
set -uo pipefail
cd "$(dirname "$0")/.."

stress=0
if [[ "${1:-}" == "--stress" ]]; then
  stress=1
  shift
fi
preset="${1:-release}"
runs="${2:-20}"
bin="build/${preset}/tests"
logs="build/${preset}/redis-repeat"
mkdir -p "$logs"

for t in redis_test redis_accountant_test concurrency_test; do
  if [[ ! -x "$bin/$t" ]]; then
    echo "redis-repeat: $bin/$t is missing: cmake --build --preset $preset" >&2
    exit 2
  fi
done

# The environment ctest's preset gives the sanitizer builds.
case "$preset" in
  asan)
    export RATEKEEPER_TEST_SCALE=0.2
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    ;;
  tsan)
    export RATEKEEPER_TEST_SCALE=0.2
    export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
    ;;
esac

stress_pid=""
if [[ $stress -eq 1 ]]; then
  command -v stress-ng >/dev/null || {
    echo "redis-repeat: stress-ng is missing (apt-get install stress-ng)" >&2
    exit 2
  }
  stress-ng --cpu 2 --quiet &
  stress_pid=$!
  trap 'kill "$stress_pid" 2>/dev/null; wait "$stress_pid" 2>/dev/null' EXIT
fi

declare -A passed=([redis_test]=0 [redis_accountant_test]=0 [concurrency_test]=0)
for ((i = 1; i <= runs; i++)); do
  line="run $i:"
  for t in redis_test redis_accountant_test concurrency_test; do
    args=()
    [[ $t == concurrency_test ]] && args=("[redis]")
    start=$(date +%s)
    if "$bin/$t" "${args[@]}" >"$logs/$t.$i.log" 2>&1; then
      passed[$t]=$((passed[$t] + 1))
      rm -f "$logs/$t.$i.log"
      line+=" $t ok ($(($(date +%s) - start)) s)"
    else
      line+=" $t FAILED (see $logs/$t.$i.log)"
    fi
  done
  echo "$line"
done

label="alone"
[[ $stress -eq 1 ]] && label="beside stress-ng --cpu 2"
status=0
for t in redis_test redis_accountant_test concurrency_test; do
  echo "redis-repeat: $preset, $label: $t passed ${passed[$t]} of $runs"
  [[ ${passed[$t]} -eq $runs ]] || status=1
done
exit $status
