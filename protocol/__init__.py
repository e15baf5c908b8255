"""protocol (theory statement to be written)."""
