"""The package version (also in pyproject.toml); written into every adapter file's header."""

__version__ = "0.1.0"
