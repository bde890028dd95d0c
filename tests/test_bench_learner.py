"""fastdqn bench learner on CPU: every case runs, on the gradient path it names."""

import json

import pytest

from fastdqn.bench import learner as bench_learner


def test_learner_bench_reports_every_case_on_its_gradient_path(tmp_path):
    report = bench_learner.main(["--device", "cpu", "--iters", "1", "--warmup", "1", "--out", str(tmp_path),
                                 "--machine", "test"])
    rows = [(r["network"], r["batch_size"], r["layout"], r["gradient"], r["mode"]) for r in report["results"]]
    assert rows == [(name, batch, layout, gradient, "eager")
                    for name, _, _, _, batch, layout, gradient in bench_learner.CASES]
    mlp = [r for r in report["results"] if r["network"] == "mlp"]
    assert all(r["iters"] == bench_learner.MLP_ITERS_FACTOR for r in mlp)
    assert all(r["updates_per_s"] > 0 for r in report["results"])
    assert [r["num_envs"] for r in report["act"]] == list(bench_learner.ACT_NUM_ENVS)
    saved = json.loads((tmp_path / "learner-test.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    markdown = (tmp_path / "learner-test.md").read_text()
    assert "| mlp | 128 | obs | manual | eager |" in markdown and "| mlp | 128 | obs | autograd | eager |" in markdown


def test_a_failing_case_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    measure = bench_learner.measure

    def fail_for_the_frames_layout(case, *args):
        if case[5] == "frames":
            raise RuntimeError("capture failed")
        return measure(case, *args)

    monkeypatch.setattr(bench_learner, "measure", fail_for_the_frames_layout)
    with pytest.raises(SystemExit, match="1 case"):
        bench_learner.main(["--device", "cpu", "--iters", "1", "--warmup", "1", "--out", str(tmp_path),
                            "--machine", "test"])
    saved = json.loads((tmp_path / "learner-test.json").read_text())
    assert [r.get("error") for r in saved["results"]] == [
        "RuntimeError: capture failed" if layout == "frames" else None for *_, layout, _ in bench_learner.CASES]
    assert all(r["updates_per_s"] > 0 for r in saved["results"] if "error" not in r)
    assert len(saved["act"]) == len(bench_learner.ACT_NUM_ENVS)  # the cases after the failure ran
    markdown = (tmp_path / "learner-test.md").read_text()
    assert "| nature_cnn | 32 | frames | autograd | eager | failed: RuntimeError: capture failed | – |" in markdown
