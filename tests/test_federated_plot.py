"""plot_runs: the before -> after plot of federated runs (docs/federated_scale.png), in the gateway's venv
(matplotlib is not in .venv-federated, where tests/test_federated.py also runs)."""
from __future__ import annotations

import pytest


def test_the_run_plot_reads_before_and_after_and_refuses_a_report_without_them(tmp_path, capsys):
    """plot_runs draws one before -> after arrow per simulate report; a report measured after its last round
    only (or not at all) is refused in one line, and nothing is written."""
    import json

    from training_jobs.federated.plot_runs import before_after, main

    metrics = {"accuracy": 0.9, "tar_at_far_1e-3": 0.5}
    good = {"heldout": {"0": metrics, "20": {"accuracy": 0.95, "tar_at_far_1e-3": 0.7}}}
    assert before_after(good) == (metrics, good["heldout"]["20"])
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps({"heldout": {"20": metrics}}))
    main(["--run", f"a={tmp_path / 'good.json'}", "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["--run", f"b={tmp_path / 'bad.json'}", "--out", str(tmp_path / "q.png")])
    assert "b: the report has no held-out metrics before and after its rounds" in capsys.readouterr().err
    assert not (tmp_path / "q.png").exists()
