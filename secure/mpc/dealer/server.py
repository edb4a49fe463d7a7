"""The dealer's process (rank 2): CrypTen's trusted-third-party server, hardened, plus the project's own requests.

``dealer_main`` is one generation (``dealer.run_dealer`` restarts them): it joins the parties' gloo group, agrees a
session key with each party (``link_keys.py``) and derives their AES-CTR streams (``crypten_rng.py``), then answers
party 0's requests until the group breaks. Requests are whitelisted (``DEALER_FUNCTIONS``) and time out. What it
computes never depends on data: Beaver triples and wrap/B2A material (CrypTen's TTP functions), the fixed-gallery
masks and per-query products c = A b (``fixed_gallery.DealerGalleryMasks``), and the comparison's corrections
(``correlations.dealer_corrections``, on a helper thread so they are ready when the scores are).
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from secure.mpc.settings import DEALER, MpcSettings
from secure.mpc.runtime.session import die_with_parent, exit_now, init_crypten, resolve_device

DEALER_FUNCTIONS = frozenset({"additive", "square", "binary", "wraps", "B2A", "ping",
                              "fg_mask", "fg_query", "fg_reset", "cmp_corrections", "cmp_collect"})


def dealer_main(settings_data: dict[str, Any], generation: int) -> None:
    """Entry point of a dealer worker process: CrypTen's TTP server, hardened (timeouts, whitelist, ping)."""
    die_with_parent()
    from common.logs import configure_logging

    configure_logging()  # a forked worker starts without the dealer process's logging configuration
    log = logging.getLogger("privface.dealer")
    code = 3
    try:
        settings = MpcSettings(**settings_data)
        init_crypten(DEALER, settings)
        log.info("dealer generation %d connected", generation)
        _Dealer(settings).serve()
        code = 0
    except BaseException as exc:  # noqa: BLE001
        log.warning("dealer generation %d ended: %s: %s", generation, type(exc).__name__, exc)
    exit_now(None, code)


