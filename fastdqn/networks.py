"""Q-networks: an MLP for vector observations and the Nature CNN for images.

Both map a batch of observations to one Q-value per action, shape (batch, num_actions),
and both take an optional dueling head (Wang et al., 2016). Observations may arrive in
their storage dtype (uint8 frames, float32 vectors); the cast happens inside forward, on
the device, so the host never converts a batch. Integer frames are pixels, scaled by 1/255;
float images are taken as they come, as SB3 takes them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "DuelingHead", "NatureCNN", "build_q_network"]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DuelingHead(nn.Module):
    """Combines a value stream V(s) and an advantage stream A(s, a) into Q-values.

    Q(s, a) = V(s) + A(s, a) - mean_a' A(s, a'): subtracting the mean makes V and A
    identifiable, as in Wang et al. (2016), eq. 9.
    """

    def __init__(self, value: nn.Module, advantage: nn.Module):
        super().__init__()
        self.value = value
        self.advantage = advantage

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        value = self.value(features)
        advantage = self.advantage(features)
        return value + advantage - advantage.mean(dim=1, keepdim=True)


class MLP(nn.Module):
    """Fully connected Q-network with ReLU hidden layers (CleanRL's default: 120, 84).

    Input of any shape (batch, ...) is flattened and cast to float32. With ``dueling``, the
    last hidden layer feeds two linear streams, V and A.
    """

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: Sequence[int] = (120, 84),
                 dueling: bool = False):
        super().__init__()
        _check_positive_int("obs_dim", obs_dim)
        _check_positive_int("num_actions", num_actions)
        hidden_sizes = tuple(hidden_sizes)
        for size in hidden_sizes:
            _check_positive_int("hidden_sizes entries", size)
        layers: list[nn.Module] = []
        width = obs_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.obs_dim = obs_dim
        self.num_actions = num_actions
        self.body = nn.Sequential(*layers)
        if dueling:
            self.head = DuelingHead(nn.Linear(width, 1), nn.Linear(width, num_actions))
        else:
            self.head = nn.Linear(width, num_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(obs.flatten(1).float()))


class NatureCNN(nn.Module):
    """The convolutional Q-network of Mnih et al. (2015), for stacked 84x84 frames.

    Takes frames (batch, in_channels, H, W): integer pixels (uint8), scaled by 1/255 inside
    forward, or float frames, taken as they are (already scaled the way the env means them).
    ``input_size`` is (H, W) and only sets the width of the first linear layer. With
    ``dueling``, the 512-unit fully connected layer is split into a value and an advantage
    stream of 512 units each, as in Wang et al. (2016).
    """

    def __init__(self, in_channels: int, num_actions: int, dueling: bool = False,
                 input_size: tuple[int, int] = (84, 84)):
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_actions", num_actions)
        height, width = (_check_positive_int("input_size entries", s) for s in input_size)
        self.in_channels = in_channels
        self.num_actions = num_actions
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        for kernel, stride in ((8, 4), (4, 2), (3, 1)):
            height, width = (height - kernel) // stride + 1, (width - kernel) // stride + 1
            if height < 1 or width < 1:
                raise ValueError(f"input_size {tuple(input_size)} is too small for the Nature CNN "
                                 "(needs at least 36x36)")
        features = 64 * height * width

        def stream(outputs: int) -> nn.Module:
            return nn.Sequential(nn.Linear(features, 512), nn.ReLU(), nn.Linear(512, outputs))

        self.head = DuelingHead(stream(1), stream(num_actions)) if dueling else stream(num_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        frames = obs.float() if obs.is_floating_point() else obs.float() * (1.0 / 255.0)
        return self.head(self.body(frames))


def check_obs_shape(obs_shape) -> tuple[int, ...]:
    """``obs_shape`` as a tuple of Python ints (numpy's too); ValueError unless it is a non-empty
    sequence of positive integers."""
    obs_shape = tuple(obs_shape)
    if not obs_shape or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in obs_shape):
        raise ValueError(f"obs_shape must be a non-empty tuple of positive ints, got {obs_shape!r}")
    return tuple(int(d) for d in obs_shape)


def build_q_network(obs_shape: Sequence[int], num_actions: int, *, hidden_sizes: Sequence[int] = (120, 84),
                    dueling: bool = False) -> nn.Module:
    """The default Q-network for an observation shape: image (C, H, W) -> NatureCNN, else MLP.

    A 3-D observation is taken as channels-first frames (a frame stack). Anything else is
    flattened into a vector for the MLP.
    """
    obs_shape = check_obs_shape(obs_shape)
    if len(obs_shape) == 3:
        if obs_shape[2] <= 4 < obs_shape[0]:  # gymnasium's image convention, (H, W, C)
            raise ValueError(f"image observations must be channels-first (C, H, W), as torch's convolutions take "
                             f"them; {obs_shape} looks channels-last (H, W, C): transpose them in an "
                             "ObservationWrapper (obs.transpose(2, 0, 1)), or pass your own q_network to DQN")
        try:
            return NatureCNN(obs_shape[0], num_actions, dueling=dueling, input_size=obs_shape[1:])
        except ValueError as error:  # frames too small for its convolutions
            raise ValueError(f"{error}; 3-D observations are taken as images (C, H, W): flatten other ones "
                             "(gymnasium's FlattenObservation) or pass your own q_network to DQN") from None
    return MLP(math.prod(obs_shape), num_actions, hidden_sizes=hidden_sizes, dueling=dueling)
