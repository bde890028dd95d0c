"""What the replay-buffer benchmark (fastdqn.bench.buffer) feeds and measures: a synthetic
Atari stream, and each implementation (fastdqn, SB3, cpprb, TorchRL) behind one interface,
fed and sampled the way its own users would.
"""

from __future__ import annotations

import contextlib
import gc

import numpy as np

FRAME_STACK = 4
FRAME_SIDE = 84
OBS_SHAPE = (FRAME_STACK, FRAME_SIDE, FRAME_SIDE)
FRAME_BYTES = FRAME_SIDE * FRAME_SIDE
NUM_ENVS = 8
NUM_ACTIONS = 6
ALPHA, BETA, PRIORITY_EPS = 0.6, 0.4, 1e-6
BATCH_FIELDS = ("obs", "actions", "rewards", "next_obs", "frames", "next_offset", "terminated", "discounts",
                "indices", "weights")


# --- the synthetic stream ----------------------------------------------------------------


class AtariStream:
    """A synthetic Atari stream for NUM_ENVS envs, prebuilt so that producing a step costs nothing.

    Each env's frames repeat with period PERIOD. Step i's observation stacks frames i-3..i
    (mod PERIOD), so consecutive observations share three frames as with real frame stacking,
    and step i's next observation is step i+1's observation. Episodes end with probability
    1/mean_episode per env and step; one end in ten is a truncation.
    """

    PERIOD = 64
    LENGTH = 4096  # steps before actions, rewards and episode ends repeat; a multiple of PERIOD

    def __init__(self, mean_episode: int, seed: int):
        rng = np.random.default_rng(seed)
        frames = rng.integers(0, 256, (self.PERIOD, NUM_ENVS, FRAME_SIDE, FRAME_SIDE), dtype=np.uint8)
        stacks = (np.arange(self.PERIOD)[:, None] + np.arange(1 - FRAME_STACK, 1)) % self.PERIOD
        # (PERIOD, NUM_ENVS, FRAME_STACK, 84, 84): obs_cycle[t] is what all envs see at step t.
        self.obs_cycle = np.ascontiguousarray(frames[stacks].transpose(0, 2, 1, 3, 4))
        ends = rng.random((self.LENGTH, NUM_ENVS)) < 1.0 / mean_episode
        self.truncated = ends & (rng.random((self.LENGTH, NUM_ENVS)) < 0.1)
        self.terminated = ends & ~self.truncated
        self.actions = rng.integers(0, NUM_ACTIONS, (self.LENGTH, NUM_ENVS), dtype=np.int64)
        self.rewards = (rng.random((self.LENGTH, NUM_ENVS)) < 0.05).astype(np.float32)

    def step(self, i: int):
        """(obs, actions, rewards, next_obs, terminated, truncated) of step i, each (NUM_ENVS, ...)."""
        t = i % self.LENGTH
        return (self.obs_cycle[t % self.PERIOD], self.actions[t], self.rewards[t],
                self.obs_cycle[(t + 1) % self.PERIOD], self.terminated[t], self.truncated[t])


# --- the implementations ------------------------------------------------------------------


def _batch_to_torch(batch):
    import torch

    return [torch.from_numpy(a) for name in BATCH_FIELDS if (a := getattr(batch, name, None)) is not None]


class Subject:
    """One replay-buffer implementation, fed and sampled the way its users would.

    The constructor prepares each step's input in the implementation's own format (untimed);
    build() makes the buffer, add(i) adds stream step i, samplers() gives the ways to sample,
    each a context manager factory yielding a call that produces one batch of torch tensors.
    """

    name = label = module = ""
    bytes_estimate = 0  # per transition, to refuse runs that cannot fit in memory
    config = prioritized_config = ""

    def __init__(self, stream: AtariStream):
        self.buf = None

    def build(self, capacity: int, prioritized: bool, seed: int) -> None:
        raise NotImplementedError

    def add(self, i: int) -> None:
        raise NotImplementedError

    def held(self) -> int:
        raise NotImplementedError

    def samplers(self) -> dict:
        return {"sample": self._sample}

    def _sample(self, batch_size: int):
        raise NotImplementedError

    def prioritized_calls(self, batch_size: int, priorities: np.ndarray):
        """(sample, sample_and_update): calls for one prioritized batch, without and with update."""
        raise NotImplementedError

    def release(self) -> None:
        self.buf = None
        gc.collect()


