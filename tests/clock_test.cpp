// Clocks: the concept, SteadyClock, ManualClock, CachedClock (and across
// fork()).
#include "ratekeeper/clock.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <thread>
#include <vector>

#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {
struct NotAClock {
  long now() const { return 0; }
};
}  // namespace

static_assert(Clock<SteadyClock>);
static_assert(Clock<ManualClock>);
static_assert(!Clock<NotAClock>, "now() must return Nanos, noexcept");

TEST_CASE("SteadyClock is monotonic", "[clock]") {
  SteadyClock c;
  Nanos prev = c.now();
  for (int i = 0; i < 10'000; ++i) {
    const Nanos t = c.now();
    REQUIRE(t >= prev);
    prev = t;
  }
}

TEST_CASE("ManualClock sets, advances, steps back and saturates", "[clock]") {
  ManualClock c;
  CHECK(c.now() == Nanos{0});
  c.advance(std::chrono::seconds(2));
  CHECK(c.now() == std::chrono::seconds(2));
  c.set(Nanos{5});
  CHECK(c.now() == Nanos{5});
  c.advance(Nanos{-10});
  CHECK(c.now() == Nanos{-5});
  c.set(Nanos{std::numeric_limits<std::int64_t>::max() - 1});
  CHECK(c.advance(std::chrono::hours(1)) == Nanos::max());
  c.set(Nanos::min());
  CHECK(c.advance(Nanos{-1}) == Nanos::min());
  ManualClock started(std::chrono::hours(3));
  CHECK(started.now() == std::chrono::hours(3));
}

TEST_CASE("ManualClock copies share one time", "[clock]") {
  ManualClock a;
  ManualClock b = a;
  a.advance(Nanos{42});
  CHECK(b.now() == Nanos{42});
}

TEST_CASE("ManualClock advances from many threads without losing a step",
          "[clock][concurrency]") {
  ManualClock c;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10'000; ++i) {
        c.advance(Nanos{1});
        static_cast<void>(c.now());
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(c.now() == Nanos{80'000});
}

TEST_CASE("CachedClock never goes backwards and never runs ahead", "[clock]") {
  CachedClock c(std::chrono::milliseconds(1));
  CHECK(c.resolution() == std::chrono::milliseconds(1));
  SteadyClock steady;
  Nanos prev = c.now();
  for (int i = 0; i < 200'000; ++i) {
    const Nanos t = c.now();
    REQUIRE(t >= prev);
    REQUIRE(t <= steady.now());  // it is SteadyClock's time, late
    prev = t;
  }
}

TEST_CASE("CachedClock advances with its ticker, and copies share it",
          "[clock]") {
  CachedClock c(std::chrono::milliseconds(1));
  CachedClock copy = c;
  const Nanos start = c.now();
  // Not a timing assertion: only that time moves at all within 10 s.
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (c.now() == start && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  CHECK(c.now() > start);
  CHECK(copy.now() >= c.now() - std::chrono::seconds(1));
}

TEST_CASE("CachedClock stops its ticker promptly", "[clock]") {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) {
    CachedClock c(std::chrono::hours(1));  // a tick that would never come
    static_cast<void>(c.now());
  }
  // Twenty start/stop cycles of an hourly ticker end at once (a stop wakes
  // it): generous bound, catches a ticker that sleeps its full period.
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30));
}

namespace {

// What a forked child reports through a pipe. `failed` names the first check
// that did not hold there (0: none), the rest are what the parent checks.
struct ChildReport {
  int failed = -1;
  std::int64_t admitted = 0;
  std::int64_t cached_span_ns = 0;
  std::int64_t steady_span_ns = 0;
  // Refill the bucket may have lost while full: for each step of the clock
  // between two of the loop's reads, the tokens it refilled past one.
  std::int64_t lost_bound = 0;
  std::int64_t largest_step_ns = 0;
  int grandchild_status = -1;
};

// Runs `body` in a forked child, which writes its report and _exits with 0
// (no Catch2 in the child, no atexit handlers of the parent). The parent
// reads the report and reaps the child, killing it after `limit` (a child
// that hangs, on a join of a thread that is not there, fails the test rather
// than hanging it). Returns the report and the child's wait status.
std::pair<ChildReport, int> in_child(const std::function<ChildReport()>& body,
                                     std::chrono::seconds limit) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    const ChildReport r = body();
    const ssize_t n = ::write(fds[1], &r, sizeof r);
    ::_exit(n == static_cast<ssize_t>(sizeof r) ? 0 : 3);
  }
  ::close(fds[1]);
  ChildReport r;
  int status = -1;
  const auto give_up = std::chrono::steady_clock::now() + limit;
  while (true) {
    const pid_t w = ::waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (std::chrono::steady_clock::now() > give_up) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ChildReport got;
  if (::read(fds[0], &got, sizeof got) == static_cast<ssize_t>(sizeof got)) {
    r = got;
  }
  ::close(fds[0]);
  return {r, status};
}

// Waits (with a deadline) until `c` has moved `by` past its first reading;
// false if it has not within 10 s of real time.
bool advances(const CachedClock& c, Nanos by) {
  const Nanos start = c.now();
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (c.now() - start < by) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::yield();
  }
  return true;
}

}  // namespace

