"""privface inference package."""
