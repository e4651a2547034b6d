"""Number theory and statistics helpers."""
