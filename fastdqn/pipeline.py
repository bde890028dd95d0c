"""The overlapped actor/learner pipeline (``pipeline="async"``).

The synchronous engine steps the envs, then learns, then steps again, so each side waits
for the other. Here they run at once, in two threads that share the lock-free replay buffer::

    actor (the calling thread)                    learner (a second thread)
    recv a batch of envs (envpool async mode)     next prefetched batch (C++ sampler thread)
    store its transitions, limiter.inserted()     copy it to the device (its own CUDA stream)
    take the newest published actor weights       update (the CUDA graph), limiter.updated()
    act with the actor's copy of the network      every K updates: publish the weights
    send the actions (the other envs step)        prioritized replay: new priorities

- For Atari, envpool's async mode steps ``num_envs`` environments and hands back
  ``num_envs // 2`` at a time (``env_batch_size``), so the envs of one half step while the
  actor acts on the other.
- A ``RateLimiter`` holds updates per env step at the synchronous engine's schedule
  (``DQN.updates_due``): the learner never runs ahead of it and the actor never more than
  ``max_lag`` updates ahead of the learner. Before each checkpoint, evaluation and at the
  end the learner catches up, so a run does exactly the synchronous run's updates. A
  schedule of rounds (max_lag 0) is followed as sync follows it: the actor waits out each
  round and the learner samples on demand, so the run equals sync's.
- The actor acts with a copy of the online network (``Learner(actor_copy=True)``) that
  ``ActorWeights`` refreshes: the learner publishes into a back buffer (on CUDA on a side
  stream, ordered by events, so neither thread waits on the host), the actor copies it in
  between two action selections, so it never sees half-written weights.
- Errors: the first exception in either thread stops both (the limiter wakes every wait)
  and is re-raised in the calling thread with its original traceback. Ctrl-C (or
  ``DQN.request_stop``) stops at a cut, as the synchronous engine does; a second Ctrl-C
  closes the limiter and comes out of ``run`` as KeyboardInterrupt once the learner has
  stopped, never halfway into a lock the two threads share.
  Checkpoints are written only while the learner is paused and caught up.

On CPU the same code runs with ``actor="thread"`` (the tests run it so), the two threads
sharing the cores and taking turns on the GIL; CUDA streams and events are simply absent
there. The CPU's default async actor is a forked process instead (``fastdqn.actor_process``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from collections import defaultdict

import numpy as np
import torch

from fastdqn.agent import next_boundary
from fastdqn.learner import network_tensors
from fastdqn.rate_limiter import RateLimiter
from fastdqn.signals import handling

__all__ = ["ActorWeights", "AsyncPipeline", "Stopwatch", "env_batch_size"]

ACTOR_SYNC_INTERVAL = 4
"""Updates between two publications of the online weights to the actor."""
PREFETCH_DEPTH = 3
"""Batches the C++ sampler thread keeps ready ahead of the learner."""
JOIN_TIMEOUT_S = 60.0
"""How long stopping waits for the learner thread to finish its current update."""


def env_batch_size(num_envs: int, env) -> int:
    """Envs handed back per ``recv`` by the async pipeline's envs (so also its action batch).

    envpool image (Atari) envs: half of them when that divides evenly, so one half steps
    while the actor acts on the other. Vector envs step in microseconds: splitting them would
    only double the actor's per-call cost. gymnasium's vector env steps all envs together.
    """
    if env.backend == "envpool" and env.is_image and num_envs % 2 == 0:
        return num_envs // 2
    return num_envs


class Stopwatch:
    """Wall time per named activity, added up: ``t = watch.lap("env", t)``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[name] += now - since
        return now

    def rounded(self) -> dict[str, float]:
        """The seconds per activity, by name, to the millisecond (for reports)."""
        return {name: round(value, 3) for name, value in sorted(self.seconds.items())}


