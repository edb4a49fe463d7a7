"""Federated retraining on Flower (issue 11, FedFace setting): one identity per client, FedAvg on the server.

Modules without Flower (importable from the gateway's venv): `population` (who is a client and what it may
see), `params` (which parameters travel and their size), `local` (one client's training step on its own
photos), `spreadout` (the server's spread-out regulariser on the class vectors), `heldout` (before/after
evaluation on LFW folds 6-10). Modules with Flower (only in .venv-federated, see docs/federated.md):
`client_app`, `server_app`, `simulate`.
"""
