"""Replay buffers: the public API over the C++ core (``fastdqn._core``).

Frames are stored once and frame stacks rebuilt at sample time, n-step returns are
folded at sample time, and sampling runs without the GIL and without a lock against
a concurrent ``add``. Arrays in, numpy arrays out: use them from numpy, PyTorch
(``torch.from_numpy``) or JAX (``jnp.asarray``). The storage layout and its invariants
are documented in ``csrc/replay_buffer.h``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import sys
from typing import Iterator

import numpy as np

from fastdqn import _core

__all__ = ["Batch", "FrameBatch", "Prefetcher", "PrioritizedReplayBuffer", "ReplayBuffer"]


@dataclasses.dataclass
class Batch:
    """A sampled batch. The learning target is ``rewards + discounts * max_a Q(next_obs, a)``."""

    obs: np.ndarray
    """``(B, *obs_shape)``: the observations the actions were taken on."""
    actions: np.ndarray
    """``(B,)``, the buffer's action dtype."""
    rewards: np.ndarray
    """``(B,)`` float32: the discounted sum of up to ``n_step`` rewards, stopping at the episode's end."""
    next_obs: np.ndarray
    """``(B, *obs_shape)``: the observation ``m <= n_step`` steps later (the final one at an episode's end)."""
    terminated: np.ndarray
    """``(B,)`` float32: 1 if the episode terminated within those ``m`` steps (truncation is not termination)."""
    discounts: np.ndarray
    """``(B,)`` float32: ``gamma**m``, or 0 if terminated."""
    indices: np.ndarray
    """``(B,)`` int64: identify the transitions, e.g. for ``update_priorities``."""
    weights: np.ndarray | None = None
    """``(B,)`` float32 importance weights (prioritized buffers only)."""

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields that hold arrays, by name (no copies)."""
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclasses.dataclass
class FrameBatch:
    """A batch in the shared-frame layout: ``k + m`` frames per sample instead of ``2k``.

    ``frames[b, :k]`` is the observation and ``frames[b, next_offset[b]:next_offset[b] + k]``
    the next observation (``next_offset`` is ``m``). Fewer bytes to copy and to move to a
    GPU, where the next observations are gathered.
    """

    frames: np.ndarray
    """``(B, frame_stack + n_step, *frame_shape)``."""
    next_offset: np.ndarray
    """``(B,)`` int64: where the next observation starts in ``frames``."""
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    discounts: np.ndarray
    indices: np.ndarray
    weights: np.ndarray | None = None

    arrays = Batch.arrays

    def unpack(self, frame_stack: int) -> tuple[np.ndarray, np.ndarray]:
        """``(obs, next_obs)`` as separate arrays (copies), shaped as ``sample`` returns them;
        ``frame_stack`` is the buffer's."""
        frame_stack = _int("frame_stack", frame_stack, 1)
        # The frames hold frame_stack + n_step columns, and a next observation ends inside them.
        last_column = int(self.next_offset.max(initial=1)) + frame_stack
        if frame_stack >= self.frames.shape[1] or last_column > self.frames.shape[1]:
            raise ValueError(f"frame_stack must be the buffer's, below the {self.frames.shape[1]} frames per sample "
                             f"(frame_stack + n_step), got {frame_stack}")
        columns = self.next_offset[:, None] + np.arange(frame_stack)
        next_obs = np.take_along_axis(self.frames, columns.reshape(columns.shape + (1,) * (self.frames.ndim - 2)), axis=1)
        obs = self.frames[:, :frame_stack].copy()
        if frame_stack == 1:  # no stack axis: each frame is a whole observation
            return obs[:, 0], next_obs[:, 0]
        return obs, next_obs


_WEIGHTS_TEMPLATE = np.empty(1, np.float32)
"""What an ``out.weights`` given to a uniform buffer is checked against."""


def _python_scalar(value, kinds: str):
    """A 0-d array of one of ``kinds`` (numpy's, a JAX or torch scalar) as a Python number; else ``value``."""
    if isinstance(value, numbers.Number) or not hasattr(value, "__array__") or getattr(value, "ndim", 0) != 0:
        return value  # (a large array is not copied to be refused)
    try:
        array = np.asarray(value)
    except (RuntimeError, TypeError, ValueError):  # e.g. a torch tensor that requires grad
        return value
    return array.item() if array.ndim == 0 and array.dtype.kind in kinds else value


