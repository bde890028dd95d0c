"""fastdqn bench train: SB3 gets fastdqn's schedule, and --json maps each system to its figures."""

import json
import sys

import pytest

from fastdqn.bench import train as bench_train
from fastdqn.config import DQNConfig, usable_cores


FIGURES = {"env_steps": 100, "updates": 0, "wall_s": 1.0, "steps_per_s": 100.0, "updates_per_s": 0.0,
           "replay_ratio": 0.0}
"""A system's figures, as a stand-in run returns them."""


def sb3_installed(monkeypatch):
    """SB3 counts as installed (the test extra has none), so that sb3 is one of the default systems."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: find_spec("pytest") if name == "stable_baselines3"
                        else find_spec(name, *a))


def test_sb3_plays_the_same_game_on_its_own_id():
    assert {bench_train.sb3_atari_id(env_id) for env_id in ("Pong-v5", "ALE/Pong-v5", "PongNoFrameskip-v4",
                                                            "Pong-v4", "PongDeterministic-v4")} == {"PongNoFrameskip-v4"}


def test_sb3_gets_the_same_schedule_in_its_units():
    config = DQNConfig()  # CartPole's preset: rounds of 32 updates every 256 env steps, 8 envs
    kwargs = bench_train.sb3_arguments(config, config.num_envs)
    # SB3 counts train_freq in vector steps and its target interval in env steps.
    assert kwargs["train_freq"] * config.num_envs == config.train_frequency
    assert kwargs["gradient_steps"] == config.gradient_steps
    env_steps_per_update = config.train_frequency / config.gradient_steps
    assert kwargs["target_update_interval"] == config.target_update_interval * env_steps_per_update
    assert (kwargs["batch_size"], kwargs["n_steps"], kwargs["learning_starts"]) == (128, 3, 1_000)
    with pytest.raises(ValueError, match="multiple of num_envs"):
        bench_train.sb3_arguments(DQNConfig(train_frequency=12), 8)


def test_median_run_is_the_middle_one_by_steps_per_s():
    runs = [{"steps_per_s": v, "run": i} for i, v in enumerate([30.0, 10.0, 20.0, 40.0])]
    assert bench_train.median_run(runs[:3]) == dict(runs[2], runs_steps_per_s=[30.0, 10.0, 20.0])
    assert bench_train.median_run(runs)["run"] == 2  # the lower middle of four
    assert bench_train.median_run(runs[:1]) == runs[0]


def test_json_maps_each_system_to_its_figures(tmp_path, capsys):
    steps, repeats = 1_200, 2
    bench_train.main(["--env", "CartPole-v1", "--steps", str(steps), "--systems", "envpool_raw,sync,async",
                      "--repeats", str(repeats), "--eval-episodes", "0", "--device", "cpu", "--out", str(tmp_path),
                      "--machine", "Test Box", "--json"])
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"envpool_raw", "sync", "async"}
    config = DQNConfig()
    # The preset's schedule: a round of gradient_steps at learning_starts, then one per train_frequency.
    updates = ((steps - config.learning_starts) // config.train_frequency + 1) * config.gradient_steps
    for name, result in figures.items():
        assert result["env_steps"] == steps and result["steps_per_s"] > 0
        assert len(result["runs_steps_per_s"]) == repeats and result["steps_per_s"] in result["runs_steps_per_s"]
        expected = 0 if name == "envpool_raw" else updates
        assert result["updates"] == expected
        assert result["replay_ratio"] == pytest.approx(expected / steps, abs=1e-4)
        assert result["updates_per_s"] == pytest.approx(expected / result["wall_s"], rel=1e-2, abs=0.1)
    # The async pipeline makes its envs inside learn(); the others make them before it, untimed.
    make_env = figures["async"]["time_s"]["actor"]["make_env"]
    assert figures["async"]["env_setup_s"] == make_env > 0
    # Not the default run: its start time in the names, so that it replaces no full run's report.
    [report] = tmp_path.glob("train-test-box-2*T*Z.json")
    saved = json.loads(report.read_text())
    assert saved["envs"]["CartPole-v1"]["torch_threads"] == config.torch_threads and saved["complete"]
    assert saved["command"].startswith("fastdqn bench train --env CartPole-v1 --steps 1200")
    assert saved["machine"]["versions"].keys() >= {"stable-baselines3", "envpool", "gymnasium", "ale-py", "torch"}
    assert figures["envpool_raw"]["backend"] == "envpool"
    assert set(figures["envpool_raw"]["time_s"]) == {"env", "actions"}
    markdown = report.with_suffix(".md").read_text()
    assert f"median of {repeats} interleaved runs" in markdown and "| CartPole-v1 | async |" in markdown
    assert f"async: its wall time leaves out making its own envs inside learn() ({make_env:.2f} s)" in markdown
    # What the schedule allows, beside what each system held: one round of updates in this short run.
    assert (f"learning starts at env step {config.learning_starts:,} of {steps:,}: the schedule makes {updates} "
            f"updates, a replay ratio of {updates / steps:.3f} over the whole run (configured: 0.125 from then on)"
            in markdown)


def test_markdown_gives_the_ratio_to_sb3_run_by_run():
    def result(runs):
        return {"env_steps": 100, "wall_s": 1.0, "steps_per_s": sorted(runs)[1], "updates_per_s": 0.0,
                "replay_ratio": 0.0, "runs_steps_per_s": runs}

    report = {"date": "d", "device": "cpu",
              "machine": {"cpu": "c", "cores": 2, "versions": {"torch": "t"}, "load_avg_1m": 0.0},
              "envs": {"CartPole-v1": {"preset": "cartpole", "config_overrides": {}, "torch_threads": 1, "repeats": 3,
                                       "config": DQNConfig().to_dict(), "systems": {"sync": result([300.0, 500.0, 400.0]),
                                                   "sb3": result([100.0, 200.0, 400.0])}}}}
    markdown = bench_train.to_markdown(report)
    assert "  - sync vs SB3, run by run (the runs of one repeat follow each other): 3.00x, 2.50x, 1.00x" in markdown
    assert "| CartPole-v1 | sync | 100 | 1.0 | 400 |" in markdown and "| 2.00x |" in markdown


def test_each_run_gets_a_fresh_process():
    import os

    pids = [bench_train.in_fresh_process(os.getpid) for _ in range(2)]
    assert os.getpid() not in pids and pids[0] != pids[1]
    with pytest.raises(ValueError, match="invalid literal") as error:  # the run's error reaches the caller
        bench_train.in_fresh_process(int, "not a number")
    assert "Traceback" in str(error.value.__cause__)
    with pytest.raises(RuntimeError, match="exit code 3"):  # and so does its death, instead of a hang
        bench_train.in_fresh_process(os._exit, 3)


def test_a_failing_system_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    calls = []

    def in_fresh_process(fn, system, *args):
        calls.append(system)
        if system == "sync":
            raise ValueError("no such thing") from RuntimeError("in the run's process:\nTraceback ...")
        return dict(FIGURES)

    monkeypatch.setattr(bench_train, "in_fresh_process", in_fresh_process)
    with pytest.raises(SystemExit, match="a system failed"):
        bench_train.main(["--env", "CartPole-v1", "--steps", "100", "--systems", "envpool_raw,sync,async",
                          "--repeats", "2", "--device", "cpu", "--out", str(tmp_path), "--json"])
    assert calls == ["envpool_raw", "sync", "async", "envpool_raw", "async"]  # a failed system is not run again
    captured = capsys.readouterr()
    figures = json.loads(captured.out)
    assert figures["sync"] == {"error": "ValueError: no such thing"}
    assert figures["async"]["steps_per_s"] == figures["envpool_raw"]["steps_per_s"] == 100.0
    assert "Traceback ..." in captured.err  # the run's own traceback, for whoever reads the log
    [report] = tmp_path.glob("train-*.json")
    saved = json.loads(report.read_text())
    assert saved["envs"]["CartPole-v1"]["systems"] == figures
    assert "| CartPole-v1 | sync | failed: ValueError: no such thing |" in report.with_suffix(".md").read_text()


def test_only_the_default_run_writes_the_report_the_readme_quotes(tmp_path, monkeypatch):
    sb3_installed(monkeypatch)
    monkeypatch.setattr(bench_train, "in_fresh_process", lambda *args: dict(FIGURES))
    bench_train.main(["--device", "cpu", "--machine", "box", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-box.json", "train-box.md"]
    full = (tmp_path / "train-box.json").read_text()
    for other in (["--systems", "envpool_raw", "--steps", "1e2"], ["--repeats", "1"]):
        report = bench_train.main(["--device", "cpu", "--machine", "box", "--out", str(tmp_path), *other])
    assert report["envs"]["CartPole-v1"]["config"]["total_steps"] == 50_000
    assert (tmp_path / "train-box.json").read_text() == full and len(list(tmp_path.glob("train-box-*Z.json"))) == 2

    def interrupted(fn, system, *args):  # a default run stopped halfway
        if system == "async":
            raise KeyboardInterrupt
        return dict(FIGURES)

    monkeypatch.setattr(bench_train, "in_fresh_process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--device", "cpu", "--machine", "box", "--out", str(tmp_path)])
    assert (tmp_path / "train-box.json").read_text() == full
    assert json.loads((tmp_path / "train-box-incomplete.json").read_text())["complete"] is False

    def sb3_fails(fn, system, *args):  # a default run that ends, without SB3's figures
        if system == "sb3":
            raise RuntimeError("no display")
        return dict(FIGURES)

    monkeypatch.setattr(bench_train, "in_fresh_process", sb3_fails)
    with pytest.raises(SystemExit, match="a system failed"):
        bench_train.main(["--device", "cpu", "--machine", "box", "--out", str(tmp_path)])
    assert (tmp_path / "train-box.json").read_text() == full and not list(tmp_path.glob("*-incomplete.*"))
    assert len(list(tmp_path.glob("train-box-*Z.json"))) == 3  # the two other runs' and this one's


def test_an_interrupted_run_says_its_report_is_incomplete(tmp_path, monkeypatch):
    def in_fresh_process(fn, system, *args):
        if system == "sync":
            raise KeyboardInterrupt
        return dict(FIGURES)

    monkeypatch.setattr(bench_train, "in_fresh_process", in_fresh_process)
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--env", "CartPole-v1", "--device", "cpu", "--out", str(tmp_path), "--systems", "envpool_raw,sync"])
    [report] = tmp_path.glob("train-*-incomplete.json")
    assert json.loads(report.read_text())["complete"] is False
    assert "**Incomplete:**" in report.with_suffix(".md").read_text()


def test_a_busy_machine_is_flagged_in_the_report():
    report = {"date": "d", "device": "cpu", "envs": {},
              "machine": {"cpu": "c", "cores": 2, "versions": {"torch": "t"}, "load_avg_1m": 1.5}}
    assert "**The machine was busy:** a 1-min load average of 1.5 on 2 cores" in bench_train.to_markdown(report)
    report["machine"]["load_avg_1m"] = 0.3
    assert "machine was busy" not in bench_train.to_markdown(report)


@pytest.mark.parametrize("flags,error", [
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
    (["--seed", "2147483647"], "--seed must be at most 2147483646, got 2147483647"),
    (["--eval-episodes", "-1"], "argument --eval-episodes: expected a non-negative integer, got -1"),
    (["--steps", "1e3x"], "argument --steps: expected a positive integer, got '1e3x'"),
    (["--num-envs", "3"], "CartPole-v1: SB3 steps all 3 envs together: train_frequency 256 must be a multiple of "
                          "num_envs (or leave sb3 out of --systems)"),
    (["--out", "FILE/sub"], "--out 'FILE/sub' cannot hold the report"),
    (["--env", "ALE/Pitfall2-v5"], "ALE/Pitfall2-v5: SB3's Atari setup has no counterpart of ALE/Pitfall2-v5 (no "
                                   "Pitfall2NoFrameskip-v4) (or leave sb3 out of --systems)"),
])
def test_impossible_values_are_refused_before_any_system_runs(tmp_path, capsys, monkeypatch, flags, error):
    monkeypatch.setattr(bench_train, "in_fresh_process", lambda *args: pytest.fail("a system ran"))
    sb3_installed(monkeypatch)  # so that sb3's num_envs is checked too
    (tmp_path / "FILE").write_text("")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    with pytest.raises(SystemExit) as stop:
        bench_train.main(["--env", "CartPole-v1", "--out", str(tmp_path / "out"), *flags])
    assert stop.value.code == 2
    assert error.replace("FILE", str(tmp_path / "FILE")) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_is_refused_where_there_is_none(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--device", "cuda", "--out", str(tmp_path)])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_sb3_is_left_out_when_not_installed_unless_asked_for(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "stable_baselines3"
                        else find_spec(name, *a))
    ran = []
    monkeypatch.setattr(bench_train, "in_fresh_process", lambda fn, system, *args: ran.append(system) or dict(FIGURES))
    with pytest.raises(SystemExit):
        bench_train.main(["--systems", "sync,sb3", "--out", str(tmp_path)])
    assert "--systems names sb3, but stable-baselines3 is not installed" in capsys.readouterr().err and not ran
    bench_train.main(["--device", "cpu", "--machine", "box", "--out", str(tmp_path)])
    assert ran == ["envpool_raw", "sync", "async"] * 5 * 2  # 5 repeats, 2 envs
    assert "stable-baselines3 is not installed: sb3 is not run" in capsys.readouterr().err
    [report] = tmp_path.glob("train-box-*Z.json")  # without SB3's column: not the default run's report


def test_an_unknown_env_id_is_refused_before_any_system_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_train.main(["--env", "CartPole-v1", "--env", "CartPol-v1", "--steps", "100", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "unknown env_id 'CartPol-v1'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran, no report replaced


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_run_dies_with_the_benchmark_stopped_by_sigterm(tmp_path):
    import signal
    import subprocess
    import time
    from pathlib import Path

    def children(pid):
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                spawned_run = b"resource_tracker" not in (stat.parent / "cmdline").read_bytes()  # it goes of itself
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid and fields[0] != "Z" and spawned_run:
                found.append(int(stat.parent.name))
        return found

    bench = subprocess.Popen([sys.executable, "-c", "import time; from fastdqn.bench import train; "
                              "train.in_fresh_process(time.sleep, 120)"],
                             cwd=tmp_path)  # outside the checkout: import the installed package, extension included
    try:
        deadline = time.monotonic() + 60
        while not children(bench.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        [run] = children(bench.pid)  # the spawned run
        time.sleep(1)  # past its start, where it asks to die with its parent
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while Path(f"/proc/{run}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            state = Path(f"/proc/{run}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "gone"
        assert state in ("gone", "Z")
    finally:
        bench.kill()
        bench.wait()


def test_a_cpu_run_on_a_gpu_machine_is_named_after_the_cpu():
    from fastdqn.bench.report import machine_name

    machine = {"slug": "h100-80gb-hbm3", "cpu_slug": "amd-epyc-9654-16c"}  # machine_info's on a GPU machine
    assert machine_name(machine, "cuda", None) == "h100-80gb-hbm3"
    assert machine_name(machine, "cpu", None) == "amd-epyc-9654-16c"  # never the GPU run's report
    assert machine_name(machine, "cpu", "My Box") == "my-box"


def test_sb3_runs_leave_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    """SB3's default logger makes an empty /tmp/SB3-<time> folder on every learn()."""
    pytest.importorskip("stable_baselines3")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = DQNConfig.preset("cartpole", total_steps=300, learning_starts=100, num_envs=2)
    result = bench_train.run_sb3("CartPole-v1", config, eval_episodes=0)
    assert result["steps_per_s"] > 0 and [p.name for p in tmp_path.glob("SB3-*")] == []


