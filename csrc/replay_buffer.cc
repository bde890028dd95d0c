#include "replay_buffer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "random.h"

namespace fastdqn {

namespace {

enum SlotFlag : uint8_t {
  kTransition = 1,   // the slot holds a transition; otherwise it is a start frame
  kTerminated = 2,
  kTruncated = 4,
  kStackBegin = 8,   // the oldest stored frame of an episode's first observation
  kZeroPad = 16,     // with kStackBegin: older stack positions are zeros, not copies
};

// Draws after which sampling stops rejecting blindly and enumerates the valid set.
constexpr int kMaxRejections = 1000;

std::string Str(int64_t v) { return std::to_string(v); }

template <typename T>
T* Allocate(int64_t count) {
  // malloc, not new T[]() : pages stay untouched (and unbacked) until first written.
  void* p = std::malloc(static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T));
  if (p == nullptr) throw std::bad_alloc();
  return static_cast<T*>(p);
}

bool AllZero(const uint8_t* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

}  // namespace

struct ReplayBuffer::Stream {
  // Published positions; see the concurrency notes in the header.
  alignas(64) std::atomic<int64_t> begin{0};
  std::atomic<int64_t> end{0};
  // Writer state, guarded by add_mutex_.
  bool episode_open = false;
  int64_t episode_first_seq = 0;
};

struct ReplayBuffer::Pick {
  int64_t env = 0;
  int64_t seq = 0;
  int64_t stack_begin = 0;  // seqs below this are padding
  int64_t steps = 1;        // m: transitions folded into the n-step return
  bool zero_pad = false;
  bool terminated = false;
  double reward = 0.0;
  double discount = 1.0;
};

void ReplayBuffer::FreeDeleter::operator()(void* p) const { std::free(p); }

ReplayBuffer::ReplayBuffer(const BufferConfig& config) : config_(config) {
  const BufferConfig& c = config_;
  if (c.num_envs < 1) throw std::invalid_argument("num_envs must be >= 1, got " + Str(c.num_envs));
  if (c.frame_stack < 1) throw std::invalid_argument("frame_stack must be >= 1, got " + Str(c.frame_stack));
  if (c.n_step < 1) throw std::invalid_argument("n_step must be >= 1, got " + Str(c.n_step));
  if (c.frame_bytes < 1) throw std::invalid_argument("a frame must hold at least one byte");
  if (c.action_bytes < 1) throw std::invalid_argument("an action must hold at least one byte");
  if (!(c.gamma >= 0.0 && c.gamma <= 1.0)) throw std::invalid_argument("gamma must be in [0, 1], got " + std::to_string(c.gamma));
  // A row may write frame_stack + 1 slots; the invalid region next to the cursor and an
  // n-step window must still leave room to sample.
  const int64_t min_slots = 2 * (c.frame_stack + c.n_step) + 2;
  slots_per_env_ = c.capacity / c.num_envs;
  if (slots_per_env_ < min_slots) {
    // The error names the capacity as given, and how it became too few slots.
    const std::string rounded = c.capacity % c.num_envs == 0 || c.capacity < 0 ? "" : ", which rounds down to " +
        Str(slots_per_env_) + " slots per env (each env's ring holds capacity // num_envs)";
    throw std::invalid_argument("capacity must be >= " + Str(min_slots * c.num_envs) + " (" + Str(min_slots) +
                                " slots per env for frame_stack=" + Str(c.frame_stack) + ", n_step=" + Str(c.n_step) +
                                " and num_envs=" + Str(c.num_envs) + "), got " + Str(c.capacity) + rounded);
  }
  config_.capacity = slots_per_env_ * c.num_envs;
  if (c.prioritized) {
    if (!(c.alpha >= 0.0 && std::isfinite(c.alpha))) throw std::invalid_argument("alpha must be >= 0");
    if (!(c.eps > 0.0 && std::isfinite(c.eps))) {
      throw std::invalid_argument("eps must be > 0: a zero priority would hide a transition forever");
    }
  }
  stack_bytes_ = c.frame_stack * c.frame_bytes;
  frames_.reset(Allocate<uint8_t>(c.capacity * c.frame_bytes));
  actions_.reset(Allocate<uint8_t>(c.capacity * c.action_bytes));
  rewards_.reset(Allocate<float>(c.capacity));
  flags_.reset(Allocate<uint8_t>(c.capacity));
  streams_.reset(new Stream[c.num_envs]);
  if (c.prioritized) tree_ = std::make_unique<SumTree>(c.capacity);
}

ReplayBuffer::~ReplayBuffer() = default;

int64_t ReplayBuffer::StartFramesNeeded(const uint8_t* stack, bool* zero_pad) const {
  const int64_t k = config_.frame_stack, fb = config_.frame_bytes;
  auto frame = [&](int64_t i) { return stack + i * fb; };
  for (int64_t m = 1; m < k; ++m) {
    const int64_t oldest_stored = k - m;
    bool repeats = true, zeros = true;
    for (int64_t i = 0; i < oldest_stored && (repeats || zeros); ++i) {
      repeats = repeats && std::memcmp(frame(i), frame(oldest_stored), fb) == 0;
      zeros = zeros && AllZero(frame(i), fb);
    }
    if (repeats || zeros) {
      *zero_pad = !repeats;
      return m;
    }
  }
  *zero_pad = false;
  return k;
}

void ReplayBuffer::Add(const AddInput& in) {
  std::lock_guard<std::mutex> add_lock(add_mutex_);
  const int64_t k = config_.frame_stack, fb = config_.frame_bytes, ab = config_.action_bytes;
  const int64_t num_envs = config_.num_envs;

  // Validate every row before any write, so a rejected Add leaves the buffer as it was.
  std::vector<int64_t> envs(in.rows), start_frames(in.rows);
  std::vector<uint8_t> zero_pad(in.rows), seen(num_envs, 0);
  for (int64_t r = 0; r < in.rows; ++r) {
    const int64_t e = in.env_ids != nullptr ? in.env_ids[r] : r;
    if (e < 0 || e >= num_envs) throw std::invalid_argument("env_ids[" + Str(r) + "]=" + Str(e) + " is not in [0, num_envs)");
    if (seen[e]) throw std::invalid_argument("env_ids holds env " + Str(e) + " twice");
    seen[e] = 1;
    envs[r] = e;
    if (!std::isfinite(in.rewards[r])) throw std::invalid_argument("rewards[" + Str(r) + "] is not finite");
    const uint8_t* obs = in.obs + r * stack_bytes_;
    const Stream& st = streams_[e];
    if (st.episode_open) {
      // All k frames, padding included, not only the newest: samples rebuild obs from the
      // ring, so a frame that differs here would come back as one that was never added.
      Pick previous;  // the open episode's last next_obs, as a sample would rebuild it
      previous.env = e;
      previous.seq = st.end.load(std::memory_order_relaxed);
      FindStackBegin(&previous);
      for (int64_t j = k - 1; j >= 0; --j) {
        const uint8_t* stored = StackFrame(previous, previous.seq - k + j);
        if (stored != nullptr ? std::memcmp(obs + j * fb, stored, fb) != 0 : !AllZero(obs + j * fb, fb)) {
          throw std::invalid_argument("obs[" + Str(r) + "] does not continue env " + Str(e) +
                                      "'s episode: it differs from the previous next_obs (in frame " + Str(j) +
                                      " of " + Str(k) + "). Add the steps of an episode in order, and never a "
                                      "step that only resets the env.");
        }
      }
    } else {
      bool zp = false;
      start_frames[r] = StartFramesNeeded(obs, &zp);
      zero_pad[r] = zp;
    }
    // The ring keeps only next_obs's newest frame; its older ones are rebuilt from obs's.
    if (std::memcmp(in.next_obs + r * stack_bytes_, obs + fb, (k - 1) * fb) != 0) {
      throw std::invalid_argument("next_obs[" + Str(r) + "] does not follow obs[" + Str(r) + "]: with frame_stack " +
                                  Str(k) + ", next_obs's oldest " + Str(k - 1) + " frames must be obs's newest " +
                                  Str(k - 1));
    }
  }

  // Publish what will be overwritten before writing it. A prioritized buffer first takes
  // the transitions that lose frames out of the tree, under the tree lock, so that
  // neither a draw nor a priority update can pick them once `begin` moves.
  {
    std::unique_lock<std::mutex> tree_lock(tree_mutex_, std::defer_lock);
    if (tree_) tree_lock.lock();
    for (int64_t r = 0; r < in.rows; ++r) {
      Stream& st = streams_[envs[r]];
      const int64_t end = st.end.load(std::memory_order_relaxed);
      const int64_t new_end = end + start_frames[r] + 1;
      st.begin.store(new_end, std::memory_order_relaxed);
      if (tree_) InvalidateBefore(envs[r], ValidFloor(end), ValidFloor(new_end));
    }
  }
  std::atomic_thread_fence(std::memory_order_release);

  int64_t held_delta = 0;
  auto claim = [&](int64_t e, int64_t seq) {
    const int64_t row = Row(e, seq);
    if (seq >= slots_per_env_ && (flags_[row] & kTransition)) --held_delta;
    return row;
  };
  for (int64_t r = 0; r < in.rows; ++r) {
    const int64_t e = envs[r];
    Stream& st = streams_[e];
    int64_t seq = st.end.load(std::memory_order_relaxed);
    const uint8_t* obs = in.obs + r * stack_bytes_;
    for (int64_t j = 0; j < start_frames[r]; ++j, ++seq) {
      const int64_t row = claim(e, seq);
      std::memcpy(frames_.get() + row * fb, obs + (k - start_frames[r] + j) * fb, fb);
      // A frame-only row has no action or reward; zeroed, so that save writes no stale heap bytes.
      std::memset(actions_.get() + row * ab, 0, ab);
      rewards_[row] = 0.0f;
      flags_[row] = j == 0 ? static_cast<uint8_t>(kStackBegin | (zero_pad[r] ? kZeroPad : 0)) : 0;
    }
    if (!st.episode_open) st.episode_first_seq = seq;
    const int64_t row = claim(e, seq);
    std::memcpy(frames_.get() + row * fb, in.next_obs + r * stack_bytes_ + (k - 1) * fb, fb);
    std::memcpy(actions_.get() + row * ab, in.actions + r * ab, ab);
    rewards_[row] = in.rewards[r];
    flags_[row] = kTransition | (in.terminated[r] ? kTerminated : 0) | (in.truncated[r] ? kTruncated : 0);
    ++held_delta;
    st.episode_open = !(in.terminated[r] || in.truncated[r]);
  }
  transitions_held_.fetch_add(held_delta, std::memory_order_release);
  for (int64_t r = 0; r < in.rows; ++r) {
    Stream& st = streams_[envs[r]];
    st.end.store(st.begin.load(std::memory_order_relaxed), std::memory_order_release);
  }

  if (tree_) {
    std::lock_guard<std::mutex> tree_lock(tree_mutex_);
    for (int64_t r = 0; r < in.rows; ++r) {
      // The new transition completes the n-step window of the one n-1 before it, or, when
      // the episode ends here, of every transition of the episode still waiting for one.
      const Stream& st = streams_[envs[r]];
      const int64_t last = st.end.load(std::memory_order_relaxed) - 1;
      const int64_t first = last - config_.n_step + 1;
      PrioritizeCompleted(envs[r], first, st.episode_open ? first : last);
    }
  }
}

void ReplayBuffer::EndEpisodes(const int64_t* env_ids, int64_t count) {
  if (env_ids == nullptr) count = config_.num_envs;
  for (int64_t i = 0; env_ids != nullptr && i < count; ++i) {
    if (env_ids[i] < 0 || env_ids[i] >= config_.num_envs) {
      throw std::invalid_argument("env_ids[" + Str(i) + "]=" + Str(env_ids[i]) + " is not in [0, num_envs)");
    }
  }
  std::lock_guard<std::mutex> add_lock(add_mutex_);
  std::unique_lock<std::mutex> tree_lock(tree_mutex_, std::defer_lock);
  if (tree_) tree_lock.lock();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t e = env_ids != nullptr ? env_ids[i] : i;
    Stream& st = streams_[e];
    if (!st.episode_open) continue;
    // An open episode holds at least one transition, the last slot written.
    const int64_t last = st.end.load(std::memory_order_relaxed) - 1;
    flags_[Row(e, last)] |= kTruncated;
    st.episode_open = false;
    // Windows that reach `last` complete now; the one that ends there already had.
    if (tree_) PrioritizeCompleted(e, last - config_.n_step + 2, last);
  }
}

