#!/usr/bin/env bash
# ratekeeper beside its peers, in one run, on the same workloads:
#   one_key_allowed, one_key_denied, 100k_keys (with bytes per key),
#   2_threads_one_key (ns per op = wall time over the ops of both threads).
#
#   benchmarks/peers/run.sh [--install] [--docs] [BUILD_DIR]
#
# --install  installs the peers first (root): Debian's libguava-java and a
#            JDK, golang-go and golang-golang-x-time-dev, gnuplot-nox, npm;
#            rate-limiter-flexible from npm (into OUT/node, not the tree).
# --docs     copies the plot to docs/img/peers.png.
# BUILD_DIR  a configured build with ratekeeper_bench (default build/bench,
#            `RATEKEEPER_WERROR=ON cmake --preset bench`); it is built here.
#
# Writes BUILD_DIR/peers/: ratekeeper.json (ratekeeper_bench's JSON, which
# benchmarks/ratios.py also reads), peers.csv (peer,workload,ns_per_op,
# bytes_per_key), peers.png. Nothing in CI runs this.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
install=0
docs=0
build=$root/build/bench
for a in "$@"; do
  case $a in
    --install) install=1 ;;
    --docs) docs=1 ;;
    -*) echo "unknown option $a" >&2; exit 2 ;;
    *) build=$a ;;
  esac
done
out=$build/peers
mkdir -p "$out/java" "$out/node" "$out/go-cache"
RLF_VERSION=11.4.0

if [[ $install == 1 ]]; then
  pkgs=(default-jdk-headless libguava-java golang-go golang-golang-x-time-dev
        gnuplot-nox npm)
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  # npm's Debian package conflicts with a nodejs that bundles npm (as
  # NodeSource's does): skip it when an npm is already there.
  if command -v npm >/dev/null; then
    missing=("${missing[@]/npm}")
  fi
  if [[ -n "${missing[*]// /}" ]]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ${missing[*]}
  fi
  npm install --silent --prefix "$out/node" "rate-limiter-flexible@$RLF_VERSION"
fi

for tool in javac java go node gnuplot python3; do
  command -v $tool >/dev/null || { echo "no $tool: run with --install" >&2; exit 1; }
done
guava=/usr/share/java/guava.jar
[[ -f $guava ]] || { echo "no $guava: run with --install" >&2; exit 1; }
[[ -d $out/node/node_modules/rate-limiter-flexible ]] ||
  npm install --silent --prefix "$out/node" "rate-limiter-flexible@$RLF_VERSION"

# Build everything first, so that no compiler runs during a measurement.
cmake --build "$build" --target ratekeeper_bench -j2
javac -d "$out/java" -cp "$guava" "$root/benchmarks/peers/GuavaBench.java"
(cd "$root/benchmarks/peers/gorate" &&
   GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$out/go-cache \
   go build -o "$out/gorate" .)

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)" |
  tee "$out/machine.txt"

# ratekeeper: the four workloads on the default configuration (SteadyClock,
# ShardedStore, default options; 100k keys: capacity 100k) and the floors
# and budget benchmark of benchmarks/ratios.py, in the same run.
filter="$(python3 "$root/benchmarks/ratios.py" --filter)|^BM_Acquire_TokenBucket_Sharded_Keys/100000\$"
"$build/benchmarks/ratekeeper_bench" --benchmark_filter="$filter" \
  --benchmark_out="$out/ratekeeper.json" --benchmark_out_format=json

csv=$out/peers.csv
echo "peer,workload,ns_per_op,bytes_per_key" >"$csv"
python3 - "$out/ratekeeper.json" >>"$csv" <<'EOF'
import json, sys
rows = {b["name"]: b for b in json.load(open(sys.argv[1]))["benchmarks"]}
for workload, name in [
        ("one_key_allowed", "BM_Acquire_TokenBucket_Sharded_OneKey_Allowed"),
        ("one_key_denied", "BM_Acquire_TokenBucket_Sharded_OneKey_Denied"),
        ("100k_keys", "BM_Acquire_TokenBucket_Sharded_Keys/100000"),
        ("2_threads_one_key", "BM_Acquire_TokenBucket_Sharded_HotKey/real_time/threads:2")]:
    b = rows[name]
    bpk = f"{b['bytes_per_key']:.1f}" if "bytes_per_key" in b else ""
    print(f"ratekeeper,{workload},{b['real_time']:.1f},{bpk}")
EOF
java -cp "$guava:$out/java" GuavaBench | tee -a "$csv"
"$out/gorate" | tee -a "$csv"
NODE_PATH=$out/node/node_modules node --expose-gc \
  "$root/benchmarks/peers/rlflex.js" | tee -a "$csv"

echo
column -s, -t "$csv"
echo
python3 "$root/benchmarks/ratios.py" "$out/ratekeeper.json"

# The plot: ns per op by workload, one bar per peer (log scale).
python3 - "$csv" "$out/peers.dat" <<'EOF'
import csv, sys
peers = ["ratekeeper", "guava", "go-x-time-rate", "rate-limiter-flexible"]
work = ["one_key_allowed", "one_key_denied", "100k_keys", "2_threads_one_key"]
v = {(r["peer"], r["workload"]): r["ns_per_op"] for r in csv.DictReader(open(sys.argv[1]))}
with open(sys.argv[2], "w") as f:
    f.write("workload " + " ".join(peers) + "\n")
    for w in work:
        f.write(w.replace("_", "\\\\_") + " " + " ".join(v.get((p, w), "?") for p in peers) + "\n")
EOF
gnuplot -e "dat='$out/peers.dat'; png='$out/peers.png'" "$root/benchmarks/peers/peers.gp"
if [[ $docs == 1 ]]; then
  mkdir -p "$root/docs/img"
  cp "$out/peers.png" "$root/docs/img/peers.png"
fi
echo "wrote $csv and $out/peers.png"
