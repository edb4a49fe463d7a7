"""The shared layer (common/) is the only definition of what the gateway and the parties both need: project
paths, the deployment environment, the development credentials, the party API's batch limit, problem+json and
the database engine factory. A second definition anywhere in the product fails here; so does drift between the
gateway's and the parties' databases or error bodies."""
from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app.db import make_engine
from common.problems import Problem, install_problem_handlers
from secure.party.db import make_party_engine
from tests.test_import_rules import ALLOWED

ROOT = Path(__file__).resolve().parent.parent
OWNED_NAMES = {"PROJECT_ROOT", "ROOT", "VAR_DIR", "shared_dir", "MAX_QUERY_BATCH", "DEV_INTERNAL_TOKEN",
               "DEV_PARTY_TOKENS", "DEV_TOKENS", "DEV_SECRET_KEY", "dev_token", "PROBLEM_BASE", "PROBLEM_MEDIA_TYPE",
               "Problem", "PartyProblem"}
DEV_CREDENTIAL = re.compile(r"^dev-(party\d-token|internal-token|insecure-change-me)$")
ENV_READERS = {"get", "getenv", "environ"}


def product_modules() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(ROOT)), ast.parse(p.read_text())) for package in ALLOWED if package != "common"
            for p in sorted((ROOT / package).rglob("*.py"))]


def top_level_definitions(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def calls_named(tree: ast.Module, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def test_names_of_the_shared_layer_are_defined_only_there() -> None:
    twice = [f"{path}: {sorted(top_level_definitions(tree) & OWNED_NAMES)}" for path, tree in product_modules()
             if top_level_definitions(tree) & OWNED_NAMES]
    assert twice == []


def test_only_the_shared_layer_creates_database_engines() -> None:
    assert [path for path, tree in product_modules() if calls_named(tree, "create_engine")] == []


def test_only_the_shared_layer_reads_privface_env() -> None:
    raw = [path for path, tree in product_modules() for name in ENV_READERS for call in calls_named(tree, name)
           if call.args and isinstance(call.args[0], ast.Constant) and call.args[0].value == "PRIVFACE_ENV"]
    raw += [path for path, tree in product_modules() for n in ast.walk(tree) if isinstance(n, ast.Subscript)
            and isinstance(n.slice, ast.Constant) and n.slice.value == "PRIVFACE_ENV"]
    assert raw == []


def test_development_credentials_are_spelled_only_in_the_shared_layer() -> None:
    spelled = [path for path, tree in product_modules() for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and DEV_CREDENTIAL.match(n.value)]
    assert spelled == []


def test_the_rules_see_a_second_definition() -> None:
    tree = ast.parse("PROJECT_ROOT = 1\nimport os\nos.environ.get('PRIVFACE_ENV')\nx = 'dev-party0-token'\n")
    assert top_level_definitions(tree) & OWNED_NAMES == {"PROJECT_ROOT"}
    assert calls_named(tree, "get") and DEV_CREDENTIAL.match("dev-party0-token")


def pragmas(engine) -> dict[str, int]:  # noqa: ANN001
    with engine.connect() as conn:
        return {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "secure_delete")}


def test_gateway_and_party_sqlite_databases_behave_alike(tmp_path: Path) -> None:
    gateway = pragmas(make_engine(f"sqlite:///{tmp_path / 'g' / 'gateway.db'}"))
    party = pragmas(make_party_engine(f"sqlite:///{tmp_path / 'p' / 'party0.db'}"))
    assert {k: gateway[k] for k in ("journal_mode", "synchronous", "foreign_keys")} == {
        "journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}
    assert party == {**gateway, "secure_delete": 1}  # erased shares are zeroed in the file (whatever the build)


class Body(BaseModel):
    n: int


def problem_app(log: logging.Logger | None) -> TestClient:
    app = FastAPI()
    install_problem_handlers(app, "it failed", log)

    @app.post("/x")
    def x(body: Body) -> dict[str, int]:
        if body.n == 0:
            raise Problem(409, "conflict", "Conflict", "n is 0", headers={"Retry-After": "1"}, extra_field=1)
        raise RuntimeError("secret value 123")

    return TestClient(app, raise_server_exceptions=False)


def test_every_error_is_problem_json(caplog) -> None:  # noqa: ANN001
    client = problem_app(logging.getLogger("test.problems"))
    conflict = client.post("/x", json={"n": 0})
    assert conflict.status_code == 409 and conflict.headers["retry-after"] == "1"
    assert conflict.headers["content-type"] == "application/problem+json"
    assert conflict.json() == {"type": "https://privface.dev/problems/conflict", "title": "Conflict", "status": 409,
                               "detail": "n is 0", "instance": "/x", "extra_field": 1}
    invalid = client.post("/x", json={"n": "not a number"}).json()
    assert invalid["type"].endswith("/validation-error") and "not a number" not in str(invalid)
    assert client.get("/x").headers["allow"] == "POST"  # a 405 keeps its Allow header
    assert client.get("/nowhere").json()["type"].endswith("/not-found")
    with caplog.at_level(logging.ERROR, logger="test.problems"):
        failed = client.post("/x", json={"n": 1})
    assert failed.status_code == 500 and failed.json()["detail"] == "it failed"
    assert "RuntimeError" in caplog.text and "123" not in caplog.text  # the type is logged, never the message
