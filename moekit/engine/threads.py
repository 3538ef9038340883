"""CPU threads that follow the cores other processes leave free.

Every parallel region of a decode step ends when its slowest thread does. On a machine where
another process keeps a core busy, a second kernel thread shares that core, loses it for whole
scheduler time slices, and every region waits for it: measured here (2 vCPUs, a Python spin
loop beside a 742M-parameter MoE), decode fell to a quarter of its speed on 2 threads while 1
thread kept its full speed. :class:`ThreadGovernor` therefore compares, every quarter second,
the CPU time all processes used (``/proc/stat``) with this process's own, and runs torch on as
many threads as there are cores the others leave free (at most the user's thread count).
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds spent busy (not idle, not waiting for I/O) on ``cpus`` since boot; None without /proc."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]
            ticks += sum(values) - values[3] - values[4]  # minus idle and iowait
    return ticks / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """Sets torch's thread count to the cores other processes leave free (re-checked every ``interval`` s).

    ``start()`` when a run begins (the user's thread count is the ceiling), ``update()`` before each
    step, ``restore()`` when it ends. The count found stays for the next run.
    """

    def __init__(self, interval: float = 0.25):
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.interval = interval
        self.max_threads = self.threads = torch.get_num_threads()
        self._last: tuple[float, float, float] | None = None  # (wall, all busy seconds, our CPU seconds)

    def start(self) -> int:
        self.max_threads = torch.get_num_threads()
        self.threads = min(self.threads, self.max_threads)
        return self.update()

    def update(self) -> int:
        """The thread count for the next step (and torch set to it)."""
        now = time.monotonic()
        if self._last is None or now - self._last[0] >= self.interval:
            busy = _busy_seconds(self.cpus)
            if busy is None:
                return self.threads
            sample = (now, busy, time.process_time())
            if self._last is not None:
                wall = now - self._last[0]
                others = max(0.0, (busy - self._last[1]) - (sample[2] - self._last[2])) / wall
                want = max(1, min(self.max_threads, int(len(self.cpus) - others + 0.5)))
                if want != self.threads:
                    log.info("other processes keep %.1f of %d cores busy: decoding on %d thread%s", others,
                             len(self.cpus), want, "s" * (want > 1))
                    self.threads = want
            self._last = sample
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def restore(self) -> None:
        if torch.get_num_threads() != self.max_threads:
            torch.set_num_threads(self.max_threads)
