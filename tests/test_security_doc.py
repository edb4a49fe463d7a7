"""docs/security.md: every claim names a test, and every test it names exists (a renamed test breaks this)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
TEST_ID = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def test_every_named_test_exists() -> None:
    text = DOC.read_text()
    ids = set(TEST_ID.findall(text))
    assert len(ids) >= 40
    missing = [f"{path}::{name}" for path, name in sorted(ids)
               if not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.MULTILINE)]
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_every_claim_row_names_a_test() -> None:
    section = DOC.read_text().split("## Claims and the tests that check them", 1)[1].split("\n#", 1)[0]
    table = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| area")]
    claims = [ln for ln in table if ln.count("|") >= 4 and not set(ln) <= set("|- ")]
    assert claims and all(TEST_ID.search(ln) for ln in claims), [ln for ln in claims if not TEST_ID.search(ln)]
