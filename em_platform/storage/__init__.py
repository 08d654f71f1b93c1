"""The storage root: one fsspec URL (local folder or s3://), with atomic publish; checksums."""

from em_platform.storage.store import DataStore, storage_options_for

__all__ = ["DataStore", "storage_options_for"]
