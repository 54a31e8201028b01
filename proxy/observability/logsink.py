"""A log writer that never blocks its caller: lines go to a file descriptor from a thread.

The event loop only appends to a queue. A daemon thread writes batches with blocking
`os.write`, so a slow or blocked stdout (a full pipe nobody reads) stalls only that thread.
When more than `limit` bytes are waiting, new lines are dropped whole and counted in
`dropped` (exported as idemproxy_log_dropped_total) instead of growing memory or blocking.
"""

from __future__ import annotations

import atexit
import os
import select
import threading
import time
from collections import deque
from typing import Protocol

DEFAULT_LIMIT = 1024 * 1024
# Writes of whole lines up to PIPE_BUF are atomic on a pipe: a process stopped while its
# output is blocked never leaves half a line behind.
BATCH_BYTES = select.PIPE_BUF
FLUSH_INTERVAL = 0.05
# The writer wakes early once this much is waiting (else every FLUSH_INTERVAL).
WAKE_BYTES = 64 * 1024


class LineWriter(Protocol):
    """Anything that takes complete newline-terminated lines (the sink, or a list in tests).

    `urgent` lines (rare events) are handed to the writer at once instead of with the next batch.
    """

    def write(self, line: bytes, urgent: bool = False) -> None: ...


class LogSink:
    """Call `write` from one thread (the event loop); a background thread does the I/O."""

    def __init__(self, fd: int = 1, limit: int = DEFAULT_LIMIT) -> None:
        self.fd = fd
        self.limit = limit
        self.dropped = 0
        self._queue: deque[bytes] = deque()
        # Single-writer counters: `_queued` by the caller, `_written` by the thread; their
        # difference is what waits, including a batch stuck in a blocked write.
        self._queued = 0
        self._written = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._queued - self._written

    def write(self, line: bytes, urgent: bool = False) -> None:
        if self._queued - self._written + len(line) > self.limit:
            self.dropped += 1
            return
        self._queue.append(line)
        self._queued += len(line)
        if self._thread is None:
            self._start()
        elif (urgent or self._queued - self._written >= WAKE_BYTES) and not self._wake.is_set():
            # Once: until the writer gets the GIL, every further line would take the event's
            # lock and notify again (1.8 % of a pass-through request's CPU when it did).
            self._wake.set()

    def label(self, name: str, value: int) -> None:
        """Add `"name": value` as the last field of every line from now on (a worker process
        names itself). Replaces `write` on this instance, so an unlabelled sink pays nothing."""
        tail = b',"%s":%d}\n' % (name.encode(), value)
        write = self.write

        def labelled(line: bytes, urgent: bool = False) -> None:
            write(line[:-2] + tail, urgent)  # every line ends with b"}\n"

        self.write = labelled  # type: ignore[method-assign]

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for everything queued to be written; True if it was."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.pending > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._thread is None or not self._thread.is_alive():
                return False
            time.sleep(min(0.005, remaining))
            self._wake.set()
        return True

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="idemproxy-log", daemon=True)
        self._thread.start()
        atexit.register(self.flush, 1.0)

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.clear()  # before draining: a line queued after this wakes the next wait
            while queue:
                batch: list[bytes] = []
                size = 0
                while queue and (not batch or size + len(queue[0]) <= BATCH_BYTES):
                    line = queue.popleft()
                    batch.append(line)
                    size += len(line)
                self._write_all(b"".join(batch))
                self._written += size
            self._wake.wait(FLUSH_INTERVAL)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                return  # stdout closed: nothing useful left to do with log lines


STDOUT = LogSink()
"""The process's stdout sink; access log lines and events share it."""
