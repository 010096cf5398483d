"""A process and all its descendants, read from /proc (Linux): find them, stop them, sum their memory.

Flower starts helper processes in sessions of their own (SuperExec, Ray's raylet and workers), so ending a
process group is not enough: `stop_process_tree` also kills every descendant found before and after.
Used by the benchmarks and by tests/test_deployment.py and tests/test_flwr_run.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _processes(with_rss: bool = False) -> dict[int, tuple[int, int]]:
    """``{pid: (parent pid, resident bytes)}`` of every process now running (resident 0 unless ``with_rss``)."""
    page = os.sysconf("SC_PAGE_SIZE") if with_rss else 0
    table: dict[int, tuple[int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            resident = int((stat.parent / "statm").read_text().split()[1]) if with_rss else 0
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        table[int(stat.parent.name)] = (parent, resident * page)
    return table


def _tree(pid: int, table: dict[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def descendants(pid: int) -> list[int]:
    """The process ids of every descendant of ``pid`` (children, their children, ...), not ``pid`` itself."""
    return _tree(pid, _processes())


def processes_naming(text: str) -> list[int]:
    """The process ids of every process whose command line contains ``text`` (e.g. a private folder it was
    started with), this process excluded."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended meanwhile
        if int(cmdline.parent.name) != os.getpid() and any(text.encode() in w for w in words):
            found.append(int(cmdline.parent.name))
    return found


def stop_processes(pids: list[int], grace_s: float = 10.0) -> None:
    """End each process of ``pids`` (and every descendant): SIGTERM, then SIGKILL after ``grace_s``."""
    tree = [p for pid in pids for p in (pid, *descendants(pid))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _ended(p) for p in tree):
        time.sleep(0.2)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ended(pid: int) -> bool:
    """A zombie (finished, not yet reaped by its parent) has ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def tree_rss_bytes(pid: int) -> int:
    """Sum of the resident memory (RSS) of ``pid`` and all its descendants."""
    table = _processes(with_rss=True)
    return sum(table[p][1] for p in [pid, *_tree(pid, table)] if p in table)


def stop_process_tree(process: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
    """End ``process`` (started with ``start_new_session=True``) and every descendant.

    Sends ``sig`` to its process group, waits up to ``grace_s`` seconds, then SIGKILLs the group; finally
    SIGKILLs every descendant seen before or after (those in sessions of their own).
    """
    tree = descendants(process.pid)
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    for pid in tree + descendants(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
