"""The parties' MPC runtime: the worker process of one generation (``worker.py``), its CrypTen session
(``session.py``, ``crypten_compat.py``, ``crypten_rng.py``, ``link_keys.py``), the leader/follower loops
(``party.py``), coalescing (``coalesce.py``), the engine<->worker messages (``messages.py``) and the parties'
direct link (``peer_link.py``). The engine that supervises workers is ``secure/mpc/engine.py``.
"""
