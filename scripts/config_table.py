"""`python -m scripts.config_table`: print the configuration table of the README from the settings classes themselves (no drift)."""
from __future__ import annotations

from pydantic_settings import BaseSettings

from common.paths import PROJECT_ROOT


def rows(settings_cls: type[BaseSettings]) -> list[str]:
    prefix = settings_cls.model_config.get("env_prefix", "")
    out = []
    for name, field in settings_cls.model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()
        if name in ("party_urls",) and isinstance(default, tuple):
            default = ",".join(default)
        root = str(PROJECT_ROOT)
        text = str(default).replace(str(PROJECT_ROOT.parent / "shared"), "../shared").replace(root, "<project>")
        out.append(f"| `{prefix}{name.upper()}` | `{text}` | {field.description or ''} |")
    return out


def main() -> None:
    from app.settings import GatewaySettings
    from secure.mpc.settings import MpcSettings
    from secure.party.settings import PartySettings

    print("| setting | default | meaning |\n|---|---|---|")
    for cls in (GatewaySettings, PartySettings, MpcSettings):
        print("\n".join(rows(cls)))


if __name__ == "__main__":
    main()
