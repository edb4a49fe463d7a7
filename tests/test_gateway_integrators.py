"""What an integrator meets first, against a real stack: offline docs, the OpenAPI's errors and examples,
strict request schemas, and the README's walk-through run as written."""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from devtools.localstack import LocalStack
from tests.test_client_detect import FACES
from tests.test_gateway_api import assert_problem, auth, payload

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared):
    stack = LocalStack(tmp_path_factory.mktemp("integrators-stack")).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def key(stack) -> str:
    return stack.api_key("enroll", "verify", "admin")


@pytest.fixture(scope="module")
def openapi(stack) -> dict:
    return httpx.get(stack.url + "/openapi.json").json()


def count_subjects(stack: LocalStack) -> int:
    with sqlite3.connect(stack.gateway_db.removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT COUNT(*) FROM subjects").fetchone()[0]


# -- /docs and /redoc without internet --------------------------------------------------------------

class _AssetLinks(HTMLParser):
    """Every src/href of a page, and the `url:`/spec URLs its inline script names."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data: str) -> None:
        self.urls += re.findall(r"""(?:https?:)?//[^\s'"]+""", data)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(stack, page):
    response = httpx.get(stack.url + page)
    assert response.status_code == 200
    links = _AssetLinks()
    links.feed(response.text)
    assert links.urls, "the page names its assets"
    remote = [url for url in links.urls if url.startswith(("http:", "https:", "//"))]
    assert not remote, f"{page} loads assets from elsewhere: {remote}"
    for url in links.urls:
        asset = httpx.get(stack.url + url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url


def test_swagger_ui_renders_the_operations_in_headless_chromium(stack):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    # --dump-dom prints the DOM once the page (and Swagger UI's JS, fetching /openapi.json) has run
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                             "--dump-dom", stack.url + "/docs"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    for path in ("/v1/verify", "/v1/identify", "/v1/subjects/{subject_id}/enrollments", "/v1/transforms"):
        assert f'data-path="{path}"' in dom, f"Swagger UI did not render {path}"


# -- OpenAPI: problem+json errors, enums, examples the API accepts -----------------------------------

def operations(openapi: dict):
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_every_documented_error_is_a_problem_with_examples(openapi):
    assert set(openapi["components"]["schemas"]["Problem"]["required"]) >= {"type", "title", "status", "detail"}
    for path, method, operation in operations(openapi):
        for status, response in operation["responses"].items():
            if status[0] not in "45" or path == "/readyz":  # /readyz's 503 is its health report, by design
                continue
            content = response.get("content", {})
            assert list(content) == [PROBLEM], (method, path, status, list(content))
            assert content[PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}, (method, path, status)
            examples = content[PROBLEM].get("examples", {})
            assert examples, (method, path, status)
            for example in examples.values():
                assert example["value"]["status"] == int(status), (method, path, status, example)


def test_documented_statuses(openapi):
    assert "401" in openapi["paths"]["/v1/transforms"]["get"]["responses"]
    for path, method, operation in operations(openapi):
        if "requestBody" in operation:
            assert {"400", "413", "422"} <= set(operation["responses"]), (method, path)
    kind = openapi["components"]["schemas"]["JobCreate"]["properties"]["kind"]
    assert sorted(kind["enum"]) == ["export-model-v0", "federated", "register-model"]


def test_documented_request_examples_are_accepted_but_for_their_placeholder_features(stack, key, openapi):
    """Each example body, posted as documented (with a real subject id), is accepted; an example with
    features is refused only for its `data`, a placeholder (real features are 38 kB of base64): its
    transform, params_hash, shape and epsilon are those the gateway serves."""
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
    posted = 0
    for path, method, operation in operations(openapi):
        if "requestBody" not in operation:
            continue
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        name = schema["$ref"].split("/")[-1]
        for example in openapi["components"]["schemas"][name]["examples"]:
            body = {**example, "subject_id": subject} if "subject_id" in example else example
            response = httpx.request(method, stack.url + path.replace("{subject_id}", subject), json=body,
                                     headers=auth(key), timeout=60)
            posted += 1
            if "features" in example:
                assert_problem(response, 422, "invalid-encoding")
            elif "sealed" in example:  # this tenant is in gateway mode: refused before its envelopes are read
                assert_problem(response, 409, "tenant-mode")
            else:
                success = (200,) if method == "put" else (201, 202)  # PUT updates in place
                assert response.status_code in success, (method, path, response.text)
            if path == "/v1/admin/tenant/mode":  # the example switched the tenant to sealed mode: switch back
                back = httpx.put(stack.url + path, json={"mode": "gateway"}, headers=auth(key), timeout=60)
                assert back.status_code == 200, back.text
    assert posted == 13  # 6 + the admin console's tenant and API key bodies (one a metrics-only key) + sealed mode's 3 routes and its mode


def test_a_non_utf8_body_is_a_400_problem(stack, key):
    response = httpx.post(stack.url + "/v1/subjects", content=b'{"external_id": "\xff\xfe"}',
                          headers={**auth(key), "content-type": "application/json"})
    assert_problem(response, 400, "bad-request")


# -- strictness ------------------------------------------------------------------------------------

def test_unknown_fields_are_refused_and_change_nothing(stack, key):
    before = count_subjects(stack)
    response = httpx.post(stack.url + "/v1/subjects", json={"foo": 1}, headers=auth(key))
    assert_problem(response, 422, "validation-error")
    assert "foo" in response.json()["detail"]
    assert count_subjects(stack) == before


def test_numbers_are_not_coerced_from_strings(stack, key, spec_and_subject):
    spec, subject = spec_and_subject
    for override in ({"shape": [str(n) for n in spec.shape]}, {"epsilon": str(spec.epsilon_per_image)},
                     {"created_at": 1_800_000_000}):
        body = {"features": payload(spec, _blank_face(), **override)}
        response = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json=body, headers=auth(key))
        assert_problem(response, 422, "validation-error")


def test_response_timestamps_carry_a_timezone(stack, key):
    subject = httpx.post(stack.url + "/v1/subjects", json={"external_id": "tz"}, headers=auth(key)).json()
    again = httpx.get(f"{stack.url}/v1/subjects/{subject['id']}", headers=auth(key)).json()
    models = httpx.get(stack.url + "/v1/admin/models", headers=auth(key)).json()
    stamps = [subject["created_at"], again["created_at"]] + [m["created_at"] for m in models]
    for stamp in stamps:
        assert datetime.fromisoformat(stamp).tzinfo is not None, stamp


def test_405_names_the_allowed_methods(stack, key):
    response = httpx.delete(stack.url + "/v1/verify", headers=auth(key))
    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "POST"


def test_an_oversized_chunked_body_is_413(stack, key):
    def chunks():
        for _ in range(64):
            yield b" " * 65536  # 4 MiB in all, no Content-Length: sent chunked

    before = count_subjects(stack)
    response = httpx.post(stack.url + "/v1/subjects", content=chunks(),
                          headers={**auth(key), "content-type": "application/json"})
    assert_problem(response, 413, "payload-too-large")
    assert count_subjects(stack) == before


@pytest.fixture(scope="module")
def spec_and_subject(stack, key):
    from inference.transform import TransformSpec

    served = httpx.get(stack.url + "/v1/transforms", headers=auth(key)).json()
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
    return TransformSpec.from_dict(served[0]["spec"]), subject


def _blank_face():
    import numpy as np

    return np.zeros((112, 112, 3), np.uint8)


# -- the README's walk-through, as written ---------------------------------------------------------

WALKTHROUGH_MARK = "<!-- walkthrough: tests/test_gateway_integrators.py runs this block -->"


def readme_walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    assert WALKTHROUGH_MARK in readme, "the README marks its walk-through for this test"
    block = readme.split(WALKTHROUGH_MARK, 1)[1]
    match = re.match(r"\s*```bash\n(.*?)```", block, re.S)
    assert match, "the mark is followed by a ```bash block"
    return match.group(1)


def test_the_readme_walkthrough_runs_as_written(stack, tmp_path):
    """The README's commands, verbatim, in bash with `set -e`, against a real stack; only URL and KEY
    come from the test (as a reader sets them), and `privface` runs this checkout's code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "privface"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m privface "$@"\n')
    shim.chmod(0o755)
    for name, source in (("alice1.jpg", "James_Caan_0001.jpg"), ("alice2.jpg", "James_Caan_0002.jpg"),
                         ("probe.jpg", "James_Caan_0002.jpg")):
        shutil.copy(FACES / source, tmp_path / name)
    env = {**stack.env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "URL": stack.url,
           "KEY": stack.api_key("enroll", "verify", tenant="walkthrough")}
    script = "set -euo pipefail\n" + readme_walkthrough()
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    assert re.search(r'"id": "enr_\d+"', out), out
    assert '"match": true' in out and '"subject_id": "sub_' in out, out
    assert out.rstrip().endswith("204"), out