void ReplayBuffer::InvalidateBefore(int64_t env, int64_t old_floor, int64_t new_floor) {
  for (int64_t q = old_floor; q < new_floor; ++q) tree_->Set(Row(env, q), 0.0);
}

void ReplayBuffer::PrioritizeCompleted(int64_t env, int64_t first, int64_t last) {
  const double leaf = std::pow(max_priority_, config_.alpha);
  for (int64_t q = std::max(streams_[env].episode_first_seq, first); q <= last; ++q) tree_->Set(Row(env, q), leaf);
}

bool ReplayBuffer::Resolve(Pick* pick, int64_t end) const {
  const int64_t e = pick->env, q = pick->seq;
  if (q < ValidFloor(end) || q >= end || q < 0) return false;
  if (!(flags_[Row(e, q)] & kTransition)) return false;

  double reward = 0.0, discount = 1.0;
  int64_t steps = 0;
  bool ended = false, terminated = false;
  while (steps < config_.n_step && !ended) {
    const int64_t s = q + steps;
    if (s >= end) return false;  // the n-step window is not complete yet
    const int64_t row = Row(e, s);
    reward += discount * rewards_[row];
    discount *= config_.gamma;
    ++steps;
    ended = flags_[row] & (kTerminated | kTruncated);
    terminated = flags_[row] & kTerminated;
  }
  pick->reward = reward;
  pick->steps = steps;
  pick->terminated = terminated;
  pick->discount = terminated ? 0.0 : discount;

  FindStackBegin(pick);
  return true;
}

