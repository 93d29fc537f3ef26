"""Progress of a long stage, as marker lines on the task's stdout.

A KFP task has no channel to its launcher but its log. `mtrec run` reads these lines from the
streamed logs of the running task and draws a progress bar; on a cluster they are ordinary,
throttled log lines.
"""

import json
import sys
import threading
import time

MARKER = "::mtrec-progress::"
MIN_INTERVAL_SECONDS = 0.25


def parse(line: str) -> dict | None:
    """The progress payload of a marker line ({"done", "total", "unit"}), None for other lines."""
    text = line.strip()
    if not text.startswith(MARKER):
        return None
    try:
        payload = json.loads(text[len(MARKER) :])
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


class Reporter:
    """Counts units of work and prints a marker at most every MIN_INTERVAL_SECONDS (and at the
    end). Thread-safe: Beam may call it from several bundles."""

    def __init__(self, unit: str, total: int | None = None):
        self.unit = unit
        self.total = total
        self.done = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def advance(self, amount: int = 1) -> None:
        with self._lock:
            self.done += amount
            now = time.monotonic()
            finished = self.total is not None and self.done >= self.total
            if finished or now - self._last >= MIN_INTERVAL_SECONDS:
                self._last = now
                self._emit()

    def _emit(self) -> None:
        payload = {"done": self.done, "total": self.total, "unit": self.unit}
        print(f"{MARKER} {json.dumps(payload)}", file=sys.stdout, flush=True)
