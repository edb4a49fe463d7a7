# The two commands of the README: `make run` (the whole local stack) and `make test` (every test).
.PHONY: run test install services

VENV := .venv
INSTALLED := $(VENV)/.installed

$(INSTALLED): pyproject.toml scripts/install.sh
	./scripts/install.sh

install: $(INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/privface run

services:
	./scripts/services.sh

test: $(INSTALLED) services
	PRIVFACE_ENV=test $(VENV)/bin/python -m pytest -q
