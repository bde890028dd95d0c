"""The ``fastdqn`` command: train, eval, plot, bench.

    fastdqn train [--env ID] [--preset NAME] [--total-steps N] [--num-envs N] [--seed S]
                  [--device auto|cpu|cuda] [--pipeline sync|async|auto] [--run-dir DIR]
                  [--set key=value ...] [--resume DIR] [--no-progress] [--no-tensorboard]
                  [--gym-packages MODULE ...]
    fastdqn eval RUN_DIR_OR_CHECKPOINT [--episodes N] [--epsilon E] [--seed S] [--device D] [--json]
                 [--video FILE] [--no-progress] [--gym-packages MODULE ...]
    fastdqn plot RUN_DIR [--out FILE]
    fastdqn bench {buffer,learner,train} [ARGS...]

Bad arguments end with a one-line error and exit status 2, never a traceback. An error once
training or a benchmark runs is no bad argument: it keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import signal
import sys
import tempfile
import textwrap
from pathlib import Path

from fastdqn.config import int_at_least
from fastdqn.metrics import RunDirectoryInUse, read_config, read_csv
from fastdqn.progress import show_line
from fastdqn.signals import handling

BENCHMARKS = {
    "buffer": "replay buffers side by side: fastdqn, SB3, cpprb, TorchRL (add, sample, memory, save/load)",
    "learner": "updates/s of one DQN update, eager vs CUDA graph (Nature CNN, MLP)",
    "train": "end-to-end env steps/s: raw envpool, fastdqn's sync and async pipelines, SB3's DQN",
}
"""Each benchmark's module in fastdqn.bench, and what it measures; ``fastdqn bench NAME --help`` has its flags."""


class UsageError(Exception):
    """A problem with the command line, reported in one line."""


@contextlib.contextmanager
def _usage_errors(command: str):
    """The errors that fastdqn raises for bad input (a wrong value, type or path) as one-line UsageErrors."""
    try:
        yield
    except (ValueError, TypeError, RunDirectoryInUse, *_BAD_PATH) as e:
        raise UsageError(f"fastdqn {command}: error: {_first_line(e)}") from e
    except OSError as e:
        if e.errno != errno.EROFS:  # a path on a read-only file system is given wrong too
            raise
        raise UsageError(f"fastdqn {command}: error: {_first_line(e)}") from e
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "fastdqn":  # fastdqn's own: a bug, with its traceback
            raise
        hint = f" ({command} needs the train extra: pip install 'fastdqn[train]')" if e.name in _TRAIN_EXTRA else ""
        raise UsageError(f"fastdqn {command}: error: {_first_line(e)}{hint}") from e


_BAD_PATH = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
"""The OSErrors of a path given wrong; others (a failing disk) keep their traceback."""
_TRAIN_EXTRA = ("torch", "envpool", "gymnasium", "ale_py", "tqdm", "tensorboard", "matplotlib", "PIL")
"""Modules that ``pip install 'fastdqn[train]'`` brings, which the buffer alone does not need."""


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


