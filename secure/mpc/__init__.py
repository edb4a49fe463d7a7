"""Two-party MPC engine (CrypTen over torch.distributed/gloo, with a separate TTP dealer).

Public entry points: ``secure.mpc.engine`` (MatchJob, MpcEngine, MpcUnavailable),
``secure.mpc.dealer.supervisor.run_dealer`` and ``secure.mpc.settings.MpcSettings``
(folder map: ``README.md``). Importing this package does not
import torch or CrypTen; only the per-generation worker processes do.
"""
