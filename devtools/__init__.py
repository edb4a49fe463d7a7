"""Drivers for the tests and the benchmarks, kept out of the production packages: `LocalStack` (the real
`privface` processes on free ports, one database each), the 3-process MPC `Cluster` and the JSON-lines
driver it runs. Nothing in the product imports them (tests/test_import_rules.py)."""
