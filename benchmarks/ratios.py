#!/usr/bin/env python3
"""Issue 15's performance ratios from one ratekeeper_bench run.

  build/release/benchmarks/ratekeeper_bench \\
      --benchmark_filter="$(benchmarks/ratios.py --filter)" \\
      --benchmark_out=ratios.json --benchmark_out_format=json
  benchmarks/ratios.py ratios.json

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


def times(path):
    data = json.load(open(path))
    out = {}
    medians = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[b["run_name"]] = b["real_time"]
        else:
            out.setdefault(b.get("run_name", b["name"]), b["real_time"])
    out.update(medians)
    return out


def main():
    if sys.argv[1:] == ["--filter"]:
        print(FILTER)
        return
    t = times(sys.argv[1])
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
