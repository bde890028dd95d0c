"""A naive replay buffer that stores whole transitions: the independent expectation.

It shares only the documented slot accounting with fastdqn (each env's ring holds
`capacity // num_envs` slots; an episode's first observation takes `m` start slots, the
fewest that leave only padding that repeats the oldest stored frame or is zero; the `k`
oldest resident slots are not sampled once a ring has wrapped). Everything else (stacks,
n-step folding, episode ends) is computed from the whole transitions as a textbook
buffer would.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Transition:
    obs: np.ndarray
    action: object
    reward: float
    next_obs: np.ndarray
    terminated: bool
    truncated: bool
    episode: list  # the transitions of its episode, in order
    position: int  # its index in `episode`


def start_slots(stack: np.ndarray) -> int:
    """How many frames of an episode's first observation are stored (the documented rule)."""
    k = len(stack)
    for m in range(1, k):
        padding, oldest_stored = stack[: k - m], stack[k - m]
        if all(np.array_equal(f, oldest_stored) for f in padding) or not padding.any():
            return m
    return k


class ReferenceBuffer:
    def __init__(self, capacity, num_envs, frame_stack, n_step, gamma):
        self.slots_per_env = capacity // num_envs
        self.num_envs, self.k, self.n, self.gamma = num_envs, frame_stack, n_step, gamma
        self.slots = [[] for _ in range(num_envs)]  # per env, by seq: None (start frame) or a Transition
        self.episode = [None] * num_envs  # the open episode's transitions, or None

    def add(self, env, obs, action, reward, next_obs, terminated, truncated):
        if self.episode[env] is None:
            self.episode[env] = []
            stack = obs if self.k > 1 else obs[None]
            self.slots[env].extend([None] * start_slots(stack))
        episode = self.episode[env]
        t = Transition(obs.copy(), action, float(reward), next_obs.copy(), bool(terminated), bool(truncated), episode,
                       len(episode))
        episode.append(t)
        self.slots[env].append(t)
        if terminated or truncated:
            self.episode[env] = None

    def end_episodes(self, envs=None):
        """Each open episode (of ``envs``, default all) ends at its last transition, now a truncation."""
        for env in range(self.num_envs) if envs is None else envs:
            if self.episode[env]:
                self.episode[env][-1].truncated = True
            self.episode[env] = None

    def __len__(self):
        return sum(sum(s is not None for s in slots[-self.slots_per_env:]) for slots in self.slots)

    def valid(self) -> dict[int, dict]:
        """index -> the expected sample, for every transition that may be sampled."""
        expected = {}
        for env, slots in enumerate(self.slots):
            end = len(slots)
            floor = end - self.slots_per_env + self.k if end > self.slots_per_env else 0
            for seq in range(floor, end):
                t = slots[seq]
                if t is None:
                    continue
                sample = self.fold(t)
                if sample is not None:
                    expected[seq * self.num_envs + env] = sample

        return expected

    def fold(self, t: Transition):
        """The n-step sample starting at `t`, or None while its window is incomplete."""
        window = t.episode[t.position: t.position + self.n]
        reward, discount = 0.0, 1.0
        for step, u in enumerate(window):
            reward += discount * u.reward
            discount *= self.gamma
            if u.terminated or u.truncated:
                window = window[: step + 1]
                break
        else:
            if len(window) < self.n:
                return None
        last = window[-1]
        return dict(obs=t.obs, action=t.action, reward=reward, next_obs=last.next_obs,
                    terminated=float(last.terminated), discount=0.0 if last.terminated else discount)
