"""Progress on long loops, as throttled log records the CLI renders as a bar.

The library never prints: `track` logs ``progress`` records (at most a few per second);
`ProgressHandler` (installed by the CLI) draws them as one updating line on a terminal
and as occasional plain lines elsewhere.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_INTERVAL_S = 0.5


def track(items: Iterable[T], desc: str, total: int, logger: logging.Logger) -> Iterator[T]:
    last = 0.0
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if done == total or now - last >= _INTERVAL_S:
            last = now
            logger.info("%s %d/%d", desc, done, total, extra={"progress": (desc, done, total)})


class ProgressHandler(logging.StreamHandler):
    """Draws progress records as a bar (TTY) or a line every ~10%; other records as usual."""

    def __init__(self, stream=None):
        super().__init__(stream or sys.stderr)
        self._open = False
        self._shown: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        info = getattr(record, "progress", None)
        if info is None:
            self.close_line()
            return super().emit(record)
        desc, done, total = info
        tty = getattr(self.stream, "isatty", lambda: False)()
        if tty:
            width = 30
            filled = int(width * done / max(total, 1))
            self.stream.write(f"\rgpp-onnx: {desc:<18} [{'#' * filled}{'.' * (width - filled)}]"
                              f" {done}/{total}")
            self._open = done < total
            if not self._open:
                self.stream.write("\n")
        else:
            step = max(total // 10, 1)
            if done // step < self._shown.get(desc, -1):   # the loop again (a later round)
                del self._shown[desc]
            if done == total or done // step > self._shown.get(desc, -1):
                self._shown[desc] = done // step
                self.stream.write(f"gpp-onnx: {desc} {done}/{total}\n")
        self.flush()

    def close_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
