"""The one error a reader raises for a file it cannot read as the format it claims (its own module: the dtype
rules and the volume both raise it)."""


class FormatError(ValueError):
    """A source file cannot be read as the format it claims to be; the message names the file and what to do."""
