"""The dependency rules of the house, for every pair of top-level packages (imports read with ast):

    privface -> app, secure, inference, client, common, training_jobs   (composition root of the `privface`
                command; training_jobs only for a device's `privface client federated join`)
    app -> inference, secure, common      training_jobs -> inference, common    migrations -> app, secure
    secure -> common                      inference -> common                   client -> inference.transform only
    common -> (nothing of ours)           devtools -> app, secure, common (test drivers; nothing imports them)

Nothing imports `privface` (it is the root), and every top-level package of the repository is in the table, so a
new package cannot escape the rules. A new edge of any kind fails this test.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "privface": {"app", "secure", "inference", "client", "common", "training_jobs"},
    "app": {"inference", "secure", "common"},
    "secure": {"common"},
    "inference": {"common"},
    "training_jobs": {"inference", "common"},
    "migrations": {"app", "secure"},
    "client": {"inference.transform"},  # module-level rule: the SDK shares the transform and nothing else
    "common": set(),
    "devtools": {"app", "secure", "common"},
}
PACKAGES = tuple(ALLOWED)
# Top-level folders that are not part of the product: they may import any of it, and nothing imports them.
OUTSIDE = {"tests", "bench", "scripts"}


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
    if top == package:
        return True
    if top in OUTSIDE:
        return False
    if top not in PACKAGES:
        return True  # a third-party or standard-library module
    rules = ALLOWED[package]
    return top in rules or any(module == r or module.startswith(r + ".") for r in rules)


def test_every_import_between_our_packages_follows_the_rules() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            offenders += [f"{rel}: {m}" for m in sorted(imports_of(path)) if not allowed(package, m)]
    assert offenders == [], "imports against the dependency rules:\n" + "\n".join(offenders)


def test_every_top_level_package_has_rules() -> None:
    folders = {p.parent.name for p in ROOT.glob("*/*.py") if not p.parent.name.startswith(".")}
    assert folders - OUTSIDE == set(PACKAGES)


def test_the_rules_catch_a_forbidden_edge() -> None:
    assert not allowed("inference", "secure.sharing") and not allowed("client", "inference.runtime")
    assert not allowed("secure", "app.settings") and allowed("client", "inference.transform")
    assert not allowed("app", "training_jobs.train") and allowed("migrations", "app.models")
    assert not allowed("app", "client.cli") and allowed("privface", "client.cli")  # only the root wires the SDK
    assert not allowed("app", "privface.cli") and not allowed("secure", "privface.roles")
    assert allowed("secure", "common.problems") and not allowed("common", "app.settings")
    assert not allowed("app", "tests.conftest") and not allowed("inference", "bench.latency")
    assert not allowed("app", "devtools.localstack") and not allowed("secure", "devtools.mpc_cluster")