_positive_int = int_at_least(1, "a positive integer")
_nonnegative_int = int_at_least(0, "a non-negative integer")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _config_help() -> str:
    from fastdqn.config import PRESETS, DQNConfig

    lines = ["config fields (set any with --set key=value; defaults are the CartPole preset):"]
    defaults = DQNConfig().to_dict()
    for name, doc in DQNConfig.field_docs().items():
        lines += textwrap.wrap(f"{name} = {defaults[name]!r}: {doc}", width=100, initial_indent="  ",
                               subsequent_indent="      ")
    lines.append(f"presets: {', '.join(PRESETS)} (default: cartpole/acrobot for those envs, atari for Atari ids, "
                 "classic otherwise)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdqn", description="Fast deep Q-learning.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,plot,bench}", parser_class=_Parser)
    sub.required = True

    train = sub.add_parser("train", help="train a DQN agent", epilog=_config_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--env", default=None,
                       help="environment id (default CartPole-v1); your own gymnasium env as 'module:Env-v0', "
                            "module on PYTHONPATH")
    train.add_argument("--preset", default=None, help="hyperparameter preset (default: chosen by the env)")
    train.add_argument("--total-steps", type=_positive_int, default=None, help="environment steps to train for")
    train.add_argument("--num-envs", type=_positive_int, default=None, help="environments stepped together")
    train.add_argument("--seed", type=_nonnegative_int, default=None)
    train.add_argument("--device", default=None, help="auto, cpu or cuda")
    train.add_argument("--pipeline", default=None,
                       help="sync, async or auto (async on CUDA); async's actor is a thread on CUDA, "
                            "a process on CPU (--set actor=thread|process)")
    train.add_argument("--run-dir", default=None, help="run directory (default runs/<run name>)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeatable)")
    train.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue this run from its newest checkpoint (only --total-steps and --device "
                            "may be changed)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (nor progress lines off a terminal)")
    train.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")
    _add_gym_packages(train)

    ev = sub.add_parser("eval", help="evaluate a trained agent")
    ev.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    ev.add_argument("--episodes", type=_positive_int, default=10)
    ev.add_argument("--epsilon", type=_probability, default=None, help="exploration rate (default: the config's)")
    ev.add_argument("--seed", type=_nonnegative_int, default=None)
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    ev.add_argument("--video", default=None, metavar="FILE",
                    help="record the first episode as the env renders it (Atari: the colour screen) "
                         "to a .gif, or an .mp4 (H.264; needs imageio-ffmpeg)")
    ev.add_argument("--no-progress", action="store_true",
                    help="no progress of the episodes on stderr (a bar on a terminal, else a line every 10 s)")
    _add_gym_packages(ev)

    plot = sub.add_parser("plot", help="write a learning-curve PNG of a run")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--out", default=None, help="PNG path (default RUN_DIR/learning_curve.png)")

    bench = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHMARKS),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="benchmarks (fastdqn bench NAME --help for each one's flags):\n"
                                       + "\n".join(f"  {name:8} {what}" for name, what in BENCHMARKS.items()))
    bench.add_argument("name", metavar="{" + ",".join(BENCHMARKS) + "}")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    return parser


def _add_gym_packages(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gym-packages", nargs="+", default=[], metavar="MODULE",
                        help="modules to import first, which register your own gymnasium envs (as rl-zoo's flag; "
                             "an env id 'module:Env-v0' imports its module itself)")


def _import_gym_packages(modules: list[str]) -> None:
    if modules:
        from fastdqn.envs import import_env_module

        for module in modules:
            import_env_module(module, "--gym-packages")


def _train(args) -> int:
    with _usage_errors("train"):
        _import_gym_packages(args.gym_packages)
        agent, total = _agent_to_train(args)
    show_line(f"run directory: {agent.run_dir}")
    signals: list[int] = []  # SIGTERM, if that is what stopped the run
    try:
        with _sigterm_as_ctrl_c(agent, signals):
            agent.learn(total)
    except KeyboardInterrupt:
        return _stopped(agent, 128 + (signals[0] if signals else signal.SIGINT))
    except RunDirectoryInUse as e:  # another run started into it since the setup's check
        raise UsageError(f"fastdqn train: error: {e}") from e
    finally:
        agent.close()

    evals = read_csv(Path(agent.run_dir) / "eval.csv")
    if evals:
        last = evals[-1]
        show_line(f"final eval: mean return {last['mean_return']:.1f} +- {last['std_return']:.1f} "
                  f"over {int(last['episodes'])} episodes; run directory {agent.run_dir}")
    return 0


@contextlib.contextmanager
def _sigterm_as_ctrl_c(agent, received: list[int]):
    """SIGTERM (a job's time limit, a preempted machine) stops training as Ctrl-C does: the first
    at a cut, with its checkpoint (see DQN.learn), a second at once. It goes through the SIGINT
    handler in place (the async pipeline's, or learn()'s); where SIGINT is ignored (a job started
    in the background), it asks the agent directly."""
    def on_sigterm(signum, frame):
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        elif not agent.stop_requested:
            agent._ctrl_c()
        else:
            agent._ctrl_c_again()

    with handling(signal.SIGTERM, on_sigterm):
        yield


def _stopped(agent, status: int) -> int:
    """After Ctrl-C or SIGTERM: where the run stopped, and how to go on from its newest checkpoint;
    returns the exit status (128 + the signal's number, as a shell reports a process it stopped)."""
    from fastdqn.checkpoint import checkpoint_dir, checkpoint_step, list_checkpoints

    show_line(f"\nstopped at step {agent.env_steps:,}")
    checkpoints = list_checkpoints(checkpoint_dir(agent.run_dir))
    step = checkpoint_step(checkpoints[-1]) if checkpoints else 0
    resumed_from = "" if step == agent.env_steps else \
        f" (from its checkpoint at step {step:,})" if checkpoints else " (it has no checkpoint: that starts it over)"
    show_line(f"continue with: fastdqn train --resume {agent.run_dir}{resumed_from}")
    return status