class FastDQN(Subject):
    name = label = module = "fastdqn"
    bytes_estimate = 7_400
    config = "ReplayBuffer(frame_stack=4, num_envs=8); numpy batches wrapped with torch.from_numpy (no copy)"
    prioritized_config = "PrioritizedReplayBuffer(alpha=0.6, beta=0.4, eps=1e-6)"

    def __init__(self, stream):
        super().__init__(stream)
        self.steps = [stream.step(i) for i in range(stream.LENGTH)]

    def build(self, capacity, prioritized, seed):
        import fastdqn

        kind, extra = fastdqn.ReplayBuffer, {}
        if prioritized:
            kind, extra = fastdqn.PrioritizedReplayBuffer, dict(alpha=ALPHA, beta=BETA, eps=PRIORITY_EPS)
        self.buf = kind(capacity, OBS_SHAPE, frame_stack=FRAME_STACK, num_envs=NUM_ENVS, seed=seed, **extra)

    def add(self, i):
        self.buf.add(*self.steps[i % len(self.steps)])

    def held(self):
        return len(self.buf)

    def samplers(self):
        return {"sample": self._sample, "sample_out": self._sample_out, "prefetch": self._prefetch,
                "frames_out": self._frames_out}

    @contextlib.contextmanager
    def _sample(self, batch_size):
        yield lambda: _batch_to_torch(self.buf.sample(batch_size))

    @contextlib.contextmanager
    def _sample_out(self, batch_size):
        out = self.buf.empty_batch(batch_size)
        tensors = _batch_to_torch(out)  # the learner's tensors share these arrays, made once
        yield lambda: self.buf.sample(batch_size, out=out)
        del tensors

    @contextlib.contextmanager
    def _frames_out(self, batch_size):
        out = self.buf.empty_frame_batch(batch_size)  # obs and next_obs share frames: k + 1 per sample
        tensors = _batch_to_torch(out)
        yield lambda: self.buf.sample_frames(batch_size, out=out)
        del tensors

    @contextlib.contextmanager
    def _prefetch(self, batch_size):
        with self.buf.prefetch(batch_size, depth=2) as prefetcher:
            yield lambda: _batch_to_torch(prefetcher.next())

    def prioritized_calls(self, batch_size, priorities):
        def sample():
            return _batch_to_torch(self.buf.sample(batch_size))

        def sample_and_update():
            batch = self.buf.sample(batch_size)
            _batch_to_torch(batch)
            self.buf.update_priorities(batch.indices, priorities)

        return sample, sample_and_update


class SB3(Subject):
    name, label, module = "sb3", "SB3", "stable_baselines3"
    bytes_estimate = 28_400
    config = ("ReplayBuffer(optimize_memory_usage=True, handle_timeout_termination=False, n_envs=8, "
              "device='cpu'); its sample returns torch tensors (copied with th.tensor)")

    def __init__(self, stream):
        super().__init__(stream)
        infos = [{} for _ in range(NUM_ENVS)]
        self.steps = []
        for i in range(stream.LENGTH):
            obs, actions, rewards, next_obs, terminated, truncated = stream.step(i)
            # Without timeout handling SB3 has one done flag: a truncation counts as termination.
            self.steps.append((obs, next_obs, actions[:, None], rewards, terminated | truncated, infos))

    def build(self, capacity, prioritized, seed):
        import gymnasium as gym
        from stable_baselines3.common.buffers import ReplayBuffer

        np.random.seed(seed)  # SB3 samples with numpy's global generator
        self.buf = ReplayBuffer(capacity, gym.spaces.Box(0, 255, OBS_SHAPE, np.uint8),
                                gym.spaces.Discrete(NUM_ACTIONS), device="cpu", n_envs=NUM_ENVS,
                                optimize_memory_usage=True, handle_timeout_termination=False)

    def add(self, i):
        self.buf.add(*self.steps[i % len(self.steps)])

    def held(self):
        return self.buf.size() * NUM_ENVS

    @contextlib.contextmanager
    def _sample(self, batch_size):
        yield lambda: self.buf.sample(batch_size)


