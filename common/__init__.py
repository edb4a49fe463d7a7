"""The shared layer: what the gateway (`app/`), the parties (`secure/`), the model code (`inference/`,
`training_jobs/`) and the `privface` command all need once — project paths, settings constants read by more
than one process, RFC 9457 problem details, the database engine factory, the log format and request id.

It imports nothing of ours (tests/test_import_rules.py), so every package may depend on it without cycles.
"""
