"""The environment a test gives a process it starts."""

from __future__ import annotations

import os


def clean_env(*prefixes: str) -> dict[str, str]:
    """A copy of ``os.environ`` without the variables whose names start with one of ``prefixes``: a process
    started with it reads only the settings its test sets (none of the ``EM_``/``DAGSTER_`` ones of the shell
    or of the test run around it)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
