"""The site's warm worker, with real processes: the ClientApp forwards a message over the worker's Unix
socket and gets the same reply as when it runs the handler itself; a forwarder without a worker, with a
wrong token or of another contract version is refused, naming what to do; the worker's socket is the
worker user's alone; a killed worker is restarted by `neurofed-site start`'s supervisor."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as site_app
from bench.bench_deployment import free_port
from bench.process_tree import stop_process_tree
from bench.tiny_sites import write_tiny_site
from client.site_worker import worker_command
from client.worker_link import SOCKET_KEY, TOKEN_KEY, receive_frames, send_frames, worker_paths
from client.worker_supervisor import answers
from contract.run_config import RunConfig
from contract.site_task import site_task_record
from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY
from models.errors import NeurofedError

pytestmark = pytest.mark.usefixtures("task_identity")
TORCH_THREADS = 1
ROOT = Path(__file__).resolve().parents[1]
READY_S = 240.0
RUN = RunConfig(
    num_sites=2,
    unseen_sites=1,
    local_steps=2,
    patch_size=16,
    batch_size=1,
    spacing_mm=4.0,
    field_of_view_mm="64,64,64",
    network_preset="tiny",
    dp=False,
    seed=3,
)


def _node_config(root: Path, worker: bool, worker_dir: Path | None = None) -> dict:
    _, sock, token = worker_paths(root / "state")
    if worker_dir is not None:
        sock, token = worker_dir / sock.name, worker_dir / token.name
    return {
        "data-dir": str(root / "site-a"),
        "site-id": "site-a",
        "state-dir": str(root / "state"),
        "cache-dir": str(root / "cache"),
        "require-dp": "false",
        "min-test-subjects": 1,
        CONTRACT_VERSION_KEY: CONTRACT_VERSION,
        **({SOCKET_KEY: str(sock), TOKEN_KEY: str(token)} if worker else {}),
    }


def _config_line(config: dict) -> str:
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _wait(condition, what: str, log: Path | None = None, timeout_s: float = READY_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-3000:] if log else ''}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny training site and its worker process (stopped at the end)."""
    root = tmp_path_factory.mktemp("worker-site")
    write_tiny_site(root / "site-a", 6, 1.0, 0)
    # The worker's folder sits in a folder every user may pass through (as /run does), so that only the
    # worker's own modes keep another user out (test_only_the_workers_user_can_open_its_socket).
    passable = Path(tempfile.mkdtemp(prefix="neurofed-worker-"))
    passable.chmod(0o711)
    config = _node_config(root, worker=True, worker_dir=passable / "worker")
    log = root / "worker.log"
    with log.open("ab") as out:
        worker = subprocess.Popen(
            worker_command(_config_line(config)),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=ROOT,
            start_new_session=True,
        )
    sock = Path(config[SOCKET_KEY])
    try:
        _wait(lambda: answers(sock) or worker.poll() is not None, "the worker's socket", log)
        assert worker.poll() is None, log.read_text()
        yield {
            "root": root,
            "config": config,
            "worker": worker,
            "socket": sock,
            "token": Path(config[TOKEN_KEY]),
            "log": log,
        }
    finally:
        stop_process_tree(worker, signal.SIGTERM, 20.0)
        shutil.rmtree(passable)