def _int(name: str, value, minimum: int) -> int:
    value = _python_scalar(value, "iu")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _real(name: str, value, low: float, high: float) -> float:
    value = _number(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _nonnegative(name: str, value) -> float:
    value = _number(name, value)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _number(name: str, value) -> float:
    value = _python_scalar(value, "iuf")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _numeric_dtype(name: str, dtype) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"{name} must be a numpy dtype, got {dtype!r}") from error
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric dtype, got {dtype}")
    return dtype


@functools.lru_cache(maxsize=None)
def _cast_bounds(source: np.dtype, target: np.dtype) -> tuple[int, int] | None:
    """The values that a cast between integer (or bool) dtypes keeps; None where every value
    casts safely or the dtypes are not both integers (cached: `add` asks on every call)."""
    if source.kind not in "biu" or target.kind not in "biu" or np.can_cast(source, target):
        return None
    if target.kind == "b":
        return 0, 1
    info = np.iinfo(target)
    return int(info.min), int(info.max)


def _indices(indices) -> np.ndarray:
    """Transition indices as a flat int64 array; TypeError for non-integers (a cast would truncate 1.7 to 1)."""
    array = np.asarray(indices)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64).reshape(-1)


def _column(name: str, value, rows: int, dtype, kinds: str) -> np.ndarray:
    array, dtype = np.asarray(value), np.dtype(dtype)
    if array.dtype.kind not in kinds:
        raise TypeError(f"{name} must have a dtype of kind {kinds!r} (convertible to {dtype}), got {array.dtype}")
    if array.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {array.shape}")
    # Casting would wrap integers that do not fit (300 -> 44 in uint8) and fold flags (2 -> True) silently.
    bounds = _cast_bounds(array.dtype, dtype)
    if bounds is not None and array.size:
        (low, high), smallest, largest = bounds, int(array.min()), int(array.max())
        if smallest < low or largest > high:
            raise ValueError(f"{name} must be in [{low}, {high}] to fit {dtype}, got values from {smallest} to {largest}")
    return np.ascontiguousarray(array, dtype=dtype)


