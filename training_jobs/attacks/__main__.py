"""`python -m training_jobs.attacks` runs the CLI."""

from training_jobs.attacks.cli import main

main()
