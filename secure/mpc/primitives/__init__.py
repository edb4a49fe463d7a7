"""Primitives of the MPC: bit-slicing, the AES-CTR PRG, exact ring products through float64 BLAS.

Pure functions on numpy/torch arrays: no process, no link, no protocol state. (Fixed point and additive sharing
of the gateway's side are ``secure/fixedpoint.py`` and ``secure/sharing.py``.)
"""