TEST_CASE(
    "CachedClock runs in a forked child, and a limiter on it admits "
    "what its rate allows there",
    "[i15][fork]") {
  using Lim = Limiter<TokenBucket, ShardedStore, CachedClock>;
  ShardedOptions small;
  small.capacity = 1024;
  // Made in the parent, so that the child inherits a clock whose ticker
  // stays behind: one read in the child, one never read there.
  std::optional<CachedClock> clock(std::in_place, std::chrono::milliseconds(1));
  std::optional<CachedClock> unread(std::in_place,
                                    std::chrono::milliseconds(1));
  std::optional<Lim> lim(std::in_place,
                         TokenBucket::create(per_second(100), 10).value(),
                         small, *clock);
  REQUIRE(advances(*clock, std::chrono::milliseconds(2)));
  REQUIRE(lim->acquire("parent"));

  constexpr std::int64_t kSpanNs = 500'000'000;  // of the child's clock
  const auto [r, status] = in_child(
      [&] {
        ChildReport rep;
        // 1: the child's clock moves (a frozen one fails here).
        if (!advances(*clock, std::chrono::milliseconds(20))) {
          rep.failed = 1;
          return rep;
        }
        // 2: 100/s with a burst of 10, polled for 0.5 s of the clock's time.
        const Nanos c0 = clock->now();
        const auto s0 = std::chrono::steady_clock::now();
        const auto give_up = s0 + std::chrono::seconds(20);
        Nanos c1 = c0;
        Nanos prev = c0;
        while ((c1 = clock->now()) - c0 < Nanos{kSpanNs}) {
          if (std::chrono::steady_clock::now() > give_up) {
            rep.failed = 2;
            return rep;
          }
          const std::int64_t step = (c1 - prev).count();
          prev = c1;
          rep.largest_step_ns = std::max(rep.largest_step_ns, step);
          // ceil(step / 10 ms) - 1 tokens past the first, rounded up.
          rep.lost_bound +=
              std::max<std::int64_t>(0, (step + 9'999'999) / 10'000'000 - 1);
          if (lim->acquire("child")) ++rep.admitted;
        }
        rep.cached_span_ns = (c1 - c0).count();
        rep.steady_span_ns = std::chrono::duration_cast<Nanos>(
                                 std::chrono::steady_clock::now() - s0)
                                 .count();
        // 3: a grandchild's clock moves too (fork counts are per process).
        const pid_t g = ::fork();
        if (g == 0) {
          ::_exit(advances(*clock, std::chrono::milliseconds(20)) ? 0 : 1);
        }
        int gs = -1;
        if (g < 0 || ::waitpid(g, &gs, 0) != g) {
          rep.failed = 3;
          return rep;
        }
        rep.grandchild_status = gs;
        // 4: the destructors return here (the parent's ticker is not joined
        // in the child): the limiter, the clock read here (its last copy,
        // whose ticker the child restarted) and the clock never read here.
        lim.reset();
        clock.reset();
        unread.reset();
        rep.failed = 0;
        return rep;
      },
      std::chrono::seconds(60));
  INFO("child report: failed at step "
       << r.failed << ", admitted " << r.admitted << ", clock span "
       << r.cached_span_ns << " ns, real span " << r.steady_span_ns << " ns");
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(r.failed == 0);
  CHECK(WIFEXITED(r.grandchild_status));
  CHECK(WEXITSTATUS(r.grandchild_status) == 0);
  // The oracle: a token bucket of 100/s and burst 10 whose key is new (full)
  // at the child's first acquire, over the clock times c0..c1 its acquires
  // saw, admits the burst plus one per 10 ms of that span: 10 + floor(span /
  // 10 ms) at most. An acquire every few microseconds keeps the bucket below
  // full, so no refill is lost to a late tick, and takes each token as it
  // comes, bar the last (its acquire may have read the clock just before it
  // ticked): 10 + floor(span / 10 ms) - 1 at least. A frozen clock admits 10.
  // On a loaded machine the child (or its ticker) can be descheduled: the
  // clock then steps by a long way between two of the loop's reads, and a
  // bucket holding up to 9 tokens before the step loses what the step
  // refills past the tenth. The child counts, for each step, every token it
  // refills past one (a sound bound whatever the bucket held), and the
  // oracle's lower bound drops by that much; a clock that froze for good
  // still fails (it never spans kSpanNs).
  const std::int64_t tokens = r.cached_span_ns / 10'000'000;
  INFO("largest clock step between reads "
       << r.largest_step_ns << " ns, refill possibly lost " << r.lost_bound
       << " tokens");
  CHECK(r.cached_span_ns >= kSpanNs);
  CHECK(r.admitted <= 10 + tokens);
  CHECK(r.admitted >= 10 + tokens - 1 - r.lost_bound);
  // The clock moved in small steps for part of the span at least.
  CHECK(r.lost_bound < tokens);
  // The clock did not run ahead of real time in the child.
  CHECK(r.cached_span_ns <= r.steady_span_ns + 1'000'000);

  // The parent's clock and limiter are untouched by the child.
  REQUIRE(advances(*clock, std::chrono::milliseconds(2)));
  REQUIRE(advances(*unread, std::chrono::milliseconds(2)));
  CHECK(lim->peek("parent", 0).allowed);
}
