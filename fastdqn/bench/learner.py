"""Learner benchmark: DQN updates per second, eager PyTorch vs one CUDA graph per update.

    python benchmarks/learner.py                      # all cases on the default device
    python benchmarks/learner.py --device cpu --iters 5

Cases: the Nature CNN (4x84x84 uint8 frames, 6 actions) at batch 32 and 256, and the MLP
(CartPole-sized: 4 inputs, 120-84 hidden, 2 actions) at batch 128, through fastdqn's
hand-written MLP step and, wrapped in a user's module, through autograd. At batch 32 the CNN also
takes the replay buffer's shared-frame layout (5 frames per sample instead of 8, the next
observation gathered on the device). All use CleanRL's dqn_atari
update (Adam 1e-4, one target network; here Huber loss and gradient clipping at 10, as in
SB3). Each update copies a fresh host batch (pinned memory on CUDA, as the prefetcher
delivers it) into the learner, so the rate includes the host-to-device copy. On CUDA every
case runs eagerly and as a captured CUDA graph; on CPU eagerly.

The rate is updates over wall time between two device synchronisations, after warm-up
updates that include the graph capture (checked to have happened). Action selection for 8 and 64 envs (the actor's
per-step work: observations to the device, forward, epsilon-greedy, actions back) is timed
the same way. Results go to ``--out``/learner-<machine>.json
and .md, rewritten after every case, so a run cut short keeps what it measured; a case that
fails is reported with its error and the others still run (the exit status is then 1).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastdqn import manual_mlp
from fastdqn.bench import report as report_io
from fastdqn.config import int_at_least
from fastdqn.learner import GRAPH_WARMUP_CALLS, Learner
from fastdqn.networks import build_q_network

CASES = [  # name, obs_shape, obs_dtype, num_actions, batch_size, layout, gradient
    ("nature_cnn", (4, 84, 84), np.uint8, 6, 32, "obs", "autograd"),
    ("nature_cnn", (4, 84, 84), np.uint8, 6, 32, "frames", "autograd"),
    ("nature_cnn", (4, 84, 84), np.uint8, 6, 256, "obs", "autograd"),
    ("mlp", (4,), np.float32, 2, 128, "obs", "manual"),
    ("mlp", (4,), np.float32, 2, 128, "obs", "autograd"),
]
MLP_ITERS_FACTOR = 10
"""An MLP update is ~100x cheaper than a CNN update: it runs this many times the --iters."""
LEARNER_SETTINGS = dict(lr=1e-4, optimizer="adam", loss="huber", double_dqn=False, target_update_interval=1000,
                        tau=1.0, max_grad_norm=10.0)
ACT_NUM_ENVS = (8, 64)  # action-selection batches for the Nature CNN: envpool async batch sizes
HOST_BATCHES = 4  # distinct host batches cycled through, so no copy is served from a cache


def log(message: str) -> None:
    print(f"[bench learner {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info(device: torch.device) -> dict:
    return {**report_io.machine_info(), "device": device.type, "torch_threads": torch.get_num_threads()}


def host_batches(obs_shape, obs_dtype, num_actions, batch_size, layout: str, pin: bool, seed: int = 0) -> list[dict]:
    """Random batches; layout "frames" is the replay buffer's shared-frame FrameBatch (n_step 1)."""
    rng = np.random.default_rng(seed)

    def observations(stack=obs_shape[0]):
        if obs_dtype == np.uint8:
            return rng.integers(0, 256, (batch_size, stack, *obs_shape[1:]), dtype=np.uint8)
        return rng.normal(size=(batch_size, *obs_shape)).astype(obs_dtype)

    batches = []
    for _ in range(HOST_BATCHES):
        if layout == "frames":
            arrays = {"frames": observations(obs_shape[0] + 1), "next_offset": np.ones(batch_size, np.int64)}
        else:
            arrays = {"obs": observations(), "next_obs": observations()}
        arrays.update(actions=rng.integers(0, num_actions, batch_size),
                      rewards=rng.normal(size=batch_size).astype(np.float32),
                      discounts=np.full(batch_size, 0.99, np.float32))
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        batches.append({k: v.pin_memory() for k, v in tensors.items()} if pin else tensors)
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case, device: torch.device, cuda_graph: bool, iters: int, warmup: int) -> dict:
    """``gradient`` "manual" is fastdqn's MLP path (fastdqn.manual_mlp); "autograd" wraps the
    same MLP in a user's module, which the learner trains through autograd."""
    name, obs_shape, obs_dtype, num_actions, batch_size, layout, gradient = case
    if name == "mlp":
        iters, warmup = iters * MLP_ITERS_FACTOR, warmup * MLP_ITERS_FACTOR
    if cuda_graph:  # the capture must not fall inside the timed loop
        warmup = max(warmup, GRAPH_WARMUP_CALLS + 1)
    torch.manual_seed(0)
    network = build_q_network(obs_shape, num_actions)
    if gradient == "autograd" and manual_mlp.supports(network):
        network = torch.nn.Sequential(network)
    learner = Learner(network, obs_shape=obs_shape, obs_dtype=obs_dtype, batch_size=batch_size, num_envs=1,
                      device=device, cuda_graph=cuda_graph, **LEARNER_SETTINGS)
    if learner.manual_gradient != (gradient == "manual"):
        raise RuntimeError(f"{name}: the learner did not take the {gradient} gradient path")
    batches = host_batches(obs_shape, obs_dtype, num_actions, batch_size, layout, pin=device.type == "cuda")
    for i in range(warmup):  # includes the graph's warm-up calls and its capture
        learner.update(batches[i % len(batches)])
    if cuda_graph and not (learner.frame_update_graph_captured if layout == "frames"
                           else learner.update_graph_captured):
        raise RuntimeError(f"{name}: the update graph was not captured during {warmup} warm-up updates")
    synchronize(device)
    report_every = max(1, iters // 5)
    start = time.perf_counter()
    for i in range(iters):
        learner.update(batches[i % len(batches)])
        if (i + 1) % report_every == 0 and i + 1 < iters:
            log(f"  {i + 1}/{iters} updates, {(i + 1) / (time.perf_counter() - start):,.1f} updates/s (host side)")
    synchronize(device)
    elapsed = time.perf_counter() - start
    loss = learner.metrics()["loss"]
    return {"network": name, "batch_size": batch_size, "layout": layout, "gradient": gradient,
            "mode": mode_name(cuda_graph),
            "iters": iters, "seconds": elapsed, "updates_per_s": iters / elapsed,
            "ms_per_update": 1e3 * elapsed / iters, "final_loss": loss}


def measure_act(num_envs: int, device: torch.device, cuda_graph: bool, iters: int, warmup: int) -> dict:
    """Epsilon-greedy action selection for a batch of envs, including the copy of the
    observations to the device and of the actions back, as an actor does every step."""
    obs_shape, num_actions = (4, 84, 84), 6
    torch.manual_seed(0)
    learner = Learner(build_q_network(obs_shape, num_actions), obs_shape=obs_shape, obs_dtype=np.uint8,
                      batch_size=32, num_envs=num_envs, device=device, cuda_graph=cuda_graph, **LEARNER_SETTINGS)
    rng = np.random.default_rng(0)
    observations = [rng.integers(0, 256, (num_envs, *obs_shape), dtype=np.uint8) for _ in range(HOST_BATCHES)]
    if cuda_graph:
        warmup = max(warmup, GRAPH_WARMUP_CALLS + 1)
    for i in range(warmup):
        learner.act(observations[i % HOST_BATCHES], 0.05).cpu()
    if cuda_graph and not learner.act_graph_captured:
        raise RuntimeError(f"act: the action graph was not captured during {warmup} warm-up calls")
    start = time.perf_counter()
    for i in range(iters):
        learner.act(observations[i % HOST_BATCHES], 0.05).cpu()
    elapsed = time.perf_counter() - start
    return {"network": "nature_cnn", "num_envs": num_envs, "mode": mode_name(cuda_graph),
            "iters": iters, "seconds": elapsed, "calls_per_s": iters / elapsed, "ms_per_call": 1e3 * elapsed / iters}


def mode_name(cuda_graph: bool) -> str:
    return "graph" if cuda_graph else "eager"


def to_markdown(report: dict) -> str:
    m = report["machine"]
    hardware = f"{m['gpu']} (CUDA {m['cuda']})" if m["device"] == "cuda" else f"{m['cpu']}, {m['cores']} cores"
    lines = [f"# Learner update benchmark: {m['slug'] if m['device'] == 'cuda' else m['cpu_slug']}", "",
             f"{report['started']}; {hardware}; torch {m['versions']['torch']} ({m['torch_threads']} CPU threads).",
             "Updates/s of one DQN update (host batch copy, forward, loss, backward, clip, Adam, target "
             "update), Nature CNN on 4x84x84 uint8 frames, MLP 4-120-84-2.", "",
             "Gradient: autograd, or fastdqn's hand-written MLP step (fastdqn.manual_mlp).", "",
             *report_io.busy_lines(m),
             "| network | batch | batch layout | gradient | mode | updates/s | ms/update |",
             "| --- | ---: | --- | --- | --- | ---: | ---: |"]
    for r in report["results"]:
        figures = (f"{r['updates_per_s']:,.1f} | {r['ms_per_update']:.3f}" if "error" not in r
                   else f"failed: {r['error']} | –")
        lines.append(f"| {r['network']} | {r['batch_size']} | {r['layout']} | {r.get('gradient', 'autograd')} | "
                     f"{r['mode']} | {figures} |")
    lines += ["", "Acting: epsilon-greedy actions for a batch of envs (observations to the device, actions back).",
              "", "| network | envs | mode | calls/s | ms/call |", "| --- | ---: | --- | ---: | ---: |"]
    for r in report["act"]:
        figures = (f"{r['calls_per_s']:,.1f} | {r['ms_per_call']:.3f}" if "error" not in r
                   else f"failed: {r['error']} | –")
        lines.append(f"| {r['network']} | {r['num_envs']} | {r['mode']} | {figures} |")
    if report["graph_speedup"]:
        lines += ["", "CUDA graph speedup over eager PyTorch: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in report["graph_speedup"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="fastdqn bench learner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--iters", type=int_at_least(1, "a positive integer"), default=None,
                        help="timed updates per case (default: 1000 on CUDA, 10 on CPU)")
    parser.add_argument("--warmup", type=int_at_least(0, "a non-negative integer"), default=None,
                        help="untimed updates first, including graph capture (default: 20 on CUDA, 2 on CPU)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="directory for learner-<machine>.json and .md; a run with other --iters, --warmup or "
                             "--threads than the defaults, or with a case that failed, adds its start time to the "
                             "names, so that it replaces no full run's report; '' writes none")
    parser.add_argument("--machine", help="machine name in the file names (default: GPU or CPU model)")
    parser.add_argument("--threads", type=int_at_least(1, "a positive integer"), help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="also print the JSON report to stdout")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if report_io.device_error(args.device):
        parser.error(report_io.device_error(args.device))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    on_cuda = device.type == "cuda"
    iters = args.iters if args.iters is not None else (1000 if on_cuda else 10)
    warmup = args.warmup if args.warmup is not None else (20 if on_cuda else 2)
    try:
        report_io.check_out_dir(args.out)
    except ValueError as e:
        parser.error(str(e))

    machine = machine_info(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {"benchmark": "learner", "started": started.isoformat(timespec="seconds"), "machine": machine,
              "command": report_io.command_line("learner", argv), "complete": False,
              "settings": {"iters": iters, "warmup": warmup, **LEARNER_SETTINGS},
              "results": [], "act": [], "graph_speedup": {}}
    changed = [flag for flag in ("iters", "warmup", "threads") if getattr(args, flag) is not None]
    machine_slug = report_io.machine_name(machine, device.type, args.machine)
    name = report_io.report_stem("learner", machine_slug, changed, started)
    modes = (False, True) if on_cuda else (False,)
    failures = 0

    def measured(label: str, identity: dict, measure_case, rate: str, unit: str) -> dict:
        """The case's result, or its identity and error if it failed: the other cases still run."""
        nonlocal failures
        log(f"{label}: running")
        try:
            result = measure_case()
        except Exception as error:  # noqa: BLE001 - reported in the results and the exit status
            failures += 1
            log(f"{label}: FAILED: {type(error).__name__}: {error}")
            return {**identity, "error": f"{type(error).__name__}: {error}"}
        log(f"{label}: {result[rate]:,.1f} {unit} ({1e3 / result[rate]:.3f} ms each)")
        return result

    def save() -> None:  # after every case, so that a run cut short keeps what it measured
        report_io.write_report(args.out, name, report, to_markdown(report), complete=False)

    log(f"{name}: {iters} timed updates per case after {warmup} warm-up updates")
    for case in CASES:
        network, batch_size, layout, gradient = case[0], case[4], case[5], case[6]
        pair = [measured(f"{network} batch {batch_size} {layout} {gradient} {mode_name(graph)}",
                         dict(network=network, batch_size=batch_size, layout=layout, gradient=gradient,
                              mode=mode_name(graph)),
                         lambda: measure(case, device, graph, iters, warmup), "updates_per_s", "updates/s")
                for graph in modes]
        report["results"] += pair
        if on_cuda and not any("error" in r for r in pair):
            key = f"{network}-b{batch_size}" + ("-frames" if layout == "frames" else "") \
                + ("-autograd" if network == "mlp" and gradient == "autograd" else "")
            report["graph_speedup"][key] = pair[1]["updates_per_s"] / pair[0]["updates_per_s"]
        save()
    for num_envs in ACT_NUM_ENVS:
        pair = [measured(f"act nature_cnn {num_envs} envs {mode_name(graph)}",
                         dict(network="nature_cnn", num_envs=num_envs, mode=mode_name(graph)),
                         lambda: measure_act(num_envs, device, graph, iters, warmup), "calls_per_s", "calls/s")
                for graph in modes]
        report["act"] += pair
        if on_cuda and not any("error" in r for r in pair):
            report["graph_speedup"][f"act-{num_envs}envs"] = pair[1]["calls_per_s"] / pair[0]["calls_per_s"]
        save()

    report["complete"] = True
    final_name = report_io.report_stem("learner", machine_slug, changed + ["failed"], started) if failures \
        else name  # cases missing: not the full run's report
    if report_io.write_report(args.out, final_name, report, to_markdown(report), started_as=name) is not None:
        log(f"wrote {Path(args.out) / final_name}.json and .md")
    if args.json:
        print(json.dumps(report, indent=2))
    if failures:
        raise SystemExit(f"fastdqn bench learner: {failures} case(s) failed; see the reports")
    return report


if __name__ == "__main__":
    main()
