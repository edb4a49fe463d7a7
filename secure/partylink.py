"""One HTTP link from the gateway to a party: its pooled client, one request on it (``send``), and the two calls of
an MPC job, one per link (``send_job``).

The party closes an idle keep-alive connection after ``api.KEEP_ALIVE_S``; the pool here forgets one after
``POOL_IDLE_S``, a quarter of that, so the gateway does not send on a connection the party is closing. (With both
at 5 s, httpx's and uvicorn's defaults, a reused connection raced the party's close: about 2 of 600 enrollments
under load got a 503 "party 1 (ReadError)", docs/operations.md.) If a connection still drops before the answer
(``DROPPED``), a request that is idempotent at the party is sent once more (the pool has closed the dropped
connection, so on another); see ``send``.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import httpx

from common.logs import request_id_headers
from secure.party.api import KEEP_ALIVE_S
from secure.party.replies import CANCELLED, Reply

log = logging.getLogger("privface.coordinator")

POOL_IDLE_S = KEEP_ALIVE_S / 4  # an idle pooled connection is dropped here long before the party closes it
# The connection closed or was reset before the party's answer: what a pooled connection the party closed
# meanwhile gives. Connect errors are the transport's own retries; a timeout means a slow party: never resent.
DROPPED = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def tls_context(tls_verify: Any, client_cert: Any) -> Any:
    """httpx's ``verify``: a context for a CA bundle path or a client certificate, else ``tls_verify`` as it is."""
    if not isinstance(tls_verify, str) and client_cert is None:
        return tls_verify
    context = ssl.create_default_context(cafile=tls_verify if isinstance(tls_verify, str) else None)
    if tls_verify is False:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if client_cert is not None:  # mutual TLS: present our certificate to the parties
        certfile, keyfile = client_cert if isinstance(client_cert, tuple) else (client_cert, None)
        context.load_cert_chain(certfile, keyfile)
    return context


def make_client(url: str, token: str, timeout_s: float, verify: Any, transport_retries: int,
                pool_idle_s: float = POOL_IDLE_S) -> httpx.AsyncClient:
    """The pooled client of one party link (``pool_idle_s``: tests scale it down with the party's timeout)."""
    if not 0 < pool_idle_s:
        raise ValueError("pool_idle_s must be positive")
    transport = httpx.AsyncHTTPTransport(retries=transport_retries, verify=verify,
                                         limits=httpx.Limits(keepalive_expiry=pool_idle_s))
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                             timeout=httpx.Timeout(timeout_s + 5.0), transport=transport)


async def send(client: httpx.AsyncClient, rank: int, method: str, path: str, json: Any, timeout: float, *,
               idempotent: bool) -> Reply:
    """One request to party ``rank``; never raises (a transport failure is a Reply without status).

    ``idempotent``: the same request twice leaves the party as the request once, so one whose connection dropped
    (``DROPPED``) is sent once more (the dropped connection is closed, so on another); whether the first copy
    reached the party does not matter then. True for: a prepare (same seq, same body: the shares are not split
    again, and the op log answers an identical prepare with its state, ``oplog.prepare``), a commit or abort
    (idempotent there), a gallery registration with the same policy, and the reads (GETs, the precheck, the
    sealed key). False for a match job: the parties run it as one MPC session, so resending one party's half
    could start a session its peer never joins (the parties fall out of step), and whether traffic is resent
    would depend on how the job went; its 503 goes to the caller, who may send a new job.
    """
    for attempt in (1, 2):
        try:
            resp = await client.request(method, path, json=json, headers=request_id_headers(),
                                        timeout=httpx.Timeout(timeout))
            break
        except DROPPED as exc:
            if idempotent and attempt == 1:
                log.info("party %d %s %s: %s before the answer; sent again", rank, method, path,
                         type(exc).__name__)
                continue
            log.warning("party %d %s %s: %s", rank, method, path, type(exc).__name__)
            return Reply(rank, None, None, exc)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            log.warning("party %d %s %s: %s", rank, method, path, type(exc).__name__)
            return Reply(rank, None, None, exc)
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code >= 400:
        log.warning("party %d %s %s -> %d %s", rank, method, path, resp.status_code,
                    body.get("type") if isinstance(body, dict) else "")
    return Reply(rank, resp.status_code, body)


async def send_job(clients: list[httpx.AsyncClient], bodies: list[dict[str, Any]], timeout: float,
                   path: str) -> list[Reply]:
    """Both calls of an MPC job (never resent), party 0's reply first. If one party refuses quickly (4xx), the
    other's call is cancelled (its reply: ``CANCELLED``) rather than waited for until its MPC timeout."""
    tasks = [asyncio.create_task(send(clients[rank], rank, "POST", path, bodies[rank], timeout, idempotent=False))
             for rank in (0, 1)]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done)).result()
        if pending and first.status is not None and 400 <= first.status < 500:
            for t in pending:
                t.cancel()
            replies = [first, first]
            replies[1 - first.rank] = Reply(1 - first.rank, CANCELLED, {"type": "cancelled"})
            return replies
        await asyncio.wait(tasks)
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
