"""What a server's processes hold, read from /proc: for tests and benchmarks/soak.py."""
from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = "/dev/shm"


def process_figures(pid: int) -> dict:
    """Resident memory (MiB), open descriptors, threads, child processes and bytes of /dev/shm
    mapped (the shared-memory exchange unlinks its files once mapped, so /dev/shm's own listing
    does not show them)."""
    proc = Path(f"/proc/{pid}")
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines()
                  if ":" in line)
    return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "fds": len(os.listdir(proc / "fd")),
            "threads": int(status["Threads"]),
            "children": len(_children(pid)),
            "shm_bytes": _shm_mapped(proc / "maps")}


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return found


def _shm_mapped(maps: Path) -> int:
    total = 0
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(SHM_DIR + "/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            total += end - start
    return total


def shm_files(prefix: str = "wanserve-") -> int:
    """Files left in /dev/shm under the shared-memory exchange's name."""
    return sum(1 for name in os.listdir(SHM_DIR) if name.startswith(prefix))
