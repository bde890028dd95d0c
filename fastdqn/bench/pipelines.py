"""fastdqn's systems in ``fastdqn bench train``: raw envpool, the sync and the async pipeline.

Each runner trains (or, for ``envpool_raw``, only steps) ``config.total_steps`` env steps and
returns the same figures as SB3's runner (env steps/s, updates/s, replay ratio) plus
``time_s``, the wall time each part took, and ``gpu_busy`` on CUDA:

- ``envpool_raw``: the same envs (same count, same async batches as the async pipeline)
  stepped with uniformly random actions and nothing else: the env-side limit, with the least
  Python a loop needs. Its ``env`` time counts the env calls alone, as the others' does;
  ``backend`` says which library stepped them (gymnasium for ids envpool does not know).
- ``sync``: the synchronous engine, its env stepping, acting, sampling and updates timed by
  wrapping those calls. On CUDA an update's time is the host's: queueing the step and
  waiting for its batch's copy to the device (the copy is part of ``update``).
- ``async``: the overlapped pipeline's own accounting. With the actor thread (CUDA,
  ``AsyncPipeline.report``): the actor's env, act, store, wait (for the rate limiter, or
  for the learner to catch up at a cut) and checkpoint; the learner's device (waiting for
  the device to finish the copy queued behind earlier updates, before its host batch is
  reused), sample (waiting for the prefetcher), copy (queueing it on the copy stream),
  update and wait (for the rate limiter). With the actor process (CPU, ``ActorProcess.report``): the actor's env,
  act, hand-off (writing the step to shared memory) and wait (for a slot, that is for the
  weights it must act with); the learner's learn (storing, updates, logs), publish (weight
  snapshots) and wait (for the actor's next step).

The learning systems are timed over ``learn()``, their envs made before it, as SB3's are. The
async pipeline makes envs of its own inside ``learn()`` (envpool's async mode, or in the actor
process): its actor times that (``make_env``, about a second for 16 Atari envs), and it is
taken out of the async wall time, as ``env_setup_s``, so that all systems are timed alike.

``gpu_busy`` is the mean of NVML's utilization (the fraction of time a kernel was running),
sampled every 50 ms during learning; None where NVML is not available.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import threading
import time
from collections import defaultdict

import numpy as np


def figures(steps: int, updates: int, wall: float) -> dict:
    return {"env_steps": int(steps), "updates": int(updates), "wall_s": round(wall, 3),
            "steps_per_s": round(steps / wall, 1), "updates_per_s": round(updates / wall, 1),
            "replay_ratio": round(updates / steps, 4) if steps else 0.0}


class GpuBusy:
    """Samples NVML's GPU utilization on a thread while in the ``with`` block."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        import torch

        if torch.cuda.is_available():
            try:
                torch.cuda.utilization()
            except Exception:  # noqa: BLE001 - no NVML bindings: report None
                return self
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import torch

        while not self._stop.wait(self.interval_s):
            self.samples.append(torch.cuda.utilization() / 100.0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def fraction(self) -> float | None:
        return round(float(np.mean(self.samples)), 3) if self.samples else None


def run_envpool_raw(env_id: str, config, eval_episodes: int = 0) -> dict:
    from fastdqn.agent import env_seed
    from fastdqn.envs import make_env
    from fastdqn.pipeline import env_batch_size

    c = config
    make = functools.partial(make_env, env_id, c.num_envs, env_seed(c.seed, 0), mode="train", protocol=c.protocol,
                             backend=c.backend)
    with make() as probe:  # the backend and the kind of observations decide the async batch
        batch = env_batch_size(c.num_envs, probe)
    env = make(batch_size=batch)
    rng = np.random.default_rng(c.seed)
    steps, in_env = 0, 0.0
    try:
        start = time.perf_counter()
        env.async_reset()
        while steps < c.total_steps:
            t = time.perf_counter()
            result = env.recv()
            in_env += time.perf_counter() - t
            steps += len(result.env_ids)
            actions = rng.integers(env.num_actions, size=len(result.env_ids))
            t = time.perf_counter()
            env.send(actions, result.env_ids)
            in_env += time.perf_counter() - t
        wall = time.perf_counter() - start
    finally:
        env.close()
    # time_s as the learning systems' env time counts it: the env calls alone, and the rest (random actions, the loop).
    return dict(figures(steps, 0, wall), env_batch=batch, backend=env.backend,
                time_s={"env": round(in_env, 3), "actions": round(wall - in_env, 3)})


def _timed(function, seconds: dict, name: str):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
    return timed


def run_sync(env_id: str, config, eval_episodes: int) -> dict:
    from fastdqn.agent import DQN

    seconds: dict[str, float] = defaultdict(float)
    with tempfile.TemporaryDirectory() as run_dir:
        agent = DQN(env_id, dataclasses.replace(config, pipeline="sync"), run_dir=run_dir, progress=False,
                    tensorboard=False)
        agent.buffer = agent._make_buffer()
        agent.env.step = _timed(agent.env.step, seconds, "env")
        agent.learner.act = _timed(agent.learner.act, seconds, "act")
        for method in ("update", "target_values"):  # on CPU, a run of updates' targets comes in one forward pass
            setattr(agent.learner, method, _timed(getattr(agent.learner, method), seconds, "update"))
        for method in ("sample", "sample_frames"):
            setattr(agent.buffer, method, _timed(getattr(agent.buffer, method), seconds, "sample"))
        with GpuBusy() as busy:
            start = time.perf_counter()
            agent.learn(config.total_steps)
            wall = time.perf_counter() - start
        result = dict(figures(agent.env_steps, agent.learner.num_updates, wall), gpu_busy=busy.fraction(),
                      time_s={name: round(value, 3) for name, value in sorted(seconds.items())})
        _evaluate(agent, eval_episodes, result)
        agent.close()
    return result


def run_async(env_id: str, config, eval_episodes: int) -> dict:
    from fastdqn.agent import DQN

    with tempfile.TemporaryDirectory() as run_dir:
        agent = DQN(env_id, dataclasses.replace(config, pipeline="async"), run_dir=run_dir, progress=False,
                    tensorboard=False)
        with GpuBusy() as busy:
            start = time.perf_counter()
            agent.learn(config.total_steps)
            wall = time.perf_counter() - start
        report = agent.pipeline_report
        env_setup = report["time_s"]["actor"].get("make_env", 0.0)
        result = dict(figures(agent.env_steps, agent.learner.num_updates, wall - env_setup), gpu_busy=busy.fraction(),
                      env_setup_s=env_setup, time_s=report["time_s"],
                      **{key: report[key] for key in _ASYNC_DETAILS if key in report})
        _evaluate(agent, eval_episodes, result)
        agent.close()
    return result


_ASYNC_DETAILS = ("actor", "policy_lag_steps", "learner_torch_threads", "max_lag_updates", "max_owed_updates",
                  "env_batch")
"""What the async run's report adds: where the actor ran, and how far it may run ahead."""


def _evaluate(agent, episodes: int, result: dict) -> None:
    if episodes:
        evaluation = agent.evaluate(episodes, epsilon=0.0, seed=agent.config.seed + 1)
        result.update(eval_mean_return=evaluation["mean_return"], eval_std_return=evaluation["std_return"],
                      eval_protocol=evaluation["protocol"])
