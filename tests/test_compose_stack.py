"""The production topology as containers: the image built from the Dockerfile and the shipped compose.yaml
brought up (gateway, worker, two parties each with its own PostgreSQL, dealer, Redis; TLS + mTLS + pin between
gateway and parties; per-link secrets from `privface certs`), then a real enroll / verify / identify of face
photos through it with the SDK.

This project's machines reach neither Docker Hub nor the PyTorch index, so the images come from
scripts/docker_local.sh (a Debian base made by debootstrap, the torch wheel on disk) and
docker/compose.local.yaml swaps PostgreSQL and Redis for images built from Debian's packages; everything else
is compose.yaml as shipped. The image is rebuilt from this checkout on every run (Docker's layer cache keeps
that to the code layers). Skips, saying why, only when no container engine answers on this machine."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client.sdk import PrivfaceClient
from devtools.net import free_port
from tests.test_client_detect import FACES

pytestmark = pytest.mark.timeout(2400)  # a first image build on a loaded 2-core machine takes ~16 min
ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ["docker-compose", "-f", str(ROOT / "compose.yaml"), "-f", str(ROOT / "docker" / "compose.local.yaml")]
IMAGE_UID = 10001  # the image's non-root user (Dockerfile): it must be able to read its key files


def engine_missing() -> str | None:
    """Why the container test cannot run here, or None."""
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on this machine (apt-get install docker.io docker-compose debootstrap)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return "the Docker engine is not running (scripts/services.sh starts dockerd when it is installed)"
    return None


def run(args: list[str], env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout




def compose_env(tmp: Path, shared: Path) -> dict[str, str]:
    """`privface certs` output as the operator would use it: certificates mounted, pins and secrets as env."""
    certs = tmp / "certs"
    run(["python", "-m", "privface", "certs", "--out", str(certs)], {**os.environ, "PYTHONPATH": str(ROOT)}, 120)
    for key in certs.glob("*.key"):  # the operator's step (docs/docker.md): keys readable by the image's user
        os.chown(key, IMAGE_UID, -1)
    env = dict(os.environ)
    for name in ("pins.env", "secrets.env"):
        for line in (certs / name).read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
    env.update(PRIVFACE_CERTS_DIR=str(certs), PRIVFACE_SHARED_DIR=str(shared),
               PRIVFACE_GATEWAY_PORT=str(free_port()), COMPOSE_PROJECT_NAME=f"pftest{secrets.token_hex(3)}")
    return env


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/readyz", timeout=5)
            if reply.status_code == 200:
                return
            last = f"{reply.status_code} {reply.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(2)
    raise AssertionError(f"the gateway at {url} was not ready within {timeout:.0f} s: {last}")


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory, shared) -> Iterator[tuple[str, dict[str, str]]]:
    why = engine_missing()
    if why:
        pytest.skip(why)
    env = compose_env(tmp_path_factory.mktemp("compose"), shared)
    run(["bash", "scripts/docker_local.sh"], env, 1800)
    try:
        run([*COMPOSE, "up", "-d", "--no-build"], env, 600)
        url = f"http://127.0.0.1:{env['PRIVFACE_GATEWAY_PORT']}"
        wait_ready(url, 300)
        yield url, env
    finally:
        logs = subprocess.run([*COMPOSE, "logs", "--no-color", "--tail", "40"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        print(logs.stdout[-8000:])
        subprocess.run([*COMPOSE, "down", "-v", "--remove-orphans"], cwd=ROOT, env=env, capture_output=True,
                       timeout=300)


def test_the_compose_stack_enrolls_verifies_and_identifies_faces(compose_stack):
    url, env = compose_stack
    key = run([*COMPOSE, "exec", "-T", "gateway", "privface", "create-api-key", "--tenant", "compose",
               "--scopes", "enroll", "verify"], env, 180).strip().splitlines()[-1]
    assert key.startswith("pf_"), key
    with PrivfaceClient(url, key, timeout=120) as client:
        subject = client.create_subject(external_id="james")["id"]
        client.enroll(subject, FACES / "James_Caan_0001.jpg")
        assert client.verify(subject, FACES / "James_Caan_0002.jpg") is True
        assert client.verify(subject, FACES / "Bill_Maher_0001.jpg") is False
        assert client.identify(FACES / "James_Caan_0002.jpg") == subject


def test_each_role_gets_only_its_own_secrets(compose_stack):
    """What compose.yaml promises: party R holds its own token and its two MPC link credentials, the dealer
    only its two, and only the gateway and worker hold the master secret."""
    _, env = compose_stack
    held = {}
    for service in ("gateway", "worker", "party0", "party1", "dealer"):
        out = run([*COMPOSE, "exec", "-T", service, "env"], env, 120)
        held[service] = {line.split("=", 1)[0] for line in out.splitlines()
                         if line.startswith(("PRIVFACE_SECRET_KEY", "PRIVFACE_PARTY0_TOKEN", "PRIVFACE_PARTY1_TOKEN",
                                             "PRIVFACE_MPC_SECRET_"))}
    assert held["party0"] == {"PRIVFACE_PARTY0_TOKEN", "PRIVFACE_MPC_SECRET_P0_DEALER", "PRIVFACE_MPC_SECRET_P0_P1"}
    assert held["party1"] == {"PRIVFACE_PARTY1_TOKEN", "PRIVFACE_MPC_SECRET_P1_DEALER", "PRIVFACE_MPC_SECRET_P0_P1"}
    assert held["dealer"] == {"PRIVFACE_MPC_SECRET_P0_DEALER", "PRIVFACE_MPC_SECRET_P1_DEALER"}
    for service in ("gateway", "worker"):
        assert held[service] == {"PRIVFACE_SECRET_KEY", "PRIVFACE_PARTY0_TOKEN", "PRIVFACE_PARTY1_TOKEN"}
