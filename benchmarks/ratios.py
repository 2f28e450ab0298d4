#!/usr/bin/env python3
"""Issue 15's performance ratios, and issue 16's Redis cost, from one
ratekeeper_bench run.

  build/release/benchmarks/ratekeeper_bench \\
      --benchmark_filter="$(benchmarks/ratios.py --filter)" \\
      --benchmark_out=ratios.json --benchmark_out_format=json
  benchmarks/ratios.py ratios.json

  # Redis: the token bucket beside the floor (a minimal GCRA script driven
  # by plain hiredis), same binary, same redis-server, same minutes
  build/bench/benchmarks/ratekeeper_bench \\
      --benchmark_filter="$(benchmarks/ratios.py --filter redis)" \\
      --benchmark_out=redis.json --benchmark_out_format=json
  # alternated: --benchmark_repetitions=5 \
  #     --benchmark_enable_random_interleaving=true
  benchmarks/ratios.py redis.json          # medians of repetitions
  benchmarks/ratios.py --best redis.json   # each benchmark's best run

Each ratio divides two benchmarks of the same run (same binary, same
minutes), so a noisy machine moves both. With --benchmark_repetitions the
median of each is used. Prints a Markdown table; exits 0 whether or not the
targets are met (nothing in CI depends on it).
"""
import json
import sys

ALLOWED = "BM_Acquire_TokenBucket_Sharded_OneKey_Allowed"
DENIED = "BM_Acquire_TokenBucket_Sharded_OneKey_Denied"
FLOOR16 = "BM_Floor_ClockPlusCas16"
FLOOR8 = "BM_Floor_ClockPlusCas8"
BUDGET = "BM_Budget_ReserveSettle_Sharded/18"
HOT2 = "BM_Acquire_TokenBucket_Sharded_HotKey/real_time/threads:2"
FLOOR_SHARED2 = "BM_Floor_ClockPlusCas16_SharedLine/real_time/threads:2"

# (what, numerator, denominator, target: ratio <= target)
RATIOS = [
    ("one key allowed / clock + 16-byte CAS", ALLOWED, FLOOR16, 1.25),
    ("one key denied / one key allowed", DENIED, ALLOWED, 1.0),
    ("reserve + settle (2^18 ids) / one acquire", BUDGET, ALLOWED, 3.0),
    ("2 threads, one hot key / contended floor (2 threads)", HOT2,
     FLOOR_SHARED2, 1.2),
]
SHOWN = [FLOOR8, FLOOR16, "BM_Floor_ClockPlusCas16_SharedLine/real_time/threads:1",
         FLOOR_SHARED2, ALLOWED, DENIED, BUDGET,
         "BM_Acquire_TokenBucket_Sharded_HotKey/real_time/threads:1", HOT2]

# A --benchmark_filter that runs just these (and a little more: the
# thread ranges' other counts, the budget's other window sizes).
FILTER = ("^BM_Floor_ClockPlusCas|^BM_Acquire_TokenBucket_Sharded_OneKey_(Allowed|Denied)$"
          "|^BM_Budget_ReserveSettle_Sharded/18$|^BM_Acquire_TokenBucket_Sharded_HotKey")


# Issue 16's Redis cost (docs/redis.md, "Cost"): BM_Redis_TokenBucket_*
# against BM_Redis_Floor_*, counters of RedisCost in ratekeeper_bench.cpp.
TB_SEQ = "BM_Redis_TokenBucket_Sequential/real_time"
TB_50 = "BM_Redis_TokenBucket_50InFlight/real_time"
FLOOR_SEQ = "BM_Redis_Floor_Sequential/real_time"
FLOOR_50 = "BM_Redis_Floor_50InFlight/real_time"
# The token bucket's script driven as the floor is (plain blocking hiredis):
# not a target, the diagnosis of (a) (script or client?); Prev: the
# previous release's script (tests/redis_tb_prev.hpp), before and after in
# one run.
TBS_SEQ = "BM_Redis_TokenBucketScript_Sequential/real_time"
TBS_50 = "BM_Redis_TokenBucketScript_50InFlight/real_time"
PREV_SEQ = "BM_Redis_TokenBucketScriptPrev_Sequential/real_time"
PREV_50 = "BM_Redis_TokenBucketScriptPrev_50InFlight/real_time"
REDIS_FILTER = ("^BM_Redis_(TokenBucket_Sequential|TokenBucket_50InFlight|Floor_"
                "|TokenBucketScript)")
