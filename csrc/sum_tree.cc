#include "sum_tree.h"

#include <algorithm>
#include <limits>

namespace fastdqn {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
}

SumTree::SumTree(int64_t num_leaves) : num_leaves_(num_leaves), first_leaf_(1) {
  while (first_leaf_ < num_leaves_) first_leaf_ *= 2;
  sum_.assign(2 * first_leaf_, 0.0);
  min_.assign(2 * first_leaf_, kInf);
}

void SumTree::Set(int64_t leaf, double value) {
  int64_t node = first_leaf_ + leaf;
  sum_[node] = value;
  min_[node] = value != 0.0 ? value : kInf;
  for (node /= 2; node >= 1; node /= 2) {
    sum_[node] = sum_[2 * node] + sum_[2 * node + 1];
    min_[node] = std::min(min_[2 * node], min_[2 * node + 1]);
  }
}

int64_t SumTree::Find(double mass) const {
  int64_t node = 1;
  while (node < first_leaf_) {
    const double left = sum_[2 * node];
    if (mass < left) {
      node = 2 * node;
    } else {
      mass -= left;
      node = 2 * node + 1;
    }
  }
  return std::min(node - first_leaf_, num_leaves_ - 1);
}

void SumTree::Rebuild(const double* leaves) {
  for (int64_t i = 0; i < first_leaf_; ++i) {
    const double value = i < num_leaves_ ? leaves[i] : 0.0;
    sum_[first_leaf_ + i] = value;
    min_[first_leaf_ + i] = value != 0.0 ? value : kInf;
  }
  for (int64_t node = first_leaf_ - 1; node >= 1; --node) {
    sum_[node] = sum_[2 * node] + sum_[2 * node + 1];
    min_[node] = std::min(min_[2 * node], min_[2 * node + 1]);
  }
}

}  // namespace fastdqn
