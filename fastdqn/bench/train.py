"""End-to-end training benchmark: raw envpool, fastdqn's sync and async pipelines, SB3's DQN.

    fastdqn bench train                                  # CartPole-v1 (preset, 50k steps) and Breakout-v5,
                                                         # each system's median of 5 interleaved runs
    fastdqn bench train --env Breakout-v5 --steps 20000 --json
    fastdqn bench train --env CartPole-v1 --repeats 1      # one run of each system
    python benchmarks/train.py --systems sync,async

Systems: ``envpool_raw`` (the same envs stepped with random actions: the env-side limit),
``sync`` and ``async`` (fastdqn's two pipelines) and ``sb3``; each reports env steps/s,
updates/s, the replay ratio held, where the time went (``time_s``: env, act, sample, copy,
update, waits; see fastdqn.bench.pipelines) and, on CUDA, the GPU's busy fraction. ``--json``
prints one object mapping each system to its figures (with several envs, each env to such
an object).

The learning systems train with the same hyperparameters on the same machine in the same run: the
environment's fastdqn preset, translated into SB3's arguments (SB3 counts train_freq in
vector steps and target_update_interval in env steps; fastdqn counts updates). Breakout runs
CleanRL's dqn_atari settings with a smaller buffer and learning_starts, so that updates
happen within a short run. Every run has a fresh Python process of its own (see
``in_fresh_process``). Each system is timed from the start of learning to its end
(environment stepping, acting, replay and updates; no evaluation), then evaluated greedily
outside the timing. The report (JSON and a markdown table) goes to ``--out``, rewritten after
every run (as ``<name>-incomplete.*`` until the end), so a benchmark cut short keeps what it
measured; progress goes to stderr. A system
whose run fails is reported with its error (its traceback goes to stderr), is not run again,
and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
import warnings

from fastdqn.bench.report import (busy_lines, check_out_dir, command_line, device_error, machine_info, machine_name,
                                  report_stem, write_report)
from fastdqn.config import MAX_SEED, DQNConfig, int_at_least, preset_for_env
from fastdqn.bench.pipelines import figures, run_async, run_envpool_raw, run_sync
from fastdqn.signals import die_with_parent

DEFAULT_ENVS = ("CartPole-v1", "Breakout-v5")
SYSTEMS = ("envpool_raw", "sync", "async", "sb3")
PEER_PACKAGES = ("stable-baselines3", "envpool", "gymnasium", "ale-py")
"""Versions the report records beside fastdqn's, numpy's and torch's."""
# Short Atari runs need updates inside the window; everything else is CleanRL's dqn_atari.
ATARI_BENCH_OVERRIDES = dict(buffer_size=100_000, learning_starts=1_000)


