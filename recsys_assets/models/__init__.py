"""Torch models: two-tower retrieval, the ranker, its calibration, the versioned bundle."""
