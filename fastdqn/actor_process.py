"""The async pipeline's actor in a forked process (``actor="process"``, the default on CPU).

Two threads of one process share Python's GIL, and a CPU update or action selection of a
small network is mostly Python and dispatch: an actor and a learner thread take turns more
than they overlap (on 2 cores the threaded pipeline ran CartPole at 0.73x sync). Here the
actor is a child process, forked when ``learn`` starts, and the calling process is the
synchronous engine's loop (``DQN._loop``) with the acting and stepping taken out::

    actor process (DQN._acted_steps)               learner (the calling process, DQN._loop)
    take a ring slot: wait for the weights          take the next vector step from the ring
      of step s - lag                               store it, run the updates due,
    act on step s, step the envs                    log, evaluate, checkpoint;
    write the step into the slot                    snapshot the weights if they changed,
                                                    free the slot

**Policy lag.** The actor acts at env step s with the weights the synchronous engine had at
step ``max(s - lag, c)``, c being the last cut (checkpoint, start or end) at or before s;
``lag`` defaults to one round of updates (``train_frequency`` steps, rounded up to whole
vector steps), so the learner's round overlaps the actor's next round. The weights are a
function of the step, not of timing, so a run is deterministic; with lag 0 it is the
synchronous run bit for bit; and a run resumed from a checkpoint continues exactly as the
uninterrupted one (at a cut the actor waits for the cut step's weights).

**How the two processes meet.** Anonymous shared memory (inherited by the fork), two
semaphores, a pipe:

- ``lag / num_envs + 1`` slot tokens. The actor takes one before each action (for the slot
  that step will fill) and the learner gives one back once it has processed a step, so the
  actor acts at step s only after the learner has processed step s - lag. At a cut the
  actor takes every token (the learner has processed all it wrote), then gives them back.
- ``filled`` counts the slots written and not yet taken by the learner.
- Weight snapshots: after processing a step whose updates changed the weights, the learner
  copies them into the oldest of K snapshots, stamped with the step, before giving back the
  token. The actor loads the newest snapshot stamped at or before s - lag. The semaphores
  order the memory between the processes, and K is large enough that the snapshot the actor
  reads is never the one being written (see ``_snapshot_count``).
- Each slot also carries the actor's RNG states after its step. The learner takes them at
  every cut (a checkpoint then holds them, and so resumes the actor's draws exactly) and,
  when it is stopped, those of the last step it stored: a stopped ``learn()`` called again
  goes on exactly as from a cut there.
- The pipe carries the actor's time split at every cut, and its error if it fails.

Shutdown: the learner (any error, Ctrl-C, the end) sets ``stop`` and joins the actor, killing
it if it does not end in time. The actor ignores Ctrl-C (the learner stops it), dies with
the learner's process (``PR_SET_PDEATHSIG``), and reports its own error through the pipe,
which the learner raises as ``ActorProcessError`` with the actor's traceback.

Fork: the child is forked while this process may hold threads (torch's OpenMP pool,
TensorBoard's writer, envpool's workers). It touches none of their state: it makes its own
envs, runs torch on one thread (as PyTorch's own forked DataLoader workers do), and never
destroys what it inherited (no garbage collection of it, no destructors at exit). It never
reads the replay buffer, whose pages it does not get (``kept_from_forks``). CUDA does not
survive a fork, so this actor is CPU only.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import mmap
import multiprocessing
import os
import signal
import sys
import time
import traceback
import warnings

import numpy as np
import torch

from fastdqn.config import usable_cores
from fastdqn.envs import StepResult
from fastdqn.learner import network_tensors
from fastdqn.pipeline import Stopwatch
from fastdqn.signals import die_with_parent

__all__ = ["ActorProcess", "ActorProcessError", "kept_from_forks", "policy_lag_steps"]

WAIT_S = 0.1
"""How often a waiting process looks whether the other one is still there."""
JOIN_TIMEOUT_S = 10.0
"""How long stopping waits for the actor to finish its current step before killing it."""
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
"""Ctrl-C, and a job's or machine's stop: the learner's to handle (fastdqn train treats both alike)."""
MAX_ERROR_CHARS = 8_000
"""The end of the actor's traceback that reaches the learner: with its JSON escapes it stays
within a pipe's buffer (64 KiB), so the dying actor never blocks on sending it."""


