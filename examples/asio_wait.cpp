// asio_wait: waiting for a rate limit in an event loop, without a thread
// per waiter (issue 17; docs/waiting.md).
//
// Each request reserves its place on a token bucket (Limiter::reserve): the
// capacity is held at once and the answer says "go at go_at". A standalone
// Asio steady_timer waits until then on the loop's one thread, and the call
// proceeds. Some requests are cancelled while they wait (a client went
// away): the timer is cancelled and the receipt given back, so the requests
// behind them go earlier by exactly the time the cancelled ones held.
//
// The output is checked by a test (examples/CMakeLists.txt): every request
// that was not cancelled ran, in arrival order, never before its go_at, and
// the cancelled capacity came back.
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
  std::unique_ptr<asio::steady_timer> timer;
  bool cancelled = false;
  bool ran = false;
  rk::Nanos ran_at{0};
};

}  // namespace

int main() {
  // 50 requests per second (20 ms each), a burst of 2.
  rk::Limiter<rk::TokenBucket> limiter(
      rk::TokenBucket::create(rk::per_second(50), 2).value());
  asio::io_context io;
  constexpr int kRequests = 12;
  std::vector<Request> requests(kRequests);
  std::vector<int> order;
  int early = 0;

  for (int i = 0; i < kRequests; ++i) {
    Request& r = requests[static_cast<std::size_t>(i)];
    r.id = i;
    // Wait at most a second; the whole queue needs about 200 ms.
    r.place = limiter.reserve("upstream", 1, std::chrono::seconds(1));
    if (!r.place.held) {
      std::printf("request %d refused: retry in %lld ns\n", i,
                  static_cast<long long>(r.place.decision.retry_after.count()));
      return 1;
    }
    r.timer = std::make_unique<asio::steady_timer>(io);
    r.timer->expires_at(to_time_point(r.place.go_at));
    r.timer->async_wait([&, i](const asio::error_code& ec) {
      Request& q = requests[static_cast<std::size_t>(i)];
      if (ec == asio::error::operation_aborted) return;  // cancelled
      q.ran = true;
      q.ran_at = limiter.now();
      if (q.ran_at < q.place.go_at) ++early;
      order.push_back(q.id);
      // The call proceeds here: its capacity was held since reserve().
    });
  }

  // Requests 7 and 9 are cancelled before their turn: their timers stop,
  // their receipts give the capacity back.
  const rk::Nanos full_before = limiter.peek("upstream", 0).reset_after;
  for (const int i : {7, 9}) {
    Request& r = requests[static_cast<std::size_t>(i)];
    r.cancelled = true;
    r.timer->cancel();
    if (!limiter.give_back(r.place.receipt).ok()) return 1;
  }
  const rk::Nanos full_after = limiter.peek("upstream", 0).reset_after;
  // Two requests of 20 ms each came back: the bucket is full again 40 ms
  // sooner (the difference of the two reads adds the time between them).
  const rk::Nanos returned = full_before - full_after;
  const bool gave_back = returned >= std::chrono::milliseconds(40) &&
                         returned < std::chrono::milliseconds(60);

  io.run();

  bool in_order = true;
  for (std::size_t k = 1; k < order.size(); ++k) {
    in_order = in_order && order[k] > order[k - 1];
  }
  int ran = 0;
  for (const Request& r : requests) ran += r.ran ? 1 : 0;
  std::printf(
      "ran %d of %d, cancelled 2, in order: %s, early: %d, "
      "cancelled capacity returned: %s\n",
      ran, kRequests, in_order ? "yes" : "no", early, gave_back ? "yes" : "no");
  const bool ok = ran == kRequests - 2 && in_order && early == 0 && gave_back;
  std::printf("%s\n", ok ? "asio_wait: OK" : "asio_wait: FAILED");
  return ok ? 0 : 1;
}
