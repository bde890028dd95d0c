"""Fixtures shared by the test modules."""

import sys

import pytest
import torch


@pytest.fixture
def torch_threads_restored():
    """torch's thread count is put back after the test, which may change it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


OWN_ENV_MODULE = """
import gymnasium as gym
import numpy as np


class Chain(gym.Env):
    \"\"\"Action 1 steps right; the far end (step 3) pays 1 and ends the episode.\"\"\"
    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.position += int(action)
        return np.full(1, self.position / 3, np.float32), float(self.position == 3), self.position == 3, False, {}


gym.register("{id}", entry_point=Chain, max_episode_steps={limit})
"""


@pytest.fixture
def own_env_module(tmp_path, monkeypatch):
    """``write(module, env_id, max_episode_steps=10)`` writes a module that registers ``env_id``
    (a 3-step chain) when imported, as a user's own env package does, into a folder on sys.path,
    which it returns. The module and the env are gone again after the test."""
    import gymnasium as gym

    folder = tmp_path / "own_envs"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    written = []

    def write(module: str, env_id: str, max_episode_steps: int | None = 10):
        (folder / f"{module}.py").write_text(OWN_ENV_MODULE.replace("{id}", env_id)
                                             .replace("{limit}", str(max_episode_steps)))
        written.append((module, env_id))
        return folder

    yield write
    for module, env_id in written:
        sys.modules.pop(module, None)
        gym.registry.pop(env_id, None)