class ActorProcessError(RuntimeError):
    """The actor process failed; the message holds its traceback."""


def policy_lag_steps(config) -> int:
    """Env steps the actor's weights trail the synchronous engine's: one round of updates
    (``train_frequency``), rounded up to whole vector steps."""
    return math.ceil(config.train_frequency / config.num_envs) * config.num_envs


def learner_threads() -> int:
    """Torch threads for the learner: the caller's (learn() set the config's torch_threads),
    less the core that the actor process keeps for itself."""
    return max(1, min(torch.get_num_threads(), usable_cores() - 1))


class ActorProcess:
    """Steps and acts for a ``DQN`` in a forked process; ``steps()`` feeds ``DQN._loop``.

    Use it as a context manager around the loop: entering forks the actor, leaving stops it.
    ``report()`` then gives the throughput, the replay ratio held and where each process's
    time went.
    """

    def __init__(self, agent, total: int, policy_lag: int | None = None) -> None:
        c = agent.config
        lag = policy_lag_steps(c) if policy_lag is None else policy_lag
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0 or lag % c.num_envs:
            raise ValueError(f"policy_lag must be a non-negative multiple of num_envs={c.num_envs}, got {lag!r}")
        self.agent, self.total, self.policy_lag = agent, total, lag
        self._tokens = lag // c.num_envs + 1  # also the ring's depth: a slot per token
        context = multiprocessing.get_context("fork")
        self._free, self._filled = context.Semaphore(self._tokens), context.Semaphore(0)
        self._stop = context.Event()
        self._receive, self._send = context.Pipe(duplex=False)
        self._slots = _ring(self._tokens, c.num_envs, agent.obs_shape, agent.env.obs_dtype)
        self._online = network_tensors(agent.learner.q_network)
        self._snapshots = [[_shared_zeros(t.shape, t.dtype) for t in self._online]
                           for _ in range(_snapshot_count(c, lag))]
        self._stamps = _shared_zeros((len(self._snapshots),), torch.int64).numpy()
        self._stamps[:] = -1
        self._process = context.Process(target=self._actor_main, name="fastdqn-actor", daemon=True)
        self._parent_pid = os.getpid()
        self._start_steps, self._start_updates = agent.env_steps, agent.learner.num_updates
        self._learner_threads = learner_threads()
        self._learner_watch = Stopwatch()
        self._actor_seconds: dict[str, float] = {}  # the actor's Stopwatch, as of its last cut
        # step -> the actor's RNG words after that step: of the slot in hand, and of the last
        # one processed (a copy: a freed slot is overwritten).
        self._rng_at: dict[int, np.ndarray] = {}
        self._wall = 0.0

    def __enter__(self) -> ActorProcess:
        agent = self.agent
        agent._obs = None  # the actor makes its own envs
        self._previous_threads = torch.get_num_threads()
        self._started = time.perf_counter()
        try:
            torch.set_num_threads(self._learner_threads)
            # Stopping is the learner's to handle: blocked (in this thread) until the child ignores it.
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                with warnings.catch_warnings(), kept_from_forks(agent.buffer._core.storage().values()), \
                        _uncollected_by_the_child():
                    warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+ on forks with threads
                    self._process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            self._send.close()  # the child's end: a dead child then reads as EOF
        except BaseException:  # a Ctrl-C (another thread may take the signal) or a failed fork
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.agent.env_steps in self._rng_at:
            # Stopped: the draws the actor made up to the last step stored, as a cut there has.
            self._take_rng(self.agent.env_steps)
        try:
            self._stop.set()
            if self._process.pid is not None:
                self._process.join(JOIN_TIMEOUT_S)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join()
                if self._process.exitcode != 0 and exc[0] is not ActorProcessError:  # not told yet
                    warnings.warn(f"the actor process did not end cleanly (exit code {self._process.exitcode}; "
                                  f"-N: killed by signal N)", RuntimeWarning, stacklevel=2)
        finally:
            self._receive.close()
            self._send.close()
            self._wall = time.perf_counter() - self._started
            torch.set_num_threads(self._previous_threads)
            self.agent.env.close()  # the sync engine restarts it from the last step, as after a cut

    # ------------------------------------------------------------------ the learner's side
    def steps(self):
        """The actor's vector steps, as ``DQN._acted_steps`` yields them; after the loop has
        processed each one, its weights go to the actor and its slot is freed."""
        agent, learner, watch = self.agent, self.agent.learner, self._learner_watch
        step, slot = agent.env_steps, 0
        snapshot_updates, oldest = learner.num_updates, 0
        self._rng_at = {step: np.array(_rng_words(agent.np_rng) + _rng_words(learner.act_rng), np.uint64)}
        while step < self.total:
            t = time.perf_counter()
            while not self._filled.acquire(timeout=WAIT_S):
                if not self._process.is_alive():
                    raise ActorProcessError(self._actor_failure())
            fields = self._slots[slot]
            episodes = int(fields["episodes"][0])
            result = StepResult(**{name: fields[name] for name in _RESULT_FIELDS},
                                **{name: fields[name][:episodes] for name in _EPISODE_FIELDS})
            step += len(result.env_ids)
            actor_cut = bool(fields["cut"][0])  # the actor's own: a checkpoint's step or the end
            cut = actor_cut or agent.stop_requested  # or a requested stop's, which the actor acted on as any step
            self._rng_at = {step: fields["rng"], **self._rng_at}
            if cut:  # the actor's draws so far: the checkpoint about to be written holds them
                self._take_rng(step)
            if actor_cut:
                self._actor_seconds = json.loads(self._receive.recv_bytes())["seconds"]
            t = watch.lap("wait", t)
            yield fields["acted_obs"], fields["actions"], result, float(fields["epsilon"][0]), cut
            t = watch.lap("learn", t)
            self._rng_at = {step: fields["rng"].copy()}  # before the slot is freed and overwritten
            if learner.num_updates != snapshot_updates:
                torch._foreach_copy_(self._snapshots[oldest], self._online)
                self._stamps[oldest] = step
                oldest = (oldest + 1) % len(self._snapshots)
                snapshot_updates = learner.num_updates
                watch.lap("publish", t)
            self._free.release()
            slot = (slot + 1) % self._tokens

    def _take_rng(self, step: int) -> None:
        """The learner's random generators take the states the actor's had after ``step``."""
        words = self._rng_at[step]
        self.agent.np_rng.bit_generator.state = _rng_state(words[:_RNG_WORDS])
        self.agent.learner.act_rng.bit_generator.state = _rng_state(words[_RNG_WORDS:])

    def _actor_failure(self) -> str:
        with contextlib.suppress(EOFError, OSError):
            while self._receive.poll():
                message = json.loads(self._receive.recv_bytes())
                if "error" in message:
                    return f"the actor process failed:\n{message['error']}"
        return f"the actor process ended unexpectedly (exit code {self._process.exitcode})"

    # ------------------------------------------------------------------ the actor process
    def _actor_main(self) -> None:
        for stop in _STOP_SIGNALS:  # sent to the whole process group or job: the learner stops the actor
            signal.signal(stop, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        die_with_parent(self._parent_pid)
        self._receive.close()
        try:
            self._act()
        except _Stopped:
            pass
        except BaseException:  # noqa: BLE001 - reported to the learner, which raises it
            text = traceback.format_exc()
            if len(text) > MAX_ERROR_CHARS:  # the learner reads it only once this process has ended
                text = "[...]\n" + text[-MAX_ERROR_CHARS:]
            self._send.send_bytes(json.dumps({"error": text}).encode())
            raise SystemExit(1) from None

    def _act(self) -> None:
        agent, learner = self.agent, self.agent.learner
        torch.set_num_threads(1)
        watch = Stopwatch()
        act = learner.act

        def timed_act(*args):
            start = time.perf_counter()
            try:
                return act(*args)
            finally:
                watch.lap("act", start)

        learner.act = timed_act
        # The forked copy of the learner's env has lost its worker threads (envpool): destroying
        # it would wait for them forever. It is kept, and this process ends without destructors.
        self._forked_env = agent.env
        t = time.perf_counter()
        agent.env = agent._make_train_env(agent.env_steps)
        watch.lap("make_env", t)
        steps = agent._acted_steps(self.total)
        actor_tensors = network_tensors(learner.actor_network)
        step, slot, loaded = agent.env_steps, 0, agent.env_steps
        weights_from = step  # the step whose weights the actor may use at the earliest: the last cut
        while True:
            t = time.perf_counter()
            self._take_token()
            newest = self._newest_snapshot(max(step - self.policy_lag, weights_from))
            if newest is not None and self._stamps[newest] > loaded:
                with torch.no_grad():
                    torch._foreach_copy_(actor_tensors, self._snapshots[newest])
                loaded = int(self._stamps[newest])
            t = watch.lap("wait", t)
            act_before = watch.seconds["act"]
            obs, actions, result, epsilon, cut = next(steps)
            t = watch.lap("env", t)
            watch.seconds["env"] -= watch.seconds["act"] - act_before  # the step's act is timed apart
            step += len(actions)
            fields = self._slots[slot]
            fields["acted_obs"][:] = obs
            fields["actions"][:] = actions
            for name in _RESULT_FIELDS:
                fields[name][:] = getattr(result, name)
            episodes = len(result.episode_returns)
            for name in _EPISODE_FIELDS:
                fields[name][:episodes] = getattr(result, name)
            fields["episodes"][0], fields["epsilon"][0], fields["cut"][0] = episodes, epsilon, cut
            fields["rng"][:] = _rng_words(agent.np_rng) + _rng_words(learner.act_rng)
            slot = (slot + 1) % self._tokens
            watch.lap("hand-off", t)
            if cut:
                self._send.send_bytes(json.dumps({"seconds": watch.rounded()}).encode())
            self._filled.release()
            if step >= self.total:
                agent.env.close()
                return
            if cut:  # act after a cut with the cut step's weights: all slots processed
                for _ in range(self._tokens):
                    self._take_token()
                for _ in range(self._tokens):
                    self._free.release()
                weights_from = step

    def _take_token(self) -> None:
        while not self._free.acquire(timeout=WAIT_S):
            if self._stop.is_set():
                raise _Stopped

    def _newest_snapshot(self, step: int) -> int | None:
        """The snapshot of the weights the learner had after processing ``step``; None if
        they have not changed since the actor started."""
        stamps = self._stamps.copy()
        eligible = np.flatnonzero((stamps >= 0) & (stamps <= step))
        return int(eligible[np.argmax(stamps[eligible])]) if eligible.size else None

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        """Throughput, the replay ratio held and where each process's time went (seconds)."""
        agent = self.agent
        steps = agent.env_steps - self._start_steps
        updates = agent.learner.num_updates - self._start_updates
        wall = max(self._wall, 1e-9)
        return {
            "actor": "process", "env_steps": steps, "updates": updates, "wall_s": round(wall, 3),
            "steps_per_s": round(steps / wall, 1), "updates_per_s": round(updates / wall, 1),
            "replay_ratio": round(updates / steps, 4) if steps else 0.0,
            "replay_ratio_target": agent.config.replay_ratio, "policy_lag_steps": self.policy_lag,
            "num_envs": agent.config.num_envs, "learner_torch_threads": self._learner_threads,
            "time_s": {"actor": self._actor_seconds,
                       "learner": self._learner_watch.rounded()},
        }


class _Stopped(Exception):
    """The learner asked the actor to stop."""


_RESULT_FIELDS = ("obs", "next_obs", "rewards", "terminated", "truncated", "valid", "env_ids")
_EPISODE_FIELDS = ("episode_returns", "episode_lengths", "episode_env_ids")


def _ring(depth: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype) -> list[dict[str, np.ndarray]]:
    """``depth`` slots, one per vector step in flight: each a dict of numpy views of shared
    memory (single values as arrays of one, so that they are views too)."""
    spec = {"acted_obs": ((num_envs, *obs_shape), obs_dtype), "actions": ((num_envs,), np.int64),
            "obs": ((num_envs, *obs_shape), obs_dtype), "next_obs": ((num_envs, *obs_shape), obs_dtype),
            "rewards": ((num_envs,), np.float32), "terminated": ((num_envs,), np.bool_),
            "truncated": ((num_envs,), np.bool_), "valid": ((num_envs,), np.bool_),
            "env_ids": ((num_envs,), np.int32), "episode_returns": ((num_envs,), np.float64),
            "episode_lengths": ((num_envs,), np.int64), "episode_env_ids": ((num_envs,), np.int32),
            "episodes": ((1,), np.int64), "epsilon": ((1,), np.float64), "cut": ((1,), np.bool_),
            "rng": ((2 * _RNG_WORDS,), np.uint64)}
    fields = {name: _shared_zeros((depth, *shape), torch.from_numpy(np.zeros(0, dtype)).dtype).numpy()
              for name, (shape, dtype) in spec.items()}
    return [{name: array[slot] for name, array in fields.items()} for slot in range(depth)]


_RNG_WORDS = 6
"""uint64 words of a PCG64 generator's state: state and increment (128 bits each), has_uint32, uinteger."""


def _rng_words(generator: np.random.Generator) -> list[int]:
    state = generator.bit_generator.state
    state_128, inc_128 = state["state"]["state"], state["state"]["inc"]
    return [state_128 >> 64, state_128 & (2**64 - 1), inc_128 >> 64, inc_128 & (2**64 - 1),
            state["has_uint32"], state["uinteger"]]


def _rng_state(words: np.ndarray) -> dict:
    high, low, inc_high, inc_low, has_uint32, uinteger = (int(w) for w in words)
    return {"bit_generator": "PCG64", "state": {"state": high << 64 | low, "inc": inc_high << 64 | inc_low},
            "has_uint32": has_uint32, "uinteger": uinteger}


def _shared_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """Zeros in anonymous shared memory, which the forked actor shares (no /dev/shm, whose
    size containers often limit)."""
    count = math.prod(shape)
    memory = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    return torch.frombuffer(memory, dtype=dtype, count=count).view(*shape)


def _snapshot_count(config, lag: int) -> int:
    """Weight snapshots to keep. While the actor looks for the newest one stamped at or before
    q >= s - lag, the learner has processed at most step s, and the weights change at most once
    per processed vector step and once per round (train_frequency steps): at most ``changes``
    snapshots stamped after q exist or are being written, and round-robin overwrites the
    oldest, so with one more slot the one the actor needs is never overwritten."""
    changes = min(lag // config.num_envs, lag // config.train_frequency + 1)
    return changes + 1


@contextlib.contextmanager
def kept_from_forks(arrays):
    """Processes forked inside the block get none of the arrays' whole pages (Linux's
    MADV_DONTFORK; elsewhere it does nothing). A child that never reads them then shares none
    of those pages with this process, so this process's writes copy none: copy-on-write would
    otherwise duplicate, page by page as the learner overwrites it, a replay buffer filled
    before the fork (a resumed one, say)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    ranges = []
    for array in arrays:
        start = -(-array.ctypes.data // page) * page
        end = (array.ctypes.data + array.nbytes) // page * page
        if end > start:
            ranges.append((start, end - start))
    for start, length in ranges:
        madvise(start, length, _MADV_DONTFORK)
    try:
        yield
    finally:
        for start, length in ranges:
            madvise(start, length, _MADV_DOFORK)


_MADV_DONTFORK, _MADV_DOFORK = 10, 11  # <asm-generic/mman-common.h>


@contextlib.contextmanager
def _uncollected_by_the_child():
    """A process forked inside the block never garbage-collects the objects it inherits
    (``gc.freeze``, for the child only: this process unfreezes them after). Among them may be
    garbage not yet collected here, an envpool env in a reference cycle say: collected in the
    child, it would join worker threads that the fork did not copy, and hang or abort."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