void ReplayBuffer::FindStackBegin(Pick* pick) const {
  const int64_t q = pick->seq, k = config_.frame_stack;
  pick->stack_begin = q - k;
  pick->zero_pad = false;
  for (int64_t s = q - 1; s >= std::max<int64_t>(q - k, 0); --s) {
    const uint8_t flags = flags_[Row(pick->env, s)];
    if (flags & kStackBegin) {
      pick->stack_begin = s;
      pick->zero_pad = flags & kZeroPad;
      break;
    }
  }
}

const uint8_t* ReplayBuffer::StackFrame(const Pick& p, int64_t seq) const {
  if (seq < p.stack_begin) {
    if (p.zero_pad) return nullptr;
    seq = p.stack_begin;
  }
  return frames_.get() + Row(p.env, seq) * config_.frame_bytes;
}

void ReplayBuffer::Copy(const Pick& p, const BatchOutput& out, int64_t b) const {
  const int64_t k = config_.frame_stack, fb = config_.frame_bytes, ab = config_.action_bytes;
  auto put = [&](uint8_t* dst, int64_t seq) {
    const uint8_t* src = StackFrame(p, seq);
    if (src != nullptr) {
      std::memcpy(dst, src, fb);
    } else {
      std::memset(dst, 0, fb);
    }
  };
  const int64_t first = p.seq - k;  // seq of the observation's oldest frame
  if (out.obs != nullptr) {
    for (int64_t j = 0; j < k; ++j) put(out.obs + (b * k + j) * fb, first + j);
  }
  if (out.next_obs != nullptr) {
    for (int64_t j = 0; j < k; ++j) put(out.next_obs + (b * k + j) * fb, first + p.steps + j);
  }
  if (out.frames != nullptr) {
    const int64_t width = k + config_.n_step;
    uint8_t* dst = out.frames + b * width * fb;
    for (int64_t j = 0; j < k + p.steps; ++j) put(dst + j * fb, first + j);
    // Past an early episode end the columns belong to no frame of this sample.
    std::memset(dst + (k + p.steps) * fb, 0, (width - k - p.steps) * fb);
    out.next_offset[b] = p.steps;
  }
  std::memcpy(out.actions + b * ab, actions_.get() + Row(p.env, p.seq) * ab, ab);
  out.rewards[b] = static_cast<float>(p.reward);
  out.terminated[b] = p.terminated ? 1.0f : 0.0f;
  out.discounts[b] = static_cast<float>(p.discount);
  out.indices[b] = p.seq * config_.num_envs + p.env;
}

