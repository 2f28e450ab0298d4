#!/bin/sh
# Runs gateway_demo's Redis mode against a redis-server of its own, started
# on a free loopback port and stopped afterwards (make demo-redis, and the
# example_gateway_demo_redis test).
#   scripts/demo-redis.sh <gateway_demo binary> [demo arguments...]
set -eu
demo=$1
shift
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT INT TERM
pid=
for try in 1 2 3 4 5 6 7 8 9 10; do
  port=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 20000 ))
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$dir" --loglevel warning >"$dir/log" 2>&1 &
  pid=$!
  for wait in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    if redis-cli -p "$port" ping >/dev/null 2>&1; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if redis-cli -p "$port" ping >/dev/null 2>&1; then
    "$demo" --redis "127.0.0.1:$port" "$@"
    exit $?
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
done
echo "demo-redis: could not start redis-server (apt-get install redis-server)" >&2
exit 1
