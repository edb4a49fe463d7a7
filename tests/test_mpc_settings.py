"""The TFP guard: no non-test configuration may select CrypTen's TFP provider (party 0 would see every triple)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from secure.mpc.settings import MpcSettings


@pytest.fixture
def prod_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in ("PRIVFACE_ENV", "PRIVFACE_MPC_PROVIDER"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_default_provider_is_ttp(prod_env: pytest.MonkeyPatch) -> None:
    assert MpcSettings().provider == "TTP"
    assert MpcSettings().world_size() == 3


@pytest.mark.parametrize("env_value", [None, "", "prod", "production", "dev", "TEST-ish", "staging"])
def test_tfp_refused_outside_test_env(prod_env: pytest.MonkeyPatch, env_value: str | None) -> None:
    if env_value is not None:
        prod_env.setenv("PRIVFACE_ENV", env_value)
    prod_env.setenv("PRIVFACE_MPC_PROVIDER", "TFP")
    with pytest.raises(ValidationError, match="TFP"):
        MpcSettings()
    prod_env.delenv("PRIVFACE_MPC_PROVIDER")
    with pytest.raises(ValidationError, match="TFP"):
        MpcSettings(provider="TFP")
    for spelling in ("tfp", "Tfp", "HE", "none"):
        with pytest.raises(ValidationError):
            MpcSettings(provider=spelling)


def test_tfp_allowed_only_with_privface_env_test(prod_env: pytest.MonkeyPatch) -> None:
    prod_env.setenv("PRIVFACE_ENV", "test")
    assert MpcSettings(provider="TFP").provider == "TFP"


def test_worker_refuses_tfp_even_if_validation_bypassed(prod_env: pytest.MonkeyPatch) -> None:
    from secure.mpc.runtime.session import init_crypten

    forged = MpcSettings.model_construct(**{**MpcSettings().model_dump(), "provider": "TFP"})
    with pytest.raises(RuntimeError, match="TFP"):
        init_crypten(0, forged)


def test_the_gloo_interface_is_a_name_or_the_one_interface_in_a_subnet():
    """compose.yaml names the MPC network by its subnet: the parties sit on two networks whose interface names
    depend on attach order (secure/mpc/runtime/interfaces.py)."""
    from secure.mpc.runtime.interfaces import gloo_interface

    assert gloo_interface("eth7") == "eth7"  # a name is taken as given
    assert gloo_interface("127.0.0.0/8") == "lo"
    with pytest.raises(RuntimeError, match="expected one interface"):
        gloo_interface("198.51.100.0/24")  # TEST-NET-2: no interface here
