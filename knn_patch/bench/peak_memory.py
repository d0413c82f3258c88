"""The process's resident memory and its high-water mark, from Linux's /proc/self/status.

`ru_maxrss` cannot be reset and a child inherits its parent's, so the benchmarks reset VmHWM to the
current RSS (`/proc/self/clear_refs` <- 5) right before the work they measure.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status ("VmRSS", "VmHWM"), in bytes; None where there is none."""
    if not _STATUS.exists():
        return None
    line = next(ln for ln in _STATUS.read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
