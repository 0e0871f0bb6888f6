"""The error type of the file formats and of the algorithms' file codecs."""

from __future__ import annotations


class FormatError(ValueError):
    """A module's tensors cannot be read or written in the requested format (the message names the file,
    key, shape or option at fault)."""


class FusedLayerError(FormatError):
    """Layers that a file format fuses into one key (Flux's ``qkv``, ``linear1``) hold adapters that one
    module of their algorithm cannot express exactly; names that keep the layers apart can."""
