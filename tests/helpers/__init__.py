"""Shared builders, reference formulas and device settings for the tests (importable as ``helpers.*``: pyproject.toml
puts tests/ on the path)."""
