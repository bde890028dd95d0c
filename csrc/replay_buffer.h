// The circular replay buffer behind fastdqn.ReplayBuffer and PrioritizedReplayBuffer.
//
// Layout. Each env owns a ring of `slots_per_env_` slots; slot s of env e lives at
// row s * num_envs + e of every array, so one Add() writes adjacent rows. A slot
// holds one frame and the metadata of at most one transition. Slots are addressed
// by a per-env sequence number `seq` that only grows; the row is seq % slots_per_env.
//
// An episode occupies consecutive slots:
//
//   [start frames (m slots)] [t0] [t1] ... [tL-1]
//
// The start frames are the oldest m frames of the episode's first observation that
// cannot be derived (m is 1 when the older frames repeat the oldest stored frame, as
// envpool pads, or are zeros, as gymnasium's zero padding gives; up to frame_stack
// otherwise). Transition slot t_i holds the newest frame of its next observation, its
// action, reward and end flags. So frame j of an episode sits right after frame j-1,
// the observation of the transition at seq q is frames [q-k, q-1] and its one-step
// next observation is [q-k+1, q]; an n-step sample reads frames [q-k, q+m-1]. A stack
// never crosses an episode boundary: walking back from the newest frame stops at the
// slot flagged kStackBegin, and older positions are padding (a copy of that frame or
// zeros, as kZeroPad says).
//
// Exactness. Only the newest frame of a next observation is stored, so Add() accepts
// only rows whose stacks it can rebuild byte for byte: every row's next_obs is its obs
// one frame on (next_obs frames [0, k-1) equal obs frames [1, k)), and a row that
// continues an open episode has an obs equal, all k frames, to that episode's previous
// next_obs as rebuilt from the ring, start padding included. Anything else would be
// sampled as stacks that were never added.
//
// Validity. A transition at seq q of an env whose published end is `end` is valid iff
//   - its slot is a transition slot (not a start frame),
//   - its n-step window is complete: q+n-1 < end, or the episode ended before that, and
//   - once the ring has wrapped (end > slots_per_env_), q >= end - slots_per_env_ + k:
//     the k oldest resident slots are never sampled, because the frames their stacks
//     may reach were overwritten by the slot just written.
// Sampling is uniform over exactly these, or proportional to priority over them.
//
// Concurrency. One Add() at a time (adders take `add_mutex_`); any number of samplers
// run at the same time without a lock. Per env, Add() publishes `begin` (the seqs it is
// about to overwrite end at begin - slots_per_env_), writes, then publishes `end`. A
// sampler chooses transitions valid under its snapshot of `end`, copies them, and then
// re-reads `begin`: a sample whose oldest frame (seq q-k) may have been overwritten
// meanwhile, q < begin - slots_per_env_ + k, is discarded and drawn again, so no torn
// frame is ever returned (a seqlock, per sample). The sum tree of a prioritized buffer
// is the only shared mutable structure on the sampling side; a mutex guards it for the
// index draws and leaf updates, never for copying frames. EndEpisodes() is the one write
// to a published slot: it adds the truncated bit to an episode's last flag byte. A
// sampler that reads the byte before sees that transition's n-step windows incomplete (not
// valid); after, ended there; a window that was complete already gives the same sample
// either way (a truncation bootstraps as a step that goes on does). A prioritized buffer
// sets the bit and the windows' priorities under the tree lock, so no draw can pick a
// window before its bit is visible.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "sum_tree.h"

namespace fastdqn {

struct BufferConfig {
  int64_t capacity = 0;      // total slots over all envs; the buffer rounds it down to a multiple of num_envs
  int64_t num_envs = 1;
  int64_t frame_stack = 1;   // k: frames per observation
  int64_t frame_bytes = 0;   // bytes of one stored frame
  int64_t action_bytes = 8;
  int64_t n_step = 1;
  double gamma = 0.99;
  uint64_t seed = 0;
  bool prioritized = false;
  double alpha = 0.6;
  double eps = 1e-6;
};

// Rows of a batch to add; each pointer holds `rows` consecutive items.
struct AddInput {
  int64_t rows = 0;
  const uint8_t* obs = nullptr;       // rows x k frames
  const uint8_t* actions = nullptr;   // rows x action_bytes
  const float* rewards = nullptr;
  const uint8_t* next_obs = nullptr;  // rows x k frames
  const bool* terminated = nullptr;
  const bool* truncated = nullptr;
  const int64_t* env_ids = nullptr;   // nullptr: rows are envs 0..num_envs-1
};

// Where a batch is written. `obs` and `next_obs` hold B x k frames; with `frames`
// instead (the shared layout), sample b's frames [q-k, q+n-1] go to frames[b] and its
// next observation is frames[b][next_offset[b] : next_offset[b] + k].
struct BatchOutput {
  int64_t batch_size = 0;
  uint8_t* obs = nullptr;
  uint8_t* next_obs = nullptr;
  uint8_t* frames = nullptr;
  int64_t* next_offset = nullptr;
  uint8_t* actions = nullptr;
  float* rewards = nullptr;
  float* terminated = nullptr;
  float* discounts = nullptr;
  int64_t* indices = nullptr;
  float* weights = nullptr;  // prioritized buffers only
};

// Persistent scalar state, for save/load. Arrays are exposed separately as views.
struct BufferState {
  std::vector<int64_t> end;                 // per env: seqs below are written
  std::vector<uint8_t> episode_open;        // per env: the next Add continues an episode
  std::vector<int64_t> episode_first_seq;   // per env: seq of the open episode's first transition
  uint64_t sample_calls = 0;
  double max_priority = 1.0;
  double beta = 0.4;
};

class ReplayBuffer {
 public:
  explicit ReplayBuffer(const BufferConfig& config);
  ~ReplayBuffer();
  ReplayBuffer(const ReplayBuffer&) = delete;
  ReplayBuffer& operator=(const ReplayBuffer&) = delete;

