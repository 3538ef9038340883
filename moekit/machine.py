"""Facts about this machine that the kernels, the engine and the benchmarks share: CPU model, ISA, load."""

from __future__ import annotations

import os
import time


def cpu_info() -> dict:
    """CPU model name and flags from /proc/cpuinfo (empty where there is none)."""
    info = {"model": "", "flags": set()}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not info["model"]:
                info["model"] = value.strip()
            elif key.strip() == "flags" and not info["flags"]:
                info["flags"] = set(value.split())
    except OSError:
        pass
    return info


def isa() -> list[str]:
    """The instruction-set extensions moekit's kernels (and oneDNN) can use on this CPU."""
    flags = cpu_info()["flags"]
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16") if f in flags]


def usable_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_seconds(cpus: set[int]) -> float | None:
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


class OtherLoad:
    """Cores kept busy by other processes between ``start()`` and ``cores()`` (None without /proc)."""

    def __init__(self, cpus: set[int] | None = None):
        self.cpus = cpus or usable_cpus()
        self.start()

    def start(self) -> None:
        self._t, self._busy, self._ours = time.monotonic(), busy_seconds(self.cpus), time.process_time()

    def cores(self) -> float | None:
        busy = busy_seconds(self.cpus)
        if busy is None or self._busy is None:
            return None
        wall = max(time.monotonic() - self._t, 1e-9)
        return max(0.0, (busy - self._busy) - (time.process_time() - self._ours)) / wall
