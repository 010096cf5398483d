"""The site runs only app bundles its operator approved (client/approved_apps.py, client/approved_supernode.py).

The check runs inside Flower's real SuperNode loop function (``_pull_and_store_message`` of the pinned
Flower 1.41.0) with a stand-in SuperLink connection: an approved bundle is stored and gets a task (what makes
Flower start a ClientApp), an unapproved or mislabelled one gets an error reply and leaves nothing behind.
tests/test_deployment.py checks the same with real processes.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import sys
import zipfile
from pathlib import Path

import pytest

from client.approved_apps import (
    ACCEPTED_EVENT,
    REFUSED_EVENT,
    AppApproval,
    app_dir_bundle_hash,
    approve,
    bundle_file_hash,
    read_approved,
    read_audit_events,
)
from contract.version import CONTRACT_VERSION, VERSION_FILE
from models.errors import NeurofedError

RUN_ID = 7
NODE_ID = 5
TINY_PYPROJECT = b"""[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "neurofed"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
rounds = 1
"""


def write_tiny_app(folder: Path, contract_version: int = CONTRACT_VERSION) -> Path:
    """A minimal Flower app project (what `flwr build` needs) in ``folder``, of ``contract_version``."""
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "contract").mkdir()
    (folder / VERSION_FILE).write_text(f"CONTRACT_VERSION = {contract_version}\n")
    (folder / "pyproject.toml").write_bytes(TINY_PYPROJECT)
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "client.py").write_text("app = None  # reads the scans\n")
    (folder / "tinyapp" / "server.py").write_text("app = None\n")
    return folder


def build_fab(folder: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(folder)


@pytest.fixture()
def supernode(tmp_path, task_identity, monkeypatch):
    """Flower's SuperNode loop function with the approval check installed, and a one-message SuperLink."""
    from flwr.supernode import start_client_internal as loop

    from client.approved_supernode import HOOK_FUNCTION, install_approval_check

    monkeypatch.setattr(loop, HOOK_FUNCTION, getattr(loop, HOOK_FUNCTION))  # undone after the test
    approval = AppApproval(tmp_path / "approved-apps.txt", tmp_path / "audit.jsonl")
    install_approval_check(approval)
    install_approval_check(approval)  # a second install does not check twice
    return StandInSuperLink(approval)


class StandInSuperLink:
    """Sends one ``query`` message of run ``RUN_ID`` with a given bundle through the patched loop function."""

    def __init__(self, approval: AppApproval) -> None:
        self.approval = approval

    def deliver(self, fab_content: bytes, claimed_hash: str | None = None):
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict
        from flwr.supercore.fab import Fab
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supercore.run import Run
        from flwr.supernode import start_client_internal as loop
        from flwr.supernode.nodestate import NodeStateFactory

        stores = ObjectStoreFactory()
        state, store = NodeStateFactory(objectstore_factory=stores).state(), stores.store()
        state.set_node_id(NODE_ID)
        message = Message(
            RecordDict({"config": ConfigRecord({"x": 1})}),
            dst_node_id=NODE_ID,
            message_type=MessageType.QUERY,
        )
        message.metadata.__dict__["_run_id"] = RUN_ID
        message.metadata.__dict__["_message_id"] = message.object_id
        objects = {k: v.deflate() for k, v in get_all_nested_objects(message).items()}
        claimed = claimed_hash or hashlib.sha256(fab_content).hexdigest()
        run = Run.create_empty(RUN_ID)
        run.fab_id, run.fab_version, run.fab_hash = "neurofed/tinyapp", "1.0.0", claimed
        returned = loop._pull_and_store_message(
            state=state,
            object_store=store,
            node_config={},
            receive=lambda: (message, get_object_tree(message)),
            get_run=lambda run_id: run,
            get_fab=lambda fab_hash, run_id: Fab(claimed, fab_content, {}),
            pull_object=lambda run_id, object_id: objects[object_id],
            confirm_message_received=lambda run_id, message_id: None,
            trusted_entities=None,
        )
        assert returned == RUN_ID
        return state


def test_an_approved_bundle_is_stored_and_gets_a_task(tmp_path, supernode) -> None:
    fab = build_fab(write_tiny_app(tmp_path / "tinyapp"))
    fab_hash = hashlib.sha256(fab).hexdigest()
    approve(supernode.approval.approved_apps, fab_hash, "test")
    state = supernode.deliver(fab)
    assert state.get_run(RUN_ID) is not None and state.get_fab(fab_hash).content == fab
    assert len(state.get_tasks(run_ids=[RUN_ID])) == 1  # Flower's SuperExec starts a ClientApp for it
    assert state.get_messages_legacy(is_reply=True) == []
    (event,) = read_audit_events(supernode.approval.audit_log)
    assert event["event"] == ACCEPTED_EVENT and event["fab_hash"] == fab_hash and event["run_id"] == str(RUN_ID)
    assert event["time"].endswith("+00:00") and event["unix"] > 0


def test_an_unapproved_bundle_is_refused_before_it_is_stored(tmp_path, supernode) -> None:
    from flwr.common.constant import ErrorCode

    approved = approve(supernode.approval.approved_apps, "a" * 64, "an older release")
    fab = build_fab(write_tiny_app(tmp_path / "tinyapp"))
    fab_hash = hashlib.sha256(fab).hexdigest()
    state = supernode.deliver(fab)
    # Nothing of the run is kept, and no task exists: no process ever installs or imports the bundle.
    assert state.get_run(RUN_ID) is None and state.get_fab(fab_hash) is None
    assert len(state.get_tasks(run_ids=[RUN_ID])) == 0
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert fab_hash in reply.error.reason and "a" * 64 in reply.error.reason
    assert "neurofed-site approve" in reply.error.reason
    (event,) = read_audit_events(supernode.approval.audit_log)
    assert event["event"] == REFUSED_EVENT and event["fab_hash"] == fab_hash and event["run_id"] == str(RUN_ID)
    assert event["approved"] == approved and event["approved_apps"] == str(supernode.approval.approved_apps)
    # Approving it takes effect for the next run without a restart.
    approve(supernode.approval.approved_apps, fab_hash, "reviewed")
    assert supernode.deliver(fab).get_run(RUN_ID) is not None


def test_an_approved_bundle_of_another_contract_version_is_refused_naming_both(tmp_path, supernode) -> None:
    newer = build_fab(write_tiny_app(tmp_path / "newer", contract_version=CONTRACT_VERSION + 1))
    approve(supernode.approval.approved_apps, hashlib.sha256(newer).hexdigest(), "a newer release")
    state = supernode.deliver(newer)
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert state.get_run(RUN_ID) is None  # none of its code runs
    reason = reply.error.reason
    assert f"contract version {CONTRACT_VERSION + 1}" in reason and f"version {CONTRACT_VERSION};" in reason
    assert "Upgrading" in reason
    (event,) = read_audit_events(supernode.approval.audit_log)
    assert event["event"] == REFUSED_EVENT and "contract version" in event["reason"]


def test_a_bundle_whose_content_does_not_match_its_hash_is_refused(tmp_path, supernode) -> None:
    fab = build_fab(write_tiny_app(tmp_path / "tinyapp"))
    approved_hash = hashlib.sha256(fab).hexdigest()
    approve(supernode.approval.approved_apps, approved_hash, "test")
    tampered = fab[:-1] + bytes([fab[-1] ^ 1])
    state = supernode.deliver(tampered, claimed_hash=approved_hash)
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and "not to " + approved_hash in reply.error.reason
    assert state.get_run(RUN_ID) is None
    (event,) = read_audit_events(supernode.approval.audit_log)
    assert event["event"] == REFUSED_EVENT and event["fab_hash"] == hashlib.sha256(tampered).hexdigest()
    assert event["claimed_hash"] == [approved_hash]


def test_an_unreadable_approvals_file_refuses_everything(tmp_path, supernode) -> None:
    supernode.approval.approved_apps.write_text("not-a-hash\n")
    state = supernode.deliver(build_fab(write_tiny_app(tmp_path / "tinyapp")))
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and "line 1" in reply.error.reason
    assert state.get_run(RUN_ID) is None


# --- Flower's hook point ---------------------------------------------------------------------------


def test_the_hook_point_is_where_the_pinned_flower_fetches_bundles() -> None:
    """Fails when a Flower upgrade moves the bundle fetch: then client/approved_supernode.py needs a new hook."""
    import flwr

    from client.approved_supernode import FLOWER_VERSION, check_hook_point

    assert flwr.__version__ == FLOWER_VERSION
    check_hook_point()


def test_a_changed_hook_point_stops_the_site_from_starting(monkeypatch) -> None:
    import flwr
    from flwr.supernode import start_client_internal as loop

    from client.approved_supernode import HOOK_FUNCTION, check_hook_point

    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with pytest.raises(NeurofedError, match=r"Flower 1\.42\.0 is installed, not 1\.41\.0.*does not start"):
        check_hook_point()
    monkeypatch.undo()

    def renamed(state, object_store, receive, fetch_fab):  # the fetch is no longer passed as get_fab
        return None

    monkeypatch.setattr(loop, HOOK_FUNCTION, renamed)
    with pytest.raises(NeurofedError, match=r"no parameter\(s\) \['get_fab'\]"):
        check_hook_point()


def test_the_launcher_installs_the_check_then_runs_flowers_supernode(tmp_path, monkeypatch, capsys) -> None:
    from flwr.supernode import start_client_internal as loop

    from client.approved_supernode import HOOK_FUNCTION, main

    monkeypatch.setattr(loop, HOOK_FUNCTION, getattr(loop, HOOK_FUNCTION))
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    approved = tmp_path / "approved-apps.txt"
    approve(approved, "b" * 64, "test")
    seen = {}

    def flower_supernode() -> None:
        seen["argv"] = list(sys.argv)
        seen["checked"] = getattr(getattr(loop, HOOK_FUNCTION), "_neurofed_approval_check", False)

    args = ["--approved-apps", str(approved), "--audit-log", str(tmp_path / "audit.jsonl"), "--"]
    assert main([*args, "--superlink", "h:1"], run_supernode=flower_supernode) == 0
    assert seen == {"argv": ["flower-supernode", "--superlink", "h:1"], "checked": True}
    assert "b" * 64 in capsys.readouterr().out


def test_an_idle_supernode_asks_for_messages_every_half_second_not_every_three(monkeypatch) -> None:
    """Flower 1.41's SuperNode waits 3 s after a pull that brought nothing; the site's waits IDLE_POLL_S.
    Every other wait and clock of its loop is the time module's own."""
    import time

    from flwr.supernode import start_client_internal as loop

    from client.approved_supernode import FLOWER_IDLE_WAIT, IDLE_POLL_S, shorten_idle_wait

    monkeypatch.setattr(loop, "time", loop.time)
    assert FLOWER_IDLE_WAIT in inspect.getsource(loop.start_client_internal)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert shorten_idle_wait()
    loop.time.sleep(3)
    loop.time.sleep(0.5)  # the wait for a reply to push
    assert slept == [IDLE_POLL_S, 0.5] and loop.time.time is time.time


def test_the_launcher_explains_a_refused_key_with_its_fingerprint(tmp_path, monkeypatch, capsys) -> None:
    import logging
    import subprocess

    from flwr.supernode import start_client_internal as loop

    from client.approved_supernode import HOOK_FUNCTION, main
    from client.site_keys import generate_site_keys

    monkeypatch.setattr(loop, HOOK_FUNCTION, getattr(loop, HOOK_FUNCTION))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    approved = tmp_path / "approved-apps.txt"
    approve(approved, "b" * 64, "test")
    pair = generate_site_keys(tmp_path / "keys")

    def refused_supernode() -> None:  # what Flower 1.41 logs and does when the coordinator refuses the key
        logging.getLogger("flwr").error(
            "Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
            "[code: 2004] Failed to activate SuperNode.\nThe SuperNode could not establish a connection."
        )
        raise SystemExit(1)

    args = ["--approved-apps", str(approved), "--audit-log", str(tmp_path / "audit.jsonl"), "--"]
    flower = ["--superlink", "coordinator.example.org:9092", "--auth-supernode-private-key", str(pair.private_key)]
    with pytest.raises(SystemExit):
        main([*args, *flower], run_supernode=refused_supernode)
    err = capsys.readouterr().err
    shown = subprocess.run(["ssh-keygen", "-lf", str(pair.public_key)], capture_output=True, text=True)
    if shown.returncode == 0:  # the fingerprint the coordinator's operator sees
        assert shown.stdout.split()[1] in err
    assert "refused this site's key (SHA256:" in err and "not enrolled" in err and "revoked" in err
    assert "not a network problem" in err


def test_a_certificate_the_site_cannot_verify_is_explained() -> None:
    from client.connection_failure import explain

    flower = ["--superlink", "coord:9092", "--root-certificates", "/etc/neurofed-site/ca.crt"]
    wrong_ca = explain("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get issuer", flower)
    assert "/etc/neurofed-site/ca.crt is not the CA" in wrong_ca and "fingerprint" in wrong_ca
    wrong_name = explain("certificate verify failed: Hostname mismatch, certificate is not valid for 'coord'", flower)
    assert "not a name in the coordinator's certificate" in wrong_name
    assert explain("something else entirely", flower) is None


# --- the approvals file and bundle hashes ------------------------------------------------------------


def test_approve_adds_once_replaces_on_request_and_names_a_bad_line(tmp_path) -> None:
    path = tmp_path / "etc" / "approved-apps.txt"
    assert read_approved(path) == []
    assert approve(path, "A" * 64, "first") == ["a" * 64]
    assert approve(path, "sha256:" + "b" * 64, "second") == ["a" * 64, "b" * 64]
    assert approve(path, "b" * 64, "again") == ["a" * 64, "b" * 64]
    assert path.stat().st_mode & 0o777 == 0o644
    assert "first, approved 20" in path.read_text()
    assert approve(path, "c" * 64, "upgrade", replace=True) == ["c" * 64]
    path.write_text(path.read_text() + "deadbeef\n")
    with pytest.raises(NeurofedError, match=rf"{path} line 4: 'deadbeef' is not a SHA-256"):
        read_approved(path)


def test_flwr_build_is_byte_reproducible_and_one_byte_changes_the_hash(tmp_path) -> None:
    """What `neurofed-site approve --installed` relies on: file times, modes and paths do not matter."""
    first = write_tiny_app(tmp_path / "a" / "tinyapp")
    fab = build_fab(first)
    second = write_tiny_app(tmp_path / "b" / "tinyapp")
    os.utime(second / "tinyapp" / "client.py", (0, 0))
    (second / "tinyapp" / "client.py").chmod(0o600)
    assert build_fab(second) == fab and app_dir_bundle_hash(second) == hashlib.sha256(fab).hexdigest()
    # The bundle a SuperNode unpacks builds to itself again.
    unpacked = tmp_path / "c" / "tinyapp"
    zipfile.ZipFile(io.BytesIO(fab)).extractall(unpacked)
    assert build_fab(unpacked) == fab
    client = second / "tinyapp" / "client.py"
    client.write_bytes(client.read_bytes() + b"#")
    assert build_fab(second) != fab


def test_a_bundle_file_is_hashed_as_flower_does_and_other_files_are_refused(tmp_path) -> None:
    fab = build_fab(write_tiny_app(tmp_path / "tinyapp"))
    (tmp_path / "app.fab").write_bytes(fab)
    assert bundle_file_hash(tmp_path / "app.fab") == hashlib.sha256(fab).hexdigest()
    (tmp_path / "notes.fab").write_text("hello")
    with pytest.raises(NeurofedError, match="not a Flower app bundle"):
        bundle_file_hash(tmp_path / "notes.fab")


def test_site_start_needs_an_approved_bundle_and_runs_the_launcher(tmp_path) -> None:
    from client.approved_supernode import LAUNCHER_MODULE
    from client.site_daemon import SiteDaemonConfig, check_approved_apps, supernode_command

    config = SiteDaemonConfig(
        coordinator="c.example.org:9092",
        ca_cert=tmp_path / "ca.crt",
        private_key=tmp_path / "site.key",
        data_dir=tmp_path,
        budget_epsilon=8,
        state_dir=tmp_path / "state",
        trusted_entities=tmp_path / "trusted.yaml",
    )
    with pytest.raises(NeurofedError, match=r"no approved app bundle.*neurofed-site approve --installed"):
        check_approved_apps(config)
    approve(config.approved_apps_path, "d" * 64, "test")
    assert check_approved_apps(config) == ["d" * 64]
    command = supernode_command(config)
    assert command[:4] == [sys.executable, "-P", "-m", LAUNCHER_MODULE]
    flower = command[command.index("--") + 1 :]
    assert flower[flower.index("--trusted-entities") + 1] == str(tmp_path / "trusted.yaml")
    assert command[command.index("--approved-apps") + 1] == str(tmp_path / "state" / "approved-apps.txt")
    assert command[command.index("--audit-log") + 1] == str(tmp_path / "state" / "audit.jsonl")


def test_a_site_retries_a_failed_heartbeat_at_most_two_seconds_apart(monkeypatch) -> None:
    """Flower 1.41's SuperNode backs off up to 20 s between heartbeat retries while its coordinator is down;
    the site's waits at most HEARTBEAT_RETRY_MAX_S, so it is not taken for gone after a restart."""
    from flwr.supercore import heartbeat
    from flwr.supercore.retry import exponential

    from client.approved_supernode import (
        FLOWER_HEARTBEAT_RETRY,
        HEARTBEAT_RETRY_MAX_S,
        prompt_heartbeat_retry,
    )

    # Flower's own back-off (an earlier test may have run the launcher in this process), undone after the test.
    monkeypatch.setattr(heartbeat, "exponential", exponential)
    assert FLOWER_HEARTBEAT_RETRY in inspect.getsource(heartbeat.HeartbeatSender.__init__)
    flower = heartbeat.HeartbeatSender(lambda: True)._retry_invoker.wait_gen_factory()
    assert max(next(flower) for _ in range(8)) == 20
    assert prompt_heartbeat_retry()
    site = heartbeat.HeartbeatSender(lambda: True)._retry_invoker.wait_gen_factory()
    waits = [next(site) for _ in range(8)]
    assert waits[0] == 1 and max(waits) == HEARTBEAT_RETRY_MAX_S
