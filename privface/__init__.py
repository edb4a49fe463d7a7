"""The `privface` command: the one composition root that wires every role (gateway, party, dealer, worker,
client, the local stack) to the packages that implement it.

It lives outside `app/`, `secure/` and `client/` because it is the only code allowed to import all of them
(tests/test_import_rules.py): the gateway must not depend on the SDK, nor the parties on the gateway.
"""
