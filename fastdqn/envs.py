"""Vectorized environments: envpool where it knows the id, gymnasium otherwise, one step interface.

Both backends reset an environment on the step *after* its episode ends (envpool's native behaviour,
gymnasium's ``AutoresetMode.NEXT_STEP``). That step only resets: its action is ignored, its reward is 0
and ``StepResult.valid`` is False for it, so the caller never stores it. The step that ends an episode
carries the final observation, so storing ``next_obs`` is always right.

Your own gymnasium env is reached by its registered id once the module that registers it is
imported, or as gymnasium's ``"module:Env-v0"``, which imports ``module`` first (and, kept in a
run's config, again whenever the run is evaluated or resumed).

Atari follows a named protocol (``ATARI_PROTOCOLS``). The gymnasium fallback for ALE ids (``ALE/Pong-v5``)
re-implements envpool's Atari preprocessing in ``AtariPreprocessing`` so that both backends play the
same game alike: the same rewards, terminations, truncations and returns, and the same observations
but for a grey level of resize rounding on a few pixels and the frame of a game that ends inside a
frame skip (a terminal frame, which nothing bootstraps from).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import re
import warnings
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import load_env_creator

__all__ = ["ATARI_PROTOCOLS", "AtariPreprocessing", "AtariProtocol", "StepResult", "VecEnv", "env_backend",
           "import_env_module", "is_atari_id", "make_env"]

ATARI_FRAME_SIZE = 84
ATARI_FRAME_STACK = 4
ATARI_FPS = 60  # the console's frame rate
DEFAULT_RENDER_FPS = 30.0
BOX2D_FPS = 50.0  # gymnasium's Box2D envs' rate, which their classes give only where Box2D is installed


@dataclass(frozen=True)
class AtariProtocol:
    """How Atari games are played: reset, frame skipping, termination and rewards."""

    name: str
    """Short name recorded with results ("cleanrl", "machado")."""
    source: str
    """Who defined the protocol, for the description."""
    noop_max: int
    """A reset plays U{1..noop_max} no-op frames (one fewer when a FIRE frame follows); 1 means no random starts."""
    sticky_actions: float
    """ALE repeat_action_probability: each frame repeats the previous action with this probability."""
    fire_reset: bool
    """Press FIRE once after each reset (including after a life loss) in games that have FIRE."""
    episodic_life: bool
    """A life loss ends the episode (terminated) and the next life starts as after a reset (new
    frame stack, the random no-ops, FIRE); the game goes on. Evaluation keeps it, as CleanRL's
    does, so that an agent is never left waiting for a FIRE it never had to press; it scores
    whole games. (That next start is envpool's; CleanRL's wrappers play one no-op step, FIRE
    and RIGHT there instead: 12 frames rather than 1-30.)"""
    clip_rewards: bool
    """Training only: rewards become their sign. Episode returns stay raw."""
    frame_skip: int = 4
    """Agent steps repeat the action for this many frames and max-pool the last two."""
    max_episode_steps: int = 27_000
    """Truncate a game after this many agent steps (27,000 steps = 108,000 frames)."""

    def __post_init__(self) -> None:
        if not isinstance(self.noop_max, int) or self.noop_max < 1:
            raise ValueError(f"noop_max must be an int >= 1 (1 = no random no-op starts), got {self.noop_max!r}")
        if not 0.0 <= self.sticky_actions < 1.0:
            raise ValueError(f"sticky_actions must be in [0, 1), got {self.sticky_actions!r}")
        if not isinstance(self.frame_skip, int) or self.frame_skip < 2:
            raise ValueError(f"frame_skip must be an int >= 2 (the last two frames are max-pooled), got {self.frame_skip!r}")
        if not isinstance(self.max_episode_steps, int) or self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be a positive int, got {self.max_episode_steps!r}")

    def for_mode(self, mode: str) -> AtariProtocol:
        """The protocol as played in `mode`: evaluation scores whole games with raw rewards."""
        if mode == "eval":
            return dataclasses.replace(self, clip_rewards=False)
        return self

    def describe(self, mode: str) -> str:
        """One line naming the protocol and every setting, for logs and evaluation output."""
        p = self.for_mode(mode)
        starts = "reset and life loss" if p.episodic_life else "reset"
        noops = f"up to {p.noop_max} random no-op frames at {starts}" if p.noop_max > 1 else "no no-op starts"
        episodes = "episodic life" if p.episodic_life else "full games"
        parts = [
            noops,
            f"FIRE after {starts}" if p.fire_reset else "no FIRE reset",
            f"frame skip {p.frame_skip} (max-pool of the last 2 frames)",
            f"{ATARI_FRAME_SIZE}x{ATARI_FRAME_SIZE} grayscale",
            f"{ATARI_FRAME_STACK}-frame stack",
            f"sticky actions {p.sticky_actions:g}" if p.sticky_actions else "no sticky actions",
            episodes + (", scored by whole games" if mode == "eval" else ""),
            "sign-clipped rewards" if p.clip_rewards else "raw rewards",
            f"at most {p.max_episode_steps:,} agent steps ({p.max_episode_steps * p.frame_skip:,} frames)",
        ]
        return f"{p.source} ({mode}): " + ", ".join(parts)


ATARI_PROTOCOLS: dict[str, AtariProtocol] = {
    # CleanRL dqn_atari.py: NoopReset(30), MaxAndSkip(4), EpisodicLife, FireReset, ClipReward, 84x84 gray, stack 4.
    "cleanrl": AtariProtocol(
        name="cleanrl", source="CleanRL dqn_atari", noop_max=30, sticky_actions=0.0,
        fire_reset=True, episodic_life=True, clip_rewards=True,
    ),
    # Machado et al. (2018), as in gymnasium's ALE v5 and Dopamine: sticky actions replace no-op starts,
    # an episode is a whole game, the minimal action set.
    "machado": AtariProtocol(
        name="machado", source="Machado et al. (2018)", noop_max=1, sticky_actions=0.25,
        fire_reset=False, episodic_life=False, clip_rewards=True,
    ),
}

_MODES = ("train", "eval")
_BACKENDS = ("auto", "envpool", "gymnasium")
# envpool modules whose env steps take well under a microsecond: one worker thread steps a
# whole batch faster than several threads can share it out (make_env's num_threads default).
_ONE_THREAD_ENVPOOL_MODULES = ("envpool.classic_control", "envpool.toy_text")


@dataclass(frozen=True, slots=True)
class StepResult:
    """One batch of transitions. Rows follow `env_ids`."""

    obs: np.ndarray
    """Observation to act on next (a reset observation on rows that just reset)."""
    next_obs: np.ndarray
    """Observation to store for this transition (the final observation where an episode ended)."""
    rewards: np.ndarray
    """float32; sign-clipped in Atari training, raw otherwise."""
    terminated: np.ndarray
    """bool; the episode reached a terminal state (a life loss counts, with episodic life)."""
    truncated: np.ndarray
    """bool; the episode was cut by a time limit. Never set together with `terminated`."""
    valid: np.ndarray
    """bool; False on rows that only reset (no transition: never store them)."""
    env_ids: np.ndarray
    """int32; which environment each row belongs to."""
    episode_returns: np.ndarray
    """float64; raw returns of the games that finished at this step (a game spans all lives)."""
    episode_lengths: np.ndarray
    """int64; their lengths in agent steps, reset-only steps not counted."""
    episode_env_ids: np.ndarray
    """int32; the environment each of those games was played in."""


_NO_RETURNS = np.zeros(0, np.float64)
_NO_LENGTHS = np.zeros(0, np.int64)
_NO_ENV_IDS = np.zeros(0, np.int32)
_NO_RETURNS.flags.writeable = False
_NO_LENGTHS.flags.writeable = False
_NO_ENV_IDS.flags.writeable = False


class VecEnv:
    """A batch of `num_envs` environments of one id, stepped together (or in async batches on envpool)."""

    env_id: str
    backend: str
    protocol: str | None
    """Atari protocol name, None for other environments."""
    protocol_description: str
    mode: str
    num_envs: int
    batch_size: int
    """Rows per `recv`; below `num_envs` only in envpool's async mode."""
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    num_actions: int
    frame_stack: int
    is_image: bool
    max_episode_steps: int | None
    """The time limit: the most steps an episode lasts (None: none)."""

    def __init__(self, env_id: str, backend: str, mode: str, num_envs: int, batch_size: int,
                 atari: AtariProtocol | None, observation_space: Any, action_space: Any, render: bool,
                 max_episode_steps: int | None) -> None:
        self.env_id, self.backend, self.mode = env_id, backend, mode
        self.num_envs, self.batch_size = num_envs, batch_size
        self.atari = atari.for_mode(mode) if atari is not None else None
        self.protocol = atari.name if atari is not None else None
        self.protocol_description = (
            atari.describe(mode) if atari is not None else f"{env_id} as registered ({backend}), raw rewards"
        )
        self.obs_shape = tuple(int(d) for d in observation_space.shape)
        self.obs_dtype = np.dtype(observation_space.dtype)
        self.num_actions = int(action_space.n)
        self.frame_stack = ATARI_FRAME_STACK if atari is not None else 1
        self.is_image = len(self.obs_shape) == 3
        self._render = render
        self.max_episode_steps = max_episode_steps
        self._clip_rewards = self.atari is not None and self.atari.clip_rewards
        # The next step of an env whose episode just ended only resets it.
        self._resetting = np.zeros(num_envs, bool)
        self._returns = np.zeros(num_envs, np.float64)
        self._lengths = np.zeros(num_envs, np.int64)
        self._age = np.zeros(num_envs, np.int64)  # valid steps since the episode started, capped at the stack size
        self._started = False
        self._closed = False
        self._in_flight = 0  # envs sent (or reset asynchronously) whose results recv has not returned

    # ---- public interface -------------------------------------------------------------------------

    def reset(self) -> np.ndarray:
        """Reset every env (sync mode) and return the first observations, shape (num_envs, *obs_shape)."""
        if self.batch_size != self.num_envs:
            raise RuntimeError("reset() is for sync mode; this env is async (batch_size < num_envs): use async_reset()")
        self._check_open()
        obs = self._reset()
        self._begin(resetting=False)
        return obs

    def step(self, actions: Any) -> StepResult:
        """Step every env with `actions` (num_envs,) and return the transitions (sync mode)."""
        if self.batch_size != self.num_envs:
            raise RuntimeError("step() is for sync mode; this env is async (batch_size < num_envs): use send()/recv()")
        self.send(actions)
        return self.recv()

    def async_reset(self) -> None:
        """Start every env resetting; each env's reset comes back from `recv` as a row with valid=False."""
        self._check_open()
        self._async_reset()
        self._begin(resetting=True)

    def send(self, actions: Any, env_ids: Any = None) -> None:
        """Queue `actions` for `env_ids` (default: all envs, in order); collect the results with `recv`."""
        self._check_open()
        if not self._started:
            raise RuntimeError("call reset() (sync) or async_reset() (async) before stepping")
        if env_ids is not None:
            given = np.asarray(env_ids)
            if given.ndim != 1 or given.dtype.kind not in "iu":
                raise TypeError(f"env_ids must be a 1-D array of integers, got {given!r}")
            if len(given) and (given.min() < 0 or given.max() >= self.num_envs):
                raise ValueError(f"env_ids must be in [0, {self.num_envs}), got {given.min()}..{given.max()}")
            if len(np.unique(given)) != len(given):
                raise ValueError(f"env_ids must be distinct (one action per env), got {given}")
            env_ids = given.astype(np.int32)
        actions = np.asarray(actions)
        n = self.num_envs if env_ids is None else len(env_ids)
        if actions.shape != (n,):
            raise ValueError(f"actions must have shape ({n},), got {actions.shape}")
        if actions.dtype.kind not in "iu":
            raise TypeError(f"actions must be integers, got dtype {actions.dtype}")
        if n and (actions.min() < 0 or actions.max() >= self.num_actions):
            raise ValueError(f"actions must be in [0, {self.num_actions}), got {actions.min()}..{actions.max()}")
        self._send(actions, env_ids)
        self._in_flight += n

    def recv(self) -> StepResult:
        """The next batch of `batch_size` transitions (rows follow `env_ids`)."""
        self._check_open()
        if self._in_flight < self.batch_size:  # it would wait forever (envpool), or return nothing
            raise RuntimeError(f"recv() with {self._in_flight} envs stepping, fewer than its batch of "
                               f"{self.batch_size}: send() actions (after reset() or async_reset()) first")
        obs, raw_rewards, terminated, truncated, game_over, env_ids = self._recv()
        self._in_flight -= len(env_ids)
        raw_rewards = raw_rewards.astype(np.float32, copy=False)
        truncated = truncated & ~terminated
        valid = ~self._resetting[env_ids]
        self._resetting[env_ids] = terminated | truncated
        if self.frame_stack > 1:
            self._hide_frames_before_episode_start(obs, valid, env_ids)
        rewards = np.sign(raw_rewards) if self._clip_rewards else raw_rewards
        self._returns[env_ids] += raw_rewards
        self._lengths[env_ids] += valid
        episode_returns, episode_lengths, ended = _NO_RETURNS, _NO_LENGTHS, _NO_ENV_IDS
        if game_over.any():
            ended = env_ids[game_over]
            episode_returns, episode_lengths = self._returns[ended], self._lengths[ended]
            self._returns[ended] = 0.0
            self._lengths[ended] = 0
        return StepResult(obs, obs, rewards, terminated, truncated, valid, env_ids, episode_returns, episode_lengths,
                          ended)

    @property
    def render_fps(self) -> float:
        """Rendered steps per second that play the game in real time (an Atari step spans frame_skip frames)."""
        return ATARI_FPS / self.atari.frame_skip if self.atari is not None else self._render_fps()

    def render(self, env_id: int = 0) -> np.ndarray:
        """Env ``env_id``'s current screen as an (H, W, 3) RGB uint8 array; the env must be made with render=True."""
        self._check_open()
        if not self._render:
            raise RuntimeError("this env was made without render=True")
        _check_int("env_id", env_id, 0, self.num_envs - 1)
        return self._render_frame(int(env_id))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this env is closed (a DQN agent closes its training envs after an interrupted or "
                               "async learn() and on load; the next learn() makes new ones)")

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VecEnv({self.env_id!r}, backend={self.backend!r}, num_envs={self.num_envs}, "
                f"batch_size={self.batch_size}, mode={self.mode!r}, protocol={self.protocol!r})")

    def _hide_frames_before_episode_start(self, obs: np.ndarray, valid: np.ndarray, env_ids: np.ndarray) -> None:
        """Frame stacks never reach back past the start of an episode (or, with episodic life, of a life).

        envpool keeps the frames from before a life loss in the stack; CleanRL's FrameStack restarts it
        from the first frame repeated, and so do we: a row `age` valid steps into its episode has its
        oldest `stack - 1 - age` frames replaced by the episode's first frame.
        """
        stack = self.frame_stack
        age = np.where(valid, self._age[env_ids] + 1, 0)
        self._age[env_ids] = np.minimum(age, stack)
        young = age < stack - 1
        if not young.any():
            return
        for a in range(stack - 1):
            rows = np.flatnonzero(age == a)
            if len(rows):
                first = stack - 1 - a
                obs[rows, :first] = obs[rows, first : first + 1]

    def _begin(self, resetting: bool) -> None:
        self._in_flight = self.num_envs if resetting else 0
        self._resetting[:] = resetting
        self._age[:] = 0
        self._returns[:] = 0.0
        self._lengths[:] = 0
        self._started = True

    # ---- backend hooks: (obs, raw rewards f32, terminated, truncated, game over, env ids int32) --------

    def _reset(self) -> np.ndarray:
        raise NotImplementedError

    def _async_reset(self) -> None:
        raise NotImplementedError

    def _send(self, actions: np.ndarray, env_ids: np.ndarray | None) -> None:
        raise NotImplementedError

    def _recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _render_frame(self, env_id: int) -> np.ndarray:
        raise NotImplementedError

    def _render_fps(self) -> float:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class _EnvpoolVecEnv(VecEnv):
    def __init__(self, env_id: str, num_envs: int, seed: int, mode: str, batch_size: int,
                 atari: AtariProtocol | None, num_threads: int | None, max_episode_steps: int | None,
                 render: bool) -> None:
        import envpool

        kwargs: dict[str, Any] = {"num_envs": num_envs, "batch_size": batch_size, "seed": seed}
        if render:
            installed = importlib.metadata.version("envpool")
            if tuple(int(part) for part in re.findall(r"\d+", installed)[:3]) < (1, 0, 1):  # 1.0.1 added render
                raise ValueError(f"rendering {env_id} (a video) needs envpool 1.0.1 or newer, installed {installed}: "
                                 "pip install -U envpool")
            kwargs["render_mode"] = "rgb_array"
        if num_threads is not None:
            kwargs["num_threads"] = num_threads
        if atari is not None:
            p = atari.for_mode(mode)
            kwargs.update(
                noop_max=p.noop_max, repeat_action_probability=p.sticky_actions, use_fire_reset=p.fire_reset,
                episodic_life=p.episodic_life, reward_clip=False, frame_skip=p.frame_skip,
                max_episode_steps=p.max_episode_steps, stack_num=ATARI_FRAME_STACK, img_height=ATARI_FRAME_SIZE,
                img_width=ATARI_FRAME_SIZE, gray_scale=True, full_action_space=False,
            )
        elif max_episode_steps is not None:
            kwargs["max_episode_steps"] = max_episode_steps
        self._pool = envpool.make_gymnasium(env_id, **kwargs)
        try:
            # envpool builds its spaces on first use; the classic-control ones trip a harmless
            # gymnasium dtype warning.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*precision lowered by casting to float32",
                                        category=UserWarning)
                observation_space, action_space = self._pool.observation_space, self._pool.action_space
            _check_spaces(env_id, observation_space, action_space)
            super().__init__(env_id, "envpool", mode, num_envs, batch_size, atari, observation_space, action_space,
                             render, getattr(self._pool.spec.config, "max_episode_steps", None))
            self._layout = _EnvpoolLayout.of(self._pool, atari is not None)
        except BaseException:
            self._pool.close()
            raise
        self._all_ids = np.arange(num_envs, dtype=np.int32)

    def _reset(self) -> np.ndarray:
        obs, _ = self._pool.reset()
        return obs

    def _async_reset(self) -> None:
        self._pool.async_reset()

    def _send(self, actions: np.ndarray, env_ids: np.ndarray | None) -> None:
        if self._layout is None:
            self._pool.send(actions, env_ids)
            return
        env_ids = self._all_ids if env_ids is None else env_ids
        self._pool._send(self._layout.actions(actions, env_ids))

    def _recv(self) -> tuple[np.ndarray, ...]:
        # envpool hands out freshly allocated arrays: rows the caller holds are never overwritten.
        if self._layout is None:  # its "done" is gymnasium's terminated, already without truncation
            obs, rewards, done, truncated, info = self._pool.recv()
            env_ids, game_rewards, game_ended = info["env_id"], info.get("reward"), info.get("terminated")
        else:
            obs, rewards, done, truncated, env_ids, game_rewards, game_ended = self._layout.state(self._pool._recv())
        terminated = done & ~truncated
        if self.atari is None:
            return obs, rewards, terminated, truncated, terminated | truncated, env_ids
        # envpool reports a game that ends on the time limit's last step as truncated; it terminated.
        game_ended = game_ended.astype(bool)
        truncated = truncated & ~game_ended
        terminated = terminated | game_ended
        return obs, game_rewards, terminated, truncated, game_ended | truncated, env_ids

    def _render_frame(self, env_id: int) -> np.ndarray:
        return self._pool.render(env_ids=[env_id])[0]

    def _render_fps(self) -> float:
        """The rate gymnasium gives the same id (classic control: CartPole-v1 plays at 50)."""
        try:
            entry_point = gym.spec(self.env_id).entry_point
            creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
            return float(creator.metadata["render_fps"])
        except Exception:  # noqa: BLE001 - not registered there, no metadata, an optional package missing
            return BOX2D_FPS if _envpool_module(self.env_id) == "envpool.box2d" else DEFAULT_RENDER_FPS

    def _close(self) -> None:
        self._pool.close()


