"""Committed transform data (per-channel DCT statistics); a package so that packaging ships the JSON."""
