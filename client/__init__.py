"""privface client package."""
