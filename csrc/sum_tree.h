// Sum and min trees over transition priorities, for proportional prioritized replay.
//
// Leaves hold priority**alpha, 0 for slots that must never be drawn (start-stack
// frames, incomplete n-step windows, the invalid region next to the write cursor).
// Each parent is recomputed from its two children on every update, never adjusted
// by a delta, so the root equals the sum of the leaves up to one rounding per level
// however long the buffer runs. The min tree ignores zero leaves.
//
// Not thread-safe: the replay buffer guards its tree with a mutex.
#pragma once

#include <cstdint>
#include <vector>

namespace fastdqn {

class SumTree {
 public:
  explicit SumTree(int64_t num_leaves);

  int64_t NumLeaves() const { return num_leaves_; }
  double Total() const { return sum_[1]; }
  // The smallest nonzero leaf; +inf while every leaf is zero.
  double MinNonzero() const { return min_[1]; }

  double Get(int64_t leaf) const { return sum_[first_leaf_ + leaf]; }
  void Set(int64_t leaf, double value);

  // The leaf whose cumulative range holds mass in [0, Total()). Rounding can land on
  // a zero leaf at the edge of a range; callers treat that draw as rejected.
  int64_t Find(double mass) const;

  // Leaves are all the persistent state: the inner nodes are rebuilt from them.
  void Rebuild(const double* leaves);

 private:
  int64_t num_leaves_;
  int64_t first_leaf_;  // a power of two: leaves are sum_[first_leaf_, first_leaf_ + num_leaves_)
  std::vector<double> sum_;
  std::vector<double> min_;
};

}  // namespace fastdqn