def log(message: str) -> None:
    print(f"[bench train {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_config(env_id: str, steps: int | None, seed: int, device: str, num_envs: int | None = None):
    """The env's preset for ``steps`` env steps (None: the preset's own total_steps) and
    ``num_envs`` envs (None: the preset's)."""
    preset = preset_for_env(env_id)
    config = DQNConfig.preset(preset, seed=seed, device=device, eval_episodes=0, save_buffer=False,
                              checkpoint_interval=0)
    if preset == "atari":
        config = dataclasses.replace(config, **ATARI_BENCH_OVERRIDES)
    if steps is not None:
        config = dataclasses.replace(config, total_steps=steps)
    if num_envs is not None:
        config = dataclasses.replace(config, num_envs=num_envs)
    return preset, dataclasses.replace(config, log_interval=max(config.total_steps // 10, 1))


def sb3_arguments(config, num_envs: int) -> dict:
    """fastdqn's config as SB3 DQN arguments (same schedule, same replay ratio)."""
    if config.train_frequency % num_envs:
        raise ValueError(f"SB3 steps all {num_envs} envs together: train_frequency {config.train_frequency} "
                         "must be a multiple of num_envs")
    return dict(
        learning_rate=config.learning_rate, buffer_size=config.buffer_size, learning_starts=config.learning_starts,
        batch_size=config.batch_size, tau=config.tau, gamma=config.gamma,
        train_freq=config.train_frequency // num_envs, gradient_steps=config.gradient_steps, n_steps=config.n_step,
        # fastdqn counts target updates in updates, SB3 in env steps.
        target_update_interval=max(round(config.target_update_interval / config.replay_ratio), 1),
        exploration_fraction=config.exploration_fraction, exploration_initial_eps=config.start_epsilon,
        exploration_final_eps=config.end_epsilon, max_grad_norm=config.max_grad_norm or 1e9,
        seed=config.seed, device=config.device, verbose=0,
    )


def run_sb3(env_id: str, config, eval_episodes: int) -> dict:
    import torch
    from stable_baselines3 import DQN as SB3DQN

    from fastdqn.learner import Learner
    from stable_baselines3.common.logger import Logger

    notes = []
    if config.double_dqn:
        notes.append("SB3's DQN has no Double DQN; ran without it")
    if config.dueling:
        notes.append("SB3's DQN has no dueling head; ran without it")
    if config.loss != "huber":
        notes.append("SB3's DQN always uses the Huber loss")
    if config.prioritized:
        notes.append("SB3's DQN has no prioritized replay")
    kwargs = sb3_arguments(config, config.num_envs)
    env, eval_env, policy, policy_kwargs = _sb3_envs(env_id, config)
    if config.optimizer == "adam":
        policy_kwargs["optimizer_kwargs"] = {"eps": config.adam_eps}
    else:  # the learner's RMSprop, as its defaults set it (Nature DQN's)
        learner_defaults = inspect.signature(Learner).parameters
        policy_kwargs["optimizer_class"] = torch.optim.RMSprop
        policy_kwargs["optimizer_kwargs"] = {key: learner_defaults[f"rmsprop_{key}"].default
                                             for key in ("alpha", "eps", "centered")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SB3DQN(policy, env, policy_kwargs=policy_kwargs, **kwargs)
        model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes a folder in /tmp per run
        start = time.perf_counter()
        model.learn(config.total_steps)
        wall = time.perf_counter() - start
    steps = model.num_timesteps
    updates = model._n_updates
    result = figures(steps, updates, wall)
    if eval_episodes:
        from stable_baselines3.common.evaluation import evaluate_policy

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True,
                                         return_episode_rewards=True)
        result.update(eval_mean_return=float(sum(returns) / len(returns)))
    env.close()
    eval_env.close()
    if notes:
        result["notes"] = notes
    return result


def sb3_atari_id(env_id: str) -> str:
    """The id SB3's AtariWrapper plays the same game on (CleanRL's protocol on the v4 NoFrameskip id)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    game = re.fullmatch(r"(?:ALE/)?(\w+?)(?:NoFrameskip|Deterministic)?-v\d+", env_id)
    sb3_id = f"{game[1]}NoFrameskip-v4" if game else None
    if sb3_id not in gym.registry:  # the games ALE added after v4 (ALE/Pitfall2-v5) have none
        raise ValueError(f"SB3's Atari setup has no counterpart of {env_id} (no {sb3_id or 'v4 id'})")
    return sb3_id


def _sb3_envs(env_id: str, config):
    from fastdqn.envs import is_atari_id

    if is_atari_id(env_id):
        from stable_baselines3.common.env_util import make_atari_env
        from stable_baselines3.common.vec_env import VecFrameStack

        sb3_id = sb3_atari_id(env_id)
        env = VecFrameStack(make_atari_env(sb3_id, n_envs=config.num_envs, seed=config.seed), 4)
        # Life losses reset as in training (FIRE after each), as fastdqn's evaluation does;
        # evaluate_policy reads whole games' scores from the Monitor under the AtariWrapper.
        eval_env = VecFrameStack(make_atari_env(sb3_id, n_envs=1, seed=config.seed + 1,
                                                wrapper_kwargs={"clip_reward": False}), 4)
        return env, eval_env, "CnnPolicy", {}
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(env_id, n_envs=config.num_envs, seed=config.seed)
    eval_env = make_vec_env(env_id, n_envs=1, seed=config.seed + 1)
    return env, eval_env, "MlpPolicy", {"net_arch": list(config.hidden_sizes)}


def median_run(results: list[dict]) -> dict:
    """The run with the median steps/s (the lower middle one of an even count); with several
    runs, every run's steps/s is added as ``runs_steps_per_s``."""
    median = sorted(results, key=lambda r: r["steps_per_s"])[(len(results) - 1) // 2]
    if len(results) > 1:
        median = dict(median, runs_steps_per_s=[r["steps_per_s"] for r in results])
    return median


def learning_window(config) -> str:
    """The replay ratio a whole run's schedule makes: no update before learning_starts."""
    steps = config.total_steps
    return (f"learning starts at env step {config.learning_starts:,} of {steps:,}: the schedule makes "
            f"{config.updates_due(steps):,} updates, a replay ratio of {config.updates_due(steps) / steps:.3f} over "
            f"the whole run (configured: {config.replay_ratio:.3f} from then on)")


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# End-to-end DQN training: fastdqn vs SB3 ({report['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('gpu', 'no GPU')}, device {report['device']}, "
             f"1-min load average at start {m['load_avg_1m']}; "
             + ", ".join(f"{name} {version}" for name, version in m["versions"].items() if version) + ".",
             "Same hyperparameters for every learning system (the env's fastdqn preset); timed from start to end of "
             "learning, evaluated greedily afterwards."
             + "".join(f" {env_id}: each system's median of {entry['repeats']} interleaved runs (every run's "
                       "steps/s below the table)." for env_id, entry in report["envs"].items()
                       if entry.get("repeats", 1) > 1), "",
             "| env | system | env steps | wall s | env steps/s | updates/s | replay ratio | GPU busy | "
             "where the time went (s) | eval return | vs sync | vs SB3 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    lines[5:5] = busy_lines(m)
    if not report.get("complete", True):
        lines[5:5] = ["**Incomplete:** the run stopped (or is still running) before every system had run.", ""]
    for env_id, entry in report["envs"].items():
        sync = entry["systems"].get("sync", {}).get("steps_per_s")
        sb3 = entry["systems"].get("sb3", {}).get("steps_per_s")
        for name, r in entry["systems"].items():
            if "steps_per_s" not in r:
                lines.append(f"| {env_id} | {name} | failed: {r['error']} |" + " |" * 9)
                continue
            vs_sync = f"{r['steps_per_s'] / sync:.2f}x" if sync and name == "async" else ""
            vs_sb3 = f"{r['steps_per_s'] / sb3:.2f}x" if sb3 and name in ("sync", "async") else ""
            ret = f"{r['eval_mean_return']:.1f}" if "eval_mean_return" in r else ""
            busy = f"{r['gpu_busy']:.0%}" if r.get("gpu_busy") is not None else ""
            lines.append(f"| {env_id} | {name} | {r['env_steps']:,} | {r['wall_s']:.1f} | {r['steps_per_s']:,.0f} | "
                         f"{r['updates_per_s']:,.0f} | {r['replay_ratio']:.3f} | {busy} | {_time_split(r)} | {ret} | "
                         f"{vs_sync} | {vs_sb3} |")
    lines.append("")
    for env_id, entry in report["envs"].items():
        async_run = entry["systems"].get("async", {})
        split = (f" (async: its learner {async_run['learner_torch_threads']}, its actor process 1)"
                 if "learner_torch_threads" in async_run else "")
        lines.append(f"- {env_id}: preset `{entry['preset']}`, config {json.dumps(entry['config_overrides'])}; "
                     f"each system with {entry['torch_threads']} torch thread(s){split}")
        lines.append(f"  - {learning_window(DQNConfig.from_dict(entry['config']))}")
        sb3_runs = entry["systems"].get("sb3", {}).get("runs_steps_per_s")
        for name, r in entry["systems"].items():
            if "runs_steps_per_s" in r:
                lines.append(f"  - {name}: steps/s of each run: " + ", ".join(f"{v:,.0f}" for v in r["runs_steps_per_s"]))
                if name in ("sync", "async") and sb3_runs and len(sb3_runs) == len(r["runs_steps_per_s"]):
                    lines.append(f"  - {name} vs SB3, run by run (the runs of one repeat follow each other): "
                                 + ", ".join(f"{ours / theirs:.2f}x" for ours, theirs in zip(r["runs_steps_per_s"], sb3_runs)))
            if "env_setup_s" in r:
                lines.append(f"  - {name}: its wall time leaves out making its own envs inside learn() "
                             f"({r['env_setup_s']:.2f} s), as the others make theirs before learning")
            for note in r.get("notes", []):
                lines.append(f"  - {name}: {note}")
            if "steps_per_s" in r and "error" in r:
                lines.append(f"  - {name}: a later run failed: {r['error']}")
    return "\n".join(lines) + "\n"


def run_system(system: str, env_id: str, config, eval_episodes: int, torch_threads: int) -> dict:
    """One run of ``system`` in this process, with ``torch_threads`` torch threads."""
    import torch

    torch.set_num_threads(torch_threads)
    runner = {"envpool_raw": run_envpool_raw, "sync": run_sync, "async": run_async, "sb3": run_sb3}[system]
    return runner(env_id, config, eval_episodes)


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process, so that no run inherits another's threads,
    caches or allocator state. It matters: libgomp stops its idle workers spinning once it
    manages more threads than there are cores, so on 2 cores an async run with the actor
    thread (two torch threads in its learner) took twice as long after a sync run in the
    same process.

    ``fn``'s exception is raised here, with the run's traceback as its cause; a process that
    dies without a result (killed, crashed) raises RuntimeError. On Ctrl-C or any error
    here the run's process is terminated."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_send_result, args=(sender, os.getpid(), fn, args))
    process.start()
    sender.close()  # the child holds the other copy: its exit ends recv() with EOFError
    try:
        ok, value, remote_traceback = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the run's process died without a result (exit code {process.exitcode})") from None
    finally:
        receiver.close()
        if process.is_alive():
            process.terminate()
        process.join()
    if not ok:
        raise value from RuntimeError(f"in the run's process:\n{remote_traceback}")
    return value


def _send_result(sender, parent_pid: int, fn, args) -> None:
    die_with_parent(parent_pid)  # a parent stopped by SIGTERM or SIGKILL runs no cleanup to stop this run
    try:
        result = (True, fn(*args), None)
    except BaseException as error:  # noqa: BLE001 - raised again in the parent
        result = (False, error, traceback.format_exc())
    sender.send(result)
    sender.close()


def _time_split(result: dict) -> str:
    """``time_s`` in one cell: "env 1.2, act 0.3" or, per thread, "actor: ...; learner: ..."."""
    times = result.get("time_s", {})
    if times and all(isinstance(v, dict) for v in times.values()):
        return "; ".join(f"{thread}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
                         for thread, parts in times.items())
    return ", ".join(f"{k} {v:.1f}" for k, v in times.items())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="fastdqn bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", action="append", default=None, help="env id (repeatable; default CartPole-v1 and "
                        "Breakout-v5)")
    parser.add_argument("--steps", type=int_at_least(1, "a positive integer"), default=None,
                        help="env steps per system (default: the preset's total_steps, 50k for CartPole; "
                             "for Atari 4k on CPU, 20k on CUDA)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--num-envs", type=int_at_least(1, "a positive integer"), default=None, help="envs per system (default: the preset's)")
    parser.add_argument("--repeats", type=int_at_least(1, "a positive integer"), default=5,
                        help="runs of each system, interleaved so that machine noise hits all alike; the report "
                             "keeps each system's median run by steps/s and lists every run's steps/s (default 5)")
    parser.add_argument("--seed", type=int_at_least(0, "a non-negative integer"), default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                        help="a config field for every system and env, over the preset (repeatable; e.g. "
                             "torch_threads=1, batch_size=64; SB3 gets what it can express, and the report notes "
                             "what it cannot); steps and envs have their own flags")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (all systems)")
    parser.add_argument("--eval-episodes", type=int_at_least(0, "a non-negative integer"), default=None,
                        help="greedy evaluation episodes after training (default 10; 0 for Atari, whose short "
                             "runs learn nothing and whose untrained agents can stall a game until its time limit)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="directory for train-<machine>.json and .md; a run with other settings than the "
                             "defaults (--env, --steps, --systems, --num-envs, --repeats, --seed, --set, "
                             "--eval-episodes), "
                             "without SB3 installed, or with a system that failed adds its start time to the names, "
                             "so that it replaces no full run's report; while it runs, the report is "
                             "train-<machine>-incomplete.*; '' writes none")
    parser.add_argument("--machine", help="machine name in the file names (default: GPU, or CPU model and cores)")
    parser.add_argument("--json", action="store_true", help="print the JSON report to stdout: each system to its "
                        "figures (with several --env, each env to such an object)")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown or not systems:
        parser.error(f"--systems must name some of {', '.join(SYSTEMS)}, got {args.systems!r}")
    from fastdqn.envs import env_backend, is_atari_id

    if args.seed > MAX_SEED:
        parser.error(f"--seed must be at most {MAX_SEED}, got {args.seed}")
    try:
        overrides = DQNConfig.parse_overrides(args.assignments)
    except ValueError as e:
        parser.error(str(e) if str(e).startswith("--set") else f"--set: {e}")
    for field, instead in (("total_steps", "use --steps"), ("num_envs", "use --num-envs"),
                           ("seed", "use --seed"), ("device", "use --device"),
                           ("eval_episodes", "use --eval-episodes (after the timed run)"),
                           ("eval_interval", "evaluations during the run would be timed with it"),
                           ("eval_epsilon", "every system is evaluated greedily, as SB3's deterministic "
                                            "evaluation")):
        if field in overrides:
            parser.error(f"--set {field}: {instead}")
    env_ids = list(dict.fromkeys(args.env or DEFAULT_ENVS))  # each env once
    for env_id in env_ids:
        try:
            env_backend(env_id)
        except ValueError as e:
            parser.error(str(e))
    missing = []
    if "sb3" in systems and importlib.util.find_spec("stable_baselines3") is None:
        if args.systems != parser.get_default("systems"):
            parser.error("--systems names sb3, but stable-baselines3 is not installed: pip install stable-baselines3")
        systems.remove("sb3")
        missing.append("stable-baselines3")
        log("stable-baselines3 is not installed: sb3 is not run (pip install stable-baselines3)")

    import torch

    all_cores = torch.get_num_threads()  # before any system sets it: what torch_threads=0 means
    if device_error(args.device):
        parser.error(device_error(args.device))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    plans = []
    for env_id in env_ids:
        steps = args.steps
        if steps is None and is_atari_id(env_id):
            steps = 20_000 if device.startswith("cuda") else 4_000
        preset, config = bench_config(env_id, steps, args.seed, device, args.num_envs)
        try:
            config = dataclasses.replace(config, **overrides)
        except ValueError as e:
            parser.error(f"--set: {e}")
        if "sb3" in systems:
            try:
                sb3_arguments(config, config.num_envs)
                if is_atari_id(env_id):
                    sb3_atari_id(env_id)
            except ValueError as e:
                parser.error(f"{env_id}: {e} (or leave sb3 out of --systems)")
        plans.append((env_id, preset, config))
        if config.learning_starts * 2 >= config.total_steps:
            log(f"{env_id}: {learning_window(config)}; most of each run only fills the buffer "
                "(more --steps, or --set learning_starts=N)")
    try:
        check_out_dir(args.out)
    except ValueError as e:
        parser.error(str(e))

    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info(PEER_PACKAGES)
    changed = missing + [flag for flag, name in (
        ("--env", "env"), ("--steps", "steps"), ("--systems", "systems"), ("--num-envs", "num_envs"),
        ("--repeats", "repeats"), ("--seed", "seed"), ("--set", "assignments"), ("--eval-episodes", "eval_episodes"))
        if getattr(args, name) != parser.get_default(name)]
    machine_slug = machine_name(machine, device, args.machine)
    stem = report_stem("train", machine_slug, changed, started)
    report = {"benchmark": "train", "date": started.isoformat(timespec="seconds"), "device": device,
              "machine": machine, "command": command_line("train", argv), "complete": False, "envs": {}}
    failed_any = False
    for env_id, preset, config in plans:
        defaults = DQNConfig.preset(preset).to_dict()
        overrides = {k: v for k, v in config.to_dict().items() if defaults[k] != v}
        # Every system of this env runs with the preset's torch threads (0: all cores).
        threads = config.effective_torch_threads or all_cores
        entry = {"preset": preset, "config_overrides": overrides, "config": config.to_dict(), "repeats": args.repeats,
                 "torch_threads": threads, "systems": {}}
        eval_episodes = args.eval_episodes if args.eval_episodes is not None else (0 if preset == "atari" else 10)
        runs: dict[str, list[dict]] = {system: [] for system in systems}
        errors: dict[str, str] = {}
        report["envs"][env_id] = entry
        for repeat in range(args.repeats):
            for system in systems:
                if system in errors:
                    continue
                log(f"{env_id}: {system}, {config.total_steps:,} env steps on {device}"
                    + (f" (run {repeat + 1} of {args.repeats})" if args.repeats > 1 else ""))
                try:
                    runs[system].append(in_fresh_process(run_system, system, env_id, config, eval_episodes, threads))
                    log(f"{env_id}: {system}: {json.dumps(runs[system][-1])}")
                except Exception as error:  # noqa: BLE001 - reported; the other systems still run
                    errors[system] = f"{type(error).__name__}: {error}"
                    log(f"{env_id}: {system} FAILED: {errors[system]}"
                        + (f"\n{error.__cause__}" if error.__cause__ is not None else ""))
                entry["systems"] = {name: _summary(results, errors.get(name)) for name, results in runs.items()
                                    if results or name in errors}
                write_report(args.out, stem, report, to_markdown(report), complete=False)
        failed_any = failed_any or bool(errors)
    report["complete"] = True
    final_stem = report_stem("train", machine_slug, changed + ["failed"], started) if failed_any \
        else stem  # a system's figures missing: not the full run's report
    base = write_report(args.out, final_stem, report, to_markdown(report), started_as=stem)
    if base is not None:
        log(f"wrote {base}.json and {base}.md")
    if args.json:
        by_env = {env_id: entry["systems"] for env_id, entry in report["envs"].items()}
        print(json.dumps(next(iter(by_env.values())) if len(by_env) == 1 else by_env))
    if failed_any:
        raise SystemExit("fastdqn bench train: a system failed; see its error in the report and its traceback above")
    return report


def _summary(results: list[dict], error: str | None) -> dict:
    """A system's figures: its median run, and the error of a run that failed."""
    summary = median_run(results) if results else {}
    return {**summary, "error": error} if error else summary

