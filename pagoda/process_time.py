"""How long this process has run, from the kernel's record of its start: start-up logs count the
interpreter's imports, which run before any of Pagoda's code can start a clock."""

from __future__ import annotations

import os


def seconds_since_process_start() -> float | None:
    """Seconds since this process began (Linux's /proc); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