def _context(config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _message(kind: str, node_grid) -> Message:
    from server.global_model import initial_state_dict
    from server.strategies import make_strategy, state_dict_to_arrays

    record = ConfigRecord(site_task_record(RUN, server_round=1, run_id="run-1"))
    arrays = state_dict_to_arrays(initial_state_dict(RUN))
    strategy = make_strategy(RUN)
    if kind == "train":
        (message,) = strategy.configure_train(1, arrays, record, node_grid([7]))
    else:
        message = Message(RecordDict({"config": record}), dst_node_id=7, message_type=kind)
    return message


@pytest.mark.parametrize("kind", ["query", "train"])
def test_the_worker_answers_as_the_handler_does_in_process(site, node_grid, kind) -> None:
    message = _message(kind, node_grid)
    in_process = site_app.app(message, _context(_node_config(site["root"], worker=False)))
    started = time.monotonic()
    forwarded = site_app.app(message, _context(site["config"]))
    assert not in_process.has_error() and not forwarded.has_error()
    assert forwarded.metadata.reply_to_message_id == message.metadata.message_id
    assert set(forwarded.content.keys()) == set(in_process.content.keys())
    for name, record in in_process.content.items():
        if name == "arrays":  # the same model, bit for bit
            same = forwarded.content[name]
            assert all(np.array_equal(v.numpy(), same[k].numpy()) for k, v in record.items())
        else:
            expected = {k: v for k, v in record.items() if k != "seconds"}
            assert {k: v for k, v in forwarded.content[name].items() if k != "seconds"} == expected
    if kind == "train":
        assert (
            time.monotonic() - started < 60
        )  # the worker had everything loaded: no import, no preprocessing


def test_the_worker_runs_the_site_rules_whatever_the_forwarded_node_config_says(site, node_grid) -> None:
    """The worker runs under its own node config: one sent by a forwarder (here a data folder that does not
    exist, which would fail in-process) is never read."""
    forged = {**site["config"], "require-dp": "true", "data-dir": "/nonexistent"}
    reply = site_app.app(_message("query", node_grid), _context(forged))
    assert reply.content["site"]["site-id"] == "site-a"


def test_a_forwarder_without_a_worker_says_how_to_start_it(tmp_path, node_grid) -> None:
    config = _node_config(tmp_path, worker=True)
    with pytest.raises(NeurofedError, match="no site worker answers at .*neurofed-site start"):
        site_app.app(_message("query", node_grid), _context(config))


def _raw_request(sock: Path, header: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(sock))
        send_frames(conn, header, b"")
        reply, _ = receive_frames(conn, 1 << 20)
    return reply


def test_a_wrong_token_or_another_contract_version_is_refused(site) -> None:
    token = site["token"].read_text().strip()
    assert (
        "wrong token"
        in _raw_request(site["socket"], {"token": "0" * 64, "contract-version": CONTRACT_VERSION})["error"]
    )
    error = _raw_request(site["socket"], {"token": token, "contract-version": CONTRACT_VERSION + 1})["error"]
    assert f"contract version {CONTRACT_VERSION + 1}" in error and f"version {CONTRACT_VERSION}" in error
    assert "refused a request with a wrong token" in site["log"].read_text()


def _other_user_connects(sock: Path) -> int:
    """Exit code of user nobody's attempt to connect to ``sock`` (13: permission denied)."""
    probe = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX)\n"
        "try: s.connect(sys.argv[1])\nexcept PermissionError: sys.exit(13)\n"
    )
    return subprocess.run(
        ["/usr/bin/python3", "-c", probe, str(sock)], user="nobody", cwd="/", timeout=60
    ).returncode


def test_only_the_workers_user_can_open_its_socket(site) -> None:
    sock = site["socket"]
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(site["token"].stat().st_mode) == 0o600
    if os.geteuid() != 0 or not Path("/usr/bin/python3").is_file():
        pytest.skip("another user's attempt needs root (to switch users) and /usr/bin/python3")
    assert _other_user_connects(sock) == 13  # the worker's folder is 0700
    sock.parent.chmod(0o711)
    try:
        assert _other_user_connects(sock) == 13  # and the socket itself is 0600
        sock.chmod(0o666)
        assert _other_user_connects(sock) == 0  # the probe itself works: only the modes refused it
    finally:
        sock.chmod(0o600)
        sock.parent.chmod(0o700)


def test_the_supervisor_restarts_a_killed_worker(tmp_path, node_grid) -> None:

    write_tiny_site(tmp_path / "site-a", 4, 1.0, 1)
    config = _node_config(tmp_path, worker=True)
    sock = Path(config[SOCKET_KEY])
    script = (
        "import sys; from pathlib import Path\n"
        "from client.worker_supervisor import WorkerSupervisor, supervise\n"
        "w = WorkerSupervisor(sys.argv[1:-1], None, Path(sys.argv[-1]))\n"
        "sys.exit(supervise(w, ['sleep', '600'], None))\n"
    )
    log = tmp_path / "supervisor.log"
    with log.open("ab") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-c", script, *worker_command(_config_line(config)), str(sock)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=ROOT,
            start_new_session=True,
        )
    ready = re.compile(r"site worker (\d+) is ready")
    try:
        _wait(lambda: ready.search(log.read_text()), "the first worker", log)
        first = int(ready.search(log.read_text()).group(1))
        os.kill(first, signal.SIGKILL)
        _wait(lambda: len(ready.findall(log.read_text())) >= 2, "the restarted worker", log)
        assert f"site worker {first} exited with code -9; restarting it" in log.read_text()
        reply = site_app.app(_message("query", node_grid), _context(config))
        assert reply.content["site"]["site-id"] == "site-a"
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0
        assert not answers(sock)
    finally:
        stop_process_tree(supervisor, signal.SIGKILL, 5.0)


