"""The replay-buffer benchmark: its synthetic stream, its ratios, and a --quick run of fastdqn alone.

No timing is asserted: only that the report is complete and its numbers consistent.
"""

import json

import numpy as np
import pytest

import fastdqn
from fastdqn.bench import buffer as bench
from fastdqn.bench import buffer_subjects as subjects

ATARI_FRAME = 84 * 84


def test_stream_stacks_frames_like_an_atari_env():
    stream = subjects.AtariStream(mean_episode=50, seed=3)
    # Across the wrap-arounds of both the frame period and the stream length.
    for i in list(range(stream.PERIOD - 3, stream.PERIOD + 3)) + list(range(stream.LENGTH - 3, stream.LENGTH + 3)):
        obs, actions, rewards, next_obs, terminated, truncated = stream.step(i)
        assert obs.shape == next_obs.shape == (subjects.NUM_ENVS, *subjects.OBS_SHAPE) and obs.dtype == np.uint8
        assert actions.shape == rewards.shape == terminated.shape == truncated.shape == (subjects.NUM_ENVS,)
        np.testing.assert_array_equal(next_obs, stream.step(i + 1)[0])
        np.testing.assert_array_equal(next_obs[:, :-1], obs[:, 1:])  # consecutive stacks share k-1 frames
        assert not (obs[0] == obs[1]).all()  # each env has its own frames
    ends = stream.terminated | stream.truncated
    assert not (stream.terminated & stream.truncated).any()
    assert abs(ends.mean() - 1 / 50) < 0.005  # 32,768 draws: about 6 standard deviations
    assert 0.05 < stream.truncated.sum() / ends.sum() < 0.15


def test_settings_reject_bad_values_naming_them():
    with pytest.raises(ValueError, match="fill"):
        bench.Settings(capacity=800, fill=808)
    with pytest.raises(ValueError, match="capacity"):
        bench.Settings(capacity=100)
    with pytest.raises(ValueError, match="batch_sizes"):
        bench.Settings(batch_sizes=(32, 0))
    with pytest.raises(ValueError, match="impls"):
        bench.Settings(impls=("fastdqn", "dopamine"))
    with pytest.raises(ValueError, match="torch_threads"):
        bench.Settings(torch_threads=-1)
    for seconds in (dict(warmup_seconds=float("inf")), dict(repeat_seconds=float("nan"))):
        with pytest.raises(ValueError, match="repeat_seconds must be > 0 and warmup_seconds >= 0, both finite"):
            bench.Settings(**seconds)
    with pytest.raises(ValueError, match="tmpdir '/nonexistent' is not a directory"):
        bench.Settings(tmpdir="/nonexistent")


def test_command_line_reports_bad_options(capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        bench.main(["--capacity", "800", "--fill", "808"])
    assert "fill must be" in capsys.readouterr().err
    monkeypatch.setattr(bench, "run", lambda settings: pytest.fail("the benchmark ran"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path / "file" / "results")])
    assert f"--out '{tmp_path / 'file' / 'results'}' cannot hold the report" in capsys.readouterr().err


