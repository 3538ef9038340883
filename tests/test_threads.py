"""The thread governor: torch's thread count follows the cores other processes leave free."""

import subprocess
import sys
import time

import pytest
import torch

from moekit import machine
from moekit.engine.threads import ThreadGovernor


class Clock:
    """Fake wall clock, machine-wide busy seconds and this process's CPU seconds."""

    def __init__(self, monkeypatch):
        self.wall = self.busy = self.ours = 0.0
        monkeypatch.setattr(machine.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(machine.time, "process_time", lambda: self.ours)
        monkeypatch.setattr(machine, "busy_seconds", lambda cpus: self.busy)

    def advance(self, seconds: float, ours: float, others: float) -> None:
        """``seconds`` pass with this process using ``ours`` cores and the others ``others``."""
        self.wall += seconds
        self.ours += ours * seconds
        self.busy += (ours + others) * seconds


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threads_follow_the_free_cores(monkeypatch, two_threads):
    clock = Clock(monkeypatch)
    gov = ThreadGovernor(interval=0.25)
    gov.load.cpus = {0, 1}
    assert gov.start() == 2 and torch.get_num_threads() == 2
    clock.advance(0.3, ours=1.3, others=0.7)  # a spinning process took its share of our 2 threads
    assert gov.update() == 1 and torch.get_num_threads() == 1
    clock.advance(0.1, ours=1.0, others=1.0)
    assert gov.update() == 1  # not re-checked within the interval
    clock.advance(0.3, ours=1.0, others=1.0)  # still busy: stay on one thread
    assert gov.update() == 1
    clock.advance(0.3, ours=1.0, others=0.05)  # the other process ended
    assert gov.update() == 2 and torch.get_num_threads() == 2
    clock.advance(0.3, ours=1.3, others=0.7)
    assert gov.update() == 1
    gov.restore()
    assert torch.get_num_threads() == 2  # the user's count is back after a run
    assert gov.start() == 1  # ... and the next run starts from what was found


def test_the_users_thread_count_is_the_ceiling(monkeypatch, two_threads):
    clock = Clock(monkeypatch)
    gov = ThreadGovernor(interval=0.25)
    gov.load.cpus = {0, 1, 2, 3}
    torch.set_num_threads(2)
    gov.start()
    clock.advance(0.3, ours=2.0, others=0.0)  # 4 free cores, but the user asked for 2
    assert gov.update() == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_other_load_counts_another_process():
    spin = subprocess.Popen([sys.executable, "-c",
                             "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass"])
    try:
        time.sleep(0.3)
        load = machine.OtherLoad()
        time.sleep(1.0)
        others = load.cores()
    finally:
        spin.kill()
        spin.wait()
    assert others > 0.6  # the spinning process kept (most of) a core busy; this one slept