class _EnvpoolLayout:
    """Where envpool's C++ core puts each field, so that a step can skip envpool's Python wrapper.

    The core takes and hands back plain lists of arrays, in the order of the pool's
    ``_spec._action_keys`` and ``_state_keys``. envpool's public ``send``/``recv`` convert
    those lists from and to gymnasium's tuples in Python, which costs as much as a whole
    CartPole step. ``of`` reads the key lists once; for a pool whose keys are not the ones
    below (another envpool version, a dict observation) it gives None, and the env keeps to
    the public API. A test checks that both paths give the same steps.
    """

    _ACTION_KEYS = ("env_id", "players.env_id", "action")
    _STATE_KEYS = ("obs", "reward", "done", "trunc", "info:env_id")
    _ATARI_STATE_KEYS = ("info:reward", "info:terminated")  # the raw game reward, the game's end

    def __init__(self, state_index: list[int | None], action_dtype: np.dtype) -> None:
        self._state_index = state_index
        self._action_dtype = action_dtype

    @classmethod
    def of(cls, pool: Any, atari: bool) -> _EnvpoolLayout | None:
        try:
            state_keys, action_keys = list(pool._state_keys), tuple(pool._spec._action_keys)
            action_dtype = np.dtype(pool._spec._action_spec[-1][0])
        except Exception:  # noqa: BLE001 - any other layout: the public API
            return None
        wanted = cls._STATE_KEYS + (cls._ATARI_STATE_KEYS if atari else ())
        if (action_keys != cls._ACTION_KEYS or not set(wanted) <= set(state_keys)
                or not all(hasattr(pool, entry) for entry in ("_send", "_recv"))):
            return None
        return cls([state_keys.index(name) if name in wanted else None
                    for name in cls._STATE_KEYS + cls._ATARI_STATE_KEYS], action_dtype)

    def actions(self, actions: np.ndarray, env_ids: np.ndarray) -> list[np.ndarray]:
        """The core's action list (single-player envs: one player per env). Copies, as envpool's
        send does: its worker threads read the arrays after ``_send`` returns, and the caller
        may reuse them by then (the learner's action tensor is rewritten by the next act)."""
        env_ids = np.array(env_ids, dtype=np.int32)
        return [env_ids, env_ids, np.array(actions, dtype=self._action_dtype)]

    def state(self, arrays: list[np.ndarray]) -> list[np.ndarray | None]:
        """obs, reward, done, trunc, env ids, and for Atari the raw game reward and the game's end."""
        return [None if i is None else arrays[i] for i in self._state_index]