class Cpprb(Subject):
    name = label = module = "cpprb"
    bytes_estimate = 7_400
    config = ('ReplayBuffer(next_of="obs", stack_compress="obs"), obs channels-last (84, 84, 4) as '
              "stack_compress requires; numpy batches wrapped with torch.from_numpy (no copy)")
    prioritized_config = ('PrioritizedReplayBuffer(alpha=0.6, eps=1e-6, next_of="obs", stack_compress="obs"), '
                          "sample(beta=0.4)")

    def __init__(self, stream):
        super().__init__(stream)
        # stack_compress wants the stack on the last axis: a cpprb user stores channels-last.
        channels_last = np.ascontiguousarray(stream.obs_cycle.transpose(0, 1, 3, 4, 2))
        self.steps = []
        for i in range(stream.LENGTH):
            _, actions, rewards, _, terminated, truncated = stream.step(i)
            t = i % stream.PERIOD
            fields = dict(obs=channels_last[t], act=actions, rew=rewards,
                          next_obs=channels_last[(t + 1) % stream.PERIOD], done=terminated.astype(np.float32))
            self.steps.append((fields, bool((terminated | truncated).any())))

    def build(self, capacity, prioritized, seed):
        import cpprb

        np.random.seed(seed)  # cpprb samples with numpy's global generator
        env_dict = {"obs": {"shape": (FRAME_SIDE, FRAME_SIDE, FRAME_STACK), "dtype": np.uint8},
                    "act": {"dtype": np.int64}, "rew": {"dtype": np.float32}, "done": {"dtype": np.float32}}
        compression = dict(next_of="obs", stack_compress="obs")
        if prioritized:
            self.buf = cpprb.PrioritizedReplayBuffer(capacity, env_dict, alpha=ALPHA, eps=PRIORITY_EPS, **compression)
        else:
            self.buf = cpprb.ReplayBuffer(capacity, env_dict, **compression)

    def add(self, i):
        fields, episode_ends = self.steps[i % len(self.steps)]
        self.buf.add(**fields)
        if episode_ends:
            self.buf.on_episode_end()  # cpprb needs this call at episode ends for next_of/stack_compress

    def held(self):
        return self.buf.get_stored_size()

    @contextlib.contextmanager
    def _sample(self, batch_size):
        import torch

        yield lambda: [torch.from_numpy(a) for a in self.buf.sample(batch_size).values()]

    def prioritized_calls(self, batch_size, priorities):
        import torch

        def sample():
            return [torch.from_numpy(a) for a in self.buf.sample(batch_size, beta=BETA).values()]

        def sample_and_update():
            batch = self.buf.sample(batch_size, beta=BETA)
            [torch.from_numpy(a) for a in batch.values()]
            self.buf.update_priorities(batch["indexes"], priorities)

        return sample, sample_and_update


class TorchRL(Subject):
    name, label, module = "torchrl", "TorchRL", "torchrl"
    bytes_estimate = 56_600
    config = ("TensorDictReplayBuffer(storage=LazyTensorStorage(capacity)): observation and "
              "('next', 'observation') stored in full; sample returns a TensorDict of torch tensors")
    prioritized_config = ("TensorDictReplayBuffer(storage=LazyTensorStorage(capacity), "
                          "sampler=PrioritizedSampler(capacity, alpha=0.6, beta=0.4, eps=1e-6)); update_priority")

    def __init__(self, stream):
        super().__init__(stream)
        import torch
        from tensordict import TensorDict

        # Built once, untimed: a TorchRL collector hands the buffer TensorDicts like these.
        self.steps = []
        for i in range(stream.LENGTH):
            obs, actions, rewards, next_obs, terminated, truncated = map(torch.from_numpy, stream.step(i))
            following = TensorDict({"observation": next_obs, "reward": rewards, "terminated": terminated,
                                    "truncated": truncated, "done": terminated | truncated}, batch_size=[NUM_ENVS])
            self.steps.append(TensorDict({"observation": obs, "action": actions, "next": following},
                                         batch_size=[NUM_ENVS]))

    def build(self, capacity, prioritized, seed):
        import torch
        from torchrl.data import LazyTensorStorage, PrioritizedSampler, TensorDictReplayBuffer

        torch.manual_seed(seed)
        sampler = PrioritizedSampler(capacity, alpha=ALPHA, beta=BETA, eps=PRIORITY_EPS) if prioritized else None
        self.buf = TensorDictReplayBuffer(storage=LazyTensorStorage(capacity), sampler=sampler)

    def add(self, i):
        self.buf.extend(self.steps[i % len(self.steps)])

    def held(self):
        return len(self.buf)

    def samplers(self):
        return {"sample": self._sample, "prefetch": self._prefetch}

    @contextlib.contextmanager
    def _sample(self, batch_size):
        yield lambda: self.buf.sample(batch_size)

    @contextlib.contextmanager
    def _prefetch(self, batch_size):
        from torchrl.data import TensorDictReplayBuffer

        # TorchRL prefetches (on a thread pool) only with the batch size fixed at construction:
        # a second buffer over the same storage.
        reader = TensorDictReplayBuffer(storage=self.buf.storage, batch_size=batch_size, prefetch=2)
        try:
            yield reader.sample
        finally:
            reader.shutdown()

    def prioritized_calls(self, batch_size, priorities):
        import torch

        priorities = torch.from_numpy(priorities)

        def sample():
            return self.buf.sample(batch_size)

        def sample_and_update():
            batch = self.buf.sample(batch_size)
            self.buf.update_priority(batch["index"], priorities)

        return sample, sample_and_update


SUBJECTS = {cls.name: cls for cls in (FastDQN, SB3, Cpprb, TorchRL)}