def _make_dealer_class() -> type[Any]:
    """The dealer's class, built once CrypTen is loaded (its TTPServer is the base; CrypTen has no types)."""
    from secure.mpc.runtime.crypten_compat import load_crypten

    load_crypten()
    from crypten.mpc.provider.ttp_provider import TTPServer

    class Dealer(TTPServer):  # type: ignore[misc]  # CrypTen is untyped: the base class is Any
        """CrypTen's TTPServer without its blocking constructor; requests are whitelisted and time out."""

        def __init__(self, settings: MpcSettings) -> None:  # noqa: D107 - do NOT call TTPServer.__init__ (it blocks)
            import crypten.communicator as comm

            self.comm = comm.get()
            self.ttp_group = self.comm.ttp_group
            self.comm_group = self.comm.ttp_comm_group
            self.device = "cpu"
            self.timeout = timedelta(seconds=float(settings.op_timeout_s))
            self.settings = settings
            self.cmp_keys: list[bytes] = []
            self._setup_generators()
            from secure.mpc.protocols.fixed_gallery import DealerGalleryMasks

            self.fg = DealerGalleryMasks(device=resolve_device(settings.device))
            self.cmp_last_stream = 0
            # corrections are computed on a helper thread (numpy and AES release the GIL) so that a job's
            # comparison material is ready when its scores are; at most one job's is pending
            from concurrent.futures import ThreadPoolExecutor

            self.cmp_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privface-dealer-cmp")
            self.cmp_pending: tuple[int, Any] | None = None

        def _setup_generators(self) -> None:
            """Replaces CrypTen's (seeds from torch.randint, sent in the clear): one authenticated key agreement
            per party (link_keys.py), AES-CTR streams derived from it (crypten_rng.py, prg.py)."""
            from secure.mpc.runtime import crypten_rng
            from secure.mpc.runtime import link_keys
            from secure.mpc.primitives import prg

            self.generators, self.generators_cuda, self.cmp_keys = [], [], []
            for rank in (0, 1):
                key = link_keys.agree_over_gloo(DEALER, rank, self.settings.link_secret(DEALER, rank),
                                                f"party{rank}-dealer")
                cpu, cuda = crypten_rng.generators_for(key)
                self.generators.append(cpu)
                self.generators_cuda.append(cuda)
                self.cmp_keys.append(prg.derive_key(key, prg.PURPOSE_COMPARE))

        def _recv_obj(self) -> Any:
            import torch
            import torch.distributed as dist
            from crypten.common import serial

            size = torch.tensor(1, dtype=torch.int32)
            self._wait(dist.irecv(size, src=0, group=self.ttp_group))
            data = torch.empty(size=(int(size),), dtype=torch.int8)
            self._wait(dist.irecv(data, src=0, group=self.ttp_group))
            return serial.restricted_loads(data.numpy().tobytes())

        def _wait(self, work: Any) -> None:
            if work is None:  # only outside the TTP group, which the dealer is always in
                raise RuntimeError("the dealer is not in the TTP group")
            work.wait(self.timeout)

        def serve(self) -> None:
            ttp_rank = self.comm.get_ttp_rank()
            while True:
                message = self._recv_obj()
                if message == "terminate":
                    return
                function = message["function"]
                if function not in DEALER_FUNCTIONS:
                    raise RuntimeError(f"refused dealer request {function!r}")
                self.device = message["device"]
                result = getattr(self, function)(*message["args"], **message["kwargs"])
                self.comm.send_obj(result.size(), 0, self.ttp_group)
                self.comm.broadcast(result, ttp_rank, self.comm_group)

        def ping(self) -> Any:
            import torch

            return torch.zeros(1, dtype=torch.long)

        # fixed-gallery protocol (secure/mpc/protocols/fixed_gallery.py): masks kept per slot, fresh b per query
        def fg_reset(self, d: int) -> Any:
            import torch

            self.fg.reset(int(d))
            return torch.zeros(1, dtype=torch.long)

        def fg_mask(self, m: int, d: int) -> Any:
            import torch

            self.fg.add(self._get_generators(device="cpu"), int(m), int(d))
            return torch.zeros(1, dtype=torch.long)

        def fg_query(self, ranges: list[list[int]], d: int, batch: int = 0, use_floats: bool = False,
                     prefetch: tuple[Any, ...] | None = None) -> Any:
            if not 0 <= int(batch) <= 4096:
                raise RuntimeError("fixed-gallery batch out of range")
            if prefetch is not None:  # the same job's comparison corrections, collected later by cmp_collect
                self._start_corrections(*prefetch)
            return self.fg.query(self._get_generators(device="cpu"), [[int(a), int(b)] for a, b in ranges], int(d),
                                 int(batch), bool(use_floats))

        # dealer-bits comparison (secure/mpc/protocols/correlations.py): party 0's share of the job's correlated bits
        def cmp_corrections(self, kind: str, rows: int, batch: int, stream_id: int, dim: int = 0) -> Any:
            self._start_corrections(kind, rows, batch, stream_id, dim)
            return self.cmp_collect(stream_id)

        def cmp_collect(self, stream_id: int) -> Any:
            import numpy as np
            import torch

            pending, self.cmp_pending = self.cmp_pending, None
            if pending is None or pending[0] != int(stream_id):
                raise RuntimeError("no comparison corrections prepared for this stream")
            corr = pending[1].result(timeout=self.timeout.total_seconds())
            return torch.from_numpy(np.ascontiguousarray(corr).view(np.int64))

        def _start_corrections(self, kind: str, rows: int, batch: int, stream_id: int, dim: int = 0) -> None:
            from secure.mpc.protocols import correlations

            if int(stream_id) <= self.cmp_last_stream:
                raise RuntimeError("comparison PRG stream reused")
            self.cmp_last_stream = int(stream_id)
            plan = correlations.match_plan(str(kind), int(rows), int(batch), int(dim))
            self.cmp_pending = (int(stream_id), self.cmp_pool.submit(
                correlations.dealer_corrections, self.cmp_keys[0], self.cmp_keys[1], int(stream_id), plan))

        def additive(self, size0: Any, size1: Any, op: str, *args: Any, **kwargs: Any) -> Any:
            import torch

            a = self._get_additive_PRSS(size0)
            b = self._get_additive_PRSS(size1)
            if a.is_cuda:  # int64 matmul/conv is not implemented on CUDA: use CrypTen's float-split wrapper
                from crypten.cuda import CUDALongTensor

                c = getattr(torch, op)(CUDALongTensor(a), CUDALongTensor(b), *args, **kwargs)
                c = c.data if hasattr(c, "data") else c
            else:
                c = getattr(torch, op)(a, b, *args, **kwargs)
            return c - self._get_additive_PRSS(c.size(), remove_rank=True)

    return Dealer


def _Dealer(settings: MpcSettings) -> Any:  # noqa: N802
    return _make_dealer_class()(settings)
