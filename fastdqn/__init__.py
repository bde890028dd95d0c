"""fastdqn: fast deep Q-learning.

Importing the package loads only numpy and the C++ replay buffer, so projects that
use the buffer with JAX or plain numpy never import PyTorch. The trainer's names are
loaded on first use.
"""

from fastdqn.replay import Batch, PrioritizedReplayBuffer, ReplayBuffer

__all__ = ["Batch", "DQN", "DQNConfig", "PrioritizedReplayBuffer", "ReplayBuffer"]
__version__ = "0.1.0"

_LAZY = {"DQN": "fastdqn.agent", "DQNConfig": "fastdqn.config"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdqn' has no attribute {name!r}")
