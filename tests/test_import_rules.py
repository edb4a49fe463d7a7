"""The dependency rules of the house, for every pair of top-level packages (imports read with ast):

    app -> inference, secure        training_jobs -> inference        client -> inference.transform only
    inference -> (nothing of ours)  secure -> (nothing of ours)       migrations -> app, secure (their ORM models)

One known exception is listed with its reason; a new edge of any kind fails this test.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "secure", "inference", "client", "training_jobs", "migrations")
ALLOWED = {
    "app": {"inference", "secure"},
    "secure": set(),
    "inference": set(),
    "training_jobs": {"inference"},
    "migrations": {"app", "secure"},
    "client": {"inference.transform"},  # module-level rule: the SDK shares the transform and nothing else
}
KNOWN_EXCEPTIONS = {
    # the `privface` entry point for every role still lives in app/cli.py and hands `privface client ...` to the
    # SDK's CLI; issue 14 moves that composition root out of app/
    ("app/cli.py", "client.cli"),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def allowed(package: str, module: str) -> bool:
    top = module.split(".")[0]
    if top not in PACKAGES or top == package:
        return True
    rules = ALLOWED[package]
    return top in rules or any(module == r or module.startswith(r + ".") for r in rules)


def test_every_import_between_our_packages_follows_the_rules() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            offenders += [f"{rel}: {m}" for m in sorted(imports_of(path))
                          if not allowed(package, m) and (rel, m) not in KNOWN_EXCEPTIONS]
    assert offenders == [], "imports against the dependency rules:\n" + "\n".join(offenders)


def test_the_rules_catch_a_forbidden_edge() -> None:
    assert not allowed("inference", "secure.sharing") and not allowed("client", "inference.runtime")
    assert not allowed("secure", "app.settings") and allowed("client", "inference.transform")
    assert not allowed("app", "training_jobs.train") and allowed("migrations", "app.models")