void ReplayBuffer::DrawUniform(uint64_t call, uint64_t attempt, const std::vector<int64_t>& ends, Pick* picks,
                               int64_t count) const {
  const int64_t num_envs = config_.num_envs;
  // Draw over the union of the resident ranges, then reject what is not valid.
  std::vector<int64_t> cumulative(num_envs);
  int64_t total = 0;
  for (int64_t e = 0; e < num_envs; ++e) {
    total += ends[e] - std::max<int64_t>(ends[e] - slots_per_env_, 0);
    cumulative[e] = total;
  }
  if (total == 0) throw std::invalid_argument("cannot sample from an empty buffer");
  SplitMix64 rng(config_.seed + attempt * 0x9e3779b97f4a7c15ULL, call);
  std::vector<Pick> valid;  // enumerated only if blind rejection keeps failing
  for (int64_t i = 0; i < count; ++i) {
    Pick& pick = picks[i];
    bool found = false;
    for (int tries = 0; tries < kMaxRejections && !found; ++tries) {
      const int64_t r = static_cast<int64_t>(rng.Below(static_cast<uint64_t>(total)));
      const int64_t e = std::upper_bound(cumulative.begin(), cumulative.end(), r) - cumulative.begin();
      const int64_t offset = r - (e > 0 ? cumulative[e - 1] : 0);
      pick.env = e;
      pick.seq = std::max<int64_t>(ends[e] - slots_per_env_, 0) + offset;
      found = Resolve(&pick, ends[e]);
    }
    if (found) continue;
    if (valid.empty()) {
      for (int64_t e = 0; e < num_envs; ++e) {
        for (int64_t q = std::max<int64_t>(ends[e] - slots_per_env_, 0); q < ends[e]; ++q) {
          Pick candidate;
          candidate.env = e;
          candidate.seq = q;
          if (Resolve(&candidate, ends[e])) valid.push_back(candidate);
        }
      }
      if (valid.empty()) {
        throw std::invalid_argument("no transition can be sampled yet: every held transition waits for its n-step "
                                    "window to complete");
      }
    }
    pick = valid[rng.Below(valid.size())];
  }
}

