"""privface secure package."""
