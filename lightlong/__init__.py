"""lightlong."""