  // Throws std::invalid_argument before touching any state if a row breaks the rules.
  void Add(const AddInput& input);
  // Fills `out`; throws std::invalid_argument if no transition is valid. `beta` is the
  // importance-weight exponent of a prioritized buffer.
  void Sample(const BatchOutput& out, double beta);
  // Ends every open episode at its last added transition, as a truncation: as if that
  // transition had been added with truncated set. For envs that restart without the
  // buffer seeing their episodes end (collection interrupted, envs reset by hand). An
  // adder, under `add_mutex_`; samplers may run meanwhile (see Concurrency above).
  // `env_ids` (count of them) picks the envs; nullptr: all. Throws std::invalid_argument
  // before any change if an id is out of range.
  void EndEpisodes(const int64_t* env_ids, int64_t count);
  // Ignores indices whose transition was overwritten or is no longer valid.
  void UpdatePriorities(const int64_t* indices, const double* priorities, int64_t count);

  // Transitions held (resident transition slots, valid or not).
  int64_t Size() const { return transitions_held_.load(std::memory_order_acquire); }
  // Transitions that can be sampled now (a scan; for tests and diagnostics).
  std::vector<int64_t> ValidIndices() const;
  // A single-transition sample at a given index (for tests); throws if not valid.
  void Get(const int64_t* indices, int64_t count, const BatchOutput& out) const;

  const BufferConfig& Config() const { return config_; }
  int64_t SlotsPerEnv() const { return slots_per_env_; }
  double Beta() const { return beta_.load(std::memory_order_relaxed); }
  void SetBeta(double beta) { beta_.store(beta, std::memory_order_relaxed); }
  double PriorityTotal() const;
  // The sampling mass, priority**alpha, of each index; 0 for one that cannot be drawn.
  void SamplingMass(const int64_t* indices, int64_t count, double* out) const;
  double MaxPriority() const;

  // Raw storage, for save/load. Quiescent use only (no concurrent Add).
  uint8_t* Frames() { return frames_.get(); }
  uint8_t* Actions() { return actions_.get(); }
  float* Rewards() { return rewards_.get(); }
  uint8_t* Flags() { return flags_.get(); }
  std::vector<double> PriorityLeaves() const;
  BufferState State() const;
  // Validates `state` and `leaves` against the config and the stored flags, then installs them.
  void Restore(const BufferState& state, const double* leaves);

 private:
  struct Stream;
  struct Pick;

  int64_t Row(int64_t env, int64_t seq) const { return (seq % slots_per_env_) * config_.num_envs + env; }
  // The lowest seq that can be a valid transition when `end` seqs are written.
  int64_t ValidFloor(int64_t end) const {
    return end > slots_per_env_ ? end - slots_per_env_ + config_.frame_stack : 0;
  }
  // The number of start frames to store for an episode's first observation.
  int64_t StartFramesNeeded(const uint8_t* stack, bool* zero_pad) const;

  // Sets the stack start of the observation whose newest frame is at pick->seq - 1.
  void FindStackBegin(Pick* pick) const;
  // The frame at position `seq` of that observation (padding copies its oldest stored
  // frame); nullptr where the position is zero padding.
  const uint8_t* StackFrame(const Pick& pick, int64_t seq) const;
  // Completes `pick` (n-step window, stack start) and says whether it is valid under `end`.
  bool Resolve(Pick* pick, int64_t end) const;
  void Copy(const Pick& pick, const BatchOutput& out, int64_t b) const;
  void DrawUniform(uint64_t call, uint64_t attempt, const std::vector<int64_t>& ends, Pick* picks, int64_t count) const;
  void DrawPrioritized(uint64_t call, uint64_t attempt, std::vector<int64_t>& ends, Pick* picks,
                       int64_t count, bool stratified, double beta, float* weights);

  void InvalidateBefore(int64_t env, int64_t old_floor, int64_t new_floor);
  // Gives the transitions [first, last] of env's current (or just ended) episode, whose
  // n-step windows just completed, the largest priority seen. Under tree_mutex_.
  void PrioritizeCompleted(int64_t env, int64_t first, int64_t last);

  BufferConfig config_;
  int64_t slots_per_env_;
  int64_t stack_bytes_;

  struct FreeDeleter {
    void operator()(void* p) const;
  };
  // Allocated, never initialized: pages are touched only when written.
  std::unique_ptr<uint8_t[], FreeDeleter> frames_;
  std::unique_ptr<uint8_t[], FreeDeleter> actions_;
  std::unique_ptr<float[], FreeDeleter> rewards_;
  std::unique_ptr<uint8_t[], FreeDeleter> flags_;

  std::unique_ptr<Stream[]> streams_;
  std::atomic<int64_t> transitions_held_{0};
  std::atomic<uint64_t> sample_calls_{0};
  std::atomic<double> beta_{0.4};
  std::mutex add_mutex_;

  std::unique_ptr<SumTree> tree_;  // prioritized buffers only; guarded by tree_mutex_
  mutable std::mutex tree_mutex_;
  double max_priority_ = 1.0;     // guarded by tree_mutex_
};

}  // namespace fastdqn
