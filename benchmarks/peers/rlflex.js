// rate-limiter-flexible's RateLimiterMemory on the workloads of
// benchmarks/peers/run.sh.
//
//   npm install --prefix DIR rate-limiter-flexible
//   NODE_PATH=DIR/node_modules node --expose-gc rlflex.js
//
// Prints CSV rows: peer,workload,ns_per_op,bytes_per_key. Its API is async:
// each op is one `await limiter.consume(key)` (a refusal is a rejected
// promise, caught), one at a time, so ns per op includes a promise and a
// microtask turn, the cost every caller of it pays. Warm-up, then a timed
// span; ns per op is that span over the ops done. RateLimiterMemory's store
// is a Map of one process's heap: worker threads cannot share it (the
// cluster variant sends every op to the primary over IPC), so there is no
// "2 threads on one key" row.
'use strict';
const { RateLimiterMemory } = require('rate-limiter-flexible');

const WARM_NS = 1e9;
const RUN_NS = 2e9;

async function timed(op, span) {
  let ops = 0;
  let ok = 0;
  const start = process.hrtime.bigint();
  let el;
  for (;;) {
    for (let i = 0; i < 10000; ++i) ok += (await op(i)) ? 1 : 0;
    ops += 10000;
    el = Number(process.hrtime.bigint() - start);
    if (el >= span) break;
  }
  globalThis.sink = (globalThis.sink || 0) + ok;
  return el / ops;
}

async function bench(op) {
  await timed(op, WARM_NS);
  return timed(op, RUN_NS);
}

function heap() {
  for (let i = 0; i < 4; ++i) global.gc();
  return process.memoryUsage().heapUsed;
}

function row(w, ns, bytes) {
  console.log(`rate-limiter-flexible,${w},${ns.toFixed(1)},${bytes}`);
}

const consume = (lim, key) =>
  lim.consume(key).then(() => true, (r) => {
    if (r instanceof Error) throw r;
    return false;
  });

async function main() {
  // One key, allowed: points no run reaches, an hour's window (no key
  // expires during the run).
  const open = new RateLimiterMemory({ points: 1e15, duration: 3600 });
  row('one_key_allowed', await bench(() => consume(open, 'user:42')), '');

  // One key, denied: one point a day, taken first.
  const shut = new RateLimiterMemory({ points: 1, duration: 86400 });
  await consume(shut, 'user:42');
  row('one_key_denied', await bench(() => consume(shut, 'user:42')), '');

  // 100k keys, touched in turn.
  const n = 100000;
  const keys = [];
  for (let i = 0; i < n; ++i) keys.push('user:' + i);
  const before = heap();
  const many = new RateLimiterMemory({ points: 1e15, duration: 3600 });
  for (const k of keys) await consume(many, k);
  const after = heap();
  let at = 0;
  const ns = await bench(() => {
    const j = at;
    if (++at === n) at = 0;
    return consume(many, keys[j]);
  });
  row('100k_keys', ns, ((after - before) / n).toFixed(1));
  // The limiters' expiry timers would keep the process alive for an hour.
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
