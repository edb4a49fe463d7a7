# The two commands of the README: `make run` (the whole local stack) and `make test` (every test).
.PHONY: run test install install-federated services

VENV := .venv
INSTALLED := $(VENV)/.installed

$(INSTALLED): pyproject.toml scripts/install.sh
	./scripts/install.sh

install: $(INSTALLED)

# Flower's pins clash with the gateway's (docs/federated.md): the federated worker and device client get their
# own venv. About 2 minutes and 1.7 GB the first time; tests/test_federated.py runs its Flower tests in it.
FED_INSTALLED := .venv-federated/.installed

$(FED_INSTALLED): pyproject.toml scripts/install_federated.sh
	./scripts/install_federated.sh

install-federated: $(FED_INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/privface run

services:
	./scripts/services.sh

test: $(INSTALLED) $(FED_INSTALLED) services
	PRIVFACE_ENV=test $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile
