"""The per-worker training loop."""
