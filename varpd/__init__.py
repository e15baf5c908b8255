"""varpd (theory statement to be written)."""
