"""Training: the driver (launch), the per-worker loop, the worker side of distribution
(strategy) and the Ray Data input (dataset)."""
