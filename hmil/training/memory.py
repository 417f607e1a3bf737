"""How much memory this process may still fill: what the OS reports available, within the
limit of its cgroup (a SLURM job's ``--mem``, a container's), which the OS figure ignores.

Deciding whether a cohort's features can stay in memory on the free memory of a 512 GB
node, for a job allowed 16 GB, would get the job killed.
"""

from __future__ import annotations

import os
from pathlib import Path

#: cgroup v1 writes "no limit" as a huge number (2^63 rounded down to the page size).
_NO_LIMIT = 2**60


def available_memory(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes this process may still use (0 where it cannot be told)."""
    available = os_available_memory()
    left = cgroup_memory_left(Path("/proc/self/cgroup"), cgroup_root)
    return available if left is None else max(0, min(available, left))


def os_available_memory() -> int:
    """MemAvailable (Linux: counts reclaimable page cache), else free pages, else 0."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def cgroup_memory_left(proc_cgroup: Path, root: Path) -> int | None:
    """The least headroom (limit − usage) of the process's memory cgroup and its parents,
    v2 (``memory.max``) or v1 (``memory.limit_in_bytes``); None where none sets a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    left = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_file, usage_file = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = (
                root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
            )  # fmt: skip
        else:
            continue
        directory = base / path.lstrip("/")
        for level in (directory, *directory.parents):
            if not level.is_relative_to(base):
                break
            headroom = _headroom(level / limit_file, level / usage_file)
            if headroom is not None:
                left = headroom if left is None else min(left, headroom)
    return left


def _headroom(limit_file: Path, usage_file: Path) -> int | None:
    try:
        limit = limit_file.read_text().strip()
        usage = int(usage_file.read_text())
        if limit == "max" or int(limit) >= _NO_LIMIT:
            return None
        return int(limit) - usage
    except (OSError, ValueError):
        return None
