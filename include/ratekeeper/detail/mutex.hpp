// ratekeeper/detail/mutex.hpp: a std::mutex that clang's thread-safety
// analysis understands.
//
// Internal. Defines detail::Mutex and detail::MutexLock, its scoped guard.
// Both carry abseil's thread-safety attributes, so clang's -Wthread-safety
// checks every ABSL_GUARDED_BY(mu).
//
// Why not absl::Mutex: Debian 12's abseil is a prebuilt shared library built
// in debug mode, so every absl::Mutex::Lock runs abseil's deadlock detector
// (a global lock-order graph): 45.5 ns per lock and unlock against 4.4 ns
// for std::mutex on the same machine (BM_Floor_Mutex_Absl and _Std in
// ratekeeper_bench; switching detection off is a process-wide setting a
// library must not change). ratekeeper uses
// none of what absl::Mutex adds (conditions, reader locks). A std::mutex
// is also seen by ThreadSanitizer through its pthread interceptors, where a
// prebuilt uninstrumented abseil is not.
#ifndef RATEKEEPER_DETAIL_MUTEX_HPP_
#define RATEKEEPER_DETAIL_MUTEX_HPP_

#include <mutex>

#include "absl/base/thread_annotations.h"

// RATEKEEPER_TSAN: defined when compiled with -fsanitize=thread (g++ or
// clang), for the code that must take another path under ThreadSanitizer.
#if defined(__SANITIZE_THREAD__)
#  define RATEKEEPER_TSAN 1
#elif defined(__has_feature)
#  if __has_feature(thread_sanitizer)
#    define RATEKEEPER_TSAN 1
#  endif
#endif

namespace ratekeeper::detail {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  bool try_lock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) {
    return mu_.try_lock();
  }

 private:
  std::mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->lock();
  }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_MUTEX_HPP_
