"""DQN: the synchronous training engine and the Python API.

One iteration of ``learn`` acts on the batch of environments, steps them, stores the
transitions and runs the updates that are due::

    actions = act(obs)                  # random before learning_starts, then epsilon-greedy
    result  = env.step(actions)         # auto-resets; reset-only rows are marked invalid
    store(obs, actions, result)         # the final observation at episode ends, never a reset
    train(updates_due)                  # keeps updates / env steps = gradient_steps / train_frequency

Acting (``Learner.act``), learning (``Learner.update``) and environment stepping
(``VecEnv.step``) are separate objects, so an overlapped actor/learner pipeline can drive
the same pieces from two threads (``fastdqn.pipeline``). The loop itself is split the same
way: ``_acted_steps`` acts and steps, ``_loop`` stores, learns, logs and checkpoints what it
yields, so the actor process (``fastdqn.actor_process``) runs the first half and feeds the
second from shared memory.

Checkpoints cut the running episodes (stored as truncations, so the value of the cut
state is still bootstrapped) and restart the environments from a seed derived from the
step. A resumed run restarts them the same way, which is what lets ``--resume`` reproduce
an uninterrupted run exactly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import math
import numbers
import os
import random
import re
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from fastdqn import checkpoint as ckpt
from fastdqn.config import DQNConfig, preset_for_env
from fastdqn.envs import make_env
from fastdqn.learner import Learner
from fastdqn.metrics import RunDirectoryLock, RunLogger, atomic_write_bytes, read_config, read_csv
from fastdqn.networks import build_q_network
from fastdqn.progress import make_progress
from fastdqn.replay import _cast_bounds
from fastdqn.signals import handling
from fastdqn.video import VideoWriter, check_video_path


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    """``start`` at t=0, moving linearly to ``end`` at t=duration, then ``end``."""
    if duration <= 0 or t >= duration:
        return end
    return start + (end - start) * (t / duration)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def next_boundary(step: int, interval: int) -> float:
    """The first multiple of ``interval`` after ``step``; never (inf) for interval 0."""
    return (step // interval + 1) * interval if interval else math.inf


def env_seed(seed: int, step: int) -> int:
    """Seed of the environments (re)started at ``step``; distinct for every (seed, step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] >> 1)


