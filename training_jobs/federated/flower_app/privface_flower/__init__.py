"""privface's Flower App: thin entry points onto training_jobs.federated.deploy (no code of its own)."""
