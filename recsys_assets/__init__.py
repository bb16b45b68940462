"""recsys_assets."""
