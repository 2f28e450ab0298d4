#!/usr/bin/env python3
"""Turns ratekeeper_bench's JSON into a Markdown table and gnuplot data.

  scripts/bench_report.py build/bench/results.json build/bench

writes results.md (every benchmark, with ratios to the floor measured in the
same run) and keys.dat / threads.dat for scripts/bench_plot.gp.
"""
import json
import re
import sys
from pathlib import Path


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(src.read_text())
    rows = [b for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    by_name = {b["name"]: b for b in rows}
    floor = by_name.get("BM_Floor_ClockPlusCas16", by_name.get("BM_Floor_ClockPlusCas8"))["real_time"]
    ctx = data["context"]
    lines = [
        f"Machine: {ctx.get('num_cpus')} x {ctx.get('mhz_per_cpu')} MHz, "
        f"run {ctx.get('date')}, `{ctx.get('executable')}`",
        "",
        "| benchmark | ns per call | vs clock + CAS | notes |",
        "|---|---:|---:|---|",
    ]
    for b in rows:
        ns = b["real_time"]
        notes = []
        for key in ("bytes_per_key", "allowed_ratio", "cas_retries_per_call"):
            if key in b:
                notes.append(f"{key}={b[key]:.3g}")
        if "items_per_second" in b:
            notes.append(f"{b['items_per_second'] / 1e6:.1f} M checks/s in all")
        lines.append(f"| `{b['name']}` | {ns:.1f} | {ns / floor:.2f}x | {', '.join(notes)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    # ns per check against the number of keys.
    keys = []
    for store in ("Sharded", "InMemory"):
        for b in rows:
            m = re.fullmatch(rf"BM_Acquire_TokenBucket_{store}_Keys/(\d+)", b["name"])
            if m:
                keys.append((store, int(m.group(1)), b["real_time"]))
    with (out / "keys.dat").open("w") as f:
        for store in ("Sharded", "InMemory"):
            f.write(f"# {store}\n")
            for s, n, ns in keys:
                if s == store:
                    f.write(f"{n} {ns}\n")
            f.write("\n\n")

    # Aggregate ns per check against threads.
    series = {}
    for b in rows:
        m = re.fullmatch(r"BM_Acquire_TokenBucket_(\w+)_(DistinctKeys|HotKey)/real_time/threads:(\d+)", b["name"])
        if m and "items_per_second" in b:
            series.setdefault(f"{m.group(1)} {m.group(2)}", []).append(
                (int(m.group(3)), 1e9 / b["items_per_second"]))
    with (out / "threads.dat").open("w") as f:
        for name in sorted(series):
            f.write(f"# {name}\n")
            for t, ns in sorted(series[name]):
                f.write(f"{t} {ns}\n")
            f.write("\n\n")
    (out / "threads.names").write_text("\n".join(sorted(series)) + "\n")


if __name__ == "__main__":
    main()
