"""The site's Flower SuperNode, which runs only approved app bundles: ``python -m client.approved_supernode``.

`neurofed-site start` becomes this process (client/site_daemon.py): it installs neurofed's approval check
into Flower's SuperNode, then runs Flower's own ``flower-supernode`` main with the arguments after ``--``.

Where the check sits (Flower 1.41.0, flwr/supernode/start_client_internal.py). The SuperNode's loop calls
``_pull_and_store_message`` for every message it pulls. For a run it does not know yet, that function
fetches the run's bundle (``fab = get_fab(run_info.fab_hash, run_id)``), optionally checks Flower's
signatures (``--trusted-entities``), and only then stores run and bundle and creates the task that makes
Flower's SuperExec start a ClientApp process, which installs the bundle and imports its code. The check
wraps the ``get_fab`` that the loop passes in: the bundle's SHA-256 must be approved (and equal the hash
the SuperLink claims), else the message gets an error reply (``ErrorCode.INVALID_FAB``, as for a failed
signature check) and nothing of the run is stored, so no process ever installs or imports it. Everything
runs in this process, which imports no code of any bundle.

Why a patch: Flower 1.41 has no hook for this, and flwr is pinned to 1.41.0 (pyproject.toml).
`check_hook_point` runs before the patch, at every start and in tests/test_approved_apps.py: it refuses to
start with another Flower version, or if the function, its parameters or the order fetch -> store -> task
changed, instead of silently running unchecked bundles.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable, Sequence
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from client.approved_apps import AppApproval, BundleRefused, read_approved
from client.connection_failure import ConnectionFailureWatch, explain
from models.errors import NeurofedError

LAUNCHER_MODULE = "client.approved_supernode"
FLOWER_VERSION = "1.41.0"
"""The Flower version whose SuperNode the check is written for (pyproject.toml pins it)."""
HOOK_MODULE = "flwr.supernode.start_client_internal"
HOOK_FUNCTION = "_pull_and_store_message"
HOOK_PARAMETERS = ("state", "object_store", "receive", "get_fab")
HOOK_ORDER = ("fab = get_fab(run_info.fab_hash, run_id)", "state.store_fab(fab)", "state.create_task(")
"""Statements of ``HOOK_FUNCTION``, in this order: the bundle is fetched before it is stored and run."""
_CHECKED = "_neurofed_approval_check"


def check_hook_point() -> None:
    """Raise NeurofedError unless Flower's SuperNode fetches bundles where `install_approval_check` hooks."""
    import flwr
    from flwr.supernode import start_client_internal as loop

    where = f"{HOOK_MODULE}.{HOOK_FUNCTION}"
    problem = None
    if flwr.__version__ != FLOWER_VERSION:
        problem = f"Flower {flwr.__version__} is installed, not {FLOWER_VERSION}"
    elif not callable(function := getattr(loop, HOOK_FUNCTION, None)) or not callable(
        getattr(loop, "_insert_message", None)
    ):
        problem = f"{where} or {HOOK_MODULE}._insert_message is missing"
    else:
        function = getattr(function, "__wrapped__", function)
        missing = set(HOOK_PARAMETERS) - set(inspect.signature(function).parameters)
        source = inspect.getsource(function)
        positions = [source.find(statement) for statement in HOOK_ORDER]
        caller = inspect.getsource(loop.start_client_internal)
        if missing:
            problem = f"{where} has no parameter(s) {sorted(missing)}"
        elif -1 in positions or positions != sorted(positions):
            problem = f"{where} no longer runs {' -> '.join(HOOK_ORDER)} in this order"
        elif f"{HOOK_FUNCTION}(" not in caller or "get_fab=get_fab" not in caller:
            problem = f"{HOOK_MODULE}.start_client_internal no longer calls {HOOK_FUNCTION}(get_fab=...)"
    if problem:
        raise NeurofedError(
            f"{problem}: neurofed's check of the app bundles this site runs cannot be installed, so the site "
            f"does not start. Install the Flower version neurofed pins (pip install flwr=={FLOWER_VERSION}) "
            "or a neurofed release made for this Flower"
        )


def install_approval_check(approval: AppApproval) -> None:
    """Wrap Flower's ``_pull_and_store_message`` so that every bundle passes ``approval`` first."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore import log
    from flwr.supernode import start_client_internal as loop

    original = getattr(loop, HOOK_FUNCTION)
    if getattr(original, _CHECKED, False):
        return

    @functools.wraps(original)
    def pull_and_store_message(**kwargs: Any) -> int | None:
        received: list[Message] = []
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def receive_and_keep() -> Any:
            pulled = receive()
            if pulled is not None:
                received.append(pulled[0])
            return pulled

        def get_approved_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            accepted = approval.admit(run_id, {fab_hash, fab.hash_str}, fab.content)
            log(
                INFO,
                "neurofed: app bundle %s of run %s is approved on this site; running it",
                accepted,
                run_id,
            )
            return fab

        try:
            return original(**{**kwargs, "receive": receive_and_keep, "get_fab": get_approved_fab})
        except BundleRefused as refused:
            log(
                ERROR,
                "neurofed: REFUSED run %s: %s (%s)",
                refused.run_id,
                refused.reason,
                approval.approved_apps,
            )
            error = Error(ErrorCode.INVALID_FAB, f"site refused the run: {refused.reason}")
            reply = Message(error, reply_to=received[-1])
            loop._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return refused.run_id

    setattr(pull_and_store_message, _CHECKED, True)
    setattr(loop, HOOK_FUNCTION, pull_and_store_message)


FLOWER_IDLE_WAIT_S = 3
FLOWER_IDLE_WAIT = f"time.sleep({FLOWER_IDLE_WAIT_S})"
"""What Flower 1.41's SuperNode loop (``start_client_internal``) does after a pull that brought no message."""
IDLE_POLL_S = 0.5
"""How long this site's SuperNode waits instead before it asks the SuperLink again: Flower's 3 s adds up
to 3 s to every message a site receives (bench/bench_deployment.py, "message floor")."""


