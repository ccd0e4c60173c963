"""Progress: a live bar (tqdm) with steps per second and recent return on a terminal; plain periodic lines
otherwise (CI logs, pipes), so a log file never fills with carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows training progress for `total` environment steps.

    Args:
        total: steps of the whole run.
        initial: steps already done (on resume).
        description: label (algorithm and environment).
        stream: where to write (stderr by default).
        enabled: False silences everything.
        line_every_s: interval of the plain lines when the stream is not a terminal.
    """

    def __init__(self, total: int, initial: int = 0, description: str = "", stream: TextIO | None = None,
                 enabled: bool = True, line_every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.total = total
        self.description = description
        self.enabled = enabled
        self.line_every_s = line_every_s
        self._last_line = time.monotonic()
        self._bar = None
        self.step = initial
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=description, unit="step", unit_scale=True,
                             file=self.stream, dynamic_ncols=True)

    def update(self, step: int, figures: dict[str, float]) -> None:
        """Move to `step` and show `figures` (e.g. {"sps": 12000, "return": 431.2})."""
        text = " ".join(f"{k}={v:.4g}" for k, v in figures.items())
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix_str(text, refresh=False)
        elif self.enabled and time.monotonic() - self._last_line >= self.line_every_s:
            self._last_line = time.monotonic()
            print(f"{self.description} step {step}/{self.total} {text}", file=self.stream, flush=True)
        self.step = step

    def close(self, message: str | None = None) -> None:
        """End the bar and print a final message."""
        if self._bar is not None:
            self._bar.close()
        if self.enabled and message:
            print(message, file=self.stream, flush=True)