def test_sb3_gets_the_learners_rmsprop(monkeypatch):
    sb3 = pytest.importorskip("stable_baselines3")
    import torch

    made = []

    class Recorded(sb3.DQN):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sb3, "DQN", Recorded)
    config = DQNConfig.preset("cartpole", total_steps=300, learning_starts=100, num_envs=2, optimizer="rmsprop",
                              learning_rate=2.5e-4)
    bench_train.run_sb3("CartPole-v1", config, eval_episodes=0)
    optimizer = made[0].policy.optimizer
    assert type(optimizer) is torch.optim.RMSprop
    settings = optimizer.param_groups[0]
    assert (settings["lr"], settings["alpha"], settings["eps"], settings["centered"]) == (2.5e-4, 0.95, 0.01, True)


def test_set_changes_every_systems_config_and_names_the_report_apart(tmp_path, monkeypatch):
    sb3_installed(monkeypatch)
    ran = []
    monkeypatch.setattr(bench_train, "in_fresh_process",
                        lambda fn, system, env_id, config, episodes, threads: ran.append((system, config, threads))
                        or dict(FIGURES))
    report = bench_train.main(["--env", "CartPole-v1", "--device", "cpu", "--machine", "box", "--out", str(tmp_path),
                               "--repeats", "1", "--set", "torch_threads=2", "--set", "batch_size=64"])
    assert sorted(system for system, _, _ in ran) == ["async", "envpool_raw", "sb3", "sync"]
    assert all(config.batch_size == 64 and threads == min(2, usable_cores()) for _, config, threads in ran)
    assert report["envs"]["CartPole-v1"]["config_overrides"]["batch_size"] == 64
    assert "--set torch_threads=2" in report["command"]
    assert not (tmp_path / "train-box.json").exists() and len(list(tmp_path.glob("train-box-*Z.json"))) == 1


@pytest.mark.parametrize("assignment,error", [
    ("batch_sise=64", "--set: unknown config field 'batch_sise' (did you mean batch_size?)"),
    ("batch_size=0", "batch_size"),
    ("total_steps=100", "--set total_steps: use --steps"),
    ("num-envs=4", "--set num_envs: use --num-envs"),
    ("eval_interval=1000", "--set eval_interval: evaluations during the run would be timed with it"),
    ("eval_epsilon=0.05", "--set eval_epsilon: every system is evaluated greedily"),
])
def test_bad_set_assignments_are_refused_before_any_system_runs(tmp_path, capsys, monkeypatch, assignment, error):
    monkeypatch.setattr(bench_train, "in_fresh_process", lambda *args: pytest.fail("a system ran"))
    with pytest.raises(SystemExit) as stop:
        bench_train.main(["--env", "CartPole-v1", "--out", str(tmp_path), "--set", assignment])
    assert stop.value.code == 2 and error in capsys.readouterr().err and not list(tmp_path.iterdir())
