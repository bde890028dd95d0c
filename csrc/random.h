// Counter-based random numbers for sampling.
//
// Every Sample() call takes the next value of an atomic call counter and seeds a
// SplitMix64 stream from (seed, call). Sampling threads therefore share no mutable
// RNG state, and the whole RNG state of a buffer is two integers that save/load
// can restore, so a loaded buffer draws exactly the batches the original would.
#pragma once

#include <cstdint>

namespace fastdqn {

inline uint64_t Mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

class SplitMix64 {
 public:
  SplitMix64(uint64_t seed, uint64_t stream) : state_(Mix64(seed) ^ Mix64(stream + 0x632be59bd9b4e019ULL)) {}

  uint64_t Next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    return Mix64(state_);
  }

  // Uniform in [0, n) by multiply-high; the bias is below n / 2^64.
  uint64_t Below(uint64_t n) { return static_cast<uint64_t>((static_cast<unsigned __int128>(Next()) * n) >> 64); }

  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

 private:
  uint64_t state_;
};

}  // namespace fastdqn
