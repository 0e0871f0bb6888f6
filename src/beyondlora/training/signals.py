"""Ctrl-C and SIGTERM during training: remembered, so the loop can checkpoint and stop between steps."""

from __future__ import annotations

import signal
from typing import Any


class StopSignals:
    """SIGINT / SIGTERM set a flag; the loop checkpoints and exits at the end of the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, sig: int, frame: Any) -> None:
        self.signal = sig

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