class _ShortIdleWaitTime:
    """The ``time`` module as Flower's SuperNode loop sees it, its idle wait cut to `IDLE_POLL_S`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(IDLE_POLL_S if seconds == FLOWER_IDLE_WAIT_S else seconds)


def shorten_idle_wait() -> bool:
    """Make Flower's SuperNode ask for messages every `IDLE_POLL_S` when idle; False (nothing changed)
    where its loop no longer waits as `FLOWER_IDLE_WAIT` says."""
    from flwr.supernode import start_client_internal as loop

    if FLOWER_IDLE_WAIT not in inspect.getsource(loop.start_client_internal):
        return False
    loop.time = _ShortIdleWaitTime()  # type: ignore[assignment]
    return True


FLOWER_HEARTBEAT_RETRY = "exponential(max_delay=20)"
"""How Flower 1.41's SuperNode retries a failed heartbeat (its coordinator down): up to 20 s apart."""
HEARTBEAT_RETRY_MAX_S = 2
"""This site's longest wait between heartbeat retries. A SuperLink takes a node for gone 60 s after its last
heartbeat (2 x 30 s), and messages to it fail: after a coordinator restart of more than about 40 s, Flower's
20 s back-off left a site that already pulled and trained again "unavailable" for up to 20 s more
(tests/test_deployment.py saw an evaluation lost so). At most 2 s, the site is back with its coordinator."""


def prompt_heartbeat_retry() -> bool:
    """Make Flower's SuperNode retry a failed heartbeat at most `HEARTBEAT_RETRY_MAX_S` apart; False
    (nothing changed) where its heartbeat no longer retries as `FLOWER_HEARTBEAT_RETRY` says."""
    from flwr.supercore import heartbeat

    if FLOWER_HEARTBEAT_RETRY not in inspect.getsource(heartbeat.HeartbeatSender.__init__):
        return False
    flower_backoff = heartbeat.exponential

    def prompt_backoff(**kwargs: Any) -> Any:
        return flower_backoff(**{**kwargs, "max_delay": HEARTBEAT_RETRY_MAX_S})

    heartbeat.exponential = prompt_backoff
    return True


# --- the command -------------------------------------------------------------------------------------


def launcher_command(approved_apps: Path, audit_log: Path, supernode_args: Sequence[str]) -> list[str]:
    """The command line that runs this module with ``flower-supernode``'s ``supernode_args``.

    ``-P``: the working folder is not put on ``sys.path``, so no file there can stand in for neurofed.
    """
    return [
        sys.executable,
        "-P",
        "-m",
        LAUNCHER_MODULE,
        "--approved-apps",
        str(approved_apps),
        "--audit-log",
        str(audit_log),
        "--",
        *supernode_args,
    ]


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, sep, flower = _split_at_separator(list(argv))
    if not sep:
        raise NeurofedError("usage: python -m client.approved_supernode OPTIONS -- FLOWER_SUPERNODE_ARGS")
    parser = argparse.ArgumentParser(prog="python -m client.approved_supernode")
    parser.add_argument("--approved-apps", type=Path, required=True)
    parser.add_argument("--audit-log", type=Path, required=True)
    return parser.parse_args(own), flower


def _split_at_separator(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    if "--" not in argv:
        return argv, False, []
    at = argv.index("--")
    return argv[:at], True, argv[at + 1 :]


def main(argv: Sequence[str] | None = None, run_supernode: Callable[[], None] | None = None) -> int:
    """Check Flower's hook point, install the check, then run ``flower-supernode`` (until it stops)."""
    try:
        args, flower_args = _parse(sys.argv[1:] if argv is None else argv)
        check_hook_point()
        approved = read_approved(args.approved_apps)
    except NeurofedError as exc:
        print(f"neurofed-site start: error: {exc}", file=sys.stderr)
        return 2
    install_approval_check(AppApproval(args.approved_apps, args.audit_log))
    shorten_idle_wait()
    prompt_heartbeat_retry()
    print(
        f"neurofed-site: runs only the app bundles approved in {args.approved_apps} "
        f"({', '.join(approved) or 'none yet'}); audit log {args.audit_log}",
        flush=True,
    )
    if run_supernode is None:
        from flwr.supernode.cli import flower_supernode as run_supernode
    sys.argv = ["flower-supernode", *flower_args]
    watch = ConnectionFailureWatch()
    logging.getLogger("flwr").addHandler(watch)
    try:
        run_supernode()
    except SystemExit as stopped:
        why = explain(watch.text, flower_args) if stopped.code not in (None, 0) else None
        if why is not None:
            print(f"neurofed-site start: error: {why}", file=sys.stderr, flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
