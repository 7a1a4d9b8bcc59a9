"""Metric values on their way to MLflow: a bounded in-memory queue and the spill file that outlives a process.

Rows are ``(key, value, timestamp_ms, step)``. The queue keeps at most ``capacity`` values and drops the oldest
beyond that (an outage longer than the buffer loses the start of it, never the newest values). Values still queued
when a process gives up on the store are appended to ``<run_dir>/mlflow_pending.jsonl`` and sent by the next start
that resumes the same run.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from pathlib import Path

log = logging.getLogger("orchestrator.tracking")

PENDING_FILE = "mlflow_pending.jsonl"

Row = tuple  # (key: str, value: float, timestamp_ms: int, step: int)


class MetricBuffer:
    """The tracker's metric queue. Every method takes ``lock`` (shared with the tracker's other queues)."""

    def __init__(self, capacity: int, lock: threading.RLock):
        self.capacity = max(int(capacity), 1)
        self.lock = lock
        self.rows: collections.deque = collections.deque()
        self.dropped = 0  # values dropped since the last reset_dropped() (what an outage cost)
        self.inflight = 0  # values taken by the sender and not yet confirmed
        self._drop_warned = False

    def __len__(self) -> int:
        with self.lock:
            return len(self.rows)

    def add(self, rows: list[Row]) -> tuple[int, bool]:
        """Append ``rows``; returns (values queued now, True when this call is the first to drop values)."""
        with self.lock:
            self.rows.extend(rows)
            over = len(self.rows) - self.capacity
            first_drop = False
            if over > 0:
                self._drop_oldest(over)
                if not self._drop_warned:
                    self._drop_warned = first_drop = True
            return len(self.rows), first_drop

    def take(self, n: int) -> list[Row]:
        """Pop up to ``n`` of the oldest values and count them in flight until ``done()`` or ``put_back()``."""
        with self.lock:
            batch = [self.rows.popleft() for _ in range(min(len(self.rows), n))]
            self.inflight = len(batch)
            return batch

    def done(self) -> None:
        self.inflight = 0

    def put_back(self, batch: list[Row]) -> None:
        """A batch that could not be sent goes back in front (the buffer bound still holds)."""
        with self.lock:
            self.rows.extendleft(reversed(batch))
            self._drop_oldest(len(self.rows) - self.capacity)

    def restore(self, rows: list[Row]) -> None:
        """Values saved by a previous process go in front of anything queued since."""
        with self.lock:
            self.rows.extendleft(reversed(rows[-self.capacity:]))

    def drain(self) -> list[Row]:
        """Everything queued, removed from the queue."""
        with self.lock:
            rows = list(self.rows)
            self.rows.clear()
            return rows

    def snapshot(self) -> list[Row]:
        with self.lock:
            return list(self.rows)

    def reset_dropped(self) -> int:
        """The count dropped since the last reset (the outage is over: the next one warns again)."""
        with self.lock:
            dropped, self.dropped = self.dropped, 0
            self._drop_warned = False
            return dropped

    def _drop_oldest(self, n: int) -> None:
        for _ in range(max(n, 0)):
            self.rows.popleft()
            self.dropped += 1


def spill(run_dir: Path, run_id: str | None, rows: list[Row]) -> bool:
    """Append ``rows`` to the run directory's pending file; True when they were saved."""
    if not rows or not run_id:
        return False
    try:
        with open(run_dir / PENDING_FILE, "a", encoding="utf-8") as f:
            for k, v, ts, s in rows:
                f.write(json.dumps({"run_id": run_id, "k": k, "v": v, "t": ts, "s": s}) + "\n")
        return True
    except OSError as exc:
        log.warning("cannot save pending metrics: %s", exc)
        return False


def load_pending(run_dir: Path, run_id: str) -> list[Row]:
    """The values a previous process saved for ``run_id`` (the file is removed once read; other runs' lines,
    which cannot belong here, are dropped with it)."""
    path = run_dir / PENDING_FILE
    if not path.exists():
        return []
    rows = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("run_id") == run_id:
                rows.append((d["k"], float(d["v"]), int(d["t"]), int(d["s"])))
        path.unlink()
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return []
    return rows