class _GymnasiumVecEnv(VecEnv):
    def __init__(self, env_id: str, num_envs: int, seed: int, mode: str,
                 atari: AtariProtocol | None, max_episode_steps: int | None, render: bool) -> None:
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        render_kwargs = {"render_mode": "rgb_array"} if render else {}
        if atari is not None:
            p = atari.for_mode(mode)

            def make_one() -> gym.Env:
                ale = gym.make(env_id, frameskip=1, repeat_action_probability=p.sticky_actions,
                               full_action_space=False, max_num_frames_per_episode=None, obs_type="grayscale",
                               **render_kwargs)
                return AtariPreprocessing(ale, p)
        else:
            kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}

            def make_one() -> gym.Env:
                return gym.make(env_id, **kwargs, **render_kwargs)

        try:
            with warnings.catch_warnings():  # an env that cannot render gets a ValueError below instead
                warnings.filterwarnings("ignore", message=r".*not in the possible render_modes")
                self._vec = SyncVectorEnv([make_one for _ in range(num_envs)], autoreset_mode=AutoresetMode.NEXT_STEP)
        except gym.error.DependencyNotInstalled as e:  # raised as any other missing package is
            raise ModuleNotFoundError(f"{env_id} needs a package that is not installed: {e}") from e
        except TypeError as e:
            if render and "render_mode" in str(e):  # an env written without rendering in mind
                raise ValueError(f"{env_id} does not render frames (a video needs its render mode 'rgb_array'; "
                                 "its constructor takes no render_mode)") from e
            raise
        try:
            _check_spaces(env_id, self._vec.single_observation_space, self._vec.single_action_space)
            metadata = self._vec.envs[0].metadata
            if render and "rgb_array" not in metadata.get("render_modes", ()):
                raise ValueError(f"{env_id} does not render frames (a video needs its render mode 'rgb_array'; "
                                 f"it has {list(metadata.get('render_modes', ()))})")
            super().__init__(env_id, "gymnasium", mode, num_envs, num_envs, atari,
                             self._vec.single_observation_space, self._vec.single_action_space, render,
                             atari.max_episode_steps if atari is not None else
                             max_episode_steps or gym.spec(env_id).max_episode_steps)
        except BaseException:
            self._vec.close()
            raise
        self._seed: int | None = seed  # envs are seeded once, on the first reset
        self._all_ids = np.arange(num_envs, dtype=np.int32)
        self._actions: np.ndarray | None = None
        self._pending_reset: np.ndarray | None = None

    def _reset(self) -> np.ndarray:
        obs, _ = self._vec.reset(seed=self._seed)
        self._seed = None
        return obs

    def _async_reset(self) -> None:
        self._pending_reset = self._reset()

    def _send(self, actions: np.ndarray, env_ids: np.ndarray | None) -> None:
        if env_ids is not None and not np.array_equal(env_ids, self._all_ids):
            raise ValueError("the gymnasium backend steps all envs together: env_ids must be None or all ids in order")
        self._actions = actions

    def _recv(self) -> tuple[np.ndarray, ...]:
        if self._pending_reset is not None:  # async_reset's rows: resets only
            obs, self._pending_reset, self._actions = self._pending_reset, None, None
            no = np.zeros(self.num_envs, bool)
            return obs, np.zeros(self.num_envs, np.float32), no, no.copy(), no.copy(), self._all_ids.copy()
        if self._actions is None:
            raise RuntimeError("recv() without a send()")
        obs, rewards, terminated, truncated, info = self._vec.step(self._actions)
        self._actions = None
        game_over = info["game_over"] if self.atari is not None else terminated | truncated
        return obs, rewards, terminated, truncated, game_over, self._all_ids.copy()

    def _render_frame(self, env_id: int) -> np.ndarray:
        try:
            return self._vec.envs[env_id].render()
        except gym.error.DependencyNotInstalled as e:
            raise ModuleNotFoundError(f"rendering {self.env_id} needs a package that is not installed: {e}") from e

    def _render_fps(self) -> float:
        return float(self._vec.envs[0].metadata.get("render_fps") or DEFAULT_RENDER_FPS)

    def _close(self) -> None:
        self._vec.close()