# Redis's wall time per call (commandstats; a preempted script is charged
# for the wait) and its CPU time per call (INFO cpu; not charged for it,
# but counting the event loop's work around each call, the same for every
# script): (a) is judged on CPU time, the wall time shown beside it.
SERVER = "server_us_per_call"
SERVER_CPU = "server_cpu_us_per_call"
CPU = "client_cpu_us_per_decision"
USER = "client_user_us_per_decision"
RATE = "decisions_per_s"
# (what, (benchmark, field) numerator, denominator or None, target, "<=" or ">=")
REDIS_RATIOS = [
    ("(a) Redis's CPU per token-bucket decision / the floor script's, sequential",
     (TB_SEQ, SERVER_CPU), (FLOOR_SEQ, SERVER_CPU), 1.1, "<="),
    ("(a) the same, 50 in flight", (TB_50, SERVER_CPU), (FLOOR_50, SERVER_CPU),
     1.1, "<="),
    ("(a) wall time in Redis (commandstats) / the floor's, sequential",
     (TB_SEQ, SERVER), (FLOOR_SEQ, SERVER), 1.1, "<="),
    ("(a) the same, 50 in flight", (TB_50, SERVER), (FLOOR_50, SERVER), 1.1, "<="),
    ("(b) pipelined decisions/s / the floor's (50 in flight)",
     (TB_50, RATE), (FLOOR_50, RATE), 0.95, ">="),
    ("(c) client CPU per pipelined decision (us)", (TB_50, CPU), None, 0.5, "<="),
    ("(c) the same in user space only (us; the kernel's part left out)",
     (TB_50, USER), None, 0.5, "<="),
    ("(d) client CPU per sequential call / a blocking hiredis call's",
     (TB_SEQ, CPU), (FLOOR_SEQ, CPU), 1.5, "<="),
]
# Not targets: where (a) sequential's difference comes from.
REDIS_DIAGNOSIS = [
    ("the token bucket's script by plain hiredis / the floor script, sequential"
     " (the script's share, Redis CPU)", (TBS_SEQ, SERVER_CPU),
     (FLOOR_SEQ, SERVER_CPU)),
    ("the same, 50 in flight", (TBS_50, SERVER_CPU), (FLOOR_50, SERVER_CPU)),
    ("before: the previous release's script / the floor script, sequential"
     " (Redis CPU)", (PREV_SEQ, SERVER_CPU), (FLOOR_SEQ, SERVER_CPU)),
    ("before: the same, 50 in flight", (PREV_50, SERVER_CPU),
     (FLOOR_50, SERVER_CPU)),
    ("the current script / the previous one, 50 in flight (Redis CPU)",
     (TBS_50, SERVER_CPU), (PREV_50, SERVER_CPU)),
    ("the token bucket by the library / its script by plain hiredis, sequential"
     " (the client's share, Redis CPU)", (TB_SEQ, SERVER_CPU),
     (TBS_SEQ, SERVER_CPU)),
]


# Issue 17: the acquire path with listener/override support built in and
# none set, against the same path built without it (PolicyLimit<.., false>),
# and with a listener set: one run, --benchmark_repetitions=5, medians.
#   build/bench/benchmarks/ratekeeper_bench \\
#       --benchmark_filter="$(benchmarks/ratios.py --filter hooks)" \\
#       --benchmark_repetitions=5 --benchmark_out=hooks.json \\
#       --benchmark_out_format=json
#   benchmarks/ratios.py hooks.json
HOOKS_OFF = "BM_Listener_Off"
HOOKS_NONE = "BM_Listener_None"
HOOKS_SET = "BM_Listener_Set"
HOOKS_OVR = "BM_Override_OtherKey"
HOOKS_FILTER = "^BM_Listener_(Off|None|Set)$|^BM_Override_OtherKey$"
HOOKS_RATIOS = [
    ("no listener set / built without listener support", HOOKS_NONE,
     HOOKS_OFF, 1.02),
    ("a listener set (does nothing) / built without", HOOKS_SET, HOOKS_OFF,
     None),
    ("an override on another key / built without", HOOKS_OVR, HOOKS_OFF,
     None),
]


def hooks_table(path):
    """The ratios on CPU time: one thread, so CPU time is its own run time
    without the time other processes of a shared machine took the core
    (real time is shown beside it)."""
    t = values(path, "cpu_time")
    real = values(path, "real_time")
    if not any(n in t for n in (HOOKS_OFF, HOOKS_NONE, HOOKS_SET)):
        return False
    print("| benchmark | CPU ns per call (median) | real ns (median) |")
    print("|---|---:|---:|")
    for n in (HOOKS_OFF, HOOKS_NONE, HOOKS_SET, HOOKS_OVR):
        if n in t:
            print(f"| `{n}` | {t[n]:.2f} | {real.get(n, 0):.2f} |")
    print()
    print("| ratio | value | target | |")
    print("|---|---:|---:|---|")
    for what, num, den, target in HOOKS_RATIOS:
        if num not in t or den not in t:
            print(f"| {what} | missing | | |")
            continue
        r = t[num] / t[den]
        if target is None:
            print(f"| {what} | {r:.3f} | (reported) | |")
        else:
            verdict = "met" if r <= target else "**not met**"
            print(f"| {what} | {r:.3f} | ≤ {target} | {verdict} |")
    return True


