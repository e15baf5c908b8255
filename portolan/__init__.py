"""portolan (theory statement to be written)."""