def _area_resize(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA shrink along one axis as (size_out, k) source indices and weights.

    Output pixel i averages the source interval [i * scale, (i + 1) * scale), weighting each source pixel
    by its overlap. At most k = ceil(scale) + 1 source pixels overlap one output pixel, so a gather
    of k rows beats a dense matrix product by far.
    """
    scale = size_in / size_out
    start = np.arange(size_out)[:, None] * scale
    pixel = np.arange(size_in)[None, :]
    weights = np.clip(np.minimum(start + scale, pixel + 1) - np.maximum(start, pixel), 0.0, None) / scale
    k = int((weights > 0).sum(1).max())
    index = (weights > 0).argmax(1)[:, None] + np.arange(k)
    inside = index < size_in
    index = np.minimum(index, size_in - 1)
    return index, (np.take_along_axis(weights, index, 1) * inside).astype(np.float32)


class AtariPreprocessing(gym.Wrapper):
    """envpool's Atari preprocessing for a gymnasium ALE env created with frameskip=1.

    Reset: a real game reset (unless episodic life and the game is not over), U{1..noop_max} no-op frames
    (one fewer when FIRE follows), FIRE. Step: repeat the action for frame_skip frames (stop at game over),
    max-pool the last two grayscale frames, area-resize to 84x84, push onto a 4-frame stack. Rewards are raw;
    info["game_over"] marks the end of a whole game (game over or time limit).
    """

    def __init__(self, env: gym.Env, protocol: AtariProtocol) -> None:
        from ale_py import Action

        super().__init__(env)
        self._p = protocol
        self._ale = env.unwrapped.ale
        self._action_set = list(env.unwrapped._action_set)
        self._noop = Action.NOOP
        self._fire = Action.FIRE if protocol.fire_reset and Action.FIRE in self._action_set else None
        height, width = self._ale.getScreenDims()
        self._row_index, self._row_weights = _area_resize(height, ATARI_FRAME_SIZE)
        self._col_index, self._col_weights = _area_resize(width, ATARI_FRAME_SIZE)
        self._screens = np.zeros((2, height, width), np.uint8)
        self._stack = np.zeros((ATARI_FRAME_STACK, ATARI_FRAME_SIZE, ATARI_FRAME_SIZE), np.uint8)
        self._rng = np.random.default_rng()
        self._lives = 0
        self._elapsed = 0
        self._game_running = False
        self.observation_space = gym.spaces.Box(0, 255, self._stack.shape, np.uint8)
        self.action_space = gym.spaces.Discrete(len(self._action_set))

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        new_game = (seed is not None or not self._game_running or not self._p.episodic_life
                    or self._ale.game_over() or self._elapsed >= self._p.max_episode_steps)
        if new_game:
            self.env.reset(seed=seed, options=options)
            self._elapsed = 0
        for _ in range(int(self._rng.integers(self._p.noop_max)) + 1 - (self._fire is not None)):
            self._ale.act(self._noop)
            if self._ale.game_over():
                self.env.reset()
                new_game = True
        if self._fire is not None:
            self._ale.act(self._fire)
        self._ale.getScreenGrayscale(self._screens[1])
        self._push(self._screens[1], fill=new_game)
        self._lives = self._ale.lives()
        self._game_running = True
        return self._stack.copy(), {"game_over": False}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        ale_action = self._action_set[action]
        reward = 0.0
        skip = self._p.frame_skip
        for frame in range(skip):
            reward += self._ale.act(ale_action)
            if self._ale.game_over():
                break
            if frame == skip - 2:
                self._ale.getScreenGrayscale(self._screens[0])
        self._ale.getScreenGrayscale(self._screens[1])
        completed = frame == skip - 1
        self._push(np.maximum(self._screens[0], self._screens[1]) if completed else self._screens[1])
        self._elapsed += 1
        game_over = self._ale.game_over()
        lives = self._ale.lives()
        truncated = not game_over and self._elapsed >= self._p.max_episode_steps
        terminated = game_over or (self._p.episodic_life and 0 < lives < self._lives)
        self._lives = lives
        return self._stack.copy(), reward, terminated, truncated, {"game_over": game_over or truncated}

    def _push(self, screen: np.ndarray, fill: bool = False) -> None:
        rows = np.einsum("ok,okw->ow", self._row_weights, screen[self._row_index].astype(np.float32))
        small = np.einsum("hok,ok->ho", rows[:, self._col_index], self._col_weights)
        frame = np.clip(np.rint(small), 0, 255).astype(np.uint8)
        if fill:
            self._stack[:] = frame
        else:
            self._stack[:-1] = self._stack[1:]
            self._stack[-1] = frame


def _check_spaces(env_id: str, observation_space: Any, action_space: Any) -> None:
    if not isinstance(observation_space, gym.spaces.Box) or not observation_space.shape \
            or np.dtype(observation_space.dtype).kind not in "uif":
        raise ValueError(f"DQN needs a numeric Box observation space (an array); {env_id} has {observation_space}")
    if not isinstance(action_space, gym.spaces.Discrete) or int(action_space.start) != 0:
        raise ValueError(f"DQN needs a Discrete action space starting at 0; {env_id} has {action_space}")


def _envpool_ids() -> list[str]:
    try:
        import envpool
    except ImportError:
        return []
    return list(envpool.list_all_envs())


def _gymnasium_ids() -> list[str]:
    try:
        import ale_py  # registers the ALE/... ids

        gym.register_envs(ale_py)
    except ImportError:
        pass
    return list(gym.registry.keys())


def _envpool_module(env_id: str) -> str:
    """The envpool module that registers ``env_id``: "envpool.atari", "envpool.classic_control", ..."""
    from envpool.registration import registry

    return registry.specs[env_id][0]


def is_atari_id(env_id: str, backend: str = "auto") -> bool:
    """Whether ``make_env`` plays ``env_id`` as Atari, under an Atari protocol: envpool's Atari ids
    (``Pong-v5``) and every id gymnasium's ALE registers (``ALE/Pong-v5``, CleanRL's
    ``PongNoFrameskip-v4``). False for an id neither knows."""
    try:
        backend, name = _resolve(env_id, backend)
    except (ValueError, ImportError):
        return False
    return _envpool_module(name) == "envpool.atari" if backend == "envpool" else _is_gymnasium_atari(name)


def _is_gymnasium_atari(env_id: str) -> bool:
    entry_point = gym.spec(env_id).entry_point
    return isinstance(entry_point, str) and entry_point.startswith("ale_py")


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def make_env(
    env_id: str,
    num_envs: int = 1,
    seed: int = 0,
    *,
    mode: str = "train",
    protocol: str | AtariProtocol = "cleanrl",
    backend: str = "auto",
    batch_size: int | None = None,
    num_threads: int | None = None,
    max_episode_steps: int | None = None,
    render: bool = False,
) -> VecEnv:
    """Make `num_envs` copies of `env_id` behind the `VecEnv` interface.

    backend: "auto" uses envpool for the ids it knows and gymnasium for any other registered id.
    mode: "train" or "eval" (Atari evaluation has raw rewards; episode_returns score whole games).
    protocol: Atari protocol name in ATARI_PROTOCOLS or an AtariProtocol; ignored by other envs.
    batch_size: envpool async mode when below num_envs (use async_reset/send/recv).
    num_threads: envpool worker threads. The default is one for classic control and toy text,
        whose steps cost less than handing them to another thread (CartPole trains 10% faster
        than on envpool's default), and envpool's own (one per env, up to the cores) otherwise.
    max_episode_steps: time limit override (for Atari it replaces the protocol's).
    render: make ``VecEnv.render`` give each env's screen (a video's frames); envpool needs 1.0.1 or newer.
    """
    if not isinstance(env_id, str):
        raise TypeError(f"env_id must be a str, got {type(env_id).__name__}")
    _check_int("num_envs", num_envs, 1)
    _check_int("seed", seed, 0, 2**31 - 1)
    if not isinstance(render, (bool, np.bool_)):
        raise TypeError(f"render must be a bool, got {type(render).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if isinstance(protocol, str):
        if protocol not in ATARI_PROTOCOLS:
            raise ValueError(f"protocol must be one of {tuple(ATARI_PROTOCOLS)} or an AtariProtocol, got {protocol!r}")
        atari_protocol = ATARI_PROTOCOLS[protocol]
    elif isinstance(protocol, AtariProtocol):
        atari_protocol = protocol
    else:
        raise TypeError(f"protocol must be a str or an AtariProtocol, got {type(protocol).__name__}")
    if batch_size is None:
        batch_size = num_envs
    _check_int("batch_size", batch_size, 1, num_envs)
    if num_threads is not None:
        _check_int("num_threads", num_threads, 0)
    if max_episode_steps is not None:
        _check_int("max_episode_steps", max_episode_steps, 1)
        atari_protocol = dataclasses.replace(atari_protocol, max_episode_steps=max_episode_steps)

    backend, env_id = _resolve(env_id, backend)
    if backend == "gymnasium":
        if batch_size != num_envs:
            raise ValueError(f"batch_size < num_envs (async mode) needs envpool; {env_id} runs on gymnasium")
        if num_threads is not None:
            raise ValueError("num_threads is an envpool setting; this env runs on gymnasium")
        atari = atari_protocol if _is_gymnasium_atari(env_id) else None
        return _GymnasiumVecEnv(env_id, num_envs, seed, mode, atari, max_episode_steps, render)
    module = _envpool_module(env_id)
    atari = atari_protocol if module == "envpool.atari" else None
    if num_threads is None and module in _ONE_THREAD_ENVPOOL_MODULES:
        num_threads = 1
    return _EnvpoolVecEnv(env_id, num_envs, seed, mode, batch_size, atari, num_threads, max_episode_steps, render)


def env_backend(env_id: str, backend: str = "auto") -> str:
    """Which package makes ``env_id`` with ``make_env(..., backend=backend)``: "envpool" or
    "gymnasium". ValueError, with close matches, for an id it does not know."""
    return _resolve(env_id, backend)[0]


def _resolve(env_id: str, backend: str) -> tuple[str, str]:
    """``env_backend``'s answer, and the id as registered there (``_registered_id``)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    name = _registered_id(env_id)
    envpool_ids = _envpool_ids() if backend != "gymnasium" else []
    if name in envpool_ids:
        return "envpool", name
    if backend == "envpool":
        if not envpool_ids:
            raise ImportError("backend='envpool' needs the envpool package (pip install envpool)")
        raise ValueError(_unknown_id_message(env_id, envpool_ids, "envpool"))
    gymnasium_ids = _gymnasium_ids()
    if name not in gymnasium_ids:
        candidates = gymnasium_ids + ([] if backend == "gymnasium" else envpool_ids)
        raise ValueError(_unknown_id_message(env_id, candidates, "envpool or gymnasium"
                                             if backend == "auto" else "gymnasium"))
    return "gymnasium", name


def _registered_id(env_id: str) -> str:
    """``env_id`` as registered: gymnasium's ``"module:Env-v0"`` imports ``module`` (which
    registers ``Env-v0``) and gives ``"Env-v0"``; any other id is returned as it is."""
    module, colon, name = env_id.rpartition(":")
    if not colon:
        return env_id
    if not module or not name:
        raise ValueError(f"env_id {env_id!r} must be an id or 'module:id'")
    import_env_module(module, f"env_id {env_id!r}")
    return name


def import_env_module(module: str, given_as: str) -> None:
    """Imports ``module``, which registers gymnasium envs; ``given_as`` says where it was named."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise  # the module is there and itself imports something missing: its own error
        raise ModuleNotFoundError(f"{given_as}: no module named {module!r} (is its folder on PYTHONPATH?)",
                                  name=e.name) from None


def _unknown_id_message(env_id: str, known: list[str], where: str) -> str:
    module, colon, name = env_id.rpartition(":")
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=5, cutoff=0.6)  # an id may be in both lists
    hint = f"; did you mean {', '.join(repr(module + colon + c) for c in close)}?" if close else ""
    if colon:
        hint += f" (module {module!r} was imported but did not register {name!r})"
    elif where != "envpool":
        hint += f"; for your own env, name the module that registers it: 'module:{name}'"
    return f"unknown env_id {env_id!r}: not registered with {where}{hint}"
