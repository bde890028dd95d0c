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
    [path] = tmp_path.glob("learner-test-2*T*Z.json")  # --iters and --warmup: not the default run's name
    saved = json.loads(path.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert saved["command"] == f"fastdqn bench learner --device cpu --iters 1 --warmup 1 --out {tmp_path} --machine test"
    markdown = path.with_suffix(".md").read_text()
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
    [path] = tmp_path.glob("learner-test-*.json")
    saved = json.loads(path.read_text())
    assert [r.get("error") for r in saved["results"]] == [
        "RuntimeError: capture failed" if layout == "frames" else None for *_, layout, _ in bench_learner.CASES]
    assert all(r["updates_per_s"] > 0 for r in saved["results"] if "error" not in r)
    assert len(saved["act"]) == len(bench_learner.ACT_NUM_ENVS)  # the cases after the failure ran
    markdown = path.with_suffix(".md").read_text()
    assert "| nature_cnn | 32 | frames | autograd | eager | failed: RuntimeError: capture failed | – |" in markdown


@pytest.mark.parametrize("flags,error", [
    (["--device", "foo"], "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--out", "FILE/sub"], "--out 'FILE/sub' cannot hold the report"),
])
def test_impossible_values_are_refused_before_any_case_runs(tmp_path, capsys, monkeypatch, flags, error):
    monkeypatch.setattr(bench_learner, "measure", lambda *args: pytest.fail("a case ran"))
    (tmp_path / "FILE").write_text("")
    with pytest.raises(SystemExit) as stop:
        bench_learner.main([f.replace("FILE", str(tmp_path / "FILE")) for f in flags])
    assert stop.value.code == 2 and error.replace("FILE", str(tmp_path / "FILE")) in capsys.readouterr().err


def test_only_a_default_run_that_measured_every_case_takes_the_default_name(tmp_path, monkeypatch):
    def measure(case, *args):
        if failing:
            raise RuntimeError("capture failed")
        return {"network": case[0], "batch_size": case[4], "layout": case[5], "gradient": case[6], "mode": "eager",
                "updates_per_s": 100.0, "ms_per_update": 10.0}

    monkeypatch.setattr(bench_learner, "measure", measure)
    monkeypatch.setattr(bench_learner, "measure_act", lambda num_envs, *args: {
        "network": "nature_cnn", "num_envs": num_envs, "mode": "eager", "calls_per_s": 10.0, "ms_per_call": 100.0})
    failing = False
    bench_learner.main(["--device", "cpu", "--machine", "box", "--out", str(tmp_path)])
    full = (tmp_path / "learner-box.json").read_text()
    assert json.loads(full)["complete"] and sorted(p.name for p in tmp_path.iterdir()) == ["learner-box.json",
                                                                                             "learner-box.md"]
    failing = True
    with pytest.raises(SystemExit, match="case"):
        bench_learner.main(["--device", "cpu", "--machine", "box", "--out", str(tmp_path)])
    assert (tmp_path / "learner-box.json").read_text() == full  # a report with failed cases replaces no full one
    assert len(list(tmp_path.glob("learner-box-*Z.json"))) == 1 and not list(tmp_path.glob("*incomplete*"))


def test_an_empty_out_writes_no_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_learner, "measure", lambda case, *args: {
        "network": case[0], "batch_size": case[4], "layout": case[5], "gradient": case[6], "mode": "eager",
        "updates_per_s": 100.0, "ms_per_update": 10.0})
    monkeypatch.setattr(bench_learner, "measure_act", lambda num_envs, *args: {
        "network": "nature_cnn", "num_envs": num_envs, "mode": "eager", "calls_per_s": 10.0, "ms_per_call": 100.0})
    report = bench_learner.main(["--device", "cpu", "--out", "", "--json"])
    assert json.loads(capsys.readouterr().out)["complete"] == report["complete"] is True
    assert not list(tmp_path.iterdir())  # as bench buffer's --out '': the report goes to stdout only
