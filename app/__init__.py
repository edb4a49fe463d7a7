"""privface app package."""
