"""The CelebA validation set: LFW's layout and pairs format, people in one fold each, and a way to keep it out of
training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.lfw import read_pairs
from training_jobs import validation_set
from training_jobs.evaluate import parse_folds


def fake_sources(tmp_path: Path, people: int, photos: int) -> tuple[Path, Path]:
    """celeb_<k>/ folders of source photos split like the repository's train/test folders, and the aligned faces
    the prepare step would have written (one photo per person left unaligned: a detection failure)."""
    aligned = tmp_path / "aligned" / "faces"
    aligned.mkdir(parents=True)
    for k in range(people):
        for n in range(photos + 1):
            split = "train_dataset" if n % 3 else "test_dataset"
            folder = tmp_path / "people" / split / f"celeb_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{k:03d}{n:03d}"
            (folder / f"{name}.jpg").write_bytes(b"photo")
            if n:
                (aligned / f"{name}.jpg").write_bytes(f"face {k} {n}".encode())
    return tmp_path / "people", tmp_path / "aligned"


def test_build_lays_out_lfw_style_folds_with_each_person_in_one_fold(tmp_path):
    people, aligned = fake_sources(tmp_path, 20, 18)
    counts = validation_set.build(people, aligned, tmp_path / "val")
    assert counts == {"people": 20, "faces": 360, "pairs": 6000}
    pairs = read_pairs(tmp_path / "val")
    assert len(pairs) == 6000 and {p.fold for p in pairs} == set(parse_folds("1-10"))
    fold_of: dict[str, int] = {}
    for pair in pairs:
        left, right = pair.left.split("/")[0], pair.right.split("/")[0]
        assert (left == right) == pair.same
        for person in (left, right):
            assert fold_of.setdefault(person, pair.fold) == pair.fold
        assert (tmp_path / "val" / pair.left).is_file() and (tmp_path / "val" / pair.right).is_file()
    assert sum(p.same for p in pairs) == 3000 and len(set(fold_of)) == 20
    again = tmp_path / "again"
    validation_set.build(people, aligned, again)  # the same seed draws the same pairs
    assert (again / "pairs.txt").read_text() == (tmp_path / "val" / "pairs.txt").read_text()


def test_exclude_drops_exactly_the_validation_faces_from_a_kept_listing(tmp_path):
    people, aligned = fake_sources(tmp_path, 20, 18)
    validation_set.build(people, aligned, tmp_path / "val")
    kept = tmp_path / "kept.txt"
    kept.write_text("faces/000001.jpg\nfaces/utk 1.jpg\nfaces/019018.jpg\nfaces/celeba_9.jpg\n")
    validation_set.main(["exclude", "--kept", str(kept), "--validation", str(tmp_path / "val")])
    assert kept.read_text() == "faces/utk 1.jpg\nfaces/celeba_9.jpg\n"  # a name may hold a space


def test_too_few_people_is_refused_in_one_line(tmp_path, capsys):
    people, aligned = fake_sources(tmp_path, 5, 4)
    with pytest.raises(SystemExit, match="^error: .*5 people with >= 2 aligned faces; need 20$"):
        validation_set.main(["build", "--people", str(people), "--aligned", str(aligned), "--out", str(tmp_path / "v")])
    assert not (tmp_path / "v").exists()


def test_the_first_pairs_of_a_fold_span_its_people():
    """HeldoutSet's --pairs-per-fold takes each fold's first same and different pairs: they must not all come from
    the first person of the fold (as they would if the draw were sorted)."""
    faces = {f"p{k:02d}": [f"{k}-{n}" for n in range(18)] for k in range(60)}
    for fold in validation_set.draw_pairs(faces, np.random.default_rng(0)):
        assert len({p for p, _, _, _ in fold[:20]}) >= 3 and len({(p, q) for p, _, q, _ in fold[300:320]}) >= 3


def test_a_non_empty_output_folder_is_refused(tmp_path):
    people, aligned = fake_sources(tmp_path, 20, 18)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "stale.txt").write_text("from an earlier build")
    with pytest.raises(ValueError, match="not empty"):
        validation_set.build(people, aligned, tmp_path / "val")