class ReplayBuffer:
    """A circular replay buffer with frame stacking, n-step returns and several env streams.

    Args:
        capacity: transitions held in total over all envs; the oldest go first. Rounded down
            to a multiple of ``num_envs`` (each env has its own ring). Each episode also keeps
            its first observation's oldest frame (rarely more) in one slot of its ring.
        obs_shape: the observation as the env returns it; with ``frame_stack=k > 1``,
            ``obs_shape[0] == k`` and each frame is stored once.
        frame_stack: frames per observation.
        num_envs: env streams added together, each with its own episodes.
        obs_dtype, action_dtype: dtypes of observations and actions.
        n_step: rewards folded into one transition.
        gamma: discount of the n-step return.
        seed: seed of the sampler; ``None`` draws one.
    """

    prioritized = False
    _SETTINGS = frozenset({"capacity", "obs_shape", "frame_shape", "frame_stack", "num_envs", "obs_dtype",
                           "action_dtype", "n_step", "gamma", "seed"})
    """Fixed at construction: the C++ core holds them, and ``save`` writes them."""

    def __init__(self, capacity, obs_shape, frame_stack=1, num_envs=1, obs_dtype=np.uint8, action_dtype=np.int64,
                 n_step=1, gamma=0.99, seed=None):
        self._init(capacity, obs_shape, frame_stack, num_envs, obs_dtype, action_dtype, n_step, gamma, seed,
                   alpha=0.0, eps=1.0)

    def _init(self, capacity, obs_shape, frame_stack, num_envs, obs_dtype, action_dtype, n_step, gamma, seed,
              alpha, eps):
        self.num_envs = _int("num_envs", num_envs, 1)
        requested_capacity = _int("capacity", capacity, -math.inf)  # the core names the least it needs
        if not -2**63 <= requested_capacity < 2**63:
            raise ValueError(f"capacity must be a 64-bit integer, got {requested_capacity}")
        self.capacity = requested_capacity // self.num_envs * self.num_envs
        self.frame_stack = _int("frame_stack", frame_stack, 1)
        if isinstance(obs_shape, numbers.Integral):
            obs_shape = (obs_shape,)
        try:
            self.obs_shape = tuple(_int(f"obs_shape[{i}]", d, 1) for i, d in enumerate(obs_shape))
        except TypeError as error:
            raise TypeError(f"obs_shape must be a tuple of positive ints, got {obs_shape!r}") from error
        if not self.obs_shape:
            raise ValueError("obs_shape must have at least one dimension")
        if self.frame_stack > 1 and (len(self.obs_shape) < 2 or self.obs_shape[0] != self.frame_stack):
            raise ValueError(f"with frame_stack={self.frame_stack}, obs_shape must be ({self.frame_stack}, *frame_shape), "
                             f"got {self.obs_shape}")
        self.frame_shape = self.obs_shape[1:] if self.frame_stack > 1 else self.obs_shape
        self.obs_dtype = _numeric_dtype("obs_dtype", obs_dtype)
        self.action_dtype = _numeric_dtype("action_dtype", action_dtype)
        self.n_step = _int("n_step", n_step, 1)
        self.gamma = _real("gamma", gamma, 0.0, 1.0)
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
        self.seed = _int("seed", seed, 0)
        if self.seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        self._templates = {}  # one-row batches of each kind, to check caller-provided arrays against
        frame_bytes = int(np.prod(self.frame_shape)) * self.obs_dtype.itemsize
        # The capacity as given: the core rounds it the same way, and its errors name what was passed.
        try:
            self._core = _core.ReplayBuffer(requested_capacity, self.num_envs, self.frame_stack, frame_bytes,
                                            self.action_dtype.itemsize, self.n_step, self.gamma, self.seed,
                                            self.prioritized, alpha, eps)
        except MemoryError:
            raise MemoryError(f"a buffer of capacity {requested_capacity:,} with {frame_bytes:,}-byte frames needs "
                              f"{requested_capacity * frame_bytes / 1e9:.1f} GB, which this machine would not "
                              "reserve") from None

    def __setattr__(self, name: str, value) -> None:
        # An assignment the core would never see (and save would write) raises instead.
        if name in self._SETTINGS and name in self.__dict__:
            raise AttributeError(f"{name} is fixed at construction: make a new buffer to change it")
        super().__setattr__(name, value)

    def __len__(self) -> int:
        return self._core.size()

    def __reduce_ex__(self, protocol):
        # copy.copy would alias the C++ storage, and pickling cannot reach it.
        raise TypeError(f"a {type(self).__name__} cannot be copied or pickled: save() it and load() the file")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(capacity={self.capacity}, obs_shape={self.obs_shape}, "
                f"frame_stack={self.frame_stack}, num_envs={self.num_envs}, n_step={self.n_step}, len={len(self)})")

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, env_ids=None) -> None:
        """Adds one step of each env: arrays with leading dimension ``num_envs``.

        ``obs`` is what the action was taken on and ``next_obs`` what the env returned, at an
        episode's end the final observation. After an env's episode ends (terminated or
        truncated), its next ``add`` starts a new episode. With auto-resetting vector envs,
        never add the step that only resets. ``env_ids`` (distinct ints) adds rows for those
        envs only, e.g. the envs an async envpool ``recv`` returned.

        Each frame is stored once, so stacks must roll as an env's frame stack does: with
        ``frame_stack=k > 1`` each ``next_obs`` is its ``obs`` one frame on (its oldest ``k-1``
        frames are ``obs``'s newest ``k-1``), and while an episode goes on each ``obs`` is its
        env's previous ``next_obs``. Other rows could not be returned as added: they raise
        ``ValueError`` before anything changes, as do integer actions outside ``action_dtype``'s
        range and integer flags other than 0 and 1 (a cast would wrap or fold them).
        """
        env_ids = self._env_ids(env_ids, distinct=True)
        rows = self.num_envs if env_ids is None else len(env_ids)
        self._core.add(
            self._check_obs("obs", obs, rows),
            _column("actions", actions, rows, self.action_dtype, "biu" if self.action_dtype.kind in "biu" else "biuf"),
            _column("rewards", rewards, rows, np.float32, "biuf"),
            self._check_obs("next_obs", next_obs, rows),
            _column("terminated", terminated, rows, np.bool_, "biu"),
            _column("truncated", truncated, rows, np.bool_, "biu"),
            env_ids,
        )

    def end_episodes(self, env_ids=None) -> None:
        """Ends every open episode at its last added step, as a truncation: as if that step
        had been added with ``truncated=True`` (its n-step windows close and bootstrap there).
        Call it when envs restart without their episodes' ends reaching the buffer, e.g.
        after collection was interrupted or the envs were reset by hand; the next ``add``
        of each env then starts a new episode. ``env_ids`` (ints) ends only those envs'
        episodes. Other threads may sample meanwhile.
        """
        self._core.end_episodes(self._env_ids(env_ids, distinct=False))

    def _env_ids(self, env_ids, distinct: bool) -> np.ndarray | None:
        """``env_ids`` as a contiguous int64 array (None stays None), checked against num_envs."""
        if env_ids is None:
            return None
        env_ids = np.asarray(env_ids)
        if env_ids.size == 0:  # [] is float to numpy
            env_ids = env_ids.astype(np.int64)
        if env_ids.dtype.kind not in "iu" or env_ids.ndim != 1:
            raise TypeError(f"env_ids must be a 1-D int array, got {env_ids.dtype} with shape {env_ids.shape}")
        if len(env_ids) and (env_ids.min() < 0 or env_ids.max() >= self.num_envs) \
                or distinct and len(env_ids) > self.num_envs:
            raise ValueError(f"env_ids must be {'distinct ' if distinct else ''}ids in [0, {self.num_envs}), "
                             f"got {env_ids}")
        return np.ascontiguousarray(env_ids, dtype=np.int64)

    def _check_obs(self, name: str, value, rows: int) -> np.ndarray:
        array = np.asarray(value)
        if array.dtype != self.obs_dtype:
            raise TypeError(f"{name} must have dtype {self.obs_dtype}, got {array.dtype}")
        if array.shape != (rows, *self.obs_shape):
            raise ValueError(f"{name} must have shape {(rows, *self.obs_shape)}, got {array.shape}")
        return np.ascontiguousarray(array)

    def empty_batch(self, batch_size: int) -> Batch:
        """Arrays to sample into with ``sample(..., out=batch)``: no allocation per batch."""
        batch_size = _int("batch_size", batch_size, 1)
        vector = lambda dtype: np.empty(batch_size, dtype)  # noqa: E731
        return Batch(obs=np.empty((batch_size, *self.obs_shape), self.obs_dtype), actions=vector(self.action_dtype),
                     rewards=vector(np.float32), next_obs=np.empty((batch_size, *self.obs_shape), self.obs_dtype),
                     terminated=vector(np.float32), discounts=vector(np.float32), indices=vector(np.int64),
                     weights=vector(np.float32) if self.prioritized else None)

    def empty_frame_batch(self, batch_size: int) -> FrameBatch:
        """Arrays to sample into with ``sample_frames(..., out=batch)``."""
        batch = self.empty_batch(batch_size)
        fields = {k: v for k, v in batch.arrays().items() if k not in ("obs", "next_obs")}
        frames = np.empty((batch.indices.size, self.frame_stack + self.n_step, *self.frame_shape), self.obs_dtype)
        return FrameBatch(frames=frames, next_offset=np.empty(batch.indices.size, np.int64), **fields)

    def sample(self, batch_size: int, out: Batch | None = None) -> Batch:
        """Draws ``batch_size`` transitions uniformly (with replacement) from the valid ones.

        With ``out`` (``batch_size`` rows, as ``empty_batch(batch_size)`` makes), fills those
        arrays in place (e.g. pinned torch tensors seen as numpy) and returns it.
        """
        return self._sample(batch_size, out, Batch, beta=0.0)

    def sample_frames(self, batch_size: int, out: FrameBatch | None = None) -> FrameBatch:
        """Like ``sample``, in the shared-frame layout (see ``FrameBatch``)."""
        return self._sample(batch_size, out, FrameBatch, beta=0.0)

    def _sample(self, batch_size, out, kind, beta):
        batch_size = _int("batch_size", batch_size, 1)
        if len(self) == 0:
            raise ValueError("cannot sample from an empty buffer")
        if out is None:
            out = self.empty_batch(batch_size) if kind is Batch else self.empty_frame_batch(batch_size)
        else:
            self._check_out(out, kind, batch_size)
        self._core.sample(batch_size, out.arrays(), beta)
        self._uniform_weights(out)
        return out

    def _check_out(self, out, kind, batch_size: int) -> None:
        """Dtypes and shapes of caller-provided arrays (an ``out.weights`` given to a uniform
        buffer too: see ``_uniform_weights``)."""
        if not isinstance(out, kind):
            raise TypeError(f"out must be a {kind.__name__}, got {type(out).__name__}")
        if kind not in self._templates:
            self._templates[kind] = self.empty_batch(1) if kind is Batch else self.empty_frame_batch(1)
        template_arrays = self._templates[kind].arrays()
        if not self.prioritized and out.weights is not None:
            template_arrays["weights"] = _WEIGHTS_TEMPLATE
        for name, template in template_arrays.items():
            array = getattr(out, name)
            if not isinstance(array, np.ndarray) or array.dtype != template.dtype:
                got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                raise TypeError(f"out.{name} must be a numpy array of dtype {template.dtype}, got {got}")
            if array.shape != (batch_size, *template.shape[1:]):
                raise ValueError(f"out.{name} must have shape {(batch_size, *template.shape[1:])} "
                                 f"(batch_size={batch_size} rows), got {array.shape}")
            if not array.flags.writeable:
                raise ValueError(f"out.{name} is read-only: sampling writes into it")

    def _uniform_weights(self, out) -> None:
        """A uniform buffer's importance weights are all 1: an ``out.weights`` given to one is
        filled with ones (once all checks have passed) rather than left as it was."""
        if not self.prioritized and out.weights is not None:
            out.weights.fill(1.0)

    def prefetch(self, batch_size: int, depth: int | None = None, out: list[Batch] | None = None) -> Prefetcher:
        """A C++ worker thread that samples the next batches while the caller trains, ``depth``
        batches ahead (default 2), into ``out``'s batches if given (then ``depth`` is ``len(out)``)."""
        return Prefetcher(self, batch_size, depth, out)

    def get(self, indices) -> Batch:
        """The transitions at ``indices`` (as returned by ``sample``), if they are still valid."""
        indices = _indices(indices)
        out = self.empty_batch(max(indices.size, 1))
        out = Batch(**{k: v[: indices.size] for k, v in out.arrays().items()})
        self._core.get(indices, out.arrays())
        return out

    def valid_indices(self) -> np.ndarray:
        """The indices of every transition that can be sampled now, sorted (a full scan)."""
        return self._core.valid_indices()

    def save(self, path: str | os.PathLike, compression: str = "none") -> None:
        """Writes the whole buffer to ``path`` atomically; see ``fastdqn.replay_file`` for the format.

        ``compression="zstd"`` needs the ``zstandard`` package. Do not ``add`` while saving.
        """
        from fastdqn import replay_file

        replay_file.save(self, path, compression)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Reads a buffer written by ``save``; it samples exactly what the saved one would have."""
        from fastdqn import replay_file

        return replay_file.load(path, expected=cls)


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritized replay (Schaul et al., 2016) on a C++ sum tree.

    The same arguments as ``ReplayBuffer``, plus ``alpha`` (how much priorities count),
    ``beta`` (the importance-weight exponent; anneal it to 1) and ``eps`` (added to every
    priority). New transitions get the largest priority seen so far. Batches are drawn
    stratified, one draw per equal slice of the total priority, and carry ``weights``
    ``(N * P(i)) ** -beta`` normalized by the largest possible weight, that of the lowest
    priority held (so the weights are at most 1). ``alpha`` and ``eps`` are fixed at
    construction (read-only); ``beta`` may be set at any time.
    """

    prioritized = True

    def __init__(self, capacity, obs_shape, frame_stack=1, num_envs=1, obs_dtype=np.uint8, action_dtype=np.int64,
                 n_step=1, gamma=0.99, seed=None, alpha=0.6, beta=0.4, eps=1e-6):
        self._alpha = _nonnegative("alpha", alpha)
        self._eps = _nonnegative("eps", eps)
        if self._eps <= 0.0:
            raise ValueError("eps must be > 0: a zero priority would hide a transition forever")
        self._init(capacity, obs_shape, frame_stack, num_envs, obs_dtype, action_dtype, n_step, gamma, seed,
                   alpha=self._alpha, eps=self._eps)
        self.beta = beta
        # Above it, (priority + eps) ** alpha over every slot could sum past the largest double.
        exponent = (math.log(sys.float_info.max) - math.log(self.capacity)) / self._alpha if self._alpha > 0 else math.inf
        self._largest_priority = math.exp(exponent) - self._eps if exponent < math.log(sys.float_info.max) else math.inf

    # Read-only: the sum tree holds (priority + eps) ** alpha, so changing either would need
    # every leaf recomputed; an assignment raises AttributeError rather than being ignored.
    @property
    def alpha(self) -> float:
        """How much priorities count, fixed at construction."""
        return self._alpha

    @property
    def eps(self) -> float:
        """Added to every priority, fixed at construction."""
        return self._eps

    @property
    def beta(self) -> float:
        """The default importance-weight exponent, also used by prefetchers."""
        return self._core.beta

    @beta.setter
    def beta(self, value) -> None:
        self._core.beta = _nonnegative("beta", value)

    def sample(self, batch_size: int, beta: float | None = None, out: Batch | None = None) -> Batch:
        beta = self.beta if beta is None else _nonnegative("beta", beta)
        return self._sample(batch_size, out, Batch, beta)

    def sample_frames(self, batch_size: int, beta: float | None = None, out: FrameBatch | None = None) -> FrameBatch:
        beta = self.beta if beta is None else _nonnegative("beta", beta)
        return self._sample(batch_size, out, FrameBatch, beta)

    def update_priorities(self, indices, priorities) -> None:
        """Sets the priorities (e.g. |TD error|) of sampled transitions.

        Indices overwritten since they were sampled are ignored. Negative, NaN or infinite
        priorities, and indices never returned by ``sample``, raise ``ValueError`` before
        any change.
        """
        indices = np.asarray(indices)
        priorities = np.asarray(priorities)
        if indices.shape != priorities.shape or indices.ndim != 1:
            raise ValueError(f"indices and priorities must be 1-D of one length, got {indices.shape} and {priorities.shape}")
        if indices.size == 0:
            return
        indices = _indices(indices)
        if priorities.dtype.kind not in "iuf":
            raise TypeError(f"priorities must be numbers, got {priorities.dtype}")
        top = float(np.max(priorities))
        if math.isfinite(top) and top > self._largest_priority:
            raise ValueError(f"priorities must be at most {self._largest_priority:.3g}: (priority + eps) ** alpha, summed "
                             f"over the capacity, must stay finite; got {top:.3g}")
        self._core.update_priorities(indices, np.ascontiguousarray(priorities, np.float64))

    def sampling_mass(self, indices) -> np.ndarray:
        """``(priority + eps) ** alpha`` of each index: its unnormalized chance to be drawn (0 if it cannot be)."""
        return self._core.sampling_mass(_indices(indices))

    def priority_total(self) -> float:
        """The sum tree's total of priority**alpha over the valid transitions."""
        return self._core.priority_total()


