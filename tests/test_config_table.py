"""The README's configuration table is exactly what scripts/config_table.py prints, and it names every
PRIVFACE_* environment variable that the product's code reads."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from scripts.config_table import table
from tests.test_import_rules import ALLOWED

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^PRIVFACE_[A-Z0-9_]*[A-Z0-9]$")  # a whole name, not a prefix such as "PRIVFACE_PARTY_"


def readme_table() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| setting | default | meaning |")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def names_in_code() -> dict[str, str]:
    """Every string constant of the product that is a whole PRIVFACE_* name -> one file that holds it."""
    found: dict[str, str] = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            pieces = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}  # f"..{x}.."
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME.match(node.value) \
                        and id(node) not in pieces:
                    found.setdefault(node.value, str(path.relative_to(ROOT)))
    return found


def test_the_readme_table_is_the_generated_one() -> None:
    assert readme_table() == table(), "run `python -m scripts.config_table` and paste its output into README.md"


def test_every_variable_the_code_reads_is_in_the_table() -> None:
    documented = set(re.findall(r"^\| `(PRIVFACE_\w+)`", table(), re.MULTILINE))
    missing = {name: path for name, path in names_in_code().items() if name not in documented}
    assert missing == {}, f"PRIVFACE_* names in the code but not in the configuration table: {missing}"


def test_the_check_sees_the_variables_read_outside_the_settings_classes() -> None:
    names = names_in_code()
    assert {"PRIVFACE_YUNET_PATH", "PRIVFACE_URL", "PRIVFACE_FAILPOINTS"} <= set(names)
