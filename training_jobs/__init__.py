"""privface training_jobs package."""
