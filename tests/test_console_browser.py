"""The admin console in real headless Chromium against a real stack (gateway, both parties, dealer).

An operator logs in with an admin key (a key without the admin scope is refused), starts a short job and
watches it finish, activates the model version it registered, manages keys and tenants, reads the audit log
and the party health. User-provided strings (a tenant name, job params) that hold HTML are shown as text and
never run. Skipped when no chromium is installed (`apt-get install chromium`).

Screenshots for docs/console/ (the operators' guide shows them): `PRIVFACE_TEST_CONSOLE_SCREENSHOTS=1`.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3

import httpx
import pytest

from common.paths import PROJECT_ROOT
from devtools.localstack import LocalStack
from tests.chromium_cdp import Chromium, chromium_binary
from tests.test_gateway_api import auth

pytestmark = pytest.mark.slow
BUNDLED = PROJECT_ROOT / "inference" / "bundled"
SHOTS = PROJECT_ROOT / "docs" / "console"
XSS = '<img src=x onerror="window.__pwned=1">'
# the shape `federated_job` writes (docs/federated.md "Admin API"): two finished rounds of a 2-round run
FEDERATED_RESULT = {"version": "fed-demo", "status": "candidate", "seconds": 41.2, "rounds": [
    {"round": k, "of": 2, "sampled": 10, "finished": 10, "failed": 0, "train_seconds": 12.5 + k,
     "metrics": {"loss": 0.62 - 0.05 * k, "identity": 0.5, "distill": 0.1},
     "heldout": {"accuracy": 0.84 + 0.01 * k, "tar_at_far_1e-3": 0.3, "rank1": 0.2, "num_pairs": 600}}
    for k in (1, 2)]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared):
    if chromium_binary() is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    if not BUNDLED.is_dir():
        pytest.skip("no bundled models in this checkout")
    workdir = tmp_path_factory.mktemp("console-stack")
    models = workdir / "models"  # the bundled versions, plus a copy to register with a job and activate
    shutil.copytree(BUNDLED / "v1-accurate", models / "v1-accurate-b")
    meta = json.loads((models / "v1-accurate-b" / "model.json").read_text())
    meta["version"] = "v1-accurate-b"
    (models / "v1-accurate-b" / "model.json").write_text(json.dumps(meta))
    stack = LocalStack(workdir, model_dir=models, extra_env={"PRIVFACE_BUNDLED_MODEL_DIR": str(BUNDLED)}).start()
    yield stack
    stack.stop()


@pytest.fixture
def browser(tmp_path):
    with Chromium(chromium_binary(), tmp_path / "profile") as chromium:
        yield chromium


def shoot(browser: Chromium, name: str) -> None:
    """A screenshot for the docs, with every full API key on the page blanked (they are this stack's, but a
    committed image should not hold anything that looks like a credential)."""
    if os.environ.get("PRIVFACE_TEST_CONSOLE_SCREENSHOTS") == "1":
        browser.evaluate(r"""(() => { const key = /pf_([0-9a-f]{12})_[A-Za-z0-9_-]{20,}/g;
            for (const input of document.querySelectorAll('input')) input.value = input.value.replace(key, 'pf_$1_…');
            const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
            while (walk.nextNode()) walk.currentNode.nodeValue = walk.currentNode.nodeValue.replace(key, 'pf_$1_…');
            })()""")
        browser.screenshot(SHOTS / f"{name}.png")


def row(selector: str, text: str) -> str:
    """JS: the text of the table row matching `selector` whose text contains `text` ('' when none)."""
    return (f"([...document.querySelectorAll({json.dumps(selector)})].map(r => r.textContent)"
            f".find(t => t.includes({json.dumps(text)})) || '')")


def log_in(browser: Chromium, stack: LocalStack, key: str) -> None:
    browser.goto(stack.url + "/console")
    browser.type_into("#login-key", key)
    browser.click("#login-form button")


def test_console_login_job_activation_keys_audit_and_parties(stack, browser):
    admin_key = stack.api_key("admin", "enroll", "verify")
    verify_key = stack.api_key("verify")

    # a key without the admin scope is refused, and the console stays closed
    log_in(browser, stack, verify_key)
    assert "no admin scope" in browser.wait_for("document.getElementById('login-error').textContent")
    assert browser.evaluate("document.getElementById('console').hidden") is True
    assert browser.evaluate("sessionStorage.length") == 0

    log_in(browser, stack, admin_key)
    browser.wait_for("!document.getElementById('console').hidden")
    assert "tenant acme" in browser.text("#who")
    assert browser.evaluate("document.cookie") == ""  # the key is never a cookie
    browser.wait_for("document.querySelectorAll('#models tr[data-version]').length === 3")
    assert "active" in browser.evaluate(row("#models tr", "v5-balanced"))

    # start a short job (register the copied version) and watch it finish
    browser.click("nav button[data-tab=jobs]")
    browser.wait_for("document.querySelectorAll('#job-kind option').length > 0")
    browser.evaluate("document.getElementById('job-kind').value = 'register-model'")
    browser.type_into("#job-params", '{"path": "v1-accurate-b"}')
    browser.click("#job-form button")
    browser.wait_for("document.querySelector('#jobs tr[data-status=succeeded]') !== null", timeout=90)
    job = browser.evaluate(row("#jobs tr[data-job]", "register-model"))
    assert "succeeded" in job and "100%" in job and "done" in job
    assert browser.evaluate("document.querySelector('#jobs tr[data-job] progress').value") == 1

    # job params are user input: shown as text, never run
    browser.type_into("#job-params", json.dumps({"path": XSS}))
    browser.click("#job-form button")
    failed = browser.wait_for(f"{row('#jobs tr[data-job]', 'FileNotFoundError')}", timeout=90)
    assert "failed" in failed and XSS in failed and XSS.replace('"', '\\"') in failed  # message, params (JSON)
    assert browser.evaluate("document.querySelectorAll('#jobs img').length") == 0

    # a federated job's rounds, as the job writes them into its row
    with sqlite3.connect(stack.gateway_db.removeprefix("sqlite:///")) as db:
        db.execute("INSERT INTO jobs (id, kind, params, status, progress, message, result, created_at, updated_at) "
                   "VALUES ('job_fed0', 'federated', '{\"rounds\": 2}', 'succeeded', 1.0, 'done', ?, "
                   "'2026-12-01 03:00:00', '2026-12-01 03:01:00')", (json.dumps(FEDERATED_RESULT),))
    browser.wait_for("document.querySelectorAll('#jobs tr.rounds tbody tr').length === 2")
    assert "2 of 2" in browser.text("#jobs tr.rounds") and "0.860" in browser.text("#jobs tr.rounds")
    shoot(browser, "jobs")

    # activate the registered version: it takes over its preset, the version it replaces is retired
    browser.click("nav button[data-tab=models]")
    browser.wait_for(f"{row('#models tr', 'v1-accurate-b')}.includes('candidate')")
    browser.click("#models tr[data-version='v1-accurate-b'] button.activate")
    browser.wait_for(f"{row('#models tr[data-version]', 'v1-accurate-b')}.includes('active')", timeout=60)
    assert "retired" in browser.text("#models tr[data-version='v1-accurate']")
    served = httpx.get(stack.url + "/readyz", timeout=30).json()["checks"]["model"]["presets"]
    assert served["accurate"] == "v1-accurate-b"
    shoot(browser, "models")

    # keys: create one, see it once, revoke it; the API then refuses it
    browser.click("nav button[data-tab=tenant]")
    browser.wait_for("document.querySelectorAll('#keys tr[data-prefix]').length === 2")
    browser.click("#key-form input[value=verify]")
    browser.click("#key-form button")
    new_key = browser.wait_for("!document.getElementById('new-key').hidden && "
                               "document.getElementById('new-key-value').value")
    assert httpx.get(stack.url + "/v1/transforms", headers=auth(new_key)).status_code == 200
    prefix = new_key.split("_")[1]
    browser.wait_for(f"document.querySelector(\"#keys tr[data-prefix='{prefix}']\") !== null")
    browser.click(f"#keys tr[data-prefix='{prefix}'] button.revoke")
    browser.wait_for(f"document.querySelector(\"#keys tr[data-prefix='{prefix}']\").textContent.includes('revoked')")
    assert httpx.get(stack.url + "/v1/transforms", headers=auth(new_key)).status_code == 401

    # a tenant name is user input: shown as text, never run
    browser.type_into("#tenant-id", "globex")
    browser.type_into("#tenant-name", XSS)
    browser.click("#tenant-form button")
    browser.wait_for("!document.getElementById('new-tenant').hidden")
    assert XSS in browser.text("#new-tenant")
    globex_key = browser.evaluate("document.querySelectorAll('#new-tenant dd')[2].textContent")
    assert httpx.get(stack.url + "/v1/admin/tenant", headers=auth(globex_key)).json()["name"] == XSS
    shoot(browser, "tenant")

    browser.click("nav button[data-tab=audit]")
    browser.wait_for(f"{row('#audit tr', 'create-tenant')} !== ''")
    actions = browser.evaluate("[...document.querySelectorAll('#audit tbody tr td:nth-child(2)')].map(t => t.textContent)")
    assert {"create-job", "activate-model", "create-api-key", "revoke-api-key", "create-tenant"} <= set(actions)
    shoot(browser, "audit")

    browser.click("nav button[data-tab=parties]")
    for rank in (0, 1):
        browser.wait_for(f"document.querySelector(\"#parties tr[data-party='{rank}']\") !== null")
        assert browser.text(f"#parties tr[data-party='{rank}'] td:nth-child(2)") == "ok"
        assert browser.text(f"#parties tr[data-party='{rank}'] td:nth-child(3)") == "ok"
    shoot(browser, "parties")

    # the other tenant's admin sees its own tenant, whose name is text in the page too
    browser.click("#logout")
    assert browser.evaluate("sessionStorage.length") == 0
    log_in(browser, stack, globex_key)
    browser.wait_for("!document.getElementById('console').hidden")
    browser.click("nav button[data-tab=tenant]")
    browser.wait_for(f"document.getElementById('tenant').textContent.includes({json.dumps(XSS)})")
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    assert browser.evaluate("window.__pwned") is None
    assert browser.problems == [], browser.problems  # no script error, no CSP violation
