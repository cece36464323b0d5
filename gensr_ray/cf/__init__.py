"""Collaborative-filtering pretraining: the LightGCN tables GenSR's CF view reads (frozen).

Import `gensr_ray.cf.lightgcn` directly; torch is only imported when training.
"""
