// ShardedStore's interleavings, driven deterministically through its test
// hook (RATEKEEPER_SHARDED_TEST_HOOKS, this binary only): a move, an
// eviction or a reclaim landing between a call's compare-and-swap and its
// check of the slot (issue 13, case 7). The free-running versions are the
// eight-thread stress tests in concurrency_test.cpp, under TSan in CI.
#define RATEKEEPER_SHARDED_TEST_HOOKS 1

#include <chrono>
#include <string>

#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {

using Store = ShardedStore<TokenBucket::State>;
using Lim = Limiter<TokenBucket, ShardedStore, ManualClock>;

struct Hook {
  Store* store;
  std::string key;
  bool evict = false;
  int fired = 0;
  bool relocated = false;
  bool shard_was_free = true;
};

void relocate(void* arg) {
  auto* h = static_cast<Hook*>(arg);
  ++h->fired;
  h->shard_was_free = h->store->test_shard_free(h->key);
  if (h->shard_was_free)
    h->relocated = h->store->test_relocate(h->key, h->evict);
}

struct Armed {
  explicit Armed(Hook& h) {
    Store::after_swap_hook = &relocate;
    Store::after_swap_arg = &h;
  }
  ~Armed() {
    Store::after_swap_hook = nullptr;
    Store::after_swap_arg = nullptr;
  }
};

}  // namespace

TEST_CASE("seams 7: a take whose slot moves after its swap counts once",
          "[seams][sharded]") {
  ManualClock clock;  // frozen: nothing refills
  Lim lim(TokenBucket::create(per_second(1), 10).value(),
          ShardedOptions{.capacity = 64, .shards = 1, .seed = 42}, clock);
  REQUIRE(lim.acquire("k", 1).allowed);  // held now
  Hook h{&lim.store(), "k"};
  {
    Armed armed(h);
    REQUIRE(lim.acquire("k", 4).allowed);
  }
  REQUIRE(h.fired >= 1);
  REQUIRE(h.relocated);
  // Before: the call saw its slot's word change, ran again in the new slot,
  // and took 8 (4 twice): remaining 1.
  CHECK(lim.peek("k", 0).remaining == 5);
  CHECK(lim.store().test_ambiguous() == 0);
}

TEST_CASE("seams 7: a take whose slot is evicted after its swap counts once",
          "[seams][sharded]") {
  ManualClock clock;
  Lim lim(TokenBucket::create(per_second(1), 10).value(),
          ShardedOptions{.capacity = 64, .shards = 1, .seed = 42}, clock);
  REQUIRE(lim.acquire("k", 1).allowed);
  Hook h{&lim.store(), "k", /*evict=*/true};
  {
    Armed armed(h);
    REQUIRE(lim.acquire("k", 4).allowed);
  }
  REQUIRE(h.relocated);
  // The key returns from its summary cell, with the take in it once.
  CHECK(lim.store().probe_distance("k") == std::nullopt);
  CHECK(lim.peek("k", 0).remaining == 5);
  CHECK(lim.acquire("k", 5).allowed);
  CHECK_FALSE(lim.acquire("k", 1).allowed);
}

TEST_CASE("seams 7: a give-back cannot race a move: it holds the shard",
          "[seams][sharded]") {
  ManualClock clock;
  Lim lim(TokenBucket::create(per_second(1), 10).value(),
          ShardedOptions{.capacity = 64, .shards = 1, .seed = 42}, clock);
  Taken t = lim.take("k", 10);
  REQUIRE(t);
  Hook h{&lim.store(), "k"};
  {
    Armed armed(h);
    REQUIRE(lim.settle(t.receipt, 5).ok());  // give back 5
  }
  REQUIRE(h.fired >= 1);
  CHECK_FALSE(h.shard_was_free);  // no move could run in between
  // Then move it for real: the state moves with the give-back in it, once.
  REQUIRE(lim.store().test_relocate("k", false));
  // Before: the give-back ran twice (10 back: a frozen bucket of 10 then
  // admitted 10 more, 20 at one instant).
  CHECK_FALSE(lim.acquire("k", 10).allowed);
  CHECK(lim.acquire("k", 5).allowed);
  CHECK_FALSE(lim.acquire("k", 1).allowed);
}

TEST_CASE("seams 7: a peek finds a key while it is being moved",
          "[seams][sharded]") {
  ManualClock clock;
  Lim lim(TokenBucket::create(per_second(1), 10).value(),
          ShardedOptions{.capacity = 64, .shards = 1, .seed = 42}, clock);
  REQUIRE(lim.acquire("k", 7).allowed);
  for (int i = 0; i < 5; ++i) {
    REQUIRE(lim.store().test_relocate("k", false));
    CHECK(lim.peek("k", 0).remaining == 3);
  }
}
