"""`neurofed-site start` with a warm worker: run the site's worker and its SuperNode, restart a crashed worker.

The worker (client/site_worker.py) starts first; the SuperNode starts once the worker answers on its
socket. A worker that exits is started again (after 1 s, doubling up to a minute while it keeps crashing
within a minute of its start); the message it was handling fails, and the coordinator handles that as
any site failure. The SuperNode's exit ends the site: the worker is stopped and its exit code returned.
SIGTERM / SIGINT stop both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.errors import NeurofedError

READY_TIMEOUT_S = 600.0
"""How long a starting worker may take to import its libraries and check the site (loaded machines)."""
QUICK_CRASH_S = 60.0
MAX_DELAY_S = 60.0


def answers(sock_path: Path) -> bool:
    """Whether a process listens on the Unix socket ``sock_path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(str(sock_path)) == 0


class WorkerSupervisor:
    """Keeps one worker process running."""

    def __init__(self, command: Sequence[str], env: dict[str, str], sock_path: Path) -> None:
        self.command, self.env, self.sock_path = list(command), env, sock_path
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._delay_s = 1.0
        self._due_at: float | None = None

    def start(self) -> None:
        """Start the worker and wait until it answers; NeurofedError when it exits first."""
        self.process = subprocess.Popen(self.command, env=self.env)
        self._started_at = time.monotonic()
        deadline = self._started_at + READY_TIMEOUT_S
        while not answers(self.sock_path):
            if (code := self.process.poll()) is not None:
                raise NeurofedError(
                    f"the site worker exited with code {code} before serving {self.sock_path} (its error is above)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise NeurofedError(f"the site worker did not serve {self.sock_path} within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        _say(f"site worker {self.process.pid} is ready at {self.sock_path}")

    def check(self) -> None:
        """Restart the worker when it has exited (after the back-off delay)."""
        if self.process is None or self.process.poll() is None:
            return
        now = time.monotonic()
        if self._due_at is None:
            quick = now - self._started_at < QUICK_CRASH_S
            self._delay_s = min(self._delay_s * 2, MAX_DELAY_S) if quick else 1.0
            self._due_at = now + self._delay_s
            _say(
                f"site worker {self.process.pid} exited with code {self.process.returncode}; "
                f"restarting it in {self._delay_s:.0f} s"
            )
            return
        if now < self._due_at:
            return
        self._due_at = None
        self.restarts += 1
        try:
            self.start()
        except NeurofedError as exc:
            _say(str(exc))

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


PR_SET_CHILD_SUBREAPER = 36
"""Linux prctl option: orphaned descendants are re-parented to this process instead of to init."""


def adopt_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux; False elsewhere or when refused).

    Flower's SuperNode starts its SuperExec, and that a ClientApp process per message, in sessions of
    their own: when the SuperNode dies in the middle of a message they would live on, blocked on a reply
    nobody takes. Adopted, they come back to `neurofed-site start`, which ends them with the site.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children(keep: set[int]) -> list[int]:
    """This process's children (from /proc), but those in ``keep``."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        try:
            # Fields after the command name (which may hold spaces): state, ppid, ...
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.append(int(entry.name))
    return found


def end_adopted(keep: set[int], grace_s: float = 10.0) -> list[int]:
    """End (SIGTERM, then SIGKILL after ``grace_s``) and reap every child of this process not in ``keep``:
    the SuperNode's helpers it adopted. Returns their pids."""
    adopted = _children(keep)
    for pid in adopted:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    waiting = set(adopted)
    while waiting:
        for pid in list(waiting):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                waiting.discard(pid)
        if waiting and time.monotonic() > deadline:
            for pid in waiting:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        if waiting:
            time.sleep(0.1)
    return adopted


def supervise(worker: WorkerSupervisor, supernode_command: Sequence[str], env: dict[str, str]) -> int:
    """Run the worker, then the SuperNode; keep the worker up until the SuperNode exits or a signal. The
    SuperNode's helper processes left when it ends are ended too (`adopt_orphans`)."""
    stopping: list[int] = []
    adopt_orphans()

    def stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    supernode: subprocess.Popen | None = None
    try:
        worker.start()
        supernode = subprocess.Popen(list(supernode_command), env=env)
        while not stopping and supernode.poll() is None:
            worker.check()
            time.sleep(0.5)
        if supernode.poll() is None:
            supernode.send_signal(stopping[0])
            try:
                supernode.wait(30)
            except subprocess.TimeoutExpired:
                supernode.kill()
        return supernode.wait() if not stopping else 0
    finally:
        if supernode is not None and supernode.poll() is None:
            supernode.kill()
        worker.stop()
        keep = {p.pid for p in (supernode, worker.process) if p is not None}
        if ended := end_adopted(keep):
            _say(f"ended {len(ended)} process(es) the SuperNode left behind: {', '.join(map(str, ended))}")
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say(text: str) -> None:
    print(f"neurofed-site: {text}", flush=True)
