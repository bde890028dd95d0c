"""DQNConfig: every hyperparameter of a fastdqn run, in one dataclass.

The field defaults are the tuned CartPole-v1 setup, so ``DQNConfig()`` is the
configuration ``fastdqn train`` uses with no arguments. Other environments start
from a named preset (``DQNConfig.preset("atari")``) chosen by ``preset_for_env``.
Any field can be overridden from the command line with ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, fields

import numpy as np

MAX_SEED = 2**31 - 2
"""The largest seed: evaluation seeds its envs with seed + 1, and envs take seeds below 2**31."""


@dataclass
class DQNConfig:
    # --- run -----------------------------------------------------------------
    seed: int = 0
    """Seeds the environments, the replay buffer, numpy, python and torch (0 to 2**31 - 2)."""
    total_steps: int = 50_000
    """Environment steps to train for (summed over all envs) when none are given to ``learn``. The step
    after an episode's end, which only resets its env (envpool's auto-reset; never stored), counts
    as one, here and in every step count below: one step per episode."""
    num_envs: int = 8
    """Environments stepped together as one batch; each contributes one step per iteration."""
    device: str = "auto"
    """Where the networks live: "auto" (cuda if available), "cpu" or "cuda"."""
    cuda_graph: str = "auto"
    """Capture the update and action selection as CUDA graphs: "auto" (on CUDA), "on" or "off"."""
    pipeline: str = "auto"
    """"sync": act, step the envs and learn in turn (exactly reproducible); "async": the actor
    and the learner overlap at the same replay ratio (see ``actor``); "auto": async on CUDA,
    sync on CPU."""
    actor: str = "auto"
    """Where the async pipeline acts: "thread" (a second thread; fastdqn.pipeline), "process" (a
    forked process acting with weights one round of updates old, deterministic; CPU and Linux
    only, as CUDA does not survive a fork; fastdqn.actor_process) or "auto" (process on a
    Linux CPU, where two threads would take turns on Python's GIL; thread otherwise). Unused
    by the sync pipeline."""
    torch_threads: int = 2
    """CPU threads torch may use while learn() or evaluate() runs (the caller's setting is put
    back after), at most one per core this process may run on (0 leaves torch's default: all
    cores). On a 2-core Xeon, idle, `fastdqn train` (CartPole, 50k steps) took 7.7 s on two
    threads and 8.6 s on one. But OpenMP's threads wait for each other spinning: while another
    process kept one core busy the same run took 15-30 s on two threads against 7.6-8.1 s on one
    (the Nature CNN's update: 228 against 44 ms). On a machine shared with other work, set 1."""

    # --- environment ---------------------------------------------------------
    protocol: str = "cleanrl"
    """Atari protocol: "cleanrl" (dqn_atari: no sticky actions, episodic life, clipped rewards
    in training) or "machado" (Machado et al. 2018: sticky actions 0.25, full episodes)."""
    backend: str = "auto"
    """Environment backend: "auto" (envpool when it knows the id, else gymnasium), "envpool" or "gymnasium"."""

    # --- network -------------------------------------------------------------
    hidden_sizes: tuple[int, ...] = (128, 128)
    """Hidden layer widths of the MLP used for vector observations (images use the Nature CNN)."""
    dueling: bool = False
    """Use a dueling head (separate value and advantage streams)."""

    # --- learning --------------------------------------------------------------
    learning_rate: float = 2.3e-3
    """Optimizer step size."""
    optimizer: str = "adam"
    """"adam" or "rmsprop"."""
    adam_eps: float = 1e-8
    """Adam's epsilon (CleanRL's dqn_atari uses the default 1e-8)."""
    loss: str = "huber"
    """TD loss: "huber" (smooth L1) or "mse"."""
    max_grad_norm: float = 10.0
    """Clip the gradient's global L2 norm to this; 0 disables clipping."""
    gamma: float = 0.99
    """Discount factor."""
    n_step: int = 3
    """Length of the n-step return (1 is plain one-step DQN); it stops at episode ends."""
    double_dqn: bool = False
    """Pick the next action with the online network and evaluate it with the target network."""
    batch_size: int = 128
    """Transitions per gradient update."""
    buffer_size: int = 100_000
    """Replay capacity in transitions."""
    learning_starts: int = 1_000
    """Environment steps of uniformly random actions before the first update."""
    train_frequency: int = 256
    """Environment steps (summed over envs) between rounds of updates."""
    gradient_steps: int = 32
    """Updates per round; updates per environment step = gradient_steps / train_frequency,
    whatever num_envs is."""
    target_update_interval: int = 64
    """Updates between target-network updates."""
    tau: float = 1.0
    """Target update rate: 1.0 copies the online network, smaller values move the target
    that fraction of the way (soft update)."""

    # --- exploration -----------------------------------------------------------
    start_epsilon: float = 1.0
    """Exploration rate at step 0."""
    end_epsilon: float = 0.04
    """Exploration rate after the decay."""
    exploration_fraction: float = 0.16
    """Fraction of total_steps over which epsilon decays linearly from start to end."""

    # --- prioritized replay ------------------------------------------------------
    prioritized: bool = False
    """Sample transitions in proportion to |TD error|**alpha (Schaul et al. 2016)."""
    per_alpha: float = 0.6
    """How strongly priorities skew sampling (0 is uniform)."""
    per_beta: float = 0.4
    """Initial importance-sampling exponent; annealed linearly to 1 by the end of training."""
    per_eps: float = 1e-6
    """Added to |TD error| so that no transition has zero priority."""

    # --- logging, evaluation, checkpoints ----------------------------------------
    log_interval: int = 1_000
    """Environment steps between metric rows, where the loop reads the learner's metrics from the
    device (otherwise it reads back only what the host needs: actions, and new priorities)."""
    eval_interval: int = 10_000
    """Environment steps between evaluations written to eval.csv; 0 evaluates only at the end."""
    eval_episodes: int = 10
    """Episodes per evaluation; 0 turns evaluation off."""
    eval_epsilon: float = 0.0
    """Exploration rate during evaluation."""
    checkpoint_interval: int = 0
    """Environment steps between checkpoints; 0 writes only the final one. Each checkpoint ends the
    running episodes as truncations (envs cannot be saved: that is what lets --resume repeat the run
    exactly), so an interval below num_envs times the env's time limit cuts long episodes short and
    changes what is learned (learn() warns)."""
    save_buffer: bool = True
    """Store the replay buffer with each checkpoint, so that --resume continues exactly."""
    checkpoint_on_stop: bool = True
    """A run stopped by Ctrl-C (SIGTERM too under fastdqn train; DQN.request_stop in Python) writes a
    checkpoint at the step where it stops, so --resume loses no step: it goes on as the run with a
    checkpoint due there. False: --resume goes on from the last periodic checkpoint, as the
    uninterrupted run."""

    # -------------------------------------------------------------------------
    @property
    def replay_ratio(self) -> float:
        """Updates per environment step."""
        return self.gradient_steps / self.train_frequency

    def updates_due(self, step: int) -> int:
        """Updates the schedule makes by env step ``step`` (see ``DQN.updates_due``)."""
        if step < max(self.learning_starts, self.n_step * self.num_envs, 1):
            return 0
        return ((step - self.learning_starts) // self.train_frequency + 1) * self.gradient_steps

    def __post_init__(self):
        if isinstance(self.hidden_sizes, list):  # as read back from config.json
            self.hidden_sizes = tuple(self.hidden_sizes)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first field that is out of range. Numpy
        scalars (``np.int64(32)``, ``np.True_``) become the Python values config.json holds."""
        hints = typing.get_type_hints(DQNConfig)
        for f in fields(self):
            setattr(self, f.name, _python_scalars(getattr(self, f.name)))
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        positive = ["total_steps", "num_envs", "batch_size", "buffer_size", "train_frequency",
                    "gradient_steps", "target_update_interval", "n_step", "log_interval"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ["seed", "learning_starts", "eval_interval", "eval_episodes", "checkpoint_interval",
                     "torch_threads"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be <= {MAX_SEED}, got {self.seed}")
        for name in ["learning_rate", "adam_eps", "per_eps"]:
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        if not 0 <= self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be >= 0 and finite (0 disables clipping), got {self.max_grad_norm}")
        for name in ["gamma", "start_epsilon", "end_epsilon", "exploration_fraction", "per_alpha",
                     "per_beta", "eval_epsilon"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be one or more positive widths, got {self.hidden_sizes}")
        choices = {"device": ("auto", "cpu", "cuda"), "cuda_graph": ("auto", "on", "off"),
                   "protocol": ("cleanrl", "machado"), "backend": ("auto", "envpool", "gymnasium"),
                   "optimizer": ("adam", "rmsprop"), "loss": ("huber", "mse"),
                   "pipeline": ("sync", "async", "auto"), "actor": ("auto", "thread", "process")}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed and not (name == "device" and re.fullmatch(r"cuda:[0-9]+", value)):
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    # --- construction ----------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "DQNConfig":
        """The named preset (see ``PRESETS``), with ``overrides`` applied."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DQNConfig":
        if not isinstance(d, dict):
            raise TypeError(f"from_dict expects a dict of config fields, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def with_overrides(self, assignments: list[str]) -> "DQNConfig":
        """Apply ``key=value`` strings (from ``--set``), parsed by each field's type."""
        return dataclasses.replace(self, **DQNConfig.parse_overrides(assignments))

    @staticmethod
    def parse_overrides(assignments: list[str]) -> dict:
        """``key=value`` strings (from ``--set``) as {field: value}, each parsed by its field's type
        (``key`` may spell ``_`` as ``-``); ValueError for anything else."""
        if not isinstance(assignments, str):
            assignments = list(assignments)  # (a generator is read once)
        if isinstance(assignments, str) or not all(isinstance(a, str) for a in assignments):
            raise TypeError(f"assignments must be a list of 'key=value' strings, got {assignments!r}")
        hints = typing.get_type_hints(DQNConfig)
        names = [f.name for f in fields(DQNConfig)]
        changes = {}
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip().replace("-", "_")
            if not sep:
                raise ValueError(f"--set expects key=value, got {assignment!r}")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ValueError(f"unknown config field {key!r}{hint}")
            changes[key] = _parse(key, text.strip(), hints[key])
        return changes

    @property
    def effective_torch_threads(self) -> int:
        """torch_threads capped at the cores this process may run on (0 stays 0): OpenMP
        threads beyond the cores only wait on each other."""
        return min(self.torch_threads, usable_cores())

    @staticmethod
    def field_docs() -> dict[str, str]:
        """Field name -> its docstring, for --help texts."""
        return dict(_FIELD_DOCS)


def parse_int(text: str) -> int:
    """An integer as typed on a command line, 1_000_000 and 1e6 included; ValueError otherwise."""
    if "e" in text.lower() and float(text).is_integer():
        return int(float(text))
    return int(text.replace("_", ""))


def int_at_least(minimum: int, what: str):
    """An argparse type: an integer (as in 1_000_000 or 1e6, like --set) of at least ``minimum``."""
    def parse(text: str) -> int:
        import argparse

        try:
            value = parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


def _parse(name: str, text: str, hint):
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return parse_int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        if typing.get_origin(hint) is tuple:
            return tuple(int(x) for x in text.replace("(", "").replace(")", "").split(",") if x.strip())
    except ValueError:
        pass
    expected = {bool: "true/false", int: "an integer", float: "a number"}.get(hint, "comma-separated integers")
    raise ValueError(f"{name} expects {expected}, got {text!r}")


def _python_scalars(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return tuple(v.item() if isinstance(v, np.generic) else v for v in value)
    return value


def _check_type(name: str, value, hint) -> None:
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typing.get_origin(hint) is tuple:
        ok = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, hint)
    if not ok:
        expected = "a tuple of ints" if typing.get_origin(hint) is tuple else hint.__name__
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def _field_docs() -> dict[str, str]:
    """Read the attribute docstrings below each field from this module's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(DQNConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


_FIELD_DOCS = _field_docs()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


PRESETS: dict[str, dict] = {
    # CartPole-v1, solved (greedy eval >= 475) within 50k steps at a low update cost: RL Zoo's
    # CartPole DQN (Adam 2.3e-3, epsilon 1 -> 0.04 over 16% of the run) with a quarter of its
    # updates (one per 8 env steps, in rounds of 32 every 256 steps), made up for by 3-step
    # returns, batches of 128 and 8 envs, and a hard target copy every second round (64
    # updates). At 50k steps 12 of seeds 0-13 evaluate at 475 or more (10 greedy episodes),
    # seeds 5 and 13 at 321 and 227, on one torch thread or two (13 of 14 with the exploration
    # draws of an earlier version: which seeds end lower moves with every change of random
    # stream). Each alternative tried (with that earlier stream) ended with more seeds below
    # 475: a target copy every 80 or 128 updates (7, 12), Adam 2e-3 (3), final epsilon 0.02
    # (2), 16 envs (2), (64, 64) hidden (4).
    # These are DQNConfig's defaults.
    "cartpole": {},
    # RL Zoo's Acrobot-v1 DQN settings (one-step returns). Seed 0 evaluates at -75 to -87 (10
    # greedy games) at every 10k steps from 40k on; its 100k steps take 4 minutes on 2 CPU cores.
    "acrobot": dict(
        total_steps=100_000, num_envs=4, learning_rate=6.3e-4, batch_size=128, buffer_size=50_000,
        learning_starts=1_000, train_frequency=4, gradient_steps=4, target_update_interval=250,
        exploration_fraction=0.12, end_epsilon=0.1, hidden_sizes=(256, 256), n_step=1,
    ),
    # A generic starting point for other vector-observation tasks (CleanRL dqn.py's defaults).
    "classic": dict(
        total_steps=500_000, num_envs=1, learning_rate=2.5e-4, batch_size=128, buffer_size=10_000,
        learning_starts=10_000, train_frequency=10, gradient_steps=1, target_update_interval=50,
        start_epsilon=1.0, end_epsilon=0.05, exploration_fraction=0.5, hidden_sizes=(120, 84),
        max_grad_norm=0.0, loss="mse", n_step=1,
    ),
    # CleanRL's dqn_atari.py: one update of batch 32 every 4 env steps, a 1M buffer, a hard
    # target copy every 1000 env steps (= 250 updates), epsilon 1 -> 0.01 over 10% of 10M steps;
    # its evaluation plays epsilon 0.05, as Mnih et al. (2015) did.
    "atari": dict(
        total_steps=10_000_000, num_envs=1, learning_rate=1e-4, batch_size=32, buffer_size=1_000_000,
        learning_starts=80_000, train_frequency=4, gradient_steps=1, target_update_interval=250,
        tau=1.0, start_epsilon=1.0, end_epsilon=0.01, exploration_fraction=0.10, gamma=0.99, eval_epsilon=0.05,
        loss="mse", max_grad_norm=0.0, n_step=1, log_interval=10_000, eval_interval=0, checkpoint_interval=500_000,
        torch_threads=0,  # all cores: see torch_threads; on a GPU the CPU threads hardly matter
    ),
}

_CLASSIC_PRESETS = {"CartPole": "cartpole", "Acrobot": "acrobot"}


def preset_for_env(env_id: str) -> str:
    """The preset ``fastdqn train --env ID`` starts from when no --preset is given."""
    registered = env_id.rpartition(":")[2]  # gymnasium's "module:Env-v0" is Env-v0
    for prefix, name in _CLASSIC_PRESETS.items():
        if registered.startswith(prefix):
            return name
    from fastdqn.envs import is_atari_id  # (gymnasium, which the buffer alone does not need)

    if is_atari_id(env_id):
        return "atari"
    return "classic"
