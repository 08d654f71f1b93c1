"""The storage root: one fsspec URL (local folder or s3://), with atomic publish."""

from em_platform.storage.store import DataStore

__all__ = ["DataStore"]
