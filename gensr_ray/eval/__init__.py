"""Evaluation: ranking metrics, faiss retrieval, baselines and the harness that scores them.

Nothing heavy is imported here: `metrics` is pure numpy, and faiss / torch are imported inside the
functions that need them, so `gensr --help` and test collection stay fast.
"""
