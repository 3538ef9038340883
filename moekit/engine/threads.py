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
import time

import torch

from moekit.machine import OtherLoad

log = logging.getLogger(__name__)


class ThreadGovernor:
    """Sets torch's thread count to the cores other processes leave free (re-checked every ``interval`` s).

    ``start()`` when a run begins (the user's thread count is the ceiling), ``update()`` before each
    step, ``restore()`` when it ends. The count found stays for the next run.
    """

    def __init__(self, interval: float = 0.25):
        self.load, self.interval = OtherLoad(), interval
        self.max_threads = self.threads = torch.get_num_threads()
        self._checked = time.monotonic()

    def start(self) -> int:
        self.max_threads = torch.get_num_threads()
        self.threads = min(self.threads, self.max_threads)
        if self.threads != self.max_threads:
            torch.set_num_threads(self.threads)
        return self.update()

    def update(self) -> int:
        """The thread count for the next step (and torch set to it)."""
        now = time.monotonic()
        if now - self._checked >= self.interval:
            others = self.load.cores()
            self.load.start()
            self._checked = now
            if others is not None:
                free = len(self.load.cpus) - others
                want = max(1, min(self.max_threads, int(free + 0.5)))
                if want != self.threads:
                    log.info("other processes keep %.1f of %d cores busy: decoding on %d thread%s", others,
                             len(self.load.cpus), want, "s" * (want > 1))
                    self.threads = want
                    torch.set_num_threads(want)
        return self.threads

    def restore(self) -> None:
        if torch.get_num_threads() != self.max_threads:
            torch.set_num_threads(self.max_threads)
