"""Alembic environments: gateway/ for the gateway database, party/ for each party database."""
