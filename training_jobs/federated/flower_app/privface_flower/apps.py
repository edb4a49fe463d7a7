"""The components named in pyproject.toml: the ServerApp and the ClientApp of training_jobs.federated.deploy."""

from training_jobs.federated.deploy import client_app, server_app

serverapp = server_app()
clientapp = client_app()
