"""Checks shared by every source's endpoint settings, so a bad run config fails at once, naming the field."""

from __future__ import annotations

from urllib.parse import urlparse


def check_url(name: str, value: str, schemes: tuple[str, ...], placeholder: str | None = None) -> None:
    """Raise ValueError unless ``value`` is a ``scheme://host/...`` URL (holding ``{placeholder}`` if given)."""
    parsed = urlparse(value)
    if parsed.scheme not in schemes or not parsed.netloc:
        raise ValueError(f"{name} must be a {'/'.join(schemes)}:// URL, not {value!r}")
    if placeholder and f"{{{placeholder}}}" not in value:
        raise ValueError(f"{name} must contain '{{{placeholder}}}', got {value!r}")


def check_retries(attempts: int, base_delay_s: float) -> None:
    if attempts < 1:
        raise ValueError(f"retry_attempts must be at least 1, not {attempts}")
    if base_delay_s < 0:
        raise ValueError(f"retry_base_delay_s must not be negative, not {base_delay_s}")
