"""`python -m scripts.config_table`: print the configuration table of the README from the settings classes
themselves and from the variables the SDK and the test hooks declare (no drift: tests/test_config_table.py
compares the README with this output)."""
from __future__ import annotations

from pydantic_settings import BaseSettings

from common.paths import PROJECT_ROOT

HEADER = "| setting | default | meaning |\n|---|---|---|"


def shown(default: object) -> str:
    """A default as the README shows it: project paths relative, tuples comma-separated."""
    if isinstance(default, tuple):
        default = ",".join(str(part) for part in default)
    return str(default).replace(str(PROJECT_ROOT.parent / "shared"), "../shared").replace(str(PROJECT_ROOT),
                                                                                           "<project>")


def rows(settings_cls: type[BaseSettings]) -> list[str]:
    prefix = settings_cls.model_config.get("env_prefix", "")
    out = []
    for name, field in settings_cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        out.append(f"| `{prefix}{name.upper()}` | `{shown(default)}` | {field.description or ''} |")
    return out


def variable_rows(variables: dict[str, tuple[str, str]]) -> list[str]:
    return [f"| `{name}` | `{default}` | {meaning} |" for name, (default, meaning) in variables.items()]


def table() -> str:
    from app import failpoints
    from app.services import federated_job
    from app.settings import GatewaySettings
    from client import environment
    from secure import sealed_box
    from secure.mpc.settings import MpcSettings
    from secure.party.settings import PartySettings
    from training_jobs import datasets

    lines = [HEADER]
    for cls in (GatewaySettings, PartySettings, MpcSettings):
        lines += rows(cls)
    for variables in (environment.VARIABLES, failpoints.VARIABLES, federated_job.VARIABLES, sealed_box.VARIABLES,
                      datasets.VARIABLES):
        lines += variable_rows(variables)
    return "\n".join(lines)


def main() -> None:
    print(table())


if __name__ == "__main__":
    main()