# --best: of repetitions, each benchmark's best instead of its median (the
# least time or CPU, the most decisions/s): on a machine shared with other
# loads, the runs the other loads disturbed least.
BEST = False


def values(path, field):
    """{run name: field}, the median (or best) of repetitions if any."""
    data = json.load(open(path))
    out = {}
    medians = {}
    runs = {}
    for b in data["benchmarks"]:
        if field not in b:
            continue
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[b["run_name"]] = b[field]
        else:
            name = b.get("run_name", b["name"])
            out.setdefault(name, b[field])
            runs.setdefault(name, []).append(b[field])
    if BEST:
        pick = max if field == RATE else min
        return {name: pick(v) for name, v in runs.items()}
    out.update(medians)
    return out


def times(path):
    return values(path, "real_time")


def redis_tables(path):
    cols = [SERVER_CPU, SERVER, CPU, USER, RATE]
    v = {c: values(path, c) for c in cols}
    names = [n for n in (TB_SEQ, TBS_SEQ, PREV_SEQ, FLOOR_SEQ, TB_50, TBS_50,
                         PREV_50, FLOOR_50)
             if n in v[CPU]]
    if not names:
        return False
    print("| benchmark | Redis CPU us per call | Redis wall us per call "
          "| client CPU us per decision | of which user space | decisions/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in names:
        print(f"| `{n}` | {v[SERVER_CPU].get(n, 0):.2f} "
              f"| {v[SERVER].get(n, 0):.2f} | {v[CPU].get(n, 0):.2f} "
              f"| {v[USER].get(n, 0):.2f} | {v[RATE].get(n, 0):,.0f} |")
    print()
    print("| target | value | target | |")
    print("|---|---:|---:|---|")
    for what, num, den, target, sense in REDIS_RATIOS:
        a = v[num[1]].get(num[0])
        b = v[den[1]].get(den[0]) if den else 1.0
        if a is None or b is None or b == 0:
            print(f"| {what} | missing | {sense} {target} | not in the run |")
            continue
        r = a / b
        met = r <= target if sense == "<=" else r >= target
        shown = f"{r:.2f} × ({a:.2f} / {b:.2f})" if den else f"{r:.2f}"
        print(f"| {what} | {shown} | {sense} {target} | "
              f"{'met' if met else '**not met**'} |")
    for what, num, den in REDIS_DIAGNOSIS:
        a = v[num[1]].get(num[0])
        b = v[den[1]].get(den[0])
        if a is None or b is None or b == 0:
            continue
        print(f"| {what} | {a / b:.2f} × ({a:.2f} / {b:.2f}) | (diagnosis) | |")
    return True


def main():
    if sys.argv[1:] == ["--filter"]:
        print(FILTER)
        return
    if sys.argv[1:] == ["--filter", "redis"]:
        print(REDIS_FILTER)
        return
    if sys.argv[1:] == ["--filter", "hooks"]:
        print(HOOKS_FILTER)
        return
    global BEST
    args = sys.argv[1:]
    if args[:1] == ["--best"]:
        BEST = True
        args = args[1:]
    sys.argv[1:] = args
    if redis_tables(sys.argv[1]):
        print()
    if hooks_table(sys.argv[1]):
        print()
    t = times(sys.argv[1])
    if not any(name in t for name in SHOWN):
        return
    print("| benchmark | ns per call |")
    print("|---|---:|")
    for name in SHOWN:
        if name in t:
            print(f"| `{name}` | {t[name]:.1f} |")
    print()
    print("| ratio | value | target | |")
    print("|---|---:|---:|---|")
    for what, num, den, target in RATIOS:
        if num not in t or den not in t:
            print(f"| {what} | missing | ≤ {target} | `{num}` or `{den}` not in the run |")
            continue
        r = t[num] / t[den]
        verdict = "met" if r <= target else "**not met**"
        print(f"| {what} | {r:.2f} × ({t[num]:.1f} / {t[den]:.1f} ns) | ≤ {target} | {verdict} |")


if __name__ == "__main__":
    main()