void ReplayBuffer::DrawPrioritized(uint64_t call, uint64_t attempt, std::vector<int64_t>& ends, Pick* picks,
                                   int64_t count, bool stratified, double beta, float* weights) {
  SplitMix64 rng(config_.seed + attempt * 0x9e3779b97f4a7c15ULL, call);
  std::lock_guard<std::mutex> tree_lock(tree_mutex_);
  // Under the tree lock every leaf that is set belongs to a published seq.
  for (int64_t e = 0; e < config_.num_envs; ++e) ends[e] = streams_[e].end.load(std::memory_order_acquire);
  const double total = tree_->Total();
  if (!(total > 0.0)) {
    throw std::invalid_argument(Size() == 0 ? "cannot sample from an empty buffer"
                                            : "no transition can be sampled yet: every held transition waits for "
                                              "its n-step window to complete");
  }
  // (N * P(i)) ** -beta over its largest value, (N * P(min)) ** -beta, is (p_i / p_min) ** -beta:
  // computed so, it stays finite for any priorities whose total does.
  const double min_priority = tree_->MinNonzero();
  for (int64_t i = 0; i < count; ++i) {
    Pick& pick = picks[i];
    bool found = false;
    for (int tries = 0; tries < kMaxRejections && !found; ++tries) {
      // Stratified: one draw in each of `count` equal slices of the total priority.
      const double mass = stratified && tries == 0 ? (i + rng.Uniform()) * total / count : rng.Uniform() * total;
      const int64_t leaf = tree_->Find(std::min(mass, std::nextafter(total, 0.0)));
      const double priority = tree_->Get(leaf);
      const int64_t e = leaf % config_.num_envs, slot = leaf / config_.num_envs;
      if (priority == 0.0 || ends[e] <= slot) continue;
      pick.env = e;
      pick.seq = slot + (ends[e] - 1 - slot) / slots_per_env_ * slots_per_env_;
      found = Resolve(&pick, ends[e]);
      if (found) weights[i] = static_cast<float>(std::pow(priority / min_priority, -beta));
    }
    if (!found) throw std::runtime_error("prioritized sampling found no valid transition: the sum tree is inconsistent");
  }
}

