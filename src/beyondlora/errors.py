"""The error type of the file formats and of the algorithms' file codecs."""

from __future__ import annotations


class FormatError(ValueError):
    """A module's tensors cannot be read or written in the requested format (the message names the file,
    key, shape or option at fault)."""
