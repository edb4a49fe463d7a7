"""The admin console's routes and the admin API it uses, in process (SQLite, no parties needed).

Auth: every admin route refuses a missing, unknown, revoked or non-admin key. CSRF: a credential only
counts in the Authorization header, so a cross-site form post or a cookie gets 401 and changes nothing; no CORS
header lets another origin read an answer. XSS: the console page is static (no server data in it), served with
a strict CSP, and its script never turns a string into HTML. Keys and tenants: create, rotate, revoke, the
last admin key kept, tenant isolation. The browser side: tests/test_console_browser.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from app.auth import create_api_key, ensure_tenant
from app.db import session_scope
from app.main import create_app
from app.models import ApiKey, Job, ModelVersion
from app.routers.console import CONSOLE_DIR
from app.settings import GatewaySettings
from tests.test_gateway_api import assert_problem, auth

XSS = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("console-units")
    settings = GatewaySettings(env="test", database_url=f"sqlite:///{workdir / 'gateway.db'}",
                               model_dir=workdir / "models", bundled_model_dir="", redis_url=None,
                               party_urls="http://127.0.0.1:9,http://127.0.0.1:9")  # no party is needed here
    app = create_app(settings)
    with TestClient(app) as client:
        client.ctx = app.state.ctx
        yield client


def new_key(gateway, tenant: str, *scopes: str) -> str:
    with session_scope(gateway.ctx.sessions) as session:
        ensure_tenant(session, tenant)
        return create_api_key(session, tenant, list(scopes), gateway.ctx.settings.secret_key)


def key_count(gateway, tenant: str) -> int:
    with session_scope(gateway.ctx.sessions) as session:
        return session.query(ApiKey).filter(ApiKey.tenant_id == tenant).count()


# -- the page itself ------------------------------------------------------------------------------------------

def test_console_page_and_assets_are_local_static_and_locked_down(gateway):
    page = gateway.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "form-action 'none'"):
        assert directive in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(links) == ["/console/console.css", "/console/console.js"]
    assert gateway.get("/console/console.js").headers["content-type"].startswith("text/javascript")
    assert gateway.get("/console/console.css").headers["content-type"].startswith("text/css")
    for outside in ("/console/index.html.bak", "/console/..%2Fmain.py", "/console/%2e%2e%2frouters%2fconsole.py"):
        assert_problem(gateway.get(outside), 404, "not-found")
    assert "/console" not in gateway.get("/openapi.json").text  # not an API operation


def test_console_files_load_nothing_remote_and_never_parse_strings_as_html():
    for path in CONSOLE_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), path  # no CDN, no font
    script = (CONSOLE_DIR / "console.js").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "DOMParser", "createContextualFragment", "setTimeout(\"", "setInterval(\""):
        assert sink not in code, f"console.js uses {sink}"
    assert "localStorage" not in code and "document.cookie" not in code  # the key: this tab only, never a cookie
    assert "<script" not in (CONSOLE_DIR / "index.html").read_text().split("</head>")[1]  # no inline script


def test_the_page_holds_no_server_data(gateway):
    """User strings reach the browser only as JSON, which the script puts in as text: the HTML is constant."""
    admin = new_key(gateway, "page-tenant", "admin")
    before = gateway.get("/console").text
    assert gateway.post("/v1/admin/tenants", json={"id": "xss-page", "name": XSS}, headers=auth(admin)).status_code == 201
    assert gateway.get("/console").text == before
    assert XSS not in before


# -- auth and CSRF --------------------------------------------------------------------------------------------

ADMIN_ROUTES = [("GET", "/v1/admin/tenant", None), ("POST", "/v1/admin/tenants", {"id": "t-auth", "name": "T"}),
                ("GET", "/v1/admin/keys", None), ("POST", "/v1/admin/keys", {"scopes": ["verify"]}),
                ("POST", "/v1/admin/keys/000000000000/revoke", None), ("POST", "/v1/admin/keys/000000000000/rotate", None),
                ("GET", "/v1/admin/audit", None), ("GET", "/v1/admin/jobs", None), ("GET", "/v1/admin/models", None)]


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
def test_admin_routes_refuse_missing_unknown_revoked_and_non_admin_keys(gateway, method, path, body):
    verify_only = new_key(gateway, "auth-tenant", "verify", "enroll")
    revoked = new_key(gateway, "auth-tenant", "admin")
    new_key(gateway, "auth-tenant", "admin")  # so that `revoked` is not the last admin key
    prefix = revoked.split("_")[1]
    keeper = new_key(gateway, "auth-tenant", "admin")
    assert gateway.post(f"/v1/admin/keys/{prefix}/revoke", headers=auth(keeper)).status_code == 200
    before = key_count(gateway, "auth-tenant")
    for headers, status in [({}, 401), (auth("pf_nope_nope"), 401), (auth(revoked), 401), (auth(verify_only), 403)]:
        response = gateway.request(method, path, json=body, headers=headers)
        assert_problem(response, status, "unauthorized" if status == 401 else "forbidden")
    assert key_count(gateway, "auth-tenant") == before


def test_a_cross_site_request_carries_no_credential_and_changes_nothing(gateway):
    """CSRF: what a forged form post or a cookie can carry is not a credential; CORS lets no other origin in."""
    admin = new_key(gateway, "csrf-tenant", "admin")
    before = key_count(gateway, "csrf-tenant")
    evil = {"Origin": "https://evil.example", "Referer": "https://evil.example/page"}
    form = gateway.post("/v1/admin/keys", content="scopes=admin", headers={
        **evil, "Content-Type": "application/x-www-form-urlencoded", "Cookie": f"key={admin}; Authorization=Bearer {admin}"})
    assert_problem(form, 401, "unauthorized")
    as_query = gateway.post(f"/v1/admin/keys?api_key={admin}&access_token={admin}", json={"scopes": ["admin"]},
                            headers=evil)
    assert_problem(as_query, 401, "unauthorized")
    assert key_count(gateway, "csrf-tenant") == before
    preflight = gateway.options("/v1/admin/keys", headers={**evil, "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in preflight.headers
    read = gateway.get("/v1/admin/keys", headers={**evil, **auth(admin)})
    assert "access-control-allow-origin" not in read.headers


# -- keys, tenants, audit, jobs, models -------------------------------------------------------------------------

def test_keys_are_created_rotated_and_revoked_within_the_tenant(gateway):
    admin = new_key(gateway, "keys-tenant", "admin")
    other = new_key(gateway, "other-tenant", "admin", "verify")
    created = gateway.post("/v1/admin/keys", json={"scopes": ["verify", "enroll"]}, headers=auth(admin))
    assert created.status_code == 201
    body = created.json()
    assert body["key"]["scopes"] == ["enroll", "verify"] and body["api_key"].startswith(f"pf_{body['key']['prefix']}_")
    assert gateway.get("/v1/transforms", headers=auth(body["api_key"])).status_code == 200
    listed = gateway.get("/v1/admin/keys", headers=auth(admin)).json()
    assert [k["prefix"] for k in listed][0] == body["key"]["prefix"]
    assert all(set(k) == {"prefix", "scopes", "created_at", "revoked_at"} for k in listed)  # never a secret

    rotated = gateway.post(f"/v1/admin/keys/{body['key']['prefix']}/rotate", headers=auth(admin)).json()
    assert rotated["replaces"] == body["key"]["prefix"] and rotated["key"]["scopes"] == ["enroll", "verify"]
    assert gateway.get("/v1/transforms", headers=auth(body["api_key"])).status_code == 401
    assert gateway.get("/v1/transforms", headers=auth(rotated["api_key"])).status_code == 200
    assert_problem(gateway.post(f"/v1/admin/keys/{body['key']['prefix']}/revoke", headers=auth(admin)), 409,
                   "api-key-revoked")
    revoked = gateway.post(f"/v1/admin/keys/{rotated['key']['prefix']}/revoke", headers=auth(admin))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"].endswith("Z")
    assert gateway.get("/v1/transforms", headers=auth(rotated["api_key"])).status_code == 401

    # another tenant's key is unknown here, and stays valid
    other_prefix = other.split("_")[1]
    for action in ("revoke", "rotate"):
        assert_problem(gateway.post(f"/v1/admin/keys/{other_prefix}/{action}", headers=auth(admin)), 404,
                       "api-key-not-found")
    assert gateway.get("/v1/admin/tenant", headers=auth(other)).json()["id"] == "other-tenant"

    # the last admin key is kept; rotating it is the way to replace it
    own = admin.split("_")[1]
    assert_problem(gateway.post(f"/v1/admin/keys/{own}/revoke", headers=auth(admin)), 409, "last-admin-key")
    assert gateway.get("/v1/admin/tenant", headers=auth(admin)).status_code == 200
    replaced = gateway.post(f"/v1/admin/keys/{own}/rotate", headers=auth(admin)).json()
    assert gateway.get("/v1/admin/tenant", headers=auth(admin)).status_code == 401
    assert gateway.get("/v1/admin/tenant", headers=auth(replaced["api_key"])).status_code == 200

    for bad in ({"scopes": []}, {"scopes": ["root"]}, {"scopes": "admin"}, {"scopes": ["verify"], "tenant": "x"}):
        assert_problem(gateway.post("/v1/admin/keys", json=bad, headers=auth(replaced["api_key"])), 422,
                       "validation-error")


def test_tenants_are_onboarded_with_one_admin_key_and_names_kept_verbatim(gateway):
    admin = new_key(gateway, "onboarding-tenant", "admin")
    created = gateway.post("/v1/admin/tenants", json={"id": "globex.eu-1", "name": XSS}, headers=auth(admin))
    assert created.status_code == 201
    body = created.json()
    assert body["tenant"]["id"] == "globex.eu-1" and body["tenant"]["name"] == XSS
    theirs = auth(body["admin_key"])
    assert gateway.get("/v1/admin/tenant", headers=theirs).json()["name"] == XSS
    assert [k["scopes"] for k in gateway.get("/v1/admin/keys", headers=theirs).json()] == [["admin", "enroll", "verify"]]
    assert gateway.get("/v1/admin/tenant", headers=auth(admin)).json()["id"] == "onboarding-tenant"
    assert_problem(gateway.post("/v1/admin/tenants", json={"id": "globex.eu-1", "name": "again"}, headers=auth(admin)),
                   409, "tenant-exists")
    for bad in ({"id": "a/b", "name": "x"}, {"id": "", "name": "x"}, {"id": "ok", "name": ""},
                {"id": "ok", "name": "x" * 201}, {"id": "ok", "name": "x", "epsilon_max": 1}):
        assert_problem(gateway.post("/v1/admin/tenants", json=bad, headers=auth(admin)), 422, "validation-error")


def test_the_audit_log_is_per_tenant_newest_first_and_pages_back(gateway):
    admin = new_key(gateway, "audit-tenant", "admin")
    other = new_key(gateway, "audit-other", "admin")
    for n in range(3):
        gateway.post("/v1/admin/keys", json={"scopes": ["verify"]}, headers={**auth(admin), "X-Request-ID": f"req-{n}"})
    entries = gateway.get("/v1/admin/audit", headers=auth(admin)).json()
    assert [e["action"] for e in entries] == ["create-api-key"] * 3
    assert [e["request_id"] for e in entries] == ["req-2", "req-1", "req-0"]  # the entry names its request
    assert entries[0]["id"] > entries[1]["id"] > entries[2]["id"] and entries[0]["at"].endswith("Z")
    older = gateway.get(f"/v1/admin/audit?limit=1&before_id={entries[0]['id']}", headers=auth(admin)).json()
    assert [e["id"] for e in older] == [entries[1]["id"]]
    assert gateway.get("/v1/admin/audit", headers=auth(other)).json() == []
    for query in ("limit=0", "limit=501", "before_id=0", "limit=x"):
        assert_problem(gateway.get("/v1/admin/audit?" + query, headers=auth(admin)), 422, "validation-error")


def test_jobs_are_listed_newest_first_and_models_name_their_preset(gateway):
    admin = new_key(gateway, "jobs-tenant", "admin")
    with session_scope(gateway.ctx.sessions) as session:
        for n in range(3):
            session.add(Job(id=f"job_list{n}", kind="register-model", params={"path": XSS}, status="succeeded"))
            session.flush()
        session.add(ModelVersion(version="vlist", path="vlist/model.onnx", sha256="0" * 64, transform_id="t",
                                 params_hash="0" * 16, embedding_dim=128, threshold=0.3, metrics={}, preset="strict"))
    jobs = gateway.get("/v1/admin/jobs?limit=2", headers=auth(admin)).json()
    assert [job["id"] for job in jobs] == ["job_list2", "job_list1"]
    assert jobs[0]["params"] == {"path": XSS}
    assert_problem(gateway.get("/v1/admin/jobs?limit=0", headers=auth(admin)), 422, "validation-error")
    models = gateway.get("/v1/admin/models", headers=auth(admin)).json()
    assert {m["version"]: m["preset"] for m in models}["vlist"] == "strict"


def test_console_router_module_is_thin():
    """The console adds no logic: it serves files; the admin logic stays in app/services."""
    source = Path(CONSOLE_DIR.parent / "routers" / "console.py").read_text()
    assert "sqlalchemy" not in source and "app.services" not in source
