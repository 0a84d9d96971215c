"""Progress for long stages: a bar on a terminal, a few plain log lines otherwise."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger("pipeline.progress")
BARS = True  # on a terminal; off when logs must be JSON lines only


class Progress:
    def __init__(self, stage: str, total: int, unit: str):
        self.stage, self.total, self.unit, self.done = stage, total, unit, 0
        self._bar = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr) if BARS and sys.stderr.isatty() else None
        self._next_log = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.done / max(self.total, 1) >= self._next_log or self.done == self.total:
            log.info("%s: %d/%d %s", self.stage, self.done, self.total, self.unit)
            self._next_log = self.done / max(self.total, 1) + 0.25

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
