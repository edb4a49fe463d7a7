"""What is shipped: the wheel (pyproject's package list) and the image (Dockerfile) hold every production
package of the import rules, and no test driver; the `privface` script points at the composition root."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.test_import_rules import ALLOWED

ROOT = Path(__file__).resolve().parent.parent
NOT_SHIPPED = {"devtools"}  # test drivers: in the repository, not in the wheel or the image
PRODUCT = set(ALLOWED) - NOT_SHIPPED


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_wheel_holds_every_production_package_and_no_driver() -> None:
    include = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert include == PRODUCT


def test_the_image_copies_every_production_package() -> None:
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert copied == PRODUCT


def test_the_privface_script_is_the_composition_root() -> None:
    assert pyproject()["project"]["scripts"]["privface"] == "privface.cli:main"
    assert (ROOT / "privface" / "__main__.py").exists()  # `python -m privface`, what the stacks start


def runnable_modules(package: str) -> set[str]:
    """Modules of `package` with a `if __name__ == "__main__":` block (a command of their own)."""
    return {str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")
            if re.search(r"^if __name__ == .__main__.:", p.read_text(), re.MULTILINE)}


def test_product_packages_hold_no_drivers_or_research_scripts() -> None:
    """Every process of the product starts through `privface`; the only other commands are the model export,
    its int8 copy and the sealed model's builder (each builds a servable version) and the SDK's own CLI. Drivers live in devtools/, measurements in
    training_jobs/."""
    found = set().union(*(runnable_modules(p) for p in ("app", "secure", "inference", "common", "client")))
    assert found == {"inference/export.py", "inference/quantize.py", "inference/sealed_export.py", "client/cli.py"}
