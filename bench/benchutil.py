"""Helpers shared by the benchmark scripts: the machine's description and the CPU
other processes took during a measurement.

Importing this module also makes ``toolkit`` importable when the package is not
installed (the scripts run as ``python bench/<script>.py``, so ``bench/`` is on
``sys.path`` and the repository root may not be).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Optional

try:
    import toolkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OtherLoad:
    """CPU time used by *other* processes while a benchmark runs, in cores.

    From ``/proc/stat`` (all busy time) minus this process and its reaped
    children (DataLoader workers are joined at the end of every epoch).  A
    benchmark on a 2-core machine is only meaningful when this is near 0.
    :meth:`cores` is ``None`` where ``/proc/stat`` is unavailable.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> Optional[tuple[float, float, float]]:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))
        return busy, own, time.perf_counter()

    def cores(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None:
            return None
        (b0, o0, t0), (b1, o1, t1) = self._start, end
        return max(0.0, (b1 - b0) - (o1 - o0)) / (t1 - t0)