class Prefetcher:
    """Samples batches on a C++ worker thread, ``depth`` batches ahead.

    ``next()`` returns the oldest ready batch, which stays valid until the following
    ``next()``; iterate or call ``next()``, and ``close()`` (or use ``with``) when done.
    A prioritized buffer's batches use its ``beta`` at the time they are drawn.
    """

    def __init__(self, buffer: ReplayBuffer, batch_size: int, depth: int | None = None,
                 out: list[Batch] | None = None):
        batch_size = _int("batch_size", batch_size, 1)
        depth = None if depth is None else _int("depth", depth, 1)
        if out is None:
            out = [buffer.empty_batch(batch_size) for _ in range(depth or 2)]
        if not out:
            raise ValueError("out must hold at least one batch")
        if depth is not None and depth != len(out):
            raise ValueError(f"depth is len(out) when out is given: got depth={depth!r} and {len(out)} batches")
        for batch in out:
            buffer._check_out(batch, Batch, batch_size)
        arrays = [array for batch in out for array in batch.arrays().values()]
        if any(np.may_share_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:]):
            raise ValueError("out's batches must not share memory: the worker fills one while you read another")
        if len(buffer) == 0:
            raise ValueError("cannot prefetch from an empty buffer")
        self._batches = list(out)
        self._core = _core.Prefetcher(buffer._core, [b.arrays() for b in self._batches], batch_size)
        for batch in self._batches:  # a uniform buffer's worker never writes them
            buffer._uniform_weights(batch)
        self._closed = False

    def next(self) -> Batch:
        return self._batches[self._core.next()]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        return self.next()

    def close(self) -> None:
        self._closed = True
        self._core.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
