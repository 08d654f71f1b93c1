"""An on/off setting as an operator writes it (1/0, true/false, yes/no, on/off): one reading for every switch,
so the same word means the same thing in a source's settings and the cluster's."""

from __future__ import annotations

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def parse_switch(raw: str) -> bool:
    """True or False for a switch's value; ValueError for anything else (the caller names the setting)."""
    value = raw.strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"{raw!r} is not on or off: write 1 (on) or 0 (off)")