class ActorWeights:
    """Hands the learner's online weights to the actor's copy without tearing or stalls.

    ``publish`` (learner thread, between updates) copies the online weights into a back
    buffer; ``refresh`` (actor thread, between action selections) copies the newest
    published weights into the actor's network. A lock makes each copy whole on CPU. On
    CUDA both only queue work: the publish copy runs on a side stream after the update
    that produced the weights and before the next one; the actor's stream waits for the
    publish event before reading the back buffer, and the next publish waits for the
    actor's read to finish. Neither host thread ever waits for the device.
    """

    def __init__(self, learner) -> None:
        if learner.actor_network is learner.q_network:
            raise ValueError("the async pipeline acts with a copy of the online network: "
                             "build the Learner with actor_copy=True")
        self._source = network_tensors(learner.q_network)
        self._actor = network_tensors(learner.actor_network)
        self._back = [t.detach().clone() for t in self._source]
        self._cuda = learner.device.type == "cuda"
        self._lock = threading.Lock()
        self.published = 0
        self.taken = 0
        if self._cuda:
            self._stream = torch.cuda.Stream(learner.device)
            self._published_event = torch.cuda.Event()
            self._taken_event = torch.cuda.Event()

    @torch.no_grad()
    def publish(self) -> None:
        with self._lock:
            if self._cuda:
                learner_stream = torch.cuda.current_stream()
                self._stream.wait_stream(learner_stream)  # after the update that produced them
                self._stream.wait_event(self._taken_event)  # and after the actor's last read
                with torch.cuda.stream(self._stream):
                    torch._foreach_copy_(self._back, self._source)
                    self._published_event.record()
                learner_stream.wait_event(self._published_event)  # the next update waits for the copy
            else:
                torch._foreach_copy_(self._back, self._source)
            self.published += 1

    @torch.no_grad()
    def refresh(self) -> bool:
        """Take the newest published weights, if any are new; True if it did."""
        if self.taken == self.published:  # a stale read only delays the refresh to the next call
            return False
        with self._lock:
            if self._cuda:
                actor_stream = torch.cuda.current_stream()
                actor_stream.wait_event(self._published_event)
                torch._foreach_copy_(self._actor, self._back)
                self._taken_event.record(actor_stream)
            else:
                torch._foreach_copy_(self._actor, self._back)
            self.taken = self.published
        return True


class _DeviceBatches:
    """Prefetched host batches, moved to the device for the learner.

    The C++ prefetcher samples into ``PREFETCH_DEPTH`` host batches (pinned memory on
    CUDA); with ``prefetch=False`` the learner samples each batch itself when it needs it.
    On CUDA each batch is copied on its own stream into one of two device staging batches,
    so the copy of batch i+1 overlaps update i; the learner's stream waits for the copy's
    event, the next copy into a staging batch waits until the update that read it is done,
    and a host slot goes back to the sampler only once its copy has landed. On CPU the host
    batch goes to the learner as it is.
    """

    def __init__(self, buffer, batch_size: int, device: torch.device, fields: tuple[str, ...],
                 prefetch: bool = True) -> None:
        self._cuda = device.type == "cuda"
        self._fields = fields
        template = buffer.empty_batch(batch_size)
        self._host: list[dict[str, torch.Tensor]] = []
        batches = []
        for _ in range(PREFETCH_DEPTH if prefetch else 1):
            tensors = {name: torch.empty(array.shape, dtype=torch.from_numpy(array).dtype, pin_memory=self._cuda)
                       for name, array in template.arrays().items()}
            self._host.append(tensors)
            batches.append(type(template)(**{name: t.numpy() for name, t in tensors.items()}))
        self._prefetcher = buffer.prefetch(batch_size, out=batches) if prefetch else None
        self._take = self._prefetcher.next if prefetch else functools.partial(buffer.sample, batch_size,
                                                                               out=batches[0])
        self._batches = batches
        self._landed: torch.cuda.Event | None = None
        if self._cuda:
            self._stream = torch.cuda.Stream(device)
            self._staging = [{name: torch.empty_like(self._host[0][name], device=device) for name in fields}
                             for _ in range(2)]
            self._copied = [torch.cuda.Event(), torch.cuda.Event()]
            self._consumed = [torch.cuda.Event(), torch.cuda.Event()]
            self._turn = 0

    def next(self, watch: Stopwatch, t: float):
        """The next batch as the learner takes it, its host indices, and the time now."""
        if self._landed is not None:
            self._landed.synchronize()  # the previous host slot is about to be refilled
            t = watch.lap("device", t)  # the device behind: the copy queued after earlier updates
        host = self._take()
        t = watch.lap("sample", t)
        tensors = self._host[self._slot(host)]
        if not self._cuda:
            return {name: tensors[name] for name in self._fields}, host.indices, t
        turn, self._turn = self._turn, self._turn ^ 1
        staging = self._staging[turn]
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(self._consumed[turn])
            for name in self._fields:
                staging[name].copy_(tensors[name], non_blocking=True)
            self._copied[turn].record()
        torch.cuda.current_stream().wait_event(self._copied[turn])
        self._landed = self._copied[turn]
        self._last_turn = turn
        return staging, host.indices, watch.lap("copy", t)

    def consumed(self) -> None:
        """The update that reads the last batch is queued: its staging batch is free after it."""
        if self._cuda:
            self._consumed[self._last_turn].record()

    def _slot(self, host) -> int:
        return next(i for i, batch in enumerate(self._batches) if batch is host)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()


