"""Offline evaluation: temporal holdout, ranking metrics, baselines, and `recsys evaluate`."""
