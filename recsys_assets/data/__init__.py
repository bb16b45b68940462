"""Source data: synthetic seeding, import of the user's files, and the raw-table reader."""

from recsys_assets.data.snapshot import RawDataMissing, read_raw, read_snapshot

__all__ = ["RawDataMissing", "read_raw", "read_snapshot"]
