// ratekeeper/detail/mutex.hpp: absl::Mutex, visible to ThreadSanitizer.
//
// Internal. Defines detail::Mutex, an absl::Mutex whose Lock and Unlock are
// annotated for ThreadSanitizer, and detail::MutexLock, its scoped guard.
//
// Why: Debian's abseil is a prebuilt shared library, not compiled with
// -fsanitize=thread, so TSan cannot see the happens-before edges that
// absl::Mutex creates and reports every access it guards as a race. An abseil
// built with TSan annotates its mutex itself, with these same calls
// (__tsan_mutex_pre_lock and friends); here ratekeeper makes them around the
// calls instead. Outside TSan builds they compile to nothing and this is
// exactly absl::Mutex. Both classes carry abseil's thread-safety attributes,
// so clang's -Wthread-safety checks every ABSL_GUARDED_BY(mu_).
#ifndef RATEKEEPER_DETAIL_MUTEX_HPP_
#define RATEKEEPER_DETAIL_MUTEX_HPP_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

#if defined(__SANITIZE_THREAD__)
#  define RATEKEEPER_TSAN 1
#elif defined(__has_feature)
#  if __has_feature(thread_sanitizer)
#    define RATEKEEPER_TSAN 1
#  endif
#endif

#ifdef RATEKEEPER_TSAN
#  include <sanitizer/tsan_interface.h>
#endif

namespace ratekeeper::detail {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() {
#ifdef RATEKEEPER_TSAN
    __tsan_mutex_create(this, 0);
#endif
  }
  ~Mutex() {
#ifdef RATEKEEPER_TSAN
    __tsan_mutex_destroy(this, 0);
#endif
  }
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() {
#ifdef RATEKEEPER_TSAN
    __tsan_mutex_pre_lock(this, 0);
#endif
    mu_.Lock();
#ifdef RATEKEEPER_TSAN
    __tsan_mutex_post_lock(this, 0, 0);
#endif
  }

  void unlock() ABSL_UNLOCK_FUNCTION() {
#ifdef RATEKEEPER_TSAN
    __tsan_mutex_pre_unlock(this, 0);
#endif
    mu_.Unlock();
#ifdef RATEKEEPER_TSAN
    __tsan_mutex_post_unlock(this, 0);
#endif
  }

 private:
  absl::Mutex mu_;
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
