"""fastdqn bench learner on CPU: every case runs, on the gradient path it names."""

import json

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
