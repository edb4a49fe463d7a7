"""The paired comparison of two gateway model versions (ONNX + model.json, e.g. a preset's old and new model, each
under its own transform): the same pairs and noise seed, decided leave-one-fold-out and at each version's served
threshold; a flip asked for a version is refused (its graph already embeds e(x) + e(flip x))."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_jobs import ab_compare

BUNDLED = Path(__file__).resolve().parents[1] / "inference" / "bundled"


def test_two_gateway_model_versions_compare_on_the_same_pairs(shared: Path, tmp_path: Path) -> None:
    accurate, balanced = BUNDLED / "v1-accurate", BUNDLED / "v5-balanced"
    out = tmp_path / "ab.json"
    ab_compare.main(["--run", f"A={accurate}", "--run", f"B={balanced}", "--bundle", f"A={accurate}",
                     "--bundle", f"B={balanced}", "--folds", "6-7", "--pairs-per-fold", "6", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["pairs"] == 12 and report["paired"]["pairs"] == 12
    models = report["models"]
    for name, version in (("A", accurate), ("B", balanced)):
        meta = json.loads((version / "model.json").read_text())
        assert models[name]["input"] == meta["transform_id"]  # each embedded under the transform it serves
        assert report["served"]["models"][name]["verify_threshold"] == meta["threshold"]
    assert models["A"]["input"] != models["B"]["input"]
    with pytest.raises(SystemExit, match="a gateway model version flips inside its ONNX graph"):
        ab_compare.main(["--run", f"A={accurate}", "--run", f"B={balanced}", "--flip", "B"])


def test_a_folder_that_is_neither_a_run_nor_a_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="DIR/checkpoints/last.pt or DIR/model.json"):
        ab_compare.main(["--run", f"A={tmp_path}", "--run", f"B={BUNDLED / 'v5-balanced'}"])
