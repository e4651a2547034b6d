"""Half-open integer intervals."""
