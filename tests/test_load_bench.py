"""bench/load.py in miniature: a real stack, concurrent verify and identify clients, 0 errors.

The full run (16 clients, 3 minutes, gallery 1,000) is in docs/operations.md; this one takes seconds of load
so that the benchmark itself cannot rot (a broken route, a refused payload or a 5xx fails it)."""
from __future__ import annotations

import pytest

from bench import load

pytestmark = pytest.mark.slow


def test_a_short_load_run_answers_every_request(tmp_path, shared):
    report = load.main(["--clients", "4", "--duration", "4", "--rounds", "1", "--gallery", "12",
                        "--settings", "tuned", "--workdir", str(tmp_path)])
    result = report["settings"]["tuned"]
    assert result["errors"] == 0, result["error_examples"]
    assert result["routes"]["verify"]["requests"] > 0 and result["routes"]["identify"]["requests"] > 0
    assert result["routes"]["verify"]["p50_ms"] > 0
    assert result["gateway_cpu_s"] > 0  # the gateway process did the work
    # each party's MPC runs in a child process of its server: counted with it (a server alone does far less)
    assert all(result["cpu_ms_per_request"][role] > 0 for role in ("gateway", "party0", "party1", "dealer"))


def test_unknown_settings_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        load.main(["--settings", "main,fastest"])
    assert "unknown settings ['fastest']" in capsys.readouterr().err


def test_the_verify_coalescing_bench_checks_every_answer_and_groups_only_where_on():
    """bench/verify_coalescing.py in miniature (two real clusters, one round): the figures in docs/internals.md come
    from answers that were each checked against plaintext."""
    from bench import verify_coalescing

    report = verify_coalescing.main(["--concurrent", "4", "--rounds", "1"])
    summary = report["summary"]
    assert summary["coalesced"]["wrong_answers"] == summary["alone"]["wrong_answers"] == 0
    assert summary["alone"]["largest_group"] == 1 and summary["coalesced"]["largest_group"] >= 2
