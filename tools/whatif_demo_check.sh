#!/bin/sh
# The demo's ledger replayed against the demo's own limits, budgets and
# prices (whatif_demo_baseline.json): every tier decides every call as the
# demo did (changed 0) and spends what the demo spent.
set -u
demo=$1 tool=$2 baseline=$3
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$demo" --users 12 --ledger "$dir/ledger.jsonl" > "$dir/demo.txt" || exit 1
"$tool" "$dir/ledger.jsonl" "$baseline" > "$dir/report.txt" || exit 1
cat "$dir/report.txt"
awk '/^tier / { rows = 1; next }
     rows && NF != 8 { rows = 0 }
     rows { n++; if ($6 != 0 || $7 != $8) bad = 1 }
     END { exit (bad || n == 0) }' "$dir/report.txt" || {
  echo "the replay decided or spent otherwise than the demo"; exit 1; }
echo ok
