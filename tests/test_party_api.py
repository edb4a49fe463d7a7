"""The party's wire contract (secure/party/api.py): what the gateway's client sends is what the party reads."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from secure.party.api import MAX_QUERY_BATCH, CheckIn, GalleryIn, MatchIn, MatchOut, PrepareIn, output_text


def test_a_request_round_trips_through_json_under_the_gallery_name() -> None:
    check = CheckIn(kind="identify", gallery="v0/t1/k1", upto_seq=3, expected_committed=3)
    job = MatchIn(**check.model_dump(), job_id="j1", query_shares=["AAAAAAAAAAA="], timeout_s=5.0)
    wire = job.model_dump(mode="json", exclude_none=True)
    assert wire["gallery"] == "v0/t1/k1" and "model_version" not in wire and "threshold" not in wire
    assert MatchIn.model_validate(wire) == job
    assert "AAAA" not in repr(job)  # shares never appear in a repr (logs, tracebacks)


def test_the_former_field_name_is_still_read() -> None:
    """A gateway of the previous release writes model_version: a party of this one still serves it."""
    op = PrepareIn.model_validate({"seq": 1, "kind": "store", "model_version": "g", "template_seq": 1, "share": "x"})
    assert op.gallery == "g"
    assert GalleryIn.model_validate({"model_version": "g", "threshold": 0.5}).gallery == "g"
    assert MatchIn.model_validate({"job_id": "j", "kind": "verify", "model_version": "g", "upto_seq": 0}).gallery == "g"


def test_the_limits_are_enforced_on_both_sides() -> None:
    with pytest.raises(ValidationError):
        CheckIn(kind="identify", gallery="x" * 201, upto_seq=0)
    with pytest.raises(ValidationError):
        MatchIn(kind="identify", gallery="g", upto_seq=0, job_id="j", query_shares=["a"] * (MAX_QUERY_BATCH + 1))
    with pytest.raises(ValidationError):
        MatchIn(kind="identify", gallery="g", upto_seq=0, job_id="no spaces")
    assert output_text(-1) == str((1 << 64) - 1)
    out = MatchOut(job_id="j", share=output_text(5), n=2, labels_digest="d")
    assert MatchOut.model_validate(out.model_dump(mode="json", exclude_none=True)) == out
