// asio_wait: waiting for a rate limit in an event loop, without a thread
// per waiter (issue 17; docs/waiting.md).
//
// Each request reserves its place on a token bucket (Limiter::reserve): the
// capacity is held at once and the answer says "go at go_at". A standalone
// Asio steady_timer waits until then on the loop's one thread, and the call
// proceeds. Some requests are cancelled while they wait (a client went
// away): the timer is cancelled and the receipt given back, and the timers
// of the requests behind are re-armed earlier by the time the give-back
// returned. Cancelled before its go_at, a reservation returns the whole of
// its time, Reserved::holds (the bucket moves later go times by holds or
// holds + 1 ns: moving them by holds is exact or 1 ns late, never early).
// Cancelled after its go_at, it returns only the part still ahead: this
// example then moves nothing (late, never early); Waiter (waiting.hpp)
// measures what was returned.
//
// The output is checked by a test (examples/CMakeLists.txt): every request
// that was not cancelled ran, in arrival order, never before its go_at; the
// ones behind a cancelled request had their go_at moved earlier by exactly
// the holds of those cancelled ahead of them, and ran before the time they
// were first given; the bucket got the cancelled capacity back.
#include <asio.hpp>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/token_bucket.hpp"

namespace rk = ratekeeper;

namespace {

// SteadyClock's nanoseconds are std::chrono::steady_clock's: a go_at is a
// steady_clock time point.
std::chrono::steady_clock::time_point to_time_point(rk::Nanos t) {
  return std::chrono::steady_clock::time_point(
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(t));
}

struct Request {
  int id = 0;
  rk::Reserved place;
  rk::Nanos first_go{0};  // go_at as reserved, before any move
  std::unique_ptr<asio::steady_timer> timer;
  bool cancelled = false;
  bool ran = false;
  rk::Nanos ran_at{0};
};

}  // namespace

int main() {
  // 5 requests per second (200 ms each), a burst of 2.
  rk::Limiter<rk::TokenBucket> limiter(
      rk::TokenBucket::create(rk::per_second(5), 2).value());
  asio::io_context io;
  constexpr int kRequests = 12;
  std::vector<Request> requests(kRequests);
  std::vector<int> order;
  int early = 0;

  // Arms request i's timer for its go_at (re-arming cancels the wait before:
  // that handler sees operation_aborted and does nothing).
  const auto arm = [&](int i) {
    Request& r = requests[static_cast<std::size_t>(i)];
    r.timer->expires_at(to_time_point(r.place.go_at));
    r.timer->async_wait([&, i](const asio::error_code& ec) {
      Request& q = requests[static_cast<std::size_t>(i)];
      if (ec == asio::error::operation_aborted) return;  // cancelled, moved
      q.ran = true;
      q.ran_at = limiter.now();
      if (q.ran_at < q.place.go_at) ++early;
      order.push_back(q.id);
      // The call proceeds here: its capacity was held since reserve().
    });
  };

  for (int i = 0; i < kRequests; ++i) {
    Request& r = requests[static_cast<std::size_t>(i)];
    r.id = i;
    // Wait at most three seconds; the whole queue needs about 2.2 s.
    r.place = limiter.reserve("upstream", 1, std::chrono::seconds(3));
    if (!r.place.held) {
      std::printf("request %d refused: retry in %lld ns\n", i,
                  static_cast<long long>(r.place.decision.retry_after.count()));
      return 1;
    }
    r.first_go = r.place.go_at;
    r.timer = std::make_unique<asio::steady_timer>(io);
    arm(i);
  }

  // Requests 7 and 9 are cancelled before their turn, front to back: their
  // timers stop, their receipts give the capacity back, and the requests
  // behind them are re-armed earlier.
  const rk::Nanos full_before = limiter.peek("upstream", 0).reset_after;
  rk::Nanos held{0};
  for (const int i : {7, 9}) {
    Request& r = requests[static_cast<std::size_t>(i)];
    r.cancelled = true;
    r.timer->cancel();
    const bool before_its_turn = limiter.now() < r.place.go_at;
    if (!limiter.give_back(r.place.receipt).ok()) return 1;
    const rk::Nanos by = before_its_turn ? r.place.holds : rk::Nanos{0};
    held += r.place.holds;
    for (int j = i + 1; j < kRequests; ++j) {
      Request& later = requests[static_cast<std::size_t>(j)];
      if (later.cancelled) continue;
      later.place.go_at -= by;
      arm(j);
    }
  }
  const rk::Nanos full_after = limiter.peek("upstream", 0).reset_after;
  // Two requests of 200 ms each came back: the bucket is full again 400 ms
  // sooner (the difference of the two reads adds the time between them).
  const rk::Nanos returned = full_before - full_after;
  const bool gave_back = held == std::chrono::milliseconds(400) &&
                         returned >= held &&
                         returned < held + std::chrono::milliseconds(20);

  io.run();

  bool in_order = true;
  for (std::size_t k = 1; k < order.size(); ++k) {
    in_order = in_order && order[k] > order[k - 1];
  }
  // The moves: a request behind k cancelled ones goes k x 200 ms earlier
  // than first given, and ran before that first time (a timer late by
  // under 200 ms).
  bool moved = true;
  int ran = 0;
  for (const Request& r : requests) {
    if (r.cancelled) continue;
    ran += r.ran ? 1 : 0;
    const int ahead = (r.id > 7 ? 1 : 0) + (r.id > 9 ? 1 : 0);
    const rk::Nanos want = r.first_go - std::chrono::milliseconds(200) * ahead;
    const bool ran_earlier = ahead == 0 || r.ran_at < r.first_go;
    std::printf(
        "request %2d: first go +%4lld ms, go +%4lld ms, ran +%4lld ms\n", r.id,
        static_cast<long long>((r.first_go - requests[0].first_go) /
                               std::chrono::milliseconds(1)),
        static_cast<long long>((r.place.go_at - requests[0].first_go) /
                               std::chrono::milliseconds(1)),
        static_cast<long long>((r.ran_at - requests[0].first_go) /
                               std::chrono::milliseconds(1)));
    moved = moved && r.place.go_at == want && ran_earlier;
  }
  std::printf(
      "ran %d of %d, cancelled 2, in order: %s, early: %d, "
      "moved by the cancelled holds: %s, "
      "cancelled capacity returned: %s\n",
      ran, kRequests, in_order ? "yes" : "no", early, moved ? "yes" : "no",
      gave_back ? "yes" : "no");
  const bool ok =
      ran == kRequests - 2 && in_order && early == 0 && moved && gave_back;
  std::printf("%s\n", ok ? "asio_wait: OK" : "asio_wait: FAILED");
  return ok ? 0 : 1;
}