def test_ratios_and_targets_follow_from_the_numbers():
    def rate(median):
        return {"median": median}

    skipped = {"status": "skipped: not installed"}
    report = {
        "settings": {"batch_sizes": [32, 256]},
        "uniform": {
            "fastdqn": {"add": rate(300.0), "bytes_per_transition": 7000.0,
                        "sample": {"sample": {"32": rate(60.0), "256": rate(10.0)},
                                   "sample_out": {"32": rate(90.0), "256": rate(12.0)}}},
            "sb3": {"add": rate(100.0), "bytes_per_transition": 28000.0,
                    "sample": {"sample": {"32": rate(20.0), "256": rate(5.0)},
                               "prefetch": {"32": rate(30.0), "256": rate(4.0)}}},
            "cpprb": {"add": rate(600.0), "bytes_per_transition": 7000.0,
                      "sample": {"sample": {"32": rate(30.0), "256": rate(4.0)}}},
            "torchrl": skipped,
        },
        "prioritized": {
            "fastdqn": {"sample": {"32": rate(40.0), "256": rate(8.0)},
                        "sample_update": {"32": rate(30.0), "256": rate(6.0)}},
            "sb3": skipped,
            "cpprb": {"sample": {"32": rate(10.0), "256": rate(2.0)},
                      "sample_update": {"32": rate(10.0), "256": rate(3.0)}},
            "torchrl": skipped,
        },
        "memcopy": {"gather": {"32": rate(100.0), "256": rate(15.0)}},
        "save": {"save_gbps": 1.0, "disk_write_gbps": 2.0, "load_gbps": 3.0, "disk_read_gbps": 3.0},
    }
    ratios = bench.compute_ratios(report)
    # best_sample: fastdqn's fastest way against the peer's fastest way (prefetch at 32, sample at 256)
    assert ratios["uniform"]["sb3"] == {"add": 3.0, "memory": 4.0, "sample_32": 3.0, "best_sample_32": 3.0,
                                        "sample_256": 2.0, "best_sample_256": 2.4}
    assert ratios["uniform"]["cpprb"]["add"] == 0.5 and ratios["uniform"]["cpprb"]["memory"] == 1.0
    assert ratios["uniform"]["cpprb"]["sample_256"] == 2.5
    assert all(value is None for value in ratios["uniform"]["torchrl"].values())
    assert ratios["memcopy_fraction"]["sample"] == {"32": 0.6, "256": 10.0 / 15.0}
    assert ratios["memcopy_fraction"]["sample_out"]["256"] == 0.8
    assert ratios["memcopy_fraction"]["prefetch"] == {"32": None, "256": None}
    assert ratios["prioritized"]["cpprb"] == {"sample_32": 4.0, "sample_256": 4.0,
                                              "sample_update_32": 3.0, "sample_update_256": 2.0}
    assert ratios["save_vs_disk"] == 0.5 and ratios["load_vs_disk"] == 1.0

    report["ratios"] = ratios
    met = {t["target"]: t["met"] for t in bench.check_targets(report)}
    assert met["plain sample(256) >= 2x SB3"] is True  # exactly 2.0
    assert met["plain sample(256) >= 3x cpprb"] is False  # 2.5
    assert met["add >= 3x SB3"] is True
    assert met["sample(out=) at batch 32 >= 80% of the memory-copy limit"] is True
    assert met["prioritized sample(256) >= 2x the best peer"] is True  # cpprb is the only peer: 4x
    assert met["save at disk speed (>= 80% of raw write)"] is False
    assert met["load at disk speed (>= 80% of raw read)"] is True


def test_frame_bytes_counts_uint8_arrays_in_any_container():
    torch = pytest.importorskip("torch")
    frames = np.zeros((2, 4, 84, 84), np.uint8)
    batch = fastdqn.Batch(obs=frames, actions=np.zeros(2, np.int64), rewards=np.zeros(2, np.float32),
                          next_obs=frames, terminated=np.zeros(2, np.float32), discounts=np.ones(2, np.float32),
                          indices=np.arange(2))
    assert bench.frame_bytes(batch) == 2 * frames.nbytes
    nested = {"obs": torch.from_numpy(frames), "more": [torch.zeros(3, dtype=torch.uint8), torch.zeros(5)], "x": None}
    assert bench.frame_bytes(nested) == frames.nbytes + 3
    assert bench.frame_bytes((torch.zeros(4, dtype=torch.bool), 7)) == 0


def test_memory_copy_limit_is_the_faster_of_its_runs():
    def run(contiguous, gather_32, gather_256):
        return {"status": "ok", "contiguous_gbps": contiguous,
                "gather": {"32": {"median": gather_32}, "256": {"median": gather_256}}}

    before, after = run(5.0, 100.0, 9.0), run(4.0, 120.0, 8.0)
    combined = bench._combine_memcopy([before, after])
    assert combined["runs"] == [before, after] and combined["contiguous_gbps"] == 5.0
    assert combined["gather"] == {"32": {"median": 120.0}, "256": {"median": 9.0}}
    failed = {"status": "failed: MemoryError: "}
    assert bench._combine_memcopy([failed, after])["gather"] == after["gather"]
    assert bench._combine_memcopy([failed]) == failed