void ReplayBuffer::Sample(const BatchOutput& out, double beta) {
  const int64_t batch = out.batch_size;
  if (batch <= 0) throw std::invalid_argument("batch_size must be > 0, got " + Str(batch));
  if (Size() == 0) throw std::invalid_argument("cannot sample from an empty buffer");
  if (tree_ && out.weights == nullptr) throw std::invalid_argument("a prioritized batch needs weights");
  if (tree_ && !(beta >= 0.0 && std::isfinite(beta))) throw std::invalid_argument("beta must be a finite number >= 0");
  const uint64_t call = sample_calls_.fetch_add(1, std::memory_order_relaxed);

  std::vector<Pick> picks(batch);
  std::vector<int64_t> pending(batch), ends(config_.num_envs);
  std::vector<float> weights(tree_ ? batch : 0);
  for (int64_t b = 0; b < batch; ++b) pending[b] = b;
  for (uint64_t attempt = 0; !pending.empty(); ++attempt) {
    const int64_t count = static_cast<int64_t>(pending.size());
    if (tree_) {
      DrawPrioritized(call, attempt, ends, picks.data(), count, attempt == 0, beta, weights.data());
    } else {
      for (int64_t e = 0; e < config_.num_envs; ++e) ends[e] = streams_[e].end.load(std::memory_order_acquire);
      DrawUniform(call, attempt, ends, picks.data(), count);
    }
    for (int64_t i = 0; i < count; ++i) {
      Copy(picks[i], out, pending[i]);
      if (tree_) out.weights[pending[i]] = weights[i];
    }
    // Seqlock check: redraw every sample whose frames an Add may have overwritten meanwhile.
    std::atomic_thread_fence(std::memory_order_acquire);
    int64_t torn = 0;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t begin = streams_[picks[i].env].begin.load(std::memory_order_relaxed);
      if (picks[i].seq < ValidFloor(begin)) pending[torn++] = pending[i];
    }
    pending.resize(torn);
  }
}

void ReplayBuffer::Get(const int64_t* indices, int64_t count, const BatchOutput& out) const {
  std::vector<Pick> picks(count);
  for (int64_t i = 0; i < count; ++i) {
    if (indices[i] < 0) throw std::invalid_argument("indices[" + Str(i) + "] is negative");
    picks[i].env = indices[i] % config_.num_envs;
    picks[i].seq = indices[i] / config_.num_envs;
    if (!Resolve(&picks[i], streams_[picks[i].env].end.load(std::memory_order_acquire))) {
      throw std::invalid_argument("indices[" + Str(i) + "]=" + Str(indices[i]) + " is not a valid transition");
    }
  }
  for (int64_t i = 0; i < count; ++i) Copy(picks[i], out, i);
}

std::vector<int64_t> ReplayBuffer::ValidIndices() const {
  std::vector<int64_t> indices;
  for (int64_t e = 0; e < config_.num_envs; ++e) {
    const int64_t end = streams_[e].end.load(std::memory_order_acquire);
    for (int64_t q = std::max<int64_t>(end - slots_per_env_, 0); q < end; ++q) {
      Pick pick;
      pick.env = e;
      pick.seq = q;
      if (Resolve(&pick, end)) indices.push_back(q * config_.num_envs + e);
    }
  }
  std::sort(indices.begin(), indices.end());
  return indices;
}

void ReplayBuffer::UpdatePriorities(const int64_t* indices, const double* priorities, int64_t count) {
  if (!tree_) throw std::invalid_argument("update_priorities needs a prioritized buffer");
  for (int64_t i = 0; i < count; ++i) {
    const int64_t index = indices[i];
    if (index < 0 || index / config_.num_envs >= streams_[index % config_.num_envs].end.load(std::memory_order_acquire)) {
      throw std::invalid_argument("indices[" + Str(i) + "]=" + Str(index) + " was never returned by sample");
    }
    if (!(std::isfinite(priorities[i]) && priorities[i] >= 0.0)) {
      throw std::invalid_argument("priorities[" + Str(i) + "]=" + std::to_string(priorities[i]) +
                                  " is not a finite number >= 0");
    }
  }
  std::lock_guard<std::mutex> tree_lock(tree_mutex_);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t e = indices[i] % config_.num_envs, seq = indices[i] / config_.num_envs;
    const int64_t row = Row(e, seq);
    // Overwritten, or about to be: Add moves `begin` under this lock.
    if (seq < ValidFloor(streams_[e].begin.load(std::memory_order_relaxed)) || tree_->Get(row) == 0.0) continue;
    const double priority = priorities[i] + config_.eps;
    max_priority_ = std::max(max_priority_, priority);
    tree_->Set(row, std::pow(priority, config_.alpha));
  }
}

