#!/bin/sh
# ratekeeper_whatif with bad proposals: each must exit 2, say why on
# stderr, and leave --out unwritten.
set -u
tool=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
: > "$dir/ledger.jsonl"
check() {  # check PROPOSAL-TEXT EXPECTED-WORDS
  printf '%s' "$1" > "$dir/p.json"
  "$tool" --out "$dir/out.txt" "$dir/ledger.jsonl" "$dir/p.json" \
    2> "$dir/err.txt"
  rc=$?
  if [ "$rc" -ne 2 ]; then echo "exit $rc, not 2, for: $1"; exit 1; fi
  if [ -e "$dir/out.txt" ]; then echo "--out written for: $1"; exit 1; fi
  if ! grep -q "$2" "$dir/err.txt"; then
    echo "no \"$2\" in: $(cat "$dir/err.txt")"; exit 1
  fi
}
check '{' 'not well-formed'
check '{"tiers": {"free": [{"name": "rpm", "scope": "user", "limit": 0, "per": "minute"}]}, "prices": {}}' '"limit" is 0'
check '{"budget": []}' 'unknown field "budget"'
"$tool" --out "$dir/out.txt" 2> /dev/null
if [ $? -ne 2 ] || [ -e "$dir/out.txt" ]; then echo "bad arguments"; exit 1; fi
# A ledger path that is not there (a typo): exit 2, nothing written.
printf '%s' '{"prices": {"m": {"input_cost_per_token": 1e-07, "output_cost_per_token": 1e-07, "mode": "chat"}}}' > "$dir/p.json"
"$tool" --out "$dir/out.txt" "$dir/no-such-ledger.jsonl" "$dir/p.json" \
  2> "$dir/err.txt"
rc=$?
if [ "$rc" -ne 2 ] || [ -e "$dir/out.txt" ]; then
  echo "a missing ledger: exit $rc"; exit 1
fi
grep -q "no-such-ledger" "$dir/err.txt" || { echo "unnamed: $(cat "$dir/err.txt")"; exit 1; }
# A good proposal on an empty ledger writes its report.
printf '%s' '{"prices": {"m": {"input_cost_per_token": 1e-07, "output_cost_per_token": 1e-07, "mode": "chat"}}}' > "$dir/p.json"
"$tool" --out "$dir/out.txt" "$dir/ledger.jsonl" "$dir/p.json" || exit 1
grep -q "what-if replay of 0 records" "$dir/out.txt" || exit 1
echo ok
