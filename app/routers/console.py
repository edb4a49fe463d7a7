"""The admin console: a static page and its script (app/console/), served by the gateway itself.

Why static: the console is a client of the JSON admin API (`app/routers/admin.py`, `admin_tenants.py`), so it
adds no server-side logic and no second way to authenticate. The admin key is typed into the page, kept in
the tab's sessionStorage and sent as a bearer header, never a cookie: a request another site makes the browser
send carries no credential, so the state-changing endpoints need no CSRF token. The page and its assets are
public (they hold no data) and go out with a strict Content-Security-Policy: only this origin's script and
style, no inline script, no framing, no external asset (the console works offline).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from app.problems import Problem

router = APIRouter(include_in_schema=False)
CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _file(name: str, media_type: str) -> Response:
    return Response((CONSOLE_DIR / name).read_bytes(), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/console")
def console_page() -> Response:
    """The console's one page; the script builds every view from the admin API."""
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/console/{asset}")
def console_asset(asset: str) -> Response:
    """The console's script and style sheet (a fixed list: nothing else under app/console is served)."""
    if asset not in ASSETS:
        raise Problem(404, "not-found", "Not Found", f"No console asset {asset!r}.")
    return _file(asset, ASSETS[asset])
