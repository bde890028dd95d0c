#include "prefetcher.h"

#include <stdexcept>
#include <utility>

namespace fastdqn {

Prefetcher::Prefetcher(std::shared_ptr<ReplayBuffer> buffer, std::vector<BatchOutput> slots)
    : buffer_(std::move(buffer)), slots_(std::move(slots)), states_(slots_.size(), SlotState::kFree) {
  if (slots_.empty()) throw std::invalid_argument("depth must be >= 1");
  worker_ = std::thread([this] { Run(); });
}

Prefetcher::~Prefetcher() { Close(); }

void Prefetcher::Run() {
  const int64_t depth = static_cast<int64_t>(slots_.size());
  while (true) {
    int64_t slot;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [&] { return closed_ || states_[next_fill_] == SlotState::kFree; });
      if (closed_) return;
      slot = next_fill_;
    }
    try {
      buffer_->Sample(slots_[slot], buffer_->Beta());
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::current_exception();
      changed_.notify_all();
      return;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    states_[slot] = SlotState::kReady;
    next_fill_ = (next_fill_ + 1) % depth;
    changed_.notify_all();
  }
}

int64_t Prefetcher::Next() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (in_use_ >= 0) {
    states_[in_use_] = SlotState::kFree;
    in_use_ = -1;
    changed_.notify_all();
  }
  changed_.wait(lock, [&] { return closed_ || error_ || states_[next_take_] == SlotState::kReady; });
  if (!closed_ && states_[next_take_] == SlotState::kReady) {
    in_use_ = next_take_;
    next_take_ = (next_take_ + 1) % static_cast<int64_t>(slots_.size());
    return in_use_;
  }
  if (error_) std::rethrow_exception(error_);
  throw std::runtime_error("the prefetcher is closed");
}

void Prefetcher::Close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
    changed_.notify_all();
  }
  if (worker_.joinable()) worker_.join();
}

}  // namespace fastdqn
