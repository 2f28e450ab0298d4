// Guava's RateLimiter on the workloads of benchmarks/peers/run.sh.
//
//   javac -cp /usr/share/java/guava.jar GuavaBench.java
//   java -cp /usr/share/java/guava.jar:. GuavaBench
//
// Prints CSV rows: peer,workload,ns_per_op,bytes_per_key. Each workload is
// warmed up (JIT) and then timed over a fixed wall-clock span; ns per op is
// that span over the operations done (all threads together for the 2-thread
// workload). Guava has no keyed API: one key is one RateLimiter, 100k keys
// are RateLimiters in a ConcurrentHashMap (computeIfAbsent), the usual way.
import com.google.common.util.concurrent.RateLimiter;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;

public final class GuavaBench {
  static final long WARM_NS = 1_000_000_000L;
  static final long RUN_NS = 2_000_000_000L;
  static volatile long sink;

  interface Op {
    boolean run(int i);
  }

  // Runs op in batches until `span` has passed; returns ns per op.
  static double timed(Op op, long span) {
    long ops = 0;
    long ok = 0;
    final long start = System.nanoTime();
    long now;
    do {
      for (int i = 0; i < 10_000; ++i) ok += op.run(i) ? 1 : 0;
      ops += 10_000;
      now = System.nanoTime();
    } while (now - start < span);
    sink += ok;
    return (double) (now - start) / ops;
  }

  static double bench(Op op) {
    timed(op, WARM_NS);
    return timed(op, RUN_NS);
  }

  static long usedHeap() {
    Runtime rt = Runtime.getRuntime();
    for (int i = 0; i < 4; ++i) System.gc();
    return rt.totalMemory() - rt.freeMemory();
  }

  static void row(String workload, double ns, String bytes) {
    System.out.printf("guava,%s,%.1f,%s%n", workload, ns, bytes);
  }

  public static void main(String[] args) throws Exception {
    // One key, allowed: a rate no run reaches.
    final RateLimiter open = RateLimiter.create(1e12);
    row("one_key_allowed", bench(i -> open.tryAcquire()), "");

    // One key, denied: one permit a day, taken first.
    final RateLimiter shut = RateLimiter.create(1.0 / 86400);
    shut.tryAcquire();
    row("one_key_denied", bench(i -> shut.tryAcquire()), "");

    // 100k keys, touched in turn.
    final int n = 100_000;
    final String[] keys = new String[n];
    for (int i = 0; i < n; ++i) keys[i] = "user:" + i;
    final long before = usedHeap();
    final ConcurrentHashMap<String, RateLimiter> map = new ConcurrentHashMap<>();
    for (String k : keys) map.computeIfAbsent(k, x -> RateLimiter.create(1e12)).tryAcquire();
    final long after = usedHeap();
    final int[] at = {0};
    final double ns = bench(i -> {
      int j = at[0];
      at[0] = j + 1 == n ? 0 : j + 1;
      return map.computeIfAbsent(keys[j], x -> RateLimiter.create(1e12)).tryAcquire();
    });
    row("100k_keys", ns, String.format("%.1f", (double) (after - before) / n));
    sink += map.size();

    // 2 threads on one key (allowed).
    final RateLimiter hot = RateLimiter.create(1e12);
    for (long span : new long[] {WARM_NS, RUN_NS}) {
      final AtomicLong total = new AtomicLong();
      final long start = System.nanoTime();
      Thread[] ts = new Thread[2];
      for (int t = 0; t < 2; ++t) {
        ts[t] = new Thread(() -> {
          long ops = 0;
          long ok = 0;
          do {
            for (int i = 0; i < 10_000; ++i) ok += hot.tryAcquire() ? 1 : 0;
            ops += 10_000;
          } while (System.nanoTime() - start < span);
          total.addAndGet(ops);
          sink += ok;
        });
        ts[t].start();
      }
      for (Thread t : ts) t.join();
      final long wall = System.nanoTime() - start;
      if (span == RUN_NS) row("2_threads_one_key", (double) wall / total.get(), "");
    }
  }
}