class _PendingPriorities:
    """New priorities go to the buffer one update late, so reading them never stalls the device.

    ``push`` queues a copy of the update's priorities into host memory (pinned and
    asynchronous on CUDA) and applies the previous update's, whose copy has long landed.
    ``flush`` applies the last one (call it with the device idle, e.g. before a checkpoint).
    With ``deferred=False`` each push is applied at once, for a learner that samples its next
    batch right after the update (rounds of updates), so that the batch sees them, as in sync.
    """

    def __init__(self, buffer, batch_size: int, device: torch.device, deferred: bool = True) -> None:
        self._buffer = buffer
        self._deferred = deferred
        self._cuda = device.type == "cuda"
        self._priorities = [torch.empty(batch_size, pin_memory=self._cuda) for _ in range(2)]
        self._indices = [np.empty(batch_size, np.int64) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if self._cuda else None
        self._turn = 0
        self._pending: int | None = None

    def push(self, indices: np.ndarray, priorities: torch.Tensor) -> None:
        turn, self._turn = self._turn, self._turn ^ 1
        self._indices[turn][:] = indices
        self._priorities[turn].copy_(priorities, non_blocking=True)
        if self._events is not None:
            self._events[turn].record()
        previous, self._pending = self._pending, turn
        if previous is not None:
            self._apply(previous)
        if not self._deferred:
            self.flush()

    def flush(self) -> None:
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    def _apply(self, turn: int) -> None:
        if self._events is not None:
            self._events[turn].synchronize()
        self._buffer.update_priorities(self._indices[turn], self._priorities[turn].numpy())


class _Stop(Exception):
    """The limiter was closed under the actor: the learner thread failed."""


class AsyncPipeline:
    """Trains a ``DQN`` agent with the actor and the learner in two threads.

    ``run(total, logger)`` stands in for the synchronous loop: it writes the same metrics,
    evaluations and checkpoints. After it, ``report()`` gives the throughput, the replay
    ratio held and where each thread's time went.

    Args:
        agent: the ``DQN`` whose learner (built with ``actor_copy=True``), buffer, config
            and run bookkeeping it drives.
        actor_sync_interval: updates between publications of the weights to the actor.
        max_lag: due updates the learner may owe before the actor waits. None allows two
            env batches' worth, so the actor's policy trails the learner by a few updates
            at most; but a schedule of rounds (gradient_steps above that) is followed as the
            synchronous engine follows it (max_lag 0): the actor goes on into the next round
            only once the learner has finished the last and acts with the weights it ended
            with, and the learner samples each batch when it needs it, after the previous
            update's new priorities are in, so the run stores the same transitions and makes
            the same updates as sync, bit for bit.
    """

    def __init__(self, agent, actor_sync_interval: int = ACTOR_SYNC_INTERVAL, max_lag: int | None = None) -> None:
        c = agent.config
        if isinstance(actor_sync_interval, bool) or not isinstance(actor_sync_interval, int) or actor_sync_interval < 1:
            raise ValueError(f"actor_sync_interval must be a positive int, got {actor_sync_interval!r}")
        self.num_envs = c.num_envs
        self.env_batch = env_batch_size(c.num_envs, agent.env)
        if max_lag is None:
            max_lag = 2 * math.ceil(c.replay_ratio * self.env_batch)
            if c.gradient_steps > max_lag:
                max_lag = 0
        if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 0:
            raise ValueError(f"max_lag must be a non-negative int, got {max_lag!r}")
        self.agent = agent
        self.actor_sync_interval = actor_sync_interval
        self.max_lag = max_lag
        self.weights = ActorWeights(agent.learner)
        self.actor_watch, self.learner_watch = Stopwatch(), Stopwatch()
        self._lock = threading.Lock()  # held by the learner around each update; taken to pause it
        # Held by the actor around acting, and by the learner around its updates until the update
        # graph is captured: while one thread captures a CUDA graph, no other may replay a graph
        # (every replay advances the default CUDA generator, which the capture holds) or draw
        # CUDA random numbers (a user's network with dropout or noisy layers).
        self._act_lock = threading.Lock()
        self._learner_error: BaseException | None = None
        self._interrupted = False  # Ctrl-C came in (see _ctrl_c_at_safe_points)
        self._pausing = False  # the actor is in a _paused block (evaluation, checkpoint, log)
        self._cuda = agent.learner.device.type == "cuda"
        self._learner_stream = torch.cuda.Stream(agent.learner.device) if self._cuda else None
        self._actor_stream = torch.cuda.Stream(agent.learner.device) if self._cuda else None
        self._limiter: RateLimiter | None = None
        self._wall = 0.0
        self._start_steps = self._start_updates = 0

    # ------------------------------------------------------------------ the actor (calling thread)
    def run(self, total: int, logger) -> None:
        agent, c = self.agent, self.agent.config
        learner = agent.learner
        self._start_steps, self._start_updates = agent.env_steps, learner.num_updates
        self._limiter = limiter = RateLimiter(agent.updates_due, self.max_lag, steps=agent.env_steps,
                                              updates=learner.num_updates)
        self._priorities = (_PendingPriorities(agent.buffer, c.batch_size, learner.device, deferred=self.max_lag > 0)
                            if c.prioritized else None)
        self._total = total
        if self._cuda:  # the actor's and learner's streams start after all work queued so far
            torch.cuda.synchronize(learner.device)
        # OpenMP's thread count is per thread: the learner thread takes the caller's setting
        # (learn() set the config's torch_threads).
        self._torch_threads = torch.get_num_threads()
        thread = threading.Thread(target=self._learner_thread, name="fastdqn-learner", daemon=True)
        start = time.perf_counter()
        error: BaseException | None = None
        with self._ctrl_c_at_safe_points():  # up to the learner's end: a Ctrl-C then only waits for it
            try:
                with self._on(self._actor_stream):
                    self.weights.publish()  # the actor starts from the current online weights
                    self.weights.refresh()
                    self._capture_action_graph()
                    thread.start()
                    self._act(total, logger)
            except _Stop:
                pass  # the learner's error (or Ctrl-C) is raised below
            except BaseException as e:  # noqa: BLE001 - stop the learner, then re-raise
                error = e
            finally:
                limiter.close()
                if thread.is_alive():
                    thread.join(JOIN_TIMEOUT_S)
                self._wall = time.perf_counter() - start
        if thread.is_alive():
            raise RuntimeError(f"the learner thread did not stop within {JOIN_TIMEOUT_S:.0f} s") from error
        if self._learner_error is not None:
            if error is not None:
                self._learner_error.add_note(f"the actor stopped with {type(error).__name__}: {error}")
            raise self._learner_error
        if error is not None:
            raise error
        if self._interrupted:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def _ctrl_c_at_safe_points(self):
        """Ctrl-C stops the run at safe points, not wherever it lands.

        The first Ctrl-C asks for a stop at a cut (``DQN.request_stop``, which the actor reads
        at its next env batch), as in the synchronous engine. A second one stops at once, but
        still not wherever it lands: Python runs a signal handler between any two bytecodes,
        also between a lock's acquire and the with-block that releases it. A KeyboardInterrupt
        raised there would leave the rate limiter's lock (or another the learner takes) held for
        good, and the learner stuck on it. So the second Ctrl-C only closes the limiter, which
        ends every wait of both threads, and ``run`` raises KeyboardInterrupt once the learner
        has stopped. The limiter is closed from a new thread: the handler may run inside the
        actor's own check of a wait condition, and a notify sent from there, before the wait
        begins, would be lost. In a ``_paused`` block (evaluation, checkpoint, log), where the
        learner waits for nothing the actor holds, the second Ctrl-C raises at once. Only the
        main thread gets signals; a caller with a SIGINT handler of its own keeps it.
        """
        def on_ctrl_c(signum, frame):
            if self.agent.stop_requested:
                self._stop_at_once()
            else:
                self.agent._ctrl_c()

        self.agent._stop_at_once = self._stop_at_once  # also for SIGTERM where SIGINT is ignored (the CLI)
        try:
            with handling(signal.SIGINT, on_ctrl_c, over_ctrl_c_default=True):
                yield
        finally:
            self.agent._stop_at_once = None

    def _stop_at_once(self) -> None:
        """The second Ctrl-C (see _ctrl_c_at_safe_points), from a signal handler in the main thread."""
        self._interrupted = True
        threading.Thread(target=self._limiter.close, name="fastdqn-ctrl-c", daemon=True).start()
        if self._pausing:
            raise KeyboardInterrupt

    def _act(self, total: int, logger) -> None:
        agent, c, learner, limiter = self.agent, self.agent.config, self.agent.learner, self._limiter
        watch = self.actor_watch
        n, batch = self.num_envs, self.env_batch
        step = agent.env_steps
        returns: list[float] = []
        lengths: list[float] = []
        next_log, next_eval, next_ckpt = agent.next_boundaries(step)
        epsilon = agent.epsilon(step, total)
        while step < total:
            segment_start = step  # a requested stop cuts the segment once it has a step of its own
            t = time.perf_counter()
            env = agent._make_train_env(step, batch_size=batch)
            watch.lap("make_env", t)
            try:
                last_obs = np.zeros((n, *agent.obs_shape), agent.env.obs_dtype)
                last_actions = np.zeros(n, np.int64)
                started = np.zeros(n, bool)  # rows before an env's first action are its initial reset
                env.async_reset()
                in_flight = n
                cut = False
                while in_flight:
                    t = time.perf_counter()
                    result = env.recv()
                    in_flight -= len(result.env_ids)
                    t = watch.lap("env", t)
                    ids = result.env_ids
                    counted = int(started[ids].sum())
                    step += counted
                    stop = agent.stop_requested and step > segment_start
                    cut = cut or step >= next_ckpt or step >= total or stop
                    # Steps count whether or not they hold a transition (a row that only reset
                    # does not), so the limiter is asked either way.
                    if not limiter.await_insert(counted):
                        raise _Stop
                    t = watch.lap("wait", t)
                    stored = np.flatnonzero(result.valid)
                    if stored.size:
                        rows = ids[stored]
                        truncated = ~result.terminated if cut else result.truncated
                        agent.buffer.add(last_obs[rows], last_actions[rows], result.rewards[stored],
                                         result.next_obs[stored], result.terminated[stored], truncated[stored],
                                         env_ids=rows)
                        t = watch.lap("store", t)
                    limiter.inserted(counted)
                    agent.env_steps = step  # the steps stored, for an interrupted learn() to go on from
                    logger.progress(step)
                    last_obs[ids] = result.obs
                    started[ids] = True
                    if len(result.episode_returns):
                        returns.extend(result.episode_returns.tolist())
                        lengths.extend(result.episode_lengths.tolist())
                    if cut:
                        continue  # collect the envs still stepping; their episodes end here too
                    epsilon = agent.epsilon(step, total)
                    if self.max_lag == 0:  # rounds of updates: act after the round, with its weights, as sync does
                        if not limiter.await_caught_up():
                            raise _Stop
                        t = watch.lap("wait", t)
                    if step < c.learning_starts:
                        actions = agent.np_rng.integers(agent.num_actions, size=len(ids))
                    else:
                        with self._act_lock:
                            self.weights.refresh()
                            actions = learner.act(result.obs, epsilon).cpu().numpy()
                    t = watch.lap("act", t)
                    last_actions[ids] = actions
                    env.send(actions, ids)
                    in_flight += len(ids)
                    watch.lap("env", t)
                    if step >= next_log:
                        next_log = next_boundary(step, c.log_interval)
                        with self._paused(catch_up=False):
                            agent._log(logger, step, epsilon, returns, lengths)
                        returns, lengths = [], []
                    if step >= next_eval:
                        next_eval = next_boundary(step, c.eval_interval)
                        with self._paused(catch_up=True):
                            agent._evaluate_and_log(logger, step)
            finally:
                env.close()
            # A cut: a checkpoint, the end or a requested stop. Every env's episode was stored as truncated.
            with self._paused(catch_up=True):  # its wait for the learner is counted as "wait"
                t = time.perf_counter()
                next_log = next_boundary(step, c.log_interval)
                agent._log(logger, step, epsilon, returns, lengths)
                returns, lengths = [], []
                if step >= next_eval:
                    next_eval = next_boundary(step, c.eval_interval)
                    agent._evaluate_and_log(logger, step)
                checkpoint_due = step >= next_ckpt or step >= total
                if checkpoint_due:
                    next_ckpt = next_boundary(step, c.checkpoint_interval)
                agent._stop_at_cut(logger, step, checkpoint_due)  # a requested stop raises here
                watch.lap("checkpoint", t)
        agent._stop_if_requested(step)  # before the final evaluation
        if agent._final_evaluation_due(step, logger):
            with self._paused(catch_up=True):
                agent._evaluate_and_log(logger, step)

    def _capture_action_graph(self) -> None:
        """On CUDA, capture the action graph before the learner thread starts (see _act_lock)."""
        learner = self.agent.learner
        if learner.cuda_graph and learner.num_envs == self.env_batch:
            obs = np.zeros((self.env_batch, *self.agent.obs_shape), self.agent.env.obs_dtype)
            while not learner.act_graph_captured:
                learner.act(obs, 1.0)

    @contextlib.contextmanager
    def _paused(self, catch_up: bool):
        """The learner between updates (after every due update with ``catch_up``), the device idle,
        its priorities in the buffer: the actor may read or save the learner's state."""
        t = time.perf_counter()
        if catch_up and not self._limiter.await_caught_up():
            raise _Stop
        with self._lock:
            if self._cuda:
                torch.cuda.synchronize(self.agent.learner.device)
            if self._priorities is not None:
                self._priorities.flush()
            self.actor_watch.lap("wait", t)
            self._pausing = True
            try:
                # Ctrl-C (its handler may not have closed the limiter yet) or a learner error while
                # it waited: not worth an evaluation.
                if self._interrupted or self._limiter.closed:
                    raise _Stop
                yield
            finally:
                self._pausing = False
            if self._cuda:
                torch.cuda.synchronize(self.agent.learner.device)

    # ------------------------------------------------------------------ the learner thread
    def _learner_thread(self) -> None:
        limiter = self._limiter
        batches = None
        try:
            torch.set_num_threads(self._torch_threads)
            with self._on(self._learner_stream):
                while due := limiter.acquire():
                    if batches is None:  # the buffer holds transitions once an update is due
                        # With max_lag 0 the learner only runs while the actor waits: a sampler
                        # thread would have nothing to overlap, and batches sampled ahead of a
                        # round would miss the steps stored just before it.
                        batches = _DeviceBatches(self.agent.buffer, self.agent.config.batch_size,
                                                 self.agent.learner.device, self._update_fields(),
                                                 prefetch=self.max_lag > 0)
                    for i in range(due):
                        if limiter.closed:
                            break
                        # With max_lag 0 the actor waits for the round to end; it acts with its last weights.
                        self._update(batches, publish=self.max_lag == 0 and i == due - 1)
                        limiter.updated()
                if self._priorities is not None:  # a stop at once keeps the last update's priorities too
                    with self._lock:
                        self._priorities.flush()
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            self._learner_error = e
            limiter.close()
        finally:
            if batches is not None:
                batches.close()

    def _update_fields(self) -> tuple[str, ...]:
        fields = ("obs", "actions", "rewards", "next_obs", "discounts")
        return fields + ("weights",) if self.agent.config.prioritized else fields

    def _update(self, batches: _DeviceBatches, publish: bool = False) -> None:
        agent, learner, watch = self.agent, self.agent.learner, self.learner_watch
        c = agent.config
        if c.prioritized:  # annealed as the synchronous engine does; the sampler reads it
            agent.buffer.beta = agent.per_beta(self._limiter.steps, self._total)
        t = time.perf_counter()
        batch, indices, t = batches.next(watch, t)
        with self._lock:
            may_capture = learner.cuda_graph and not learner.update_graph_captured
            with self._act_lock if may_capture else contextlib.nullcontext():
                learner.update(batch)
            batches.consumed()
            if self._priorities is not None:
                self._priorities.push(indices, learner.new_priorities)
            if publish or learner.num_updates % self.actor_sync_interval == 0:
                self.weights.publish()
        watch.lap("update", t)

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        """Throughput, the replay ratio held and where each thread's time went (seconds)."""
        limiter = self._limiter
        steps = limiter.steps - self._start_steps
        updates = limiter.updates - self._start_updates
        wall = max(self._wall, 1e-9)
        learning_steps = max(limiter.steps - max(self.agent.config.learning_starts, self._start_steps), 0)
        time_s = {"actor": self.actor_watch.rounded(),
                  "learner": {**self.learner_watch.rounded(), "wait": round(limiter.learner_wait_s, 3)}}
        return {
            "actor": "thread", "env_steps": steps, "updates": updates, "wall_s": round(wall, 3),
            "steps_per_s": round(steps / wall, 1), "updates_per_s": round(updates / wall, 1),
            "replay_ratio": round(updates / steps, 4) if steps else 0.0,
            "replay_ratio_after_learning_starts": round(updates / learning_steps, 4) if learning_steps else 0.0,
            "replay_ratio_target": self.agent.config.replay_ratio,
            "max_lag_updates": self.max_lag, "max_owed_updates": limiter.max_owed,
            "num_envs": self.num_envs, "env_batch": self.env_batch,
            "actor_syncs": self.weights.taken,
            "time_s": time_s,
        }

    @staticmethod
    def _on(stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