def _agent_to_train(args):
    """The agent that ``fastdqn train`` trains (new, or resumed from a run) and the total steps it goes to."""
    if args.resume is not None:
        given = [flag for flag, value in (("--env", args.env), ("--preset", args.preset),
                                          ("--num-envs", args.num_envs), ("--seed", args.seed),
                                          ("--run-dir", args.run_dir), ("--pipeline", args.pipeline))
                 if value is not None]
        if args.overrides:
            given.append("--set")
        if given:
            raise UsageError(f"fastdqn train: error: --resume continues the run's own config; drop {', '.join(given)}")
        from fastdqn.agent import DQN

        read_config(args.resume)  # a run directory, or a one-line error
        agent = DQN.resume(args.resume, device=args.device, progress=not args.no_progress,
                           tensorboard=not args.no_tensorboard)
        if agent.env_steps == 0:
            show_line(f"{args.resume} holds no checkpoint: the run starts over from step 0")
        total = args.total_steps or agent.scheduled_total_steps
        # With its steps taken, a run has something left only if it was stopped at its end
        # (in its final evaluation), and that is the total it goes on to.
        if total <= agent.env_steps and agent.unfinished_total_steps != total:
            raise UsageError(f"fastdqn train: error: the run already has {agent.env_steps} steps; "
                             f"pass --total-steps above that to continue")
    else:
        from fastdqn.config import DQNConfig, preset_for_env

        env_id = args.env if args.env is not None else "CartPole-v1"
        if not env_id:
            raise UsageError("fastdqn train: error: --env must name an environment, got ''")
        config = DQNConfig.preset(args.preset if args.preset is not None else preset_for_env(env_id))
        direct = {"total_steps": args.total_steps, "num_envs": args.num_envs, "seed": args.seed,
                  "device": args.device, "pipeline": args.pipeline}
        config = config.with_overrides(args.overrides + [f"{k}={v}" for k, v in direct.items() if v is not None])
        if args.run_dir is not None and (Path(args.run_dir) / "config.json").exists():
            raise UsageError(f"fastdqn train: error: {args.run_dir} already holds a run; use --resume {args.run_dir} "
                             "or another --run-dir")
        from fastdqn.agent import DQN

        agent = DQN(env_id, config, run_dir=args.run_dir, progress=not args.no_progress,
                    tensorboard=not args.no_tensorboard)
        total = config.total_steps
    if agent.buffer is None:  # made now, as learn() would first: a size it refuses is a bad argument
        agent.buffer = agent._make_buffer()
    Path(agent.run_dir).mkdir(parents=True, exist_ok=True)  # a path that cannot be one is a bad argument too
    tempfile.TemporaryFile(dir=agent.run_dir).close()  # and so is a folder it cannot write (read-only)
    if agent.tensorboard:  # imported by learn(): missing, it is named now, in one line
        importlib.import_module("torch.utils.tensorboard")
    return agent, total


def _eval(args) -> int:
    with _usage_errors("eval"):  # a few games: any error is most likely the checkpoint's or the arguments'
        _import_gym_packages(args.gym_packages)
        from fastdqn.agent import DQN

        agent = DQN.load(args.path, device=args.device, load_buffer=False, progress=False, tensorboard=False)
        try:
            seed = args.seed if args.seed is not None else agent.config.seed + 1
            result = agent.evaluate(args.episodes, epsilon=args.epsilon, seed=seed, video=args.video,
                                    progress=not args.no_progress)
        finally:
            agent.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['env']}: mean return {result['mean_return']:.2f} +- {result['std_return']:.2f} "
              f"over {result['episodes']} episodes ({result['protocol']})")
        if args.video:
            print(f"video: {args.video}")
    return 0


def _plot(args) -> int:
    with _usage_errors("plot"):
        from fastdqn.plot import plot_run

        print(plot_run(args.run_dir, args.out))
    return 0


def _bench(args) -> int:
    if args.name not in BENCHMARKS:
        raise UsageError(f"fastdqn bench: error: unknown benchmark {args.name!r}; choose from {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"fastdqn.bench.{args.name}")
    status = module.main(args.args)  # benchmarks return their report; only an int is an exit status
    return status if isinstance(status, int) else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler = {"train": _train, "eval": _eval, "plot": _plot, "bench": _bench}[args.command]
        return handler(args)
    except UsageError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (which stops at a cut): while starting, evaluating, plotting
        print("\ninterrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