class DQN:
    """A DQN agent for one environment id.

    Args:
        env_id: an envpool id (``CartPole-v1``, ``Pong-v5``) or any gymnasium id.
        config: hyperparameters; None picks the preset for the env (``preset_for_env``).
        q_network: your own ``torch.nn.Module`` mapping (N, *obs_shape) observations to
            (N, num_actions) Q-values; None builds an MLP or the Nature CNN.
        run_dir: where ``learn`` writes config.json, metrics, TensorBoard events and
            checkpoints; None uses ``runs/<run_name>``. ``learn`` raises
            ``fastdqn.metrics.RunDirectoryInUse`` while another run writes it.
        progress: show a progress bar while learning.
        tensorboard: write TensorBoard events.
    """

    def __init__(self, env_id: str, config: DQNConfig | None = None, *, q_network: torch.nn.Module | None = None,
                 run_dir: str | os.PathLike | None = None, progress: bool = True, tensorboard: bool = True):
        if not isinstance(env_id, str) or not env_id:
            raise TypeError(f"env_id must be a non-empty string, got {env_id!r}")
        if config is None:
            config = DQNConfig.preset(preset_for_env(env_id))
        if not isinstance(config, DQNConfig):
            raise TypeError(f"config must be a DQNConfig, got {type(config).__name__}")
        config = dataclasses.replace(config)  # checked, and the agent's own: a caller's later changes reach no run
        self.env_id = env_id
        self.config = config
        self.device = resolve_device(config.device)
        self.pipeline = config.pipeline if config.pipeline != "auto" else \
            ("async" if self.device.type == "cuda" else "sync")
        linux = sys.platform.startswith("linux")
        self.actor = config.actor if config.actor != "auto" else \
            ("process" if self.device.type == "cpu" and linux else "thread")
        if self.pipeline == "async" and self.actor == "process" and (self.device.type != "cpu" or not linux):
            raise ValueError(f"actor 'process' needs a CPU device and Linux's fork (CUDA does not survive a "
                             f"fork), got device {self.device} on {sys.platform}; use actor 'thread'")
        threaded = self.pipeline == "async" and self.actor == "thread"
        self.pipeline_report: dict | None = None  # throughput and replay ratio of the last async learn()
        # To the microsecond: runs started together (a sweep) get run names, so directories, of their own.
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        self.run_name = f"{re.sub('[/:]', '-', env_id)}__dqn__seed{config.seed}__{stamp}"
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / self.run_name
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run_dir must be a directory, got {self.run_dir}, which is a file")
        self.progress, self.tensorboard = progress, tensorboard

        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.np_rng = np.random.default_rng(config.seed)
        self.env = self._make_train_env(step=0)
        self.obs_shape, self.num_actions = tuple(self.env.obs_shape), self.env.num_actions
        acting_batch = config.num_envs
        if threaded:  # it acts on envpool's async batches: the action graph's static batch
            from fastdqn.pipeline import env_batch_size

            acting_batch = env_batch_size(config.num_envs, self.env)
        # The class of a network of the user's (recorded in checkpoints: loading needs one like it), else None.
        self.custom_q_network = _class_name(q_network) if q_network is not None else None
        if q_network is None:
            q_network = build_q_network(self.obs_shape, self.num_actions, hidden_sizes=config.hidden_sizes,
                                        dueling=config.dueling)
        try:
            self.learner = Learner(
                q_network, obs_shape=self.obs_shape, obs_dtype=self.env.obs_dtype, batch_size=config.batch_size,
                num_envs=acting_batch, device=self.device, lr=config.learning_rate, optimizer=config.optimizer,
                adam_eps=config.adam_eps, loss=config.loss, double_dqn=config.double_dqn,
                target_update_interval=config.target_update_interval, tau=config.tau,
                max_grad_norm=config.max_grad_norm or None, prioritized=config.prioritized,
                cuda_graph={"auto": "auto", "on": True, "off": False}[config.cuda_graph],
                actor_copy=threaded, seed=int(self.np_rng.integers(2**63)))
            if self.learner.num_actions != self.num_actions:
                raise ValueError(f"q_network must output one Q-value per action: {env_id} has {self.num_actions} "
                                 f"actions, q_network outputs {self.learner.num_actions}")
        except BaseException:
            self.env.close()
            raise
        self.q_network = self.learner.q_network
        self.buffer = None  # made on the first learn(): acting and evaluating need no replay
        self._batch = self._sample = self._stretch = None
        self._obs = None
        self.env_steps = 0
        self.episodes = 0
        self.wall_time = 0.0
        self.recent_returns: collections.deque[float] = collections.deque(maxlen=100)
        self._unfinished_total_steps: int | None = None  # of a learn() call interrupted here or in the run
        # The step last stored when the sync engine drew for the next one, and the generators' states then.
        self._rng_after_step: tuple[int, dict, dict] = (-1, {}, {})
        self._stop_requested = False  # see request_stop
        self._stop_at_once = None  # how a second Ctrl-C stops the running pipeline; None: KeyboardInterrupt

    # ------------------------------------------------------------------ pieces
    def _make_train_env(self, step: int, batch_size: int | None = None):
        """The training envs as made at ``step`` (seeded by it), in envpool's async mode when
        ``batch_size`` is below num_envs."""
        c = self.config
        return make_env(self.env_id, c.num_envs, env_seed(c.seed, step), mode="train", protocol=c.protocol,
                        backend=c.backend, batch_size=batch_size)

    def _use_config_threads(self) -> int:
        """Sets the config's torch_threads for this thread (OpenMP's count is per thread), for a
        learn() or evaluate() call; returns the caller's count, which the call puts back: other
        torch work in the process keeps its own."""
        callers = torch.get_num_threads()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.effective_torch_threads)
        return callers

    def _make_buffer(self):
        from fastdqn.replay import PrioritizedReplayBuffer, ReplayBuffer

        c = self.config
        kwargs = dict(frame_stack=self.env.frame_stack, num_envs=c.num_envs, obs_dtype=self.env.obs_dtype,
                      action_dtype=np.int64, n_step=c.n_step, gamma=c.gamma,
                      seed=int(self.np_rng.integers(2**31)))
        try:
            if c.prioritized:
                return PrioritizedReplayBuffer(c.buffer_size, self.obs_shape, alpha=c.per_alpha, beta=c.per_beta,
                                               eps=c.per_eps, **kwargs)
            return ReplayBuffer(c.buffer_size, self.obs_shape, **kwargs)
        except ValueError as e:
            if not str(e).startswith("capacity"):
                raise
            raise ValueError(f"buffer_size={c.buffer_size} does not fit this run: {e}") from None

    @property
    def unfinished_total_steps(self) -> int | None:
        """The total of a learn() call that stopped before it ended (in this process, or in the
        run a checkpoint came from); None if there is none."""
        return self._unfinished_total_steps

    @property
    def scheduled_total_steps(self) -> int:
        """What learn() trains to by default: the total of a learn() call that was interrupted
        before it (in this process, or in the run a checkpoint came from), else the config's."""
        unfinished = self._unfinished_total_steps
        return unfinished if unfinished is not None else self.config.total_steps

    def epsilon(self, step: int, total_steps: int) -> float:
        """Exploration at ``step`` of a run to ``total_steps``: 1 (uniformly random actions) before
        learning_starts, then the schedule, linear over the run's first fraction from step 0."""
        c = self.config
        if step < c.learning_starts:
            return 1.0
        return linear_schedule(c.start_epsilon, c.end_epsilon, c.exploration_fraction * total_steps, step)

    def per_beta(self, step: int, total_steps: int) -> float:
        """Prioritized replay's importance exponent at ``step``: annealed linearly to 1 at the end."""
        return linear_schedule(self.config.per_beta, 1.0, total_steps, step)

    def next_boundaries(self, step: int) -> tuple[float, float, float]:
        """The first log, evaluation and checkpoint steps after ``step`` (inf: never)."""
        c = self.config
        return (next_boundary(step, c.log_interval), next_boundary(step, c.eval_interval if c.eval_episodes else 0),
                next_boundary(step, c.checkpoint_interval))

    def updates_due(self, step: int) -> int:
        """Updates that should have run by env step ``step``: one round of gradient_steps
        per train_frequency steps after learning_starts, whatever num_envs is. 0 before
        every env has taken n_step steps, when the buffer may hold no complete n-step window."""
        return self.config.updates_due(step)

    def _store(self, obs, actions, result, cut: bool) -> None:
        truncated = ~result.terminated if cut else result.truncated
        valid = result.valid
        if valid.all():
            self.buffer.add(obs, actions, result.rewards, result.next_obs, result.terminated, truncated)
        else:
            ids = np.flatnonzero(valid)
            self.buffer.add(obs[ids], actions[ids], result.rewards[ids], result.next_obs[ids],
                            result.terminated[ids], truncated[ids], env_ids=ids)

    def _sampling(self):
        """A reusable host batch and the buffer method that fills it. Frame-stacked envs use
        the shared-frame layout (k + n frames per sample instead of 2k, unpacked by the
        learner); on CUDA the batch lives in pinned memory, so the copy is asynchronous."""
        buf, size = self.buffer, self.config.batch_size
        frames = buf.frame_stack > 1
        batch = buf.empty_frame_batch(size) if frames else buf.empty_batch(size)
        if self.device.type == "cuda":
            batch = type(batch)(**{k: torch.from_numpy(v).pin_memory().numpy() for k, v in batch.arrays().items()})
        return batch, buf.sample_frames if frames else buf.sample

    def _stretch_batches(self) -> tuple | None:
        """Batches for a stretch of updates between two changes of the target network, whose
        TD targets one forward pass computes (see _train): on CPU, with uniform replay of
        observation batches and plain DQN targets (the chooser of Double DQN changes with
        each update, and so do prioritized draws). One batch of all their rows, and the
        batches as views of it; None where that does not apply."""
        from fastdqn.replay import Batch

        c = self.config
        length = min(c.gradient_steps, c.target_update_interval)
        if self.device.type != "cpu" or c.prioritized or c.double_dqn or self.buffer.frame_stack > 1 or length < 2:
            return None
        rows = self.buffer.empty_batch(length * c.batch_size)
        return rows, [Batch(**{name: array[i * c.batch_size:(i + 1) * c.batch_size]
                               for name, array in rows.arrays().items()}) for i in range(length)]

    def _train(self, updates: int, beta: float) -> None:
        buf, learner, sample = self.buffer, self.learner, self._sample
        if self._stretch is not None:
            # The target changes after an update that completes a target_update_interval: up
            # to there, the batches' targets come from one forward pass. Sampled ahead, the
            # batches are those the updates would draw one by one (nothing is added meanwhile).
            rows, stretch = self._stretch
            size, interval = self.config.batch_size, self.config.target_update_interval
            while updates > 0:
                batches = stretch[:min(updates, interval - learner.num_updates % interval)]
                for batch in batches:
                    sample(size, out=batch)
                next_q = learner.target_values(rows.next_obs[:len(batches) * size])
                for i, batch in enumerate(batches):
                    learner.update(batch, next_q=next_q[i * size:(i + 1) * size])
                updates -= len(batches)
            return
        if self.config.prioritized:
            buf.beta = beta
        for _ in range(updates):
            batch = sample(self.config.batch_size, out=self._batch)
            learner.update(batch)
            if self.config.prioritized:
                buf.update_priorities(batch.indices, learner.new_priorities.cpu().numpy())

    # ------------------------------------------------------------------ training
    def learn(self, total_steps: int | None = None) -> "DQN":
        """Train until ``total_steps`` environment steps (summed over envs) have been taken
        in this agent's life; returns self. Schedules (epsilon, PER beta) span total_steps.
        The default is ``scheduled_total_steps``: an interrupted run goes on to its own total.

        Ctrl-C (in the main thread; or ``request_stop``) stops the run at a cut: the next step
        is stored as a checkpoint's step is (the episodes end there as truncations), its
        updates are made, its metrics row and, with ``checkpoint_on_stop``, its checkpoint
        are written, and learn() raises KeyboardInterrupt. A second Ctrl-C stops at once.
        Stopped at once (a second Ctrl-C, an error), it leaves the agent as a cut after its
        last stored step would: ``env_steps`` counts the stored steps, the buffer's episodes
        end there as truncations. Either way the next call restarts the envs and goes on."""
        c = self.config
        total = self.scheduled_total_steps if total_steps is None else total_steps
        if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 1:
            raise ValueError(f"total_steps must be a positive int, got {total!r}")
        total = int(total)
        last_step = self.env_steps + math.ceil(max(total - self.env_steps, 0) / c.num_envs) * c.num_envs
        if last_step > self.env_steps and self.updates_due(last_step) == 0:  # not the gap between two rounds
            warnings.warn(f"learn({total}) makes no update: learning starts after learning_starts="
                          f"{c.learning_starts} steps, so it only fills the buffer", stacklevel=2)
        horizon = self.env.max_episode_steps
        if (c.checkpoint_interval and horizon and c.checkpoint_interval < horizon * c.num_envs
                and next_boundary(self.env_steps, c.checkpoint_interval) < last_step):  # a cut before the end
            warnings.warn(f"checkpoint_interval={c.checkpoint_interval} with {c.num_envs} envs cuts every episode at "
                          f"{c.checkpoint_interval // c.num_envs} steps or fewer ({self.env_id}'s last up to {horizon}), "
                          "which changes what is learned: each checkpoint ends the running episodes (envs cannot "
                          f"be saved); an interval of {horizon * c.num_envs} or more leaves whole episodes",
                          stacklevel=2)
        if self.buffer is None:
            self.buffer = self._make_buffer()
        if self._batch is None:
            self._batch, self._sample = self._sampling()
            self._stretch = self._stretch_batches()
        stopped_at_its_end = self._unfinished_total_steps is not None and self._unfinished_total_steps <= self.env_steps
        # RunDirectoryInUse (another run writes run_dir) comes before anything changes.
        logger = RunLogger(self.run_dir, self._config_record(total), total_steps=total,
                           start_step=self.env_steps, wall_time_offset=self.wall_time, resume=self.env_steps > 0,
                           tensorboard=self.tensorboard, progress=self.progress)
        callers_threads = self._use_config_threads()
        try:
            self._unfinished_total_steps = total
            if self.env_steps >= total:  # no step to take
                self._finish_run(total, logger, stopped_at_its_end)
            elif self.pipeline == "async" and self.actor == "thread":
                from fastdqn.pipeline import AsyncPipeline

                pipeline = AsyncPipeline(self)
                try:
                    pipeline.run(total, logger)
                finally:
                    self.pipeline_report = pipeline.report()
                    self._obs = None  # the pipeline stepped its own envs
            elif self.pipeline == "async":
                from fastdqn.actor_process import ActorProcess

                actor = ActorProcess(self, total)
                try:
                    with actor, self._ctrl_c_requests_a_stop():
                        self._loop(total, logger, actor.steps())
                finally:
                    self.pipeline_report = actor.report()
            else:
                with self._ctrl_c_requests_a_stop():
                    self._loop(total, logger)
        except BaseException as error:
            try:  # the next learn() makes new envs (see _acted_steps)
                self.buffer.end_episodes()
                self.env.close()
                step, np_state, act_state = self._rng_after_step
                if self.pipeline == "sync" and step == self.env_steps:  # draws for a step not stored
                    self.np_rng.bit_generator.state, self.learner.act_rng.bit_generator.state = np_state, act_state
            except Exception as cleanup:  # noqa: BLE001 - the first error is the one to show
                error.add_note(f"then ending the buffer's episodes and closing the envs failed: {cleanup!r}")
            raise
        finally:
            torch.set_num_threads(callers_threads)
            self._stop_requested = False  # a request made before this call (a signal during its setup) counted
            self.wall_time = logger.wall_time()
            logger.close()
        self._unfinished_total_steps = None
        return self

    def request_stop(self) -> None:
        """Ask ``learn()`` to stop at a cut at its next step (see ``learn``); safe to call from a
        signal handler or another thread. A request holds until the learn() call it reaches
        ends (one made just before a call reaches that call)."""
        self._stop_requested = True

    def _ctrl_c(self) -> None:
        """The first Ctrl-C (or SIGTERM): a stop at the next step, said at once, since an
        evaluation or a checkpoint under way finishes first. Written straight to stderr's file
        descriptor: a print from a signal handler can land inside another write to stderr."""
        with contextlib.suppress(OSError):
            os.write(2, b"\nstopping at the next step (the same signal again stops at once)\n")
        self.request_stop()

    def _ctrl_c_again(self) -> None:
        """The second Ctrl-C (or SIGTERM): stop at once, in the way the running pipeline can."""
        if self._stop_at_once is None:
            raise KeyboardInterrupt
        self._stop_at_once()

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for (``request_stop``, Ctrl-C) that a learn() call has yet to end with."""
        return self._stop_requested

    @contextlib.contextmanager
    def _ctrl_c_requests_a_stop(self):
        """In the main thread, with Python's own Ctrl-C handler in place: the first Ctrl-C asks
        for a stop at a cut (``request_stop``), and puts that handler back, so that a second one
        stops at once (raising KeyboardInterrupt wherever it lands)."""
        def on_ctrl_c(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._ctrl_c()

        with handling(signal.SIGINT, on_ctrl_c, over_ctrl_c_default=True):
            yield

    def _stop_at_cut(self, logger: RunLogger, step: int, checkpoint_due: bool) -> None:
        """A cut's checkpoint, when one is due there or the cut is a requested stop's (with
        checkpoint_on_stop); then, for a stop, KeyboardInterrupt."""
        stopping = self._stop_requested
        if checkpoint_due or (stopping and self.config.checkpoint_on_stop):
            if stopping:
                logger.message(f"stopping at step {step:,}: writing its checkpoint (the same signal again skips it)")
            self._checkpoint_cut(logger)
        if stopping:
            self._stop_if_requested(step)

    def _stop_if_requested(self, step: int) -> None:
        """KeyboardInterrupt if a stop was asked for: called at cuts, and before the final
        evaluation (a stop asked for during the last step's checkpoint, or in a call that only
        finishes a run's end: the run's end is a cut already, and the next learn() makes the
        final evaluation it owes)."""
        if self._stop_requested:
            raise KeyboardInterrupt(f"stopped at step {step}, as requested")

    def _loop(self, total: int, logger: RunLogger, steps=None) -> None:
        """Store each vector step of ``steps`` (``_acted_steps``, or an actor process's), run
        the updates due, log, evaluate and checkpoint. What ``steps`` yields is consumed before
        it asks for the next one, so a producer may reuse its arrays. A requested stop makes
        the next step a cut, and ends the loop there; the source reads the request (once per
        step), so that what it does at a cut, such as taking the actor's RNG states, and the
        loop agree."""
        c, learner = self.config, self.learner
        step = self.env_steps
        updates_done = learner.num_updates
        returns_since_log: list[float] = []
        lengths_since_log: list[float] = []
        next_log, next_eval, next_ckpt = self.next_boundaries(step)  # cuts come from the source
        for obs, actions, result, epsilon, cut in (self._acted_steps(total) if steps is None else steps):
            step += len(actions)
            self._store(obs, actions, result, cut)
            self.env_steps = step  # the steps stored, for an interrupted learn() to go on from
            logger.progress(step)
            if len(result.episode_returns):
                returns_since_log.extend(result.episode_returns.tolist())
                lengths_since_log.extend(result.episode_lengths.tolist())
            due = self.updates_due(step)
            if due > updates_done:
                self._train(due - updates_done, self.per_beta(step, total))
                updates_done = due
            if step >= next_log or cut:  # a checkpoint's step always has its metrics row
                next_log = next_boundary(step, c.log_interval)
                self._log(logger, step, epsilon, returns_since_log, lengths_since_log)
                returns_since_log, lengths_since_log = [], []
            if step >= next_eval:
                next_eval = next_boundary(step, c.eval_interval)
                self._evaluate_and_log(logger, step)
            if cut:
                checkpoint_due = step >= next_ckpt or step >= total
                if checkpoint_due:
                    next_ckpt = next_boundary(step, c.checkpoint_interval)
                self._stop_at_cut(logger, step, checkpoint_due)
        self._stop_if_requested(step)
        if self._final_evaluation_due(step, logger):
            self._evaluate_and_log(logger, step)

    def _finish_run(self, total: int, logger: RunLogger, stopped_at_its_end: bool) -> None:
        """learn() with every env step taken: what the run's end still owes. After a call that
        stopped once it had stored its last step, the updates due, the last metrics row and
        the checkpoint; in any case the final evaluation, if it is not made yet."""
        step = self.env_steps
        if not stopped_at_its_end and not self._final_evaluation_due(step, logger):
            warnings.warn(f"learn({total}) has nothing to do: this agent has taken {step} steps (learn trains until "
                          f"the agent has taken total_steps in all; learn({step + total}) takes {total} more)",
                          stacklevel=3)
        if stopped_at_its_end:
            owed = self.updates_due(step) - self.learner.num_updates
            if owed > 0:
                self._train(owed, self.per_beta(step, total))
            if logger.last_log_step != step:
                self._log(logger, step, self.epsilon(step, total), [], [])
            if not ckpt.checkpoint_path(ckpt.checkpoint_dir(self.run_dir), step).is_file():
                self._checkpoint_cut(logger)
        self._stop_if_requested(step)
        if self._final_evaluation_due(step, logger):
            self._evaluate_and_log(logger, step)

    def _acted_steps(self, total: int):
        """Act on this agent's envs and step them up to ``total``: yields (obs acted on, actions,
        StepResult, epsilon, cut) per vector step. A cut (a checkpoint's step, the end or a
        requested stop's step) is stored as a truncation; the envs then restart from a seed
        derived from the step."""
        c, learner = self.config, self.learner
        step = self.env_steps
        if self.env.closed:  # by an async or interrupted learn(), or a resume: restart as at a cut
            self.env = self._make_train_env(step)
            self._obs = None
        obs = self.env.reset() if self._obs is None else self._obs
        next_ckpt = next_boundary(step, c.checkpoint_interval)
        while step < total:
            # The draws of a step not yet stored are taken back if learn() stops (see learn).
            self._rng_after_step = (step, self.np_rng.bit_generator.state, learner.act_rng.bit_generator.state)
            epsilon = self.epsilon(step, total)
            if step < c.learning_starts:
                actions = self.np_rng.integers(self.num_actions, size=c.num_envs)
            else:
                actions = learner.act(obs, epsilon).cpu().numpy()
            result = self.env.step(actions)
            step += c.num_envs
            cut = step >= next_ckpt or step >= total or self._stop_requested
            yield obs, actions, result, epsilon, cut
            obs = result.obs
            if cut:
                next_ckpt = next_boundary(step, c.checkpoint_interval)
                self.env.close()
                self.env = self._make_train_env(step)
                obs = self.env.reset()
        self._obs = obs

    def _log(self, logger, step, epsilon, returns, lengths) -> None:
        self.episodes += len(returns)
        self.recent_returns.extend(returns)
        metrics = self.learner.metrics()
        logger.log(step, dict(
            updates=metrics["updates"], episodes=self.episodes,
            episode_return=float(np.mean(returns)) if returns else math.nan,
            episode_return_100=float(np.mean(self.recent_returns)) if self.recent_returns else math.nan,
            episode_length=float(np.mean(lengths)) if lengths else math.nan,
            loss=metrics["loss"], q_mean=metrics["q_mean"], epsilon=epsilon))

    def _final_evaluation_made(self) -> bool:
        """Whether the run directory's eval.csv holds the evaluation at env_steps, or the run
        makes none: then a checkpoint at a learn() call's total is from a call that ended."""
        path = Path(self.run_dir) / "eval.csv"
        return not self.config.eval_episodes or path.is_file() and any(
            row["step"] == self.env_steps for row in read_csv(path))

    def _final_evaluation_due(self, step: int, logger: RunLogger) -> bool:
        """Whether a run ending at ``step`` still owes its final evaluation (not if one was made
        there, also before a resume: the final evaluation comes after the final checkpoint)."""
        return bool(self.config.eval_episodes) and logger.last_eval_step != step

    def _evaluate_and_log(self, logger, step) -> None:
        c = self.config
        result = self.evaluate(c.eval_episodes, epsilon=c.eval_epsilon, seed=env_seed(c.seed + 1, step))
        logger.log_eval(step, result["returns"], result["protocol"])

    def _config_record(self, total_steps: int) -> dict:
        import fastdqn

        return {"env_id": self.env_id, "run_name": self.run_name, "algorithm": "dqn",
                "fastdqn_version": fastdqn.__version__, "device": str(self.device),
                "backend": getattr(self.env, "backend", None), "protocol": self.config.protocol,
                "pipeline": self.pipeline, "actor": self.actor if self.pipeline == "async" else None,
                "learn_total_steps": total_steps, "config": self.config.to_dict(),
                "custom_q_network": self.custom_q_network}

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def predict(self, obs, epsilon: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray | int:
        """Greedy (or epsilon-greedy) actions for one observation (returns an int) or a batch
        (returns an int64 array)."""
        _check_epsilon(epsilon)
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
        obs = np.asarray(obs)
        single = obs.shape == self.obs_shape
        if not single and obs.shape[1:] != self.obs_shape:
            raise ValueError(f"obs must have shape {self.obs_shape} or (N, *{self.obs_shape}), got {obs.shape}")
        expected = self.env.obs_dtype
        # Integer observations (uint8 frames, scaled by the network) must come as integers the
        # env's dtype holds: frames already scaled to [0, 1] would be scaled again, silently.
        if obs.dtype != expected:
            if obs.dtype.kind not in "biuf" or expected.kind in "iu" and obs.dtype.kind not in "iu":
                raise TypeError(f"obs must have dtype {expected}, as the env gives it, got {obs.dtype}")
            bounds = _cast_bounds(obs.dtype, expected)
            if bounds is not None and obs.size and not (bounds[0] <= obs.min() and obs.max() <= bounds[1]):
                raise ValueError(f"obs values must fit the env's dtype {expected}, got values from "
                                 f"{obs.min()} to {obs.max()}")
        batch = (obs[None] if single else obs).astype(expected, copy=False)
        q = self.learner.q_values(torch.as_tensor(batch, device=self.device))
        actions = q.argmax(dim=1).cpu().numpy()
        if epsilon > 0:
            rng = rng if rng is not None else np.random.default_rng()
            explore = rng.random(len(actions)) < epsilon
            actions = np.where(explore, rng.integers(self.num_actions, size=len(actions)), actions)
        return int(actions[0]) if single else actions

    def evaluate(self, episodes: int = 10, epsilon: float | None = None, seed: int | None = None,
                 video: str | os.PathLike | None = None, progress: bool = False) -> dict:
        """Run ``episodes`` full evaluation episodes (raw game scores for Atari, under the
        config's protocol) and return {"env", "episodes", "mean_return", "std_return",
        "returns", "protocol", "epsilon"}; the protocol names the epsilon too. Each of up to 8
        envs plays the same number of episodes, so short episodes are not over-represented.

        video: a .gif or .mp4 path; the first env's first episode (the first of the returns) is
        recorded there as the env renders it (Atari: the 210x160 colour screen, in real time),
        and finished when that episode ends.

        progress: show the episodes played as they end (a bar on a terminal, else a line every
        10 s), for evaluations that take a while (Atari games on a CPU)."""
        if isinstance(episodes, bool) or not isinstance(episodes, numbers.Integral) or episodes < 1:
            raise ValueError(f"episodes must be a positive int, got {episodes!r}")
        episodes = int(episodes)
        epsilon = self.config.eval_epsilon if epsilon is None else epsilon
        _check_epsilon(epsilon)
        if video is not None:
            check_video_path(video)  # found out now, not after the games
        seed = self.config.seed + 1 if seed is None else seed
        callers_threads = self._use_config_threads()
        try:
            returns, protocol = self._play(episodes, epsilon, seed, video, progress)
        finally:
            torch.set_num_threads(callers_threads)
        return {"env": self.env_id, "episodes": episodes, "mean_return": float(np.mean(returns)),
                "std_return": float(np.std(returns)), "returns": returns,
                "protocol": f"{protocol}; epsilon-greedy, epsilon {epsilon:g}", "epsilon": float(epsilon)}

    def _play(self, episodes: int, epsilon: float, seed: int, video: str | os.PathLike | None,
              progress: bool = False) -> tuple[list[float], str]:
        num_envs = next(k for k in range(min(episodes, 8), 0, -1) if episodes % k == 0)
        per_env = episodes // num_envs
        env = make_env(self.env_id, num_envs, seed, mode="eval", protocol=self.config.protocol,
                       backend=self.config.backend, render=video is not None)
        if env.max_episode_steps is None:
            warnings.warn(f"{self.env_id} has no time limit: an evaluation episode lasts until the env ends it, so a "
                          "policy that never ends one keeps evaluate() waiting; register the env with "
                          "max_episode_steps", stacklevel=3)
        rng = np.random.default_rng(seed)
        returns: list[list[float]] = [[] for _ in range(num_envs)]
        played, score_sum = 0, 0.0  # for the progress display
        with env:
            recording = VideoWriter(video, env.render_fps) if video is not None else None
            shown = make_progress(episodes, 0, f"{self.env_id} evaluation", unit="episode") if progress else None
            try:
                obs = env.reset()
                if recording is not None:
                    recording.add(env.render(0))
                while any(len(r) < per_env for r in returns):
                    result = env.step(self.predict(obs, epsilon, rng))
                    if recording is not None:
                        recording.add(env.render(0))
                    # Whole games' raw scores (an Atari game spans its lives), each env's first per_env.
                    for i, game_return in zip(result.episode_env_ids, result.episode_returns):
                        if len(returns[i]) < per_env:
                            returns[i].append(float(game_return))
                            played, score_sum = played + 1, score_sum + float(game_return)
                    if recording is not None and returns[0]:  # env 0's first game is over, and so is its video
                        recording.close()
                        recording = None
                    if shown is not None:
                        shown.show(played, f"mean return {score_sum / played:.1f}" if played else "")
                    obs = result.obs
            finally:
                if recording is not None:
                    recording.discard()
                if shown is not None:
                    shown.close()
            protocol = env.protocol_description
        return [r for env_returns in returns for r in env_returns], protocol

    # ------------------------------------------------------------------ persistence
    def _state(self, with_rng: bool) -> dict:
        state = {"env_id": self.env_id, "run_name": self.run_name, "config": self.config.to_dict(),
                 "custom_q_network": self.custom_q_network,
                 "learner": self.learner.state_dict(),
                 "counters": {"env_steps": self.env_steps, "episodes": self.episodes, "wall_time": self.wall_time,
                              "learn_total_steps": self._unfinished_total_steps},
                 "recent_returns": list(self.recent_returns)}
        if with_rng:
            state["rng"] = ckpt.capture_rng(self.np_rng)
        return state

    def _checkpoint_cut(self, logger: RunLogger) -> None:
        """A cut's checkpoint: the run's metrics made durable first, so that it never holds
        a step whose rows could be lost, and the wall time up to now."""
        self.wall_time = logger.wall_time()
        logger.flush()
        self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write a full checkpoint (with RNG states and the replay buffer) into the run dir."""
        buffer = self.buffer if self.config.save_buffer else None
        return ckpt.save_checkpoint(ckpt.checkpoint_dir(self.run_dir), self.env_steps, self._state(True), buffer)

    def save(self, path: str | os.PathLike) -> None:
        """Save the agent (config, networks, optimizer, counters; not the replay buffer) to
        one file that ``DQN.load`` reads."""
        atomic_write_bytes(path, ckpt.encode_state(self._state(False)))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None, q_network: torch.nn.Module | None = None,
             load_buffer: bool = True, run_dir: str | os.PathLike | None = None, **kwargs) -> "DQN":
        """An agent from ``DQN.save``'s file, a checkpoint, or a run directory (its newest
        checkpoint). A run checkpoint also restores the RNG states and, with load_buffer,
        the replay buffer, so that ``learn`` continues exactly where the run stopped."""
        path, state, buffer = ckpt.load_newest(path, with_buffer=load_buffer)
        _check_network_given(path, state, q_network)
        config = _config_on(state["config"], device)
        if run_dir is None and path.parent.name == "checkpoints":
            run_dir = path.parent.parent
        agent = cls(state["env_id"], config, q_network=q_network, run_dir=run_dir, **kwargs)
        agent.run_name = state["run_name"]
        agent._restore(state, buffer, load_buffer)
        return agent

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, device: str | None = None,
               q_network: torch.nn.Module | None = None, load_buffer: bool = True, **kwargs) -> "DQN":
        """The agent of a run directory at its newest checkpoint, ready to ``learn`` on. A run
        with no checkpoint that did not finish (stopped before its first checkpoint, or killed)
        starts over: the agent is new, with the run's config, name and total steps, at step 0
        (``env_steps``), and its learn() rewrites the run's logs. A finished run without a
        checkpoint (they were deleted) raises ValueError: its logs are all that is left of it."""
        record = read_config(run_dir)
        RunDirectoryLock(run_dir).release()  # a run still going: RunDirectoryInUse now, not a checkpoint it removes
        if ckpt.latest_checkpoint(run_dir) is not None:
            return cls.load(run_dir, run_dir=run_dir, device=device, q_network=q_network, load_buffer=load_buffer,
                            **kwargs)
        _check_network_given(run_dir, record, q_network)
        total = record.get("learn_total_steps")
        metrics = Path(run_dir) / "metrics.csv"
        logged = [row["step"] for row in read_csv(metrics)] if metrics.is_file() else []
        if total is not None and logged and max(logged) >= total:
            raise ValueError(f"{run_dir} finished its {total} steps and holds no checkpoint to go on from "
                             "(starting it over would overwrite its logs): start a new run instead")
        agent = cls(record["env_id"], _config_on(record["config"], device), q_network=q_network, run_dir=run_dir,
                    **kwargs)
        agent.run_name = record["run_name"]
        agent._unfinished_total_steps = total
        return agent

    def _restore(self, state: dict, buffer, load_buffer: bool) -> None:
        self.learner.load_state_dict(state["learner"])
        counters = state["counters"]
        self.env_steps, self.episodes = int(counters["env_steps"]), int(counters["episodes"])
        self.wall_time = float(counters["wall_time"])
        self._unfinished_total_steps = counters.get("learn_total_steps")
        unfinished = self._unfinished_total_steps
        if unfinished is not None and unfinished <= self.env_steps and self._final_evaluation_made():
            self._unfinished_total_steps = None  # the call's last checkpoint, and it went on to the end
        self.recent_returns.extend(state.get("recent_returns", []))
        if "rng" in state:
            ckpt.restore_rng(state["rng"], self.np_rng)
        if self.env_steps > 0:
            self.env.close()  # learn() restarts it from this step, as at the checkpoint's cut
        if load_buffer and "rng" in state and not state.get("buffer_path"):
            warnings.warn("this checkpoint holds no replay buffer (save_buffer=False): learning continues from an "
                          "empty buffer, not exactly as the run would have", stacklevel=3)
        if buffer is not None:
            self.buffer = buffer

    def close(self) -> None:
        self.env.close()


def _check_network_given(path, saved: dict, q_network: torch.nn.Module | None) -> None:
    """A run trained with a network of the user's needs one of that architecture to go on."""
    if saved.get("custom_q_network") and q_network is None:
        raise ValueError(f"{path} was trained with a custom q_network ({saved['custom_q_network']}): pass "
                         "q_network=<a network of that architecture> to DQN.load or DQN.resume in Python (the "
                         "fastdqn command cannot rebuild it)")


def _check_epsilon(epsilon) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a number, got {type(epsilon).__name__}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")


def _class_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _config_on(fields: dict, device: str | None) -> DQNConfig:
    """A saved config, moved to ``device`` if one is given."""
    config = DQNConfig.from_dict(fields)
    if device is not None:
        config.device = device
        config.validate()
    return config

