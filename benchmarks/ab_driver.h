// What the A/B drivers in benchmarks/ share: a pool of real threads, as the kernel gets from XLA, whose tasks of one
// call are joined before the clock stops; a clock in milliseconds; medians.
#ifndef LCNN_JAX_BENCHMARKS_AB_DRIVER_H_
#define LCNN_JAX_BENCHMARKS_AB_DRIVER_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace ab {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) : threads_(threads) {}
  int64_t num_threads() const { return threads_; }
  template <typename Task>
  void Schedule(Task&& task) {
    std::lock_guard<std::mutex> lock(mutex_);
    running_.emplace_back(std::forward<Task>(task));
  }
  void Join() {
    for (std::thread& t : running_) t.join();
    running_.clear();
  }

 private:
  int threads_;
  std::mutex mutex_;
  std::vector<std::thread> running_;
};

inline double Millis() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace ab

#endif  // LCNN_JAX_BENCHMARKS_AB_DRIVER_H_