def test_the_forwarding_clientapp_imports_no_torch() -> None:
    """A message through the worker costs a process start: the ClientApp module loads no torch, MONAI or
    Opacus (the forwarding path's import time is measured in bench/bench_deployment.py)."""
    check = "import sys, client.app; print(sorted({'torch', 'monai', 'opacus', 'numpy'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", check], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout and "monai" not in out.stdout and "opacus" not in out.stdout, out.stdout


def test_a_socket_path_too_long_for_unix_is_refused_naming_what_to_change(tmp_path) -> None:
    from client.worker_link import check_socket_path

    check_socket_path(tmp_path / "worker.sock")  # a usual path is fine
    with pytest.raises(NeurofedError, match=r"more than the 107 a Unix socket allows: give a shorter --worker-dir"):
        check_socket_path(tmp_path / ("d" * 120) / "worker.sock")


@pytest.mark.parametrize("worker", ["external", "supervised"])
def test_with_an_external_worker_start_never_reads_the_scans(tmp_path, monkeypatch, worker) -> None:
    """The SuperNode may run as a user that cannot read the scans: with ``--worker external`` the worker (the
    data's user) checks the data, and `start` neither looks at nor needs the data folder."""
    import client.site_check
    import client.site_daemon as daemon
    from client.approved_apps import approve
    from client.site_keys import generate_site_keys

    keys = generate_site_keys(tmp_path / "keys")
    (tmp_path / "ca.crt").write_text("a CA certificate")
    approved = tmp_path / "approved-apps.txt"
    approve(approved, "a" * 64, "test")
    config = daemon.SiteDaemonConfig(
        coordinator="127.0.0.1:9092",
        ca_cert=tmp_path / "ca.crt",
        private_key=keys.private_key,
        data_dir=tmp_path / "scans-this-user-cannot-read",
        budget_epsilon=8.0,
        state_dir=tmp_path / "state",
        runtime_port=free_port(),
        approved_apps=approved,
        worker=worker,
    )
    read: list[Path] = []
    monkeypatch.setattr(client.site_check, "run_site_check", lambda folder, **_: read.append(folder) or 1)
    started: list[list[str]] = []
    monkeypatch.setattr(daemon.os, "execve", lambda path, args, env: started.append(args))
    if worker == "external":
        daemon.start_site(config)
        assert read == [] and started, "start read the data, or did not start the SuperNode"
    else:
        with pytest.raises(NeurofedError, match="--data .*not a folder"):
            daemon.start_site(config)


FAKE_WORKER = "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); time.sleep(300)"
DYING_SUPERNODE = (
    "import subprocess, sys, time; "
    "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
    "open(sys.argv[1], 'w').write(str(helper.pid)); time.sleep(1); sys.exit(3)"
)
SUPERVISE = (
    "import sys; from pathlib import Path; from client.worker_supervisor import WorkerSupervisor, supervise; "
    "sock, pidfile = Path(sys.argv[1]), sys.argv[2]; "
    "worker = WorkerSupervisor([sys.executable, '-c', sys.argv[3], str(sock)], None, sock); "
    "sys.exit(supervise(worker, [sys.executable, '-c', sys.argv[4], pidfile], None))"
)


def test_helpers_a_dying_supernode_leaves_in_their_own_session_are_ended_with_the_site(tmp_path) -> None:
    """Flower's SuperNode starts its SuperExec and a message's ClientApp in sessions of their own: killed in
    the middle of a message, it would leave them blocked on a reply. `neurofed-site start` adopts them
    (Linux child subreaper) and ends them when the SuperNode is gone; here a stand-in SuperNode starts such a
    helper and dies."""
    pidfile = tmp_path / "helper.pid"
    done = subprocess.run(
        [sys.executable, "-c", SUPERVISE, str(tmp_path / "w.sock"), str(pidfile), FAKE_WORKER, DYING_SUPERNODE],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 3, done.stdout + done.stderr  # the SuperNode's exit code is the site's
    helper = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(helper, 0)
    assert f"the SuperNode left behind: {helper}" in done.stdout, done.stdout
