"""The privacy-accuracy frontier collects measured figures: a run's final held-out evaluation beside the strongest
attack on its transform and noise; --keep adds a run to the points of runs trained elsewhere (their attack figures
read again), and a rerun replaces its own point instead of adding a second one."""
from __future__ import annotations

import json
from pathlib import Path

from training_jobs import frontier


def fake_run(root: Path, name: str, preset: str, accuracy: float) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"transform": {"preset": preset, "epsilon": 64}, "model": {}}))
    tars = {"0.001": {"tar": 0.5}, "0.0001": {"tar": 0.4}, "far_resolution": 0.001}
    (run / "final.json").write_text(json.dumps({"name": name, "epochs": 3, "eval_folds": [6, 7, 8, 9, 10], "final": {
        "num_pairs": 3000, "verification": {"accuracy": accuracy, "accuracy_std": 0.01}, "tar_at_far": tars,
        "rank1": 0.4}}))
    return run


def test_keep_adds_a_run_to_the_points_of_runs_trained_elsewhere(tmp_path: Path) -> None:
    attacks = tmp_path / "results.json"
    attacks.write_text(json.dumps([
        {"attack": "a1", "transform": "dct8-low8", "epsilon": "64", "rank1": 0.234, "run": "a1-low8"},
        {"attack": "a1", "transform": "dct8-low10", "epsilon": "64", "rank1": 0.163, "run": "a1-low10"},
        {"attack": "a1", "transform": "dct8-low10", "epsilon": "16", "rank1": 0.048, "run": "a1-low10-eps16"}]))
    out = tmp_path / "frontier"
    elsewhere = fake_run(tmp_path, "gpu-low10", "dct8-low10", 0.903)
    frontier.main(["--runs", str(elsewhere), "--attacks", str(attacks), "--out", str(out)])
    elsewhere.joinpath("final.json").unlink()  # that run's folder is gone: only its plotted point remains
    new = fake_run(tmp_path, "cpu-low8-warm", "dct8-low8", 0.95)
    for _ in range(2):  # a rerun replaces its own point
        frontier.main(["--runs", str(new), "--attacks", str(attacks), "--out", str(out), "--keep"])
    points = {p["run"]: p for p in json.loads(out.with_suffix(".json").read_text())}
    assert sorted(points) == ["cpu-low8-warm", "gpu-low10"]
    assert points["gpu-low10"]["accuracy"] == 0.903 and points["gpu-low10"]["attacks"]["a1"]["rank1"] == 0.163
    assert points["cpu-low8-warm"]["attacks"]["a1"]["rank1"] == 0.234
    assert out.with_suffix(".png").stat().st_size > 0
    frontier.main(["--runs", str(new), "--attacks", str(attacks), "--out", str(out)])  # without --keep: only the run
    assert [p["run"] for p in json.loads(out.with_suffix(".json").read_text())] == ["cpu-low8-warm"]
