"""training_jobs/threshold_check.py: the realised false-match rate of a bundle's thresholds on new people."""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from inference.operating_points import ImpostorCurve, per_comparison_fmr
from training_jobs.threshold_check import bundle_thresholds, chosen_images, load_models, realised_rate

CHECKPOINT = Path("training_jobs/checkpoints/cpu-sealed-quad-w128-hint.pt")
BUNDLE = Path("inference/bundled/sealed-v7")
GATEWAY = Path("inference/bundled/v1-accurate")


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_realised_rate_counts_every_pair_once() -> None:
    """Against a brute-force count over all pairs i < j, impostor and same-person apart."""
    emb = _unit_rows(60, 8, seed=1)
    person = np.repeat(np.arange(20), 3)
    threshold = 0.6
    impostor_hits = genuine_hits = impostor_pairs = 0
    for i, j in combinations(range(len(emb)), 2):
        hit = float(emb[i] @ emb[j]) >= threshold
        if person[i] == person[j]:
            genuine_hits += hit
        else:
            impostor_pairs += 1
            impostor_hits += hit
    out = realised_rate(emb, person, threshold)
    assert out["impostor_pairs"] == impostor_pairs == 60 * 59 // 2 - 20 * 3
    assert out["impostors_accepted"] == impostor_hits > 0
    assert out["realised_fmr"] == pytest.approx(impostor_hits / impostor_pairs)
    assert out["genuine_pairs"] == 60 and out["genuine_accepted"] == pytest.approx(genuine_hits / 60)
    low, high = out["realised_fmr_95"]
    assert low < out["realised_fmr"] < high


def test_realised_rate_is_zero_when_no_impostor_passes() -> None:
    emb = np.repeat(np.eye(5), 2, axis=0)  # each person's two images identical, people orthogonal
    out = realised_rate(emb, np.repeat(np.arange(5), 2), 0.5)
    assert out["impostors_accepted"] == 0 and out["realised_fmr_95"] == [0.0, 0.0]
    assert out["genuine_accepted"] == 1.0


def test_chosen_images_cap_each_person_and_keep_to_the_folds(shared: Path) -> None:
    from inference.lfw import lfw_dir, read_pairs

    lfw = lfw_dir(shared)
    fold6 = {path.split("/")[0] for p in read_pairs(lfw) if p.fold == 6 for path in (p.left, p.right)}
    chosen = chosen_images(lfw, (6,), per_person=2)
    names = [p.split("/")[0] for p in chosen]
    assert set(names) == fold6 and max(names.count(n) for n in set(names)) == 2


def _meta(threshold: float, fmr: float = 1e-3) -> dict:
    scores = np.random.default_rng(0).normal(0.0, 0.1, size=50_000)
    return {"threshold": threshold, "impostor_curve": ImpostorCurve.from_scores(scores).to_dict(),
            "threshold_source": f"false-match rate {fmr} on the calibration impostors (somewhere)"}


def test_bundle_thresholds_are_the_ones_the_service_applies() -> None:
    meta = _meta(0.31)
    curve = ImpostorCurve.from_dict(meta["impostor_curve"])
    rows = bundle_thresholds(meta, gallery=1000, fpir=0.01)
    assert rows["verify"] == (1e-3, 0.31)
    assert rows["fmr_1e-4"] == (1e-4, curve.threshold(1e-4))
    target, identify = rows["identify_n1000"]
    assert target == per_comparison_fmr(0.01, 1000)
    assert identify == max(0.31, curve.threshold(per_comparison_fmr(0.01, 1000)))


def test_a_bundle_of_another_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "sealed.json").write_text(json.dumps({**_meta(0.3), "source": {"checkpoint_sha256": "0" * 64}}))
    with pytest.raises(SystemExit, match="exported from another checkpoint"):
        load_models([f"other={folder}"], CHECKPOINT)
    with pytest.raises(SystemExit, match="give NAME=DIR"):
        load_models([str(folder)], CHECKPOINT)
    with pytest.raises(SystemExit, match="give --checkpoint"):
        load_models([f"other={folder}"], None)


def test_the_served_bundle_checked_end_to_end_on_new_faces(shared: Path, tmp_path: Path) -> None:
    """The CLI on a small face folder, a sealed bundle and a gateway model: every threshold row reports its target
    and counts that add up."""
    from inference.lfw import lfw_dir
    from tests.test_operating_points import _face_folder
    from training_jobs.threshold_check import main

    folder = _face_folder(tmp_path / "new", people=12, photos=2, lfw=lfw_dir(shared))
    out = tmp_path / "check.json"
    main(["--checkpoint", str(CHECKPOINT), "--model", f"served={BUNDLE}", "--model", f"gateway={GATEWAY}",
          "--root", str(folder), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["images"] == 24 and report["people"] == 12
    for name, meta_file in (("served", BUNDLE / "sealed.json"), ("gateway", GATEWAY / "model.json")):
        rows = report["models"][name]
        meta = json.loads(meta_file.read_text())
        assert rows["verify"]["threshold"] == meta["threshold"] and rows["verify"]["target_fmr"] == 1e-3
        for key in ("verify", "fmr_1e-4", "identify_n1000"):
            assert rows[key]["impostor_pairs"] == 24 * 23 // 2 - 12 and rows[key]["genuine_pairs"] == 12
