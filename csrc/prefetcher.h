// Fills batches on a worker thread while the caller trains on the previous one.
//
// The caller hands over `depth` output slots. The worker samples into free slots in
// ring order; Next() hands the caller the oldest ready slot and, in the same call,
// frees the slot handed out before, so a batch stays valid until the next Next().
// An error on the worker (an empty buffer, say) is raised by the following Next().
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "replay_buffer.h"

namespace fastdqn {

class Prefetcher {
 public:
  Prefetcher(std::shared_ptr<ReplayBuffer> buffer, std::vector<BatchOutput> slots);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Blocks until a batch is ready and returns its slot.
  int64_t Next();
  // Stops and joins the worker; idempotent.
  void Close();

 private:
  enum class SlotState { kFree, kReady };
  void Run();

  std::shared_ptr<ReplayBuffer> buffer_;
  std::vector<BatchOutput> slots_;
  std::vector<SlotState> states_;
  std::mutex mutex_;
  std::condition_variable changed_;
  int64_t next_fill_ = 0;
  int64_t next_take_ = 0;
  int64_t in_use_ = -1;
  bool closed_ = false;
  std::exception_ptr error_;
  std::thread worker_;
};

}  // namespace fastdqn
