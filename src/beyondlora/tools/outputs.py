"""What every tool checks before it writes: the output is none of its inputs, unless the user says so."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def _same(first: Path, second: Path) -> bool:
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def check_output(output: str | Path, inputs: Sequence[tuple[str | Path, str]], overwrite: bool) -> None:
    """Raise ``ValueError`` when ``output`` is one of ``inputs`` (``(path, what it is)`` pairs; the same path or
    file) and ``overwrite`` is not set: a tool never replaces what it reads by accident."""
    for source, role in inputs:
        if not overwrite and _same(Path(output), Path(source)):
            raise ValueError(
                f"{output} is {role} itself, an input of this command: choose another output path, or pass "
                "--overwrite (overwrite=True) to replace it"
            )
