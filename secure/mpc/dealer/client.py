"""Party 0's asynchronous requests to the dealer: CrypTen's ``TTPClient.ttp_request`` cut in two halves.

Why: the dealer's answer is often needed only at the end of a step (the fixed-gallery c = A b is added after
the parties' own products; the comparison bits after the scores), so party 0 sends the request, works, and
collects the answer later while the dealer computes in parallel. The dealer answers requests in order, so
``receive_result`` returns the oldest request not yet collected; every request must be collected. Keep at
most ONE request outstanding: a gloo send blocks until the receiver posts its receive, so a second request
sent while the dealer is sending its first answer deadlocks both (seen as a send timeout).
"""
from __future__ import annotations

from typing import Any


def send_request(function: str, *args: Any) -> None:
    """Party 0: the first half of CrypTen's TTPClient.ttp_request (send the request, do not wait)."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    from secure.mpc.runtime.crypten_compat import load_crypten

    comm = load_crypten().communicator.get()
    message = {"function": function, "device": "cpu", "args": args, "kwargs": {}}
    comm.send_obj(message, comm.get_ttp_rank(), TTPClient.get().ttp_group)


def receive_result() -> Any:
    """Party 0: the result (an int64 tensor) of the oldest request not yet collected."""
    import torch
    from crypten.mpc.provider.ttp_provider import TTPClient

    from secure.mpc.runtime.crypten_compat import load_crypten

    comm = load_crypten().communicator.get()
    client = TTPClient.get()
    size = comm.recv_obj(comm.get_ttp_rank(), client.ttp_group)
    result = torch.empty(size, dtype=torch.long)
    comm.broadcast(result, comm.get_ttp_rank(), client.comm_group)
    return result
