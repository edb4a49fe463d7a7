"""secure/ must not import the gateway, the SDK or the training code; settings defaults; run_party guard."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from secure.party.settings import PartySettings

SECURE = Path(__file__).resolve().parents[1] / "secure"
FORBIDDEN = ("app", "client", "training_jobs")


def test_secure_imports_no_gateway_client_or_training_code():
    offenders = []
    for path in SECURE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(SECURE)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_party_settings_defaults(monkeypatch):
    for name in ("PRIVFACE_INTERNAL_TOKEN", "PRIVFACE_PARTY_INTERNAL_TOKEN", "PRIVFACE_PARTY0_TOKEN",
                 "PRIVFACE_PARTY1_TOKEN", "PRIVFACE_PARTY_RANK"):
        monkeypatch.delenv(name, raising=False)
    s = PartySettings(rank=1)
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("var/party1.db")
    assert s.port == 8102
    # one development token per link, never the same for both parties
    assert PartySettings(rank=0).internal_token != s.internal_token and s.has_dev_token()
    monkeypatch.setenv("PRIVFACE_INTERNAL_TOKEN", "shared-token")  # the old shared token is ignored
    assert PartySettings().internal_token == "dev-party0-token"
    monkeypatch.setenv("PRIVFACE_PARTY0_TOKEN", "link0")
    monkeypatch.setenv("PRIVFACE_PARTY1_TOKEN", "link1")
    assert (PartySettings(rank=0).internal_token, PartySettings(rank=1).internal_token) == ("link0", "link1")
    monkeypatch.setenv("PRIVFACE_PARTY_INTERNAL_TOKEN", "party-token")
    monkeypatch.setenv("PRIVFACE_PARTY_RANK", "1")
    s = PartySettings()
    assert s.internal_token == "party-token" and s.rank == 1


def test_run_party_refuses_dev_token_off_loopback(tmp_path):
    from secure.party.server import run_party

    with pytest.raises(SystemExit):
        run_party(PartySettings(rank=0, host="0.0.0.0", internal_token="dev-internal-token",
                                database_url=f"sqlite:///{tmp_path / 'p.db'}"))
    assert not (tmp_path / "p.db").exists()  # refused before touching anything