double ReplayBuffer::PriorityTotal() const {
  std::lock_guard<std::mutex> tree_lock(tree_mutex_);
  return tree_ ? tree_->Total() : 0.0;
}

void ReplayBuffer::SamplingMass(const int64_t* indices, int64_t count, double* out) const {
  if (!tree_) throw std::invalid_argument("sampling mass needs a prioritized buffer");
  std::lock_guard<std::mutex> tree_lock(tree_mutex_);
  for (int64_t i = 0; i < count; ++i) {
    if (indices[i] < 0) throw std::invalid_argument("indices[" + Str(i) + "] is negative");
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t e = indices[i] % config_.num_envs, seq = indices[i] / config_.num_envs;
    const int64_t end = streams_[e].end.load(std::memory_order_acquire);
    out[i] = seq < end && seq >= end - slots_per_env_ ? tree_->Get(Row(e, seq)) : 0.0;
  }
}

double ReplayBuffer::MaxPriority() const {
  std::lock_guard<std::mutex> tree_lock(tree_mutex_);
  return max_priority_;
}

std::vector<double> ReplayBuffer::PriorityLeaves() const {
  std::lock_guard<std::mutex> tree_lock(tree_mutex_);
  std::vector<double> leaves(tree_ ? config_.capacity : 0);
  for (size_t i = 0; i < leaves.size(); ++i) leaves[i] = tree_->Get(static_cast<int64_t>(i));
  return leaves;
}

BufferState ReplayBuffer::State() const {
  BufferState state;
  for (int64_t e = 0; e < config_.num_envs; ++e) {
    state.end.push_back(streams_[e].end.load(std::memory_order_acquire));
    state.episode_open.push_back(streams_[e].episode_open);
    state.episode_first_seq.push_back(streams_[e].episode_first_seq);
  }
  state.sample_calls = sample_calls_.load();
  state.max_priority = MaxPriority();
  state.beta = Beta();
  return state;
}

void ReplayBuffer::Restore(const BufferState& state, const double* leaves) {
  const int64_t num_envs = config_.num_envs;
  if (static_cast<int64_t>(state.end.size()) != num_envs || static_cast<int64_t>(state.episode_open.size()) != num_envs ||
      static_cast<int64_t>(state.episode_first_seq.size()) != num_envs) {
    throw std::invalid_argument("saved state does not match num_envs=" + Str(num_envs));
  }
  int64_t held = 0;
  for (int64_t e = 0; e < num_envs; ++e) {
    const int64_t end = state.end[e];
    if (end < 0 || state.episode_first_seq[e] < 0 || state.episode_first_seq[e] > end) {
      throw std::invalid_argument("saved cursor of env " + Str(e) + " is inconsistent");
    }
    if (state.episode_open[e] && (end == 0 || !(flags_[Row(e, end - 1)] & kTransition))) {
      throw std::invalid_argument("saved episode state of env " + Str(e) + " is inconsistent");
    }
    for (int64_t q = std::max<int64_t>(end - slots_per_env_, 0); q < end; ++q) held += flags_[Row(e, q)] & kTransition;
  }
  if (!(std::isfinite(state.max_priority) && state.max_priority > 0.0)) {
    throw std::invalid_argument("saved max priority is not a positive number");
  }
  if (tree_) {
    for (int64_t i = 0; i < config_.capacity; ++i) {
      if (!(std::isfinite(leaves[i]) && leaves[i] >= 0.0)) throw std::invalid_argument("saved priorities are corrupt");
    }
  }
  std::lock_guard<std::mutex> add_lock(add_mutex_);
  std::lock_guard<std::mutex> tree_lock(tree_mutex_);
  for (int64_t e = 0; e < num_envs; ++e) {
    streams_[e].begin.store(state.end[e]);
    streams_[e].end.store(state.end[e]);
    streams_[e].episode_open = state.episode_open[e] != 0;
    streams_[e].episode_first_seq = state.episode_first_seq[e];
  }
  transitions_held_.store(held);
  sample_calls_.store(state.sample_calls);
  max_priority_ = state.max_priority;
  SetBeta(state.beta);
  if (tree_) tree_->Rebuild(leaves);
}

}  // namespace fastdqn
