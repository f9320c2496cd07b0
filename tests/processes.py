"""Processes a test started, found and ended by pid (read from /proc): never by name, never anyone else's."""

from __future__ import annotations

import os
import signal
import time


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (read from /proc)."""
    parents, found, frontier = _parents(), [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def end_tree(pids: list[int]) -> None:
    """SIGKILL what is left of a process tree this test started, by pid, and wait until it is gone."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)


def alive(pid: int) -> bool:
    """Running: not gone, not a zombie (an ended child not yet reaped: reparented ones may never be here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