def _check_rates(stats, batch_size=None):
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert stats["repeats"] == bench.QUICK["repeats"] and stats["calls_per_repeat"] >= 1
    if batch_size is not None:
        assert stats["gbps"] == pytest.approx(stats["median"] * 2 * batch_size * 4 * ATARI_FRAME / 1e9)
        assert stats["transitions_per_s"] == pytest.approx(stats["median"] * batch_size)


def test_quick_run_of_fastdqn_writes_a_consistent_report(tmp_path, capsys):
    code = bench.main(["--quick", "--impls", "fastdqn", "--out", str(tmp_path), "--tmpdir", str(tmp_path),
                       "--machine", "smoke", "--torch-threads", "1", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    [path] = tmp_path.glob("buffer-smoke-quick-2*T*Z.json")  # never a real run's name, nor a plain quick run's
    assert json.loads(path.read_text()) == printed
    report = printed
    assert report["schema"] == bench.SCHEMA and report["settings"]["fill"] == bench.QUICK["fill"]
    assert report["machine"]["versions"]["numpy"] == np.__version__ and report["torch_threads"] == 1

    memcopy = report["memcopy"]
    assert memcopy["status"] == "ok" and memcopy["contiguous_gbps"] > 0 and len(memcopy["runs"]) == 2
    for size in ("32", "256"):
        _check_rates(memcopy["gather"][size], int(size))

    uniform = report["uniform"]["fastdqn"]
    assert uniform["status"] == "ok"
    assert uniform["held"] == bench.QUICK["fill"]  # below capacity nothing is evicted
    _check_rates(uniform["add"])
    # Frames are stored once: one 7,056-byte frame per transition and a little metadata.
    assert 0.9 * ATARI_FRAME <= uniform["bytes_per_transition"] <= 2 * ATARI_FRAME
    assert set(uniform["sample"]) == set(bench.VARIANT_NAMES)
    for variant, by_size in uniform["sample"].items():
        for size in ("32", "256"):
            _check_rates(by_size[size], int(size))
            # obs and next_obs in full (k + k frames), or sharing frames (k + 1) in the shared layout
            frames = 5 if variant == "frames_out" else 8
            assert by_size[size]["frame_bytes"] == int(size) * frames * ATARI_FRAME
    for peer in ("sb3", "cpprb", "torchrl"):
        assert report["uniform"][peer] == {"status": "skipped: not selected"}
        assert all(value is None for value in report["ratios"]["uniform"][peer].values())

    prioritized = report["prioritized"]["fastdqn"]
    assert prioritized["status"] == "ok" and prioritized["held"] == bench.QUICK["fill"]
    for key in ("sample", "sample_update"):
        for size in ("32", "256"):
            _check_rates(prioritized[key][size], int(size))

    save = report["save"]
    assert save["status"] == "ok"
    assert 0 < save["transitions"] <= bench.QUICK["save_capacity"]
    assert save["file_bytes"] >= save["transitions"] * ATARI_FRAME
    assert min(save["save_gbps"], save["load_gbps"], save["disk_write_gbps"], save["disk_read_gbps"]) > 0
    assert not any(tmp_path.glob("fastdqn-bench-*")), "the save/load files are cleaned up"

    markdown = path.with_suffix(".md").read_text()
    assert "| fastdqn `sample(out=)` |" in markdown and "memory-copy limit" in markdown
    assert "| SB3 |" not in markdown  # peers not selected get no rows
    assert "Measured with other sizes than the targets were set for (capacity, fill, repeats" in markdown


def test_only_a_default_run_with_every_peer_takes_the_default_name(tmp_path, monkeypatch):
    import importlib.util

    def run(settings):  # the figures do not matter here, only which run it was
        return {"machine": {"cpu_slug": "box"}, "seconds": 1.0, "uniform": {}, "prioritized": {},
                "save": {"status": "ok"}, "memcopy": {"status": "ok"}}

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(bench, "render_markdown", lambda report: "")
    find_spec = importlib.util.find_spec
    peers = {subject.module for subject in bench.SUBJECTS.values()}
    installed = set(peers)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (find_spec("pytest") if name in installed else None)
                        if name in peers else find_spec(name, *a))
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer-box.json", "buffer-box.md"]
    installed.discard(bench.SUBJECTS["cpprb"].module)  # a peer missing: its column would be empty
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("buffer-box-*Z.json"))) == 1
